"""What one local user can hold of the sidecar's Workload API socket is bounded (issue 13, finding 3).

Real sidecar processes; the attacker is a raw HTTP/2 client (tests/clients/h2_client.py) running as
another uid, the legitimate caller the unmodified `spiffe` client.
"""

import json
import socket
import subprocess
import sys
import threading
import time

import pytest

from harness import BIN, CLIENTS, Daemon, as_uid

FLOODER, LEGIT = 5001, 5002


def vm_rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))


def h2_client(*args: str, uid: int | None = None, timeout: float = 60) -> dict:
    argv = [sys.executable, str(CLIENTS / "h2_client.py"), *args]
    r = subprocess.run(argv if uid is None else as_uid(uid, argv), capture_output=True, text=True, timeout=timeout)
    lines = [json.loads(x) for x in r.stdout.splitlines() if x.startswith("{")]
    assert lines, r.stderr[-2000:]
    return lines[-1]


def closed_by_peer(sock: socket.socket, timeout: float) -> bool:
    """True once the sidecar has closed `sock` (anything it sent first, such as GOAWAY, is skipped)."""
    sock.settimeout(timeout)
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            if sock.recv(65536) == b"":
                return True
    except (ConnectionResetError, BrokenPipeError):
        return True
    except TimeoutError:
        pass
    return False


def test_flood_by_one_uid_leaves_memory_bounded_and_another_uids_fetch_fast(running):
    """Finding 3: idle connections, half-open streams and a 1 GiB message per connection, from one uid.
    The sidecar's RSS stays within a fixed bound and a fetch by another uid completes within a second."""
    running.entry("/agent/legit", "host-a", f"unix:uid:{LEGIT}")
    pid = running.sidecars["host-a"].proc.pid
    assert running.fetch("host-a", uid=LEGIT)["event"] == "update"
    before = vm_rss_kib(pid)
    peak = [before]
    stop = threading.Event()

    def sample():
        while not stop.is_set():
            peak[0] = max(peak[0], vm_rss_kib(pid))
            time.sleep(0.05)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    argv = [sys.executable, str(CLIENTS / "h2_client.py"), "flood", str(running.socket("host-a")), "12"]
    flooder = subprocess.Popen(as_uid(FLOODER, argv), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        time.sleep(5)  # the flood is in place: connections open, streams sent
        assert flooder.poll() is None, flooder.stderr.read()
        started = time.monotonic()
        during = running.fetch("host-a", uid=LEGIT)
        wall = time.monotonic() - started
        out, err = flooder.communicate(timeout=60)
    finally:
        stop.set()
        sampler.join()
        if flooder.poll() is None:
            flooder.kill()
            flooder.wait()
    report = json.loads(out.splitlines()[-1])
    grew = (peak[0] - before) / 1024
    print(f"\nflood {report}; sidecar VmRSS {before / 1024:.0f} MiB before, peak {peak[0] / 1024:.0f} MiB "
          f"(+{grew:.0f} MiB); fetch by uid {LEGIT} during the flood: {during.get('elapsed', -1):.3f}s "
          f"in the client, {wall:.2f}s with the client's start-up")
    assert during["event"] == "update", during
    assert during["elapsed"] < 1.0
    assert report["connections"] > 64, report  # the flood did reach the sidecar
    assert grew < 64, f"the sidecar grew by {grew:.0f} MiB under one uid's flood"
    assert running.sidecars["host-a"].proc.poll() is None


def test_request_longer_than_the_limit_is_refused_from_its_length_prefix(running):
    """A call announcing 8 MiB is refused with RESOURCE_EXHAUSTED after at most a window's worth was sent,
    by a caller with no entry at all."""
    result = h2_client("oversize", str(running.socket("host-a")), str(8 << 20), uid=FLOODER)
    assert result["status"] == 8, result  # RESOURCE_EXHAUSTED
    assert "larger than the sidecar's limit of 65536 bytes" in result["message"]
    assert result["sent"] <= 2 * 65536, result


def test_header_block_longer_than_the_limit_closes_the_connection(running):
    """h2 would keep 64 CONTINUATION frames (about 1 MiB) of an unfinished header block per connection."""
    result = h2_client("headers", str(running.socket("host-a")), str(64 * 1024), uid=FLOODER)
    assert result["closed"], result


def test_connections_calls_and_silence_are_bounded_per_uid(deployment):
    deployment.start_issuer()
    deployment.start_sidecar("host-a", socket_limits={
        "connections_per_uid": 4, "pending_per_uid": 2, "first_request_timeout": "2s", "request_timeout": "2s",
        "idle_timeout": "3s"})
    deployment.entry("/agent/legit", "host-a", f"unix:uid:{LEGIT}")
    path = str(deployment.socket("host-a"))

    # A fifth connection of one uid is closed at once; another uid's fetch is served meanwhile.
    held = []
    for _ in range(4):
        s = socket.socket(socket.AF_UNIX)
        s.connect(path)
        held.append(s)
    with socket.socket(socket.AF_UNIX) as fifth:
        fifth.connect(path)
        assert closed_by_peer(fifth, 1.5)
    assert deployment.fetch("host-a", uid=LEGIT)["event"] == "update"
    # Connections that never start a call are closed after first_request_timeout.
    assert all(closed_by_peer(s, 6) for s in held)

    # Calls that never send their request: past pending_per_uid refused, the rest timed out.
    result = h2_client("halfopen", path, "4", uid=FLOODER)
    statuses = sorted(result["statuses"])
    assert statuses == [4, 4, 8, 8], result  # DEADLINE_EXCEEDED twice, RESOURCE_EXHAUSTED twice
    assert any("no complete request message within 2s" in m for m in result["messages"]), result


def test_sidecar_raises_its_descriptor_soft_limit_to_the_hard_limit(running):
    sidecar = running.sidecars["host-a"]
    sidecar.stop()
    cfg = running.sidecar_dir("host-a") / "sidecar.yaml"
    daemon = Daemon("sidecar-low-nofile", ["prlimit", "--nofile=1024:", "--", str(BIN / "tessera-sidecar"), "run",
                                           "--config", str(cfg)],
                    running.sidecar_dir("host-a") / "sidecar.log", running.socket("host-a")).start()
    running.sidecars["host-a"] = daemon
    with open(f"/proc/{daemon.proc.pid}/limits") as f:
        line = next(x for x in f if x.startswith("Max open files"))
    soft, hard = line.split()[3:5]
    assert soft == hard, line


def test_connection_limit_is_lowered_to_fit_the_descriptor_limit():
    from agent_sidecar.socket_server import SocketLimits, fit_to_descriptors

    assert fit_to_descriptors(SocketLimits(), 1 << 20) == SocketLimits()
    fitted = fit_to_descriptors(SocketLimits(connections=1024, connections_per_uid=64), 356)
    assert (fitted.connections, fitted.connections_per_uid) == (50, 50)  # (356 - 256 reserved) / 2 each


@pytest.mark.parametrize("key,value,problem", [
    ("max_request_bytes", 64 << 20, "between 5 and 4194304"),
    ("connections_per_uid", 0, "between 1 and 1000000"),
    ("idle_timeout", "forever", "invalid duration"),
    ("conections", 5, "unknown key"),
])
def test_bad_socket_limits_are_refused_naming_the_key(tmp_path, key, value, problem):
    import yaml

    from agent_sidecar import config
    from tessera.errors import ConfigError

    path = tmp_path / "sidecar.yaml"
    path.write_text(yaml.safe_dump({"issuer_address": "127.0.0.1:1", "trust_bundle": "/b.pem", "data_dir": "/d",
                                    "socket_path": "/s.sock", "socket_limits": {key: value}}))
    with pytest.raises(ConfigError, match=f"socket_limits.{key}: .*{problem}"):
        config.load(path)
