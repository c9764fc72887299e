"""The issuer under connection and join floods: bounded descriptors, a working admin socket, bounded logs
and audit trail.

End-to-end tests run the issuer under a small descriptor limit (prlimit) so a few hundred connections
are more than it has; the pure rules (caps, token buckets, denial aggregation) are tested directly.
"""

from __future__ import annotations

import os
import resource
import socket
import ssl
import time

import grpc
import pytest
import yaml
from harness import BIN, Daemon, wait_for
from test_logs import Clock

from issuer.identity.attestation import JoinDenials
from tessera.errors import ConfigError
from tessera.fdlimits import RESERVED, connection_caps
from tessera.ratelimit import KeyedTokenBuckets, peer_host
from tessera.v1 import issuer_pb2, issuer_pb2_grpc

NOFILE = 256  # under it: 96 reserved, bootstrap 20, listen 140, admin 32
FLOOD = 600  # connections per port: more than the issuer has descriptors


@pytest.fixture(autouse=True)
def _our_descriptors():
    """The flood needs more descriptors than the default soft limit of the test process."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, min(hard, 8192)), hard))
    yield
    resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def start_issuer_limited(d, nofile: str, **extra) -> Daemon:
    """The deployment's issuer, run under `prlimit --nofile=SOFT:HARD`."""
    d.issuer_cfg_path.write_text(yaml.safe_dump(d.issuer_config(**extra)))
    d.issuer = Daemon("issuer", ["prlimit", f"--nofile={nofile}", str(BIN / "tessera-issuer"), "run", "--config",
                                 str(d.issuer_cfg_path)], d.root / "issuer.log", d.admin_socket).start()
    d.bundle_path.write_text(d.cli("bundle", "show").stdout)
    return d.issuer


def open_idle(port: int, n: int, host: str = "127.0.0.1", within: float = 15.0) -> list[socket.socket]:
    """Up to n TCP connections that never send a byte, opened within `within` seconds."""
    socks = []
    deadline = time.monotonic() + within
    while len(socks) < n and time.monotonic() < deadline:
        s = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
        s.settimeout(0.5)
        try:
            s.connect((host, port))
            socks.append(s)
        except OSError:
            s.close()
    return socks


def open_unix_idle(path, n: int, within: float = 15.0) -> list[socket.socket]:
    socks = []
    deadline = time.monotonic() + within
    while len(socks) < n and time.monotonic() < deadline:
        s = socket.socket(socket.AF_UNIX)
        s.settimeout(0.5)
        try:
            s.connect(str(path))
            socks.append(s)
        except OSError:
            s.close()
    return socks


def junk_handshakes(port: int, n: int, within: float = 10.0) -> None:
    """n connections that fail the TLS handshake (plain HTTP/1) or send garbage inside TLS."""
    ctx = ssl.create_default_context()
    ctx.check_hostname, ctx.verify_mode = False, ssl.CERT_NONE
    deadline = time.monotonic() + within
    for i in range(n):
        if time.monotonic() > deadline:
            break
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5) as s:
                if i % 2:
                    s.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
                    s.recv(100)
                else:
                    with ctx.wrap_socket(s) as t:
                        t.sendall(b"not http/2 " * 20)
                        t.recv(100)
        except OSError:
            pass


def close_all(socks) -> None:
    for s in socks:
        s.close()


def fd_count(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def soft_nofile(pid: int) -> int:
    for line in open(f"/proc/{pid}/limits"):
        if line.startswith("Max open files"):
            return int(line.split()[3])
    raise AssertionError("no open-files line")


def timed_entry_list(d) -> float:
    t0 = time.monotonic()
    d.cli("entry", "list", "--output", "json", timeout=10)
    return time.monotonic() - t0


def answers_at_once(d, quiet: float) -> bool:
    """The admin socket answers an operator at once: within 3 s, plus slack for a loaded host (`quiet`: the same
    command timed before the flood; on a busy 2-core host the CLI's own start-up alone can take seconds)."""
    return timed_entry_list(d) < 3.0 + 2 * quiet


# -- the daemons' own limit -------------------------------------------------------------------------------

def test_issuer_and_sidecar_raise_their_soft_descriptor_limit_to_the_hard_limit(deployment):
    d = deployment
    start_issuer_limited(d, "200:1024")
    assert soft_nofile(d.issuer.proc.pid) == 1024
    sidecar = d.start_sidecar("host-a")
    sidecar.stop()  # restarted under the limit from its saved SVID
    sidecar.argv = ["prlimit", "--nofile=200:1024", *[a for a in sidecar.argv if not a.startswith("--join-token")]]
    sidecar.start()
    assert soft_nofile(sidecar.proc.pid) == 1024


def test_issuer_refuses_to_start_with_too_few_descriptors_with_one_line(deployment):
    path = deployment.root / "issuer.yaml"
    path.write_text(yaml.safe_dump(deployment.issuer_config()))
    import subprocess
    r = subprocess.run(["prlimit", "--nofile=100:100", str(BIN / "tessera-issuer"), "run", "--config", str(path)],
                       capture_output=True, text=True, timeout=30)
    assert r.returncode == 2, r.stderr
    assert "RLIMIT_NOFILE" in r.stderr and "Traceback" not in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1, r.stderr


# -- connection floods ------------------------------------------------------------------------------------

def test_idle_connection_flood_leaves_admin_socket_and_sidecars_working_and_log_small(deployment):
    d = deployment
    start_issuer_limited(d, f"{NOFILE}:{NOFILE}", handshake_timeout="2s")
    d.start_sidecar("host-a")
    d.entry("/agent/a", "host-a")
    assert d.fetch("host-a")["event"] == "update"
    quiet = timed_entry_list(d)
    log_before = d.issuer.log_path.stat().st_size
    flood = []
    try:
        flood += open_idle(d.port + 1, FLOOD)  # the bootstrap port, as reproduced
        flood += open_idle(d.port, FLOOD)  # and the sidecars' mTLS port
        junk_handshakes(d.port + 1, 150)
        junk_handshakes(d.port, 150)
        assert len(flood) > NOFILE
        pid = d.issuer.proc.pid
        assert fd_count(pid) < NOFILE - 16, "the listeners' caps keep headroom"
        # Operators can still act, at once.
        assert answers_at_once(d, quiet)
        # The established sidecar still syncs (the new entry is pushed) and gets it signed.
        d.entry("/agent/b", "host-a")
        wait_for(lambda: len(d.fetch("host-a").get("svids", [])) == 2, timeout=20, what="second SVID via sync")
        # A new sidecar joins once the handshake timeout has freed the bootstrap slots the flood held.
        d.start_sidecar("host-b")
        d.entry("/agent/c", "host-b")
        assert d.fetch("host-b")["event"] == "update"
        grown = d.issuer.log_path.stat().st_size - log_before
        assert grown < 16_000, f"log grew by {grown} bytes under the flood:\n{d.issuer.log()[-3000:]}"
    finally:
        close_all(flood)
    # After the flood everything works as before, the listeners included.
    wait_for(lambda: fd_count(d.issuer.proc.pid) < 80, timeout=15, what="flood connections closed")
    assert answers_at_once(d, quiet)
    d.start_sidecar("host-c")
    d.entry("/agent/d", "host-c")
    assert d.fetch("host-c")["event"] == "update"


def test_admin_socket_flood_is_capped_and_the_admin_socket_recovers(deployment):
    d = deployment
    start_issuer_limited(d, f"{NOFILE}:{NOFILE}")
    d.start_sidecar("host-a")
    d.entry("/agent/a", "host-a")
    assert d.fetch("host-a")["event"] == "update"
    token = d.token("host-b")
    d.entry("/agent/b", "host-b")
    quiet = timed_entry_list(d)
    pid = d.issuer.proc.pid
    flood = open_unix_idle(d.admin_socket, 2 * NOFILE)
    try:
        time.sleep(0.5)
        assert fd_count(pid) < NOFILE - 100, "admin connections are capped far below the limit"
        # The issuer's other work goes on: a new sidecar joins and gets its entry's SVID signed.
        d.start_sidecar("host-b", token)
        assert d.fetch("host-b")["event"] == "update"
    finally:
        close_all(flood)
    assert answers_at_once(d, quiet)


# -- join floods --------------------------------------------------------------------------------------------

def attest_with(channel, token: str) -> grpc.StatusCode:
    from tessera import x509svid
    try:
        issuer_pb2_grpc.IssuerStub(channel).AttestSidecar(
            issuer_pb2.AttestSidecarRequest(join_token=token, csr=x509svid.make_csr(x509svid.new_key())),
            timeout=10)
        return grpc.StatusCode.OK
    except grpc.RpcError as e:
        return e.code()


def test_bad_token_flood_is_rate_limited_per_peer_and_aggregated_in_the_audit_trail(deployment):
    d = deployment
    # Dual-stack bootstrap listener: the flood comes from ::1, the honest sidecar from 127.0.0.1.
    start_issuer_limited(d, "1024:1024", bootstrap_address=f"[::]:{d.port + 1}")
    creds = grpc.ssl_channel_credentials(root_certificates=d.bundle_path.read_bytes())
    valid = d.token("host-c")  # made before the flood: the flooder's bucket refills while a CLI call runs
    attempts = 200
    with grpc.secure_channel(f"[::1]:{d.port + 1}", creds,
                             options=[("grpc.ssl_target_name_override", "tessera-issuer")]) as ch:
        codes = [attest_with(ch, "00" * 32) for _ in range(attempts)]
        denied = codes.count(grpc.StatusCode.PERMISSION_DENIED)
        limited = codes.count(grpc.StatusCode.UNAVAILABLE)
        assert denied + limited == attempts
        assert 10 <= denied <= 15 and limited >= attempts - 15, (denied, limited)
        # The flooding peer stays limited, even with a valid token, and on a new connection. (Asked at once: its
        # bucket gains a token every 3 s, which a loaded host can spend on a sidecar's start.)
        assert attest_with(ch, valid) == grpc.StatusCode.UNAVAILABLE
    with grpc.secure_channel(f"[::1]:{d.port + 1}", creds,
                             options=[("grpc.ssl_target_name_override", "tessera-issuer")]) as ch:
        with pytest.raises(grpc.RpcError) as e:
            issuer_pb2_grpc.IssuerStub(ch).AttestSidecar(issuer_pb2.AttestSidecarRequest(join_token="x"), timeout=10)
        assert "too many refused join attempts from ::/64" in e.value.details()
    # Another peer's valid token works meanwhile.
    d.start_sidecar("host-b")
    d.entry("/agent/b", "host-b")
    assert d.fetch("host-b")["event"] == "update"
    refused = [r for r in d.audit("sidecar.attest") if r["decision"] == "deny"]
    assert len(refused) == 1, "one durable record for the first refusal of the window"
    d.issuer.stop()  # a shutdown records the counts of the open window
    refused = [r for r in d.audit("sidecar.attest") if r["decision"] == "deny"]
    assert len(refused) == 2
    aggregate = refused[1]
    # Every refusal is counted: the flood, the valid token sent while limited and the last call, but the first.
    assert aggregate["details"]["count"] == attempts + 1, aggregate
    assert aggregate["details"]["reasons"] == {"join token is not valid": denied - 1, "rate limited": limited + 2}
    audit_lines = [line for line in (d.issuer_dir / "audit.jsonl").read_text().splitlines()
                   if '"sidecar.attest"' in line and '"deny"' in line]
    assert len(audit_lines) == 2


# -- the rules ---------------------------------------------------------------------------------------------

def test_connection_caps_stay_below_the_descriptor_limit():
    for nofile in (RESERVED + 64, 256, 1024, 4096, 65536, 1 << 20):
        caps = connection_caps(nofile)
        assert caps.sidecar + caps.bootstrap + RESERVED <= nofile
        assert caps.admin < RESERVED and caps.bootstrap >= 8 and caps.sidecar >= 8
    assert connection_caps(1024).bootstrap == 116 and connection_caps(1024).sidecar == 812
    assert connection_caps(1 << 20).bootstrap == 1024 and connection_caps(1 << 20).sidecar == 50_000
    with pytest.raises(ConfigError, match="RLIMIT_NOFILE"):
        connection_caps(RESERVED + 63)


def test_token_bucket_allows_a_burst_then_the_rate_per_key():
    clock = Clock()
    b = KeyedTokenBuckets(rate=0.5, burst=3, max_keys=2, clock=clock)
    assert [b.take("a") for _ in range(3)] == [0.0, 0.0, 0.0]
    assert b.take("a") == pytest.approx(2.0)
    assert b.take("b") == 0.0  # another key has its own bucket
    clock.now += 2
    assert b.take("a") == 0.0 and b.take("a") > 0
    b.refund("b")  # an attempt that went well gives its token back
    assert [b.take("b") for _ in range(3)] == [0.0, 0.0, 0.0] and b.take("b") > 0
    b.take("c")  # a third key evicts the least recently seen one ("a", empty), which starts full again
    assert [b.take("a") for _ in range(3)] == [0.0, 0.0, 0.0]


def test_peer_host_keys_ipv4_by_address_and_ipv6_by_its_slash_64():
    assert peer_host("ipv4:10.1.2.3:5555") == "10.1.2.3"
    assert peer_host("ipv6:[2001:db8::1:2]:443") == "2001:db8::/64"
    assert peer_host("ipv6:[2001:db8::ffff:9]:443") == "2001:db8::/64"
    assert peer_host("ipv6:[::ffff:127.0.0.1]:80") == "127.0.0.1"
    assert peer_host("ipv6:%5B::1%5D:41234") == "::/64"  # as grpc-core writes it


def test_join_denials_record_the_first_per_peer_and_window_then_one_count():
    clock, written = Clock(), []
    j = JoinDenials(written.extend, window=60, records_per_window=2, clock=clock)
    for _ in range(50):
        j.deny("10.0.0.1", "ipv4:10.0.0.1:1", "join token is not valid")
    j.deny("10.0.0.1", "ipv4:10.0.0.1:1", "rate limited")
    assert len(written) == 1 and written[0].reason == "join token is not valid"
    j.deny("10.0.0.2", "ipv4:10.0.0.2:1", "join token is not valid")  # a second address: its own record
    for i in range(30):  # past records_per_window: other addresses are counted together
        j.deny(f"10.0.1.{i}", f"ipv4:10.0.1.{i}:1", "join token is not valid")
    assert len(written) == 2
    j.flush()
    assert len(written) == 2, "nothing is due before the window ends"
    clock.now += 60
    j.flush()
    counts = {e.actor.details["peer"]: e.details for e in written[2:]}
    assert counts["10.0.0.1"]["count"] == 50
    assert counts["10.0.0.1"]["reasons"] == {"join token is not valid": 49, "rate limited": 1}
    assert counts["*"]["count"] == 30
    assert "10.0.0.2" not in counts  # one refusal: its first record says it all
    j.deny("10.0.0.1", "ipv4:10.0.0.1:1", "join token is not valid")  # a new window: a new first record
    assert len(written) == 5
