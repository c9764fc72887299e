"""Root daemons never follow a link or write through a path another user controls (tessera.safefs).

The attacker is uid 5001: it owns the victims' files, plants links in shared (sticky, world-writable)
directories as itself, and pre-creates directories the daemons are configured to use.
"""

from __future__ import annotations

import os
import socket
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from harness import BIN, as_uid, one_line_error, wait_for
from tessera import safefs

ATTACKER = 5001


# -- helpers ---------------------------------------------------------------------------------


def attacker_file(path: Path, content: bytes = b"", mode: int = 0o644) -> Path:
    path.write_bytes(content)
    os.chmod(path, mode)
    os.chown(path, ATTACKER, ATTACKER)
    return path


def attacker_dir(path: Path, mode: int = 0o755) -> Path:
    path.mkdir()
    os.chmod(path, mode)
    os.chown(path, ATTACKER, ATTACKER)
    return path


def shared_dir(root: Path, name: str = "shared") -> Path:
    """A directory like /tmp: root's, world-writable, sticky."""
    d = root / name
    d.mkdir()
    os.chmod(d, 0o1777)
    return d


def as_attacker(*argv: str) -> None:
    subprocess.run(as_uid(ATTACKER, list(argv)), check=True, capture_output=True, timeout=30)


def untouched(path: Path, content: bytes = b"", mode: int = 0o644) -> None:
    st = os.lstat(path)
    assert stat.S_ISREG(st.st_mode) and st.st_uid == ATTACKER, st
    assert stat.S_IMODE(st.st_mode) == mode, f"{path} was chmod'ed to {stat.S_IMODE(st.st_mode):o}"
    assert path.read_bytes() == content, f"{path} was written to"


def run_sidecar_once(d, name: str, **extra) -> subprocess.CompletedProcess:
    """A sidecar that is expected to refuse to start (no join token: it would use its saved SVID)."""
    sd = d.sidecar_dir(name)
    sd.mkdir(exist_ok=True)
    cfg = {"issuer_address": f"127.0.0.1:{d.port}", "trust_bundle": str(d.bundle_path),
           "data_dir": str(sd / "data"), "socket_path": str(d.socket(name)), **extra}
    (sd / "once.yaml").write_text(yaml.safe_dump(cfg))
    return subprocess.run([str(BIN / "tessera-sidecar"), "run", "--config", str(sd / "once.yaml")],
                          capture_output=True, text=True, timeout=30)


def stop_sidecar(d, name: str) -> Path:
    """Stop a sidecar that attested; returns its data_dir (holding its saved identity)."""
    d.sidecars[name].stop()
    return d.sidecar_dir(name) / "data"


# -- the rules, on real files -------------------------------------------------------------------


def test_tmp_and_o_plus_x_ancestors_are_accepted(tmp_path):
    # pytest's own temp dirs under /tmp (sticky) with o+x added, as the harness does for other uids
    os.chmod(tmp_path, 0o711)
    assert safefs.make_dir(tmp_path / "state", "data_dir") == (tmp_path / "state").resolve()
    assert stat.S_IMODE(os.stat(tmp_path / "state").st_mode) == 0o700


def test_a_directory_another_user_owns_or_can_write_is_refused(tmp_path):
    attacker_dir(tmp_path / "theirs")
    with pytest.raises(safefs.UnsafePath, match=f"data_dir: {tmp_path}/theirs is owned by uid {ATTACKER}"):
        safefs.make_dir(tmp_path / "theirs" / "d", "data_dir")
    for mode, who in ((0o770, "group"), (0o757, "others"), (0o777, "group and others")):
        (tmp_path / "open").mkdir(exist_ok=True)
        os.chmod(tmp_path / "open", mode)
        with pytest.raises(safefs.UnsafePath, match=f"is writable by {who} .mode 0{mode:o}. without the sticky"):
            safefs.resolve_dir(tmp_path / "open" / "sub", "x", create=0o700)
        assert not (tmp_path / "open" / "sub").exists()
    # sticky: fine on the way, not as the directory state is kept in
    os.chmod(tmp_path / "open", 0o1777)
    safefs.make_dir(tmp_path / "open" / "sub", "x")
    with pytest.raises(safefs.UnsafePath, match=r"is writable by group and others \(mode 1777\)$"):
        safefs.make_dir(tmp_path / "open", "x")


def test_links_on_the_way_are_followed_only_when_root_owns_them(deployment):
    tmp_path = deployment.root  # reachable by the attacker's uid
    shared = shared_dir(tmp_path)
    real = safefs.make_dir(tmp_path / "real", "x")
    os.symlink(real, shared / "mine")  # root's link in a sticky directory: like /var/run -> /run
    assert safefs.make_dir(shared / "mine", "x") == real
    as_attacker("ln", "-s", str(real), str(shared / "planted"))
    with pytest.raises(safefs.UnsafePath, match=f"planted is a symbolic link owned by uid {ATTACKER}"):
        safefs.make_dir(shared / "planted", "x")


def test_a_file_is_opened_only_if_it_is_a_regular_file_of_ours_and_never_through_a_link(tmp_path):
    victim = attacker_file(tmp_path / "victim", b"precious")
    os.symlink(victim, tmp_path / "link")
    with pytest.raises(safefs.UnsafePath, match="link is a symbolic link; not following it"):
        safefs.open_regular(tmp_path / "link", os.O_RDWR | os.O_CREAT, what="f")
    with pytest.raises(safefs.UnsafePath, match=f"victim is owned by uid {ATTACKER}"):
        safefs.open_regular(victim, os.O_RDONLY, what="f")
    os.mkfifo(tmp_path / "fifo")
    for flags in (os.O_RDONLY, os.O_WRONLY):  # neither hangs on a FIFO without a peer
        with pytest.raises(safefs.UnsafePath, match="fifo is not a regular file"):
            safefs.open_regular(tmp_path / "fifo", flags, what="f")
    mine = tmp_path / "mine"
    mine.write_bytes(b"x")
    os.link(mine, tmp_path / "alias")
    os.close(safefs.open_regular(mine, os.O_RDONLY, what="f"))
    with pytest.raises(safefs.UnsafePath, match="has 2 hard links"):
        safefs.open_regular(mine, os.O_WRONLY, what="f")
    untouched(victim, b"precious")


def test_atomic_write_creates_a_key_0600_and_renames_within_the_checked_directory(tmp_path):
    victim = attacker_file(tmp_path / "victim", b"precious")
    out = safefs.make_dir(tmp_path / "out", "out")
    os.symlink(victim, out / "key.pem")  # a link at the name is replaced, never written through
    old = os.umask(0)
    try:
        safefs.atomic_write(out / "key.pem", b"KEY", 0o600)
    finally:
        os.umask(old)
    st = os.lstat(out / "key.pem")
    assert stat.S_ISREG(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o600 and st.st_uid == os.geteuid()
    assert sorted(os.listdir(out)) == ["key.pem"]
    untouched(victim, b"precious")


# -- the issuer ---------------------------------------------------------------------------------


def test_links_at_the_audit_file_and_its_position_file_stop_the_issuer_untouched(deployment):
    shared = shared_dir(deployment.root)
    position = attacker_file(deployment.root / "victim-position", b"precious")
    trail = attacker_file(deployment.root / "victim-trail")  # empty: it would pass for a fresh audit file
    as_attacker("ln", "-s", str(position), str(shared / ".audit.jsonl.seq"))
    as_attacker("ln", "-s", str(trail), str(shared / "audit.jsonl"))
    cfg = deployment.issuer_config(audit_file=str(shared / "audit.jsonl"))
    one_line_error(deployment.run_issuer_once(cfg), f"audit_file: {shared}/.audit.jsonl.seq is a symbolic link")
    os.unlink(shared / ".audit.jsonl.seq")
    one_line_error(deployment.run_issuer_once(cfg), f"audit_file: {shared}/audit.jsonl is a symbolic link")
    untouched(position, b"precious")
    untouched(trail)


def test_a_link_put_at_the_audit_file_after_a_rotation_is_not_written_through(deployment):
    shared = shared_dir(deployment.root)
    trail = attacker_file(deployment.root / "victim-trail")
    deployment.start_issuer(audit_file=str(shared / "audit.jsonl"))
    os.rename(shared / "audit.jsonl", shared / "audit.jsonl.1")  # rotated; the name is free for a moment
    as_attacker("ln", "-s", str(trail), str(shared / "audit.jsonl"))
    deployment.token("host-x")  # an audit record to append
    wait_for(lambda: "audit.jsonl is a symbolic link; not following it" in deployment.issuer.log(),
             what="the audit file's error in the issuer log")
    untouched(trail)
    os.unlink(shared / "audit.jsonl")  # the operator removes the link: the file catches up
    wait_for(lambda: (shared / "audit.jsonl").exists() and b"token.create" in (shared / "audit.jsonl").read_bytes(),
             timeout=15, what="the audit file to catch up")


def test_a_data_dir_another_user_created_is_refused_with_its_ca_key(deployment):
    from cautil import write_root

    planted = safefs.make_dir(deployment.root / "issuer", "x")
    write_root(planted)  # the attacker's CA, all of it theirs
    for f in (planted, *planted.iterdir()):
        os.chown(f, ATTACKER, ATTACKER)
    line = one_line_error(deployment.run_issuer_once(deployment.issuer_config()),
                          f"data_dir: {planted} is owned by uid {ATTACKER}")
    assert line.startswith("tessera-issuer: ")
    assert stat.S_IMODE(os.stat(planted).st_mode) == 0o700 and not (planted / "tessera.db").exists()


@pytest.mark.parametrize("mode", [0o770, 0o777, 0o1777], ids=oct)
def test_a_data_dir_writable_by_group_or_others_is_refused(deployment, mode):
    deployment.issuer_dir.mkdir()
    os.chmod(deployment.issuer_dir, mode)
    one_line_error(deployment.run_issuer_once(deployment.issuer_config()),
                   f"data_dir: {deployment.issuer_dir} is writable by")
    assert stat.S_IMODE(os.stat(deployment.issuer_dir).st_mode) == mode  # refused, not silently "fixed"


def test_a_ca_key_another_user_owns_is_refused_even_at_0600(deployment):
    from cautil import write_root

    ca_dir = safefs.make_dir(deployment.root / "ca", "x")
    write_root(ca_dir)
    os.chown(ca_dir / "ca-key.pem", ATTACKER, ATTACKER)
    assert stat.S_IMODE(os.stat(ca_dir / "ca-key.pem").st_mode) == 0o600
    cfg = deployment.issuer_config(ca_cert=str(ca_dir / "ca.pem"), ca_key=str(ca_dir / "ca-key.pem"))
    one_line_error(deployment.run_issuer_once(cfg), f"ca_key: {ca_dir}/ca-key.pem is owned by uid {ATTACKER}")
    os.chown(ca_dir / "ca-key.pem", 0, 0)
    os.rename(ca_dir / "ca-key.pem", ca_dir / "real-key.pem")
    os.symlink(ca_dir / "real-key.pem", ca_dir / "ca-key.pem")
    one_line_error(deployment.run_issuer_once(cfg), f"ca_key: {ca_dir}/ca-key.pem is a symbolic link")


def test_the_admin_socket_does_not_replace_what_another_user_put_at_its_name(deployment):
    shared = shared_dir(deployment.root)
    sock = shared / "admin.sock"
    as_attacker(sys.executable, "-c",
                f"import socket; socket.socket(socket.AF_UNIX).bind({str(sock)!r})")
    one_line_error(deployment.run_issuer_once(deployment.issuer_config(admin_socket=str(sock))),
                   f"{sock} exists and is not a socket owned by uid 0")
    assert os.lstat(sock).st_uid == ATTACKER and stat.S_ISSOCK(os.lstat(sock).st_mode)
    open_dir = deployment.root / "open"
    open_dir.mkdir()
    os.chmod(open_dir, 0o777)  # anyone could swap the socket for theirs
    one_line_error(deployment.run_issuer_once(deployment.issuer_config(admin_socket=str(open_dir / "a.sock"))),
                   f"{open_dir} is writable by group and others (mode 0777) without the sticky bit")


# -- the sidecar ---------------------------------------------------------------------------------


def test_a_sidecar_data_dir_another_user_owns_or_can_write_is_refused(deployment):
    data = deployment.sidecar_dir("host-a") / "data"
    data.parent.mkdir()
    attacker_dir(data, 0o700)
    one_line_error(run_sidecar_once(deployment, "host-a"), f"data_dir: {data} is owned by uid {ATTACKER}")
    os.chown(data, 0, 0)
    os.chmod(data, 0o777)
    one_line_error(run_sidecar_once(deployment, "host-a"), f"data_dir: {data} is writable by group and others")


def test_a_saved_sidecar_key_another_user_owns_or_linked_is_refused(running):
    data = stop_sidecar(running, "host-a")
    identity = data / "sidecar-identity.pem"
    os.chown(identity, ATTACKER, ATTACKER)
    one_line_error(run_sidecar_once(running, "host-a"), f"data_dir: {identity} is owned by uid {ATTACKER}")
    os.chown(identity, 0, 0)
    os.rename(identity, data / "elsewhere.pem")
    os.symlink(data / "elsewhere.pem", identity)
    one_line_error(run_sidecar_once(running, "host-a"), f"data_dir: {identity} is a symbolic link")


def test_the_sidecar_does_not_write_outputs_through_another_users_link(running):
    stop_sidecar(running, "host-a")
    shared = shared_dir(running.root)
    theirs = attacker_dir(running.root / "theirs")
    victim = attacker_file(theirs / "bundle.pem", b"precious")
    as_attacker("ln", "-s", str(theirs), str(shared / "out"))
    one_line_error(run_sidecar_once(running, "host-a", output_dir=str(shared / "out")),
                   f"output_dir: {shared}/out is a symbolic link owned by uid {ATTACKER}")
    untouched(victim, b"precious")
    assert sorted(os.listdir(theirs)) == ["bundle.pem"]


def test_api_fetch_does_not_write_a_key_through_another_users_link(deployment):
    from agent_sidecar.workload_client import write_svid_files
    from tessera import pem, x509svid

    shared = shared_dir(deployment.root)
    theirs = attacker_dir(deployment.root / "theirs", 0o777)
    as_attacker("ln", "-s", str(theirs), str(shared / "svid"))
    key_der = pem.key_pkcs8_der(x509svid.new_key())
    with pytest.raises(safefs.UnsafePath, match=f"--out: {shared}/svid is a symbolic link owned by uid {ATTACKER}"):
        write_svid_files(shared / "svid", b"", key_der, b"")
    assert os.listdir(theirs) == []


def test_a_socket_path_with_a_link_to_a_directory_of_ours_still_works(tmp_path):
    # Not an attack: the rules must still take root's own links on the way (/var/run -> /run).
    from tessera.uds import bind_unix

    real = safefs.make_dir(tmp_path / "run", "x", 0o755)
    os.symlink(real, tmp_path / "varrun")
    s = bind_unix(tmp_path / "varrun" / "w.sock", 0o666)
    try:
        with socket.socket(socket.AF_UNIX) as c:
            c.connect(str(tmp_path / "varrun" / "w.sock"))
    finally:
        s.close()
    s = bind_unix(tmp_path / "varrun" / "w.sock", 0o666)  # a stale socket of ours is replaced
    s.close()
