"""File mode: `tessera-sidecar api watch` keeps PEM files current for a real nginx and reloads it.

nginx and the watch run as one unprivileged user (the application's), nginx as a non-daemon
master with its own prefix, config and pid file in the test's directory (no system service).
"""

from __future__ import annotations

import datetime as dt
import os
import random
import shutil
import signal
import socket
import ssl
import subprocess
import time
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from harness import BIN, as_uid, free_ports, wait_for

APP_UID, CLIENT_UID, OTHER_UID = 23451, 23452, 23453
NGINX = shutil.which("nginx") or "/usr/sbin/nginx"

pytestmark = pytest.mark.skipif(not os.path.exists(NGINX), reason="nginx is not installed (scripts/test installs it)")

NGINX_CONF = """\
daemon off;
master_process on;
worker_processes 1;
pid {prefix}/nginx.pid;
error_log {prefix}/error.log info;
events {{ worker_connections 64; }}
http {{
    access_log off;
    client_body_temp_path {prefix}/tmp/body;
    proxy_temp_path {prefix}/tmp/proxy;
    fastcgi_temp_path {prefix}/tmp/fastcgi;
    uwsgi_temp_path {prefix}/tmp/uwsgi;
    scgi_temp_path {prefix}/tmp/scgi;
    server {{
        listen 127.0.0.1:{port} ssl;
        ssl_certificate {out}/svid.pem;
        ssl_certificate_key {out}/key.pem;
        ssl_client_certificate {out}/bundle.pem;
        ssl_crl {out}/crl.pem;
        ssl_verify_client on;
        location / {{ return 200 "$ssl_client_verify $ssl_client_serial\\n"; }}
    }}
}}
"""


def owned_dir(path: Path, uid: int) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    os.chown(path, uid, uid)
    return path


def watch_argv(d, out: Path, *reload: str) -> list[str]:
    return [str(BIN / "tessera-sidecar"), "api", "watch", "--socket", str(d.socket("host-a")), "--out", str(out),
            *reload]


def start_watch(d, uid: int, out: Path, *reload: str) -> subprocess.Popen:
    log = open(d.root / f"watch-{uid}.log", "ab")
    with log:
        return subprocess.Popen(as_uid(uid, watch_argv(d, out, *reload)), stdout=log, stderr=subprocess.STDOUT)


def watch_log(d, uid: int) -> str:
    return (d.root / f"watch-{uid}.log").read_text(errors="replace")


def leaf_serial(pem_path: Path) -> str:
    return f"{x509.load_pem_x509_certificates(pem_path.read_bytes())[0].serial_number:x}"


def fetch_client(d, out: Path) -> str:
    """The client identity's SVID into `out` (as the client's user); its serial."""
    owned_dir(out, CLIENT_UID)
    r = subprocess.run(as_uid(CLIENT_UID, [str(BIN / "tessera-sidecar"), "api", "fetch", "--socket",
                                           str(d.socket("host-a")), "--out", str(out)]),
                       capture_output=True, text=True, timeout=30)
    assert r.returncode == 0, r.stderr
    return leaf_serial(out / "svid.pem")


def request(port: int, client: Path, bundle: Path) -> tuple[int, str]:
    """GET / over mTLS: (HTTP status, or 0 if the handshake failed; serial of the server's certificate)."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False  # SVIDs name a SPIFFE ID, not a host; the chain is still verified
    ctx.load_verify_locations(cafile=str(bundle))
    ctx.load_cert_chain(str(client / "svid.pem"), str(client / "key.pem"))
    with socket.create_connection(("127.0.0.1", port), timeout=5) as raw, ctx.wrap_socket(raw) as s:
        served = f"{x509.load_der_x509_certificate(s.getpeercert(binary_form=True)).serial_number:x}"
        try:
            s.sendall(b"GET / HTTP/1.0\r\n\r\n")
            data = b""
            while chunk := s.recv(4096):
                data += chunk
        except (ssl.SSLError, ConnectionError):
            return 0, served  # TLS 1.3: a refused client certificate can surface as an alert after the handshake
    return int(data.split(b" ", 2)[1]), served


class Nginx:
    def __init__(self, root: Path, out: Path, uid: int):
        self.prefix = owned_dir(root / "nginx", uid)
        owned_dir(self.prefix / "tmp", uid)
        self.port = free_ports(1)[0]
        self.conf = self.prefix / "nginx.conf"
        self.conf.write_text(NGINX_CONF.format(prefix=self.prefix, port=self.port, out=out))
        self.pid_file = self.prefix / "nginx.pid"
        self.uid = uid
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        with open(self.prefix / "stdout.log", "ab") as log:
            self.proc = subprocess.Popen(
                as_uid(self.uid, [NGINX, "-p", str(self.prefix), "-e", str(self.prefix / "error.log"),
                                  "-c", str(self.conf)]), stdout=log, stderr=subprocess.STDOUT)
        wait_for(lambda: self.pid_file.exists() or self.proc.poll() is not None, 15, what="nginx to start")
        assert self.proc.poll() is None, self.log()

    def log(self) -> str:
        return (self.prefix / "error.log").read_text(errors="replace")[-4000:]

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGQUIT)  # graceful shutdown
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


@pytest.fixture
def web(running, tmp_path):
    """A server identity (16 s SVIDs, rotated at half-life) served by nginx from file mode."""
    d = running
    d.entry("/svc/web", "host-a", f"unix:uid:{APP_UID}", x509_ttl="16s")
    d.entry("/agent/client", "host-a", f"unix:uid:{CLIENT_UID}")
    out = owned_dir(tmp_path / "web-svid", APP_UID)
    nginx = Nginx(tmp_path, out, APP_UID)
    watch = start_watch(d, APP_UID, out, "--signal", "HUP", "--pid-file", str(nginx.pid_file))
    try:
        wait_for(lambda: (out / "crl.pem").exists(), 20, what=f"file mode's first set:\n{watch_log(d, APP_UID)}")
        nginx.start()
        yield d, out, nginx, watch
    finally:
        nginx.stop()
        watch.terminate()
        watch.wait(10)


def test_nginx_serves_mtls_from_file_mode_and_follows_revocation_and_rotation(web, tmp_path):
    d, out, nginx, watch = web
    bundle = out / "bundle.pem"
    assert (out / "key.pem").stat().st_mode & 0o777 == 0o600
    assert (out / "key.pem").stat().st_uid == APP_UID

    client = tmp_path / "client"
    revoked = fetch_client(d, client)
    status, first_server = request(nginx.port, client, bundle)
    assert status == 200, nginx.log()
    assert first_server == leaf_serial(out / "svid.pem")

    d.cli("revoke", "--serial", revoked, "--reason", "test")
    t0 = time.monotonic()
    wait_for(lambda: request(nginx.port, client, bundle)[0] != 200, 2.0, interval=0.05,
             what="nginx to refuse the revoked client certificate")
    refused_after = time.monotonic() - t0
    print(f"revoked client refused by nginx {refused_after:.2f}s after `tessera revoke` returned")

    # The identity itself is still trusted: the sidecar replaces the revoked serial with a fresh SVID.
    fresh = tmp_path / "client2"
    wait_for(lambda: fetch_client(d, fresh) != revoked, 10, interval=0.2, what="a fresh client SVID")
    assert request(nginx.port, fresh, bundle)[0] == 200

    # Rotation of nginx's own SVID: requests keep succeeding while nginx reloads onto the new one.
    statuses, served = [], first_server
    deadline = time.monotonic() + 30
    while served == first_server and time.monotonic() < deadline:
        status, served = request(nginx.port, fresh, bundle)
        statuses.append(status)
        time.sleep(0.02)
    assert served != first_server, f"nginx still serves {first_server}:\n{watch_log(d, APP_UID)}"
    for _ in range(20):  # and after the old workers are gone
        status, served = request(nginx.port, fresh, bundle)
        statuses.append(status)
    assert statuses and set(statuses) == {200}, statuses
    assert served == leaf_serial(out / "svid.pem")
    print(f"{len(statuses)} requests across the rotation, all 200")
    assert "reload signalled" in watch_log(d, APP_UID)
    assert watch.poll() is None


def test_watch_on_a_revoked_identity_removes_key_and_exits_3(running, tmp_path):
    d = running
    entry = d.entry("/agent/other", "host-a", f"unix:uid:{OTHER_UID}")
    out = owned_dir(tmp_path / "out", OTHER_UID)
    watch = start_watch(d, OTHER_UID, out)
    wait_for(lambda: (out / "key.pem").exists(), 20, what="the first set")
    d.cli("revoke", "--entry", entry, "--reason", "test")
    assert watch.wait(10) == 3
    lines = watch_log(d, OTHER_UID).strip().splitlines()
    assert lines[-1].startswith("tessera-sidecar: identity revoked or not issued"), lines[-1]
    assert "Traceback" not in watch_log(d, OTHER_UID)
    assert not os.path.lexists(out / "key.pem") and not os.path.lexists(out / "svid.pem")
    assert not list(out.glob(".svid-*/key.pem"))
    assert (out / "bundle.pem").read_bytes().startswith(b"-----BEGIN CERTIFICATE")
    assert (out / "crl.pem").read_bytes().startswith(b"-----BEGIN X509 CRL")


def test_failed_writes_and_reloads_are_logged_and_the_watch_goes_on_across_a_sidecar_restart(running, tmp_path):
    d = running
    d.entry("/agent/other", "host-a", f"unix:uid:{OTHER_UID}")
    victim = d.entry("/agent/victim", "host-a", "unix:uid:65534")
    out = owned_dir(tmp_path / "out", 0)  # not writable by the watch's user, yet
    calls = owned_dir(tmp_path / "calls", OTHER_UID)
    script = tmp_path / "reload.sh"
    script.write_text(f"#!/bin/sh\necho \"$1\" >> {calls}/log\nexit 7\n")
    script.chmod(0o755)
    watch = start_watch(d, OTHER_UID, out, "--exec", f"{script} 'one arg'")
    try:
        wait_for(lambda: "cannot write the SVID files" in watch_log(d, OTHER_UID), 20, what="the failed write")
        os.chown(out, OTHER_UID, OTHER_UID)
        wait_for(lambda: (calls / "log").exists(), 20, what=f"the first reload:\n{watch_log(d, OTHER_UID)}")
        assert (calls / "log").read_text() == "one arg\n"  # argv from shlex, no shell word splitting
        wait_for(lambda: '"exit_code": 7' in watch_log(d, OTHER_UID), 5, what="the failure logged")

        d.sidecars["host-a"].stop()
        time.sleep(1.5)  # the watch notices and backs off
        d.start_sidecar("host-a")
        # A CRL change after the restart reaches the files and the reload command: the stream is back.
        before = (out / "crl.pem").read_bytes()
        d.cli("revoke", "--entry", victim, "--reason", "test")
        wait_for(lambda: (out / "crl.pem").read_bytes() != before, 15, what="crl.pem after the sidecar restart")
        wait_for(lambda: len((calls / "log").read_text().splitlines()) >= 2, 5, what="a reload after the change")
        assert watch.poll() is None
        assert "retrying" in watch_log(d, OTHER_UID)
    finally:
        watch.terminate()
        assert watch.wait(10) == 0


# -- the set of files: one writer, always a matching key and certificate --------------------------

def svid_sets(n: int) -> list[tuple[bytes, bytes, bytes]]:
    """n (chain, key, bundle) in the Workload API's DER, each with its own key, from a real CA."""
    from issuer.ca.authority import SigningAuthority
    from tessera import pem, spiffeid, x509svid

    ca_key = x509svid.new_key()
    ca = SigningAuthority(x509svid.build_ca(ca_key, "example.org", dt.timedelta(days=1)), ca_key, "example.org")
    sets = []
    for _ in range(n):
        key = x509svid.new_key()
        signed = ca.sign(key.public_key(), spiffeid.parse("spiffe://example.org/a"), 3600)
        sets.append((pem.der_concat([signed.cert]), pem.key_pkcs8_der(key), pem.der_concat([ca.cert])))
    return sets


def pair_matches(out: Path) -> bool:
    cert = x509.load_pem_x509_certificates((out / "svid.pem").read_bytes())[0]
    key = serialization.load_pem_private_key((out / "key.pem").read_bytes(), None)
    return cert.public_key().public_numbers() == key.public_key().public_numbers()


def test_a_writer_killed_at_any_point_leaves_a_key_and_certificate_that_match(tmp_path):
    from agent_sidecar.workload_client import write_svid_files

    out = tmp_path / "out"
    sets = svid_sets(4)
    rng = random.Random(17)
    for n in range(30):
        pid = os.fork()
        if pid == 0:  # the writer: publishes sets one after another until it is killed
            try:
                i = n
                while True:
                    write_svid_files(out, *sets[i % len(sets)], [])
                    i += 1
            finally:
                os._exit(1)
        time.sleep(rng.uniform(0.005, 0.05))
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        if (out / "svid.pem").exists() and (out / "key.pem").exists():
            assert pair_matches(out), f"kill {n}: svid.pem and key.pem do not match"


def test_a_pid_file_names_one_process_or_nothing_is_signalled(tmp_path):
    from agent_sidecar.watch import read_pid

    pid_file = tmp_path / "app.pid"
    for bad in ("0", "-1", "1", "", "12 13", "abc", "9" * 80):
        pid_file.write_text(bad + "\n")
        with pytest.raises(ValueError):  # kill(2) takes 0 / -1 as "my group" / "everyone"
            read_pid(pid_file)
    pid_file.write_text("4242\n")
    assert read_pid(pid_file) == 4242
    planted = tmp_path / "planted.pid"
    planted.symlink_to(pid_file)  # a link could aim the signal at any process
    with pytest.raises(ValueError, match="link"):
        read_pid(planted)


def test_publishing_replaces_planted_links_and_never_writes_through_them(tmp_path):
    from agent_sidecar.workload_client import read_published, write_svid_files

    out = tmp_path / "out"
    out.mkdir()
    victim = tmp_path / "victim"
    victim.write_text("untouched")
    (tmp_path / "victim-dir").mkdir()
    for name in ("key.pem", "svid.pem", "bundle.pem", "crl.pem"):
        (out / name).symlink_to(victim)
    (out / ".live").symlink_to(tmp_path / "victim-dir")
    assert read_published(out) == {}  # not a set of ours: nothing is taken as already written
    chain, key, bundle = svid_sets(1)[0]
    write_svid_files(out, chain, key, bundle, [])
    assert victim.read_text() == "untouched" and not list((tmp_path / "victim-dir").iterdir())
    # No CRL known yet: no crl.pem (nginx must not start with an empty one), the planted link is gone.
    assert pair_matches(out) and set(read_published(out)) == {"key.pem", "svid.pem", "bundle.pem"}
    assert not os.path.lexists(out / "crl.pem")
    live = out / os.readlink(out / ".live")
    assert live.parent == out and (live / "key.pem").stat().st_mode & 0o777 == 0o600
    assert sorted(p.name for p in out.iterdir() if p.name.startswith(".svid-")) == [live.name]
