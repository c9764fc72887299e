"""The join token never travels on a command line: a private file or stdin, each attesting for real;
the argument form, and a token in a file others can read, are refused with one line."""

import os
import subprocess
from pathlib import Path

import pytest

from harness import BIN, Daemon, one_line_error, write_private


@pytest.fixture
def issuer(deployment):
    deployment.start_issuer()
    return deployment


def cmdlines() -> dict[int, str]:
    """Every process's command line, as any local user can read it."""
    out = {}
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                out[int(d.name)] = (d / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            except OSError:
                pass
    return out


def serves_an_svid(d, name: str) -> bool:
    d.entry(f"/agent/{name}", name)
    return d.fetch(name).get("event") == "update"


def run_sidecar(*args: str, stdin: bytes | None = None) -> subprocess.CompletedProcess:
    """A sidecar start that is expected to fail at once."""
    r = subprocess.run([str(BIN / "tessera-sidecar"), "run", *args], capture_output=True, timeout=30, input=stdin)
    return subprocess.CompletedProcess(r.args, r.returncode, r.stdout.decode(), r.stderr.decode())


def test_token_file_attests_and_the_token_is_in_no_process_command_line(issuer):
    token = issuer.token("host-a")
    sidecar = issuer.start_sidecar("host-a", token)
    lines = cmdlines()
    assert sidecar.proc.pid in lines and "tessera-sidecar" in lines[sidecar.proc.pid]
    assert not [pid for pid, line in lines.items() if token in line]
    assert serves_an_svid(issuer, "host-a")


def test_token_on_stdin_attests(issuer):
    token = issuer.token("host-a")
    cfg = issuer.sidecar_config("host-a")
    sidecar = Daemon("sidecar-host-a", [str(BIN / "tessera-sidecar"), "run", "--config", str(cfg),
                                        "--join-token-file", "-"],
                     issuer.sidecar_dir("host-a") / "sidecar.log", issuer.socket("host-a"),
                     stdin=token.encode() + b"\n")
    issuer.sidecars["host-a"] = sidecar.start()
    assert not [pid for pid, line in cmdlines().items() if token in line]
    assert serves_an_svid(issuer, "host-a")


def test_token_in_a_private_config_file_attests(issuer):
    cfg = issuer.sidecar_config("host-a", join_token=issuer.token("host-a"))
    sidecar = Daemon("sidecar-host-a", [str(BIN / "tessera-sidecar"), "run", "--config", str(cfg)],
                     issuer.sidecar_dir("host-a") / "sidecar.log", issuer.socket("host-a"))
    issuer.sidecars["host-a"] = sidecar.start()
    assert serves_an_svid(issuer, "host-a")


@pytest.mark.parametrize("form", [["--join-token", "{t}"], ["--join-token={t}"], ["--join-token"]])
def test_token_as_an_argument_is_refused_and_not_consumed(issuer, form):
    token = issuer.token("host-a")
    cfg = issuer.sidecar_config("host-a")
    r = run_sidecar("--config", str(cfg), *[a.format(t=token) for a in form])
    line = one_line_error(r, "--join-token is refused", "--join-token-file FILE", "--join-token-file -", "join_token")
    assert token not in line
    assert not issuer.sidecar_dir("host-a").joinpath("data").exists()  # nothing started
    issuer.start_sidecar("host-a", token)  # the token was not used up
    assert serves_an_svid(issuer, "host-a")


def test_join_token_in_a_config_file_others_can_read_is_refused(issuer):
    cfg = issuer.sidecar_config("host-a", join_token=issuer.token("host-a"))
    cfg.chmod(0o644)
    one_line_error(run_sidecar("--config", str(cfg)), "join_token", "mode 0644", "chmod 600")
    cfg.chmod(0o640)
    one_line_error(run_sidecar("--config", str(cfg)), "join_token", "mode 0640")
    cfg.chmod(0o600)
    link = cfg.with_name("link.yaml")
    link.symlink_to(cfg)
    one_line_error(run_sidecar("--config", str(link)), "join_token", "symbolic link")
    os.chown(cfg, 65534, 65534)  # nobody's file: whoever wrote it may know the token
    one_line_error(run_sidecar("--config", str(cfg)), "join_token", "owned by uid 65534")


def test_token_file_others_can_read_or_a_link_is_refused(issuer):
    token = issuer.token("host-a")
    cfg = issuer.sidecar_config("host-a")
    tok = write_private(issuer.root / "tok", token)
    tok.chmod(0o604)
    one_line_error(run_sidecar("--config", str(cfg), "--join-token-file", str(tok)),
                   "join_token_file", "mode 0604", "chmod 600")
    tok.chmod(0o600)
    link = issuer.root / "tok-link"
    link.symlink_to(tok)
    one_line_error(run_sidecar("--config", str(cfg), "--join-token-file", str(link)), "join_token_file",
                   "symbolic link")
    cfg2 = issuer.sidecar_config("host-a", join_token_file=str(link))
    one_line_error(run_sidecar("--config", str(cfg2)), "join_token_file", "symbolic link")
    one_line_error(run_sidecar("--config", str(cfg), "--join-token-file", "-", stdin=b""),
                   "--join-token-file: standard input: empty")
    issuer.start_sidecar("host-a", token)  # none of it used the token up
    assert serves_an_svid(issuer, "host-a")


def test_config_with_both_join_token_and_join_token_file_is_refused(issuer):
    cfg = issuer.sidecar_config("host-a", join_token="abc", join_token_file="/nonexistent")
    one_line_error(run_sidecar("--config", str(cfg)), "join_token_file", "not both")
