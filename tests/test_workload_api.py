"""The SPIFFE Workload API end to end: real issuer and sidecar processes, unmodified SPIFFE clients."""

import subprocess
import time

import grpc
import pytest

from harness import as_uid, one_line_error, openssl_verify

from tessera.workload import workload_pb2, workload_pb2_grpc


def test_spiffe_client_fetches_svid_that_chains_to_bundle(running, tmp_path):
    running.entry("/agent/a", "host-a")
    ctx = running.fetch("host-a")
    assert ctx["event"] == "update", ctx
    svid = ctx["svids"][0]
    assert svid["spiffe_id"] == "spiffe://example.org/agent/a"
    (tmp_path / "ca.pem").write_text(ctx["bundle_pem"])
    (tmp_path / "leaf.pem").write_text(svid["svid_pem"])
    r = openssl_verify(tmp_path / "ca.pem", tmp_path / "leaf.pem")
    assert r.returncode == 0 and ": OK" in r.stdout, r.stdout + r.stderr


def test_request_without_security_header_is_invalid_argument(running):
    running.entry("/agent/a", "host-a")
    with grpc.insecure_channel(f"unix://{running.socket('host-a')}") as ch:
        stub = workload_pb2_grpc.SpiffeWorkloadAPIStub(ch)
        with pytest.raises(grpc.RpcError) as e:
            next(iter(stub.FetchX509SVID(workload_pb2.X509SVIDRequest(), timeout=5)))
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "security header" in e.value.details()


def test_spiffe_tls_mtls_between_two_workloads_succeeds_with_authorize_id_and_fails_for_wrong_id(running):
    running.entry("/agent/server", "host-a", "unix:uid:65534")
    running.entry("/agent/client", "host-a", "unix:uid:0")
    sock = str(running.socket("host-a"))
    from harness import free_ports

    port = free_ports(1)[0]
    server = running.spawn_as(65534, "mtls-server", sock, str(port), "spiffe://example.org/agent/client")
    assert server.next(20)["event"] == "listening"
    client = running.spawn("mtls-client", sock, str(port), "spiffe://example.org/agent/server")
    assert client.next(20) == {"event": "reply", "data": "echo:hello"}
    assert server.next(10)["event"] == "served"

    # The server now only accepts a peer it was told about: the client's real ID is refused.
    port2 = free_ports(1)[0]
    server2 = running.spawn_as(65534, "mtls-server", sock, str(port2), "spiffe://example.org/agent/someone-else")
    assert server2.next(20)["event"] == "listening"
    client2 = running.spawn("mtls-client", sock, str(port2), "spiffe://example.org/agent/server")
    assert client2.next(20)["event"] == "error"
    # And a client expecting another server ID refuses the real server.
    port3 = free_ports(1)[0]
    server3 = running.spawn_as(65534, "mtls-server", sock, str(port3), "spiffe://example.org/agent/client")
    assert server3.next(20)["event"] == "listening"
    client3 = running.spawn("mtls-client", sock, str(port3), "spiffe://example.org/agent/not-the-server")
    assert client3.next(20)["event"] == "error"


def test_process_under_uid_with_no_entry_gets_permission_denied(running):
    running.entry("/agent/a", "host-a", "unix:uid:0")
    result = running.fetch("host-a", uid=65534)
    assert result["event"] == "error" and "PERMISSION_DENIED" in result["error"]


def test_metadata_a_caller_sends_cannot_change_its_identity(running):
    running.entry("/agent/a", "host-a", "unix:uid:0")
    script = (
        "import grpc,sys\n"
        "from tessera.workload import workload_pb2 as p, workload_pb2_grpc as g\n"
        f"ch = grpc.insecure_channel('unix://{running.socket('host-a')}')\n"
        "md = (('workload.spiffe.io','true'),('x-uid','0'),('x-spiffe-id','spiffe://example.org/agent/a'),('selector','unix:uid:0'))\n"
        "try:\n"
        "    next(iter(g.SpiffeWorkloadAPIStub(ch).FetchX509SVID(p.X509SVIDRequest(), metadata=md, timeout=5)))\n"
        "    print('GOT-SVID')\n"
        "except grpc.RpcError as e:\n"
        "    print(e.code().name)\n"
    )
    import sys

    r = subprocess.run(as_uid(65534, [sys.executable, "-c", script]),
                       capture_output=True, text=True, timeout=30, cwd=str(running.root))
    assert r.stdout.strip() == "PERMISSION_DENIED", r.stdout + r.stderr


def test_jwt_methods_answer_unimplemented(running):
    running.entry("/agent/a", "host-a")
    with grpc.insecure_channel(f"unix://{running.socket('host-a')}") as ch:
        stub = workload_pb2_grpc.SpiffeWorkloadAPIStub(ch)
        with pytest.raises(grpc.RpcError) as e:
            stub.FetchJWTSVID(workload_pb2.JWTSVIDRequest(audience=["x"]), metadata=(("workload.spiffe.io", "true"),),
                              timeout=5)
    assert e.value.code() == grpc.StatusCode.UNIMPLEMENTED


def test_entry_created_after_start_reaches_open_stream_within_one_second(running):
    import time

    running.entry("/agent/a", "host-a")
    stream = running.stream("host-a")
    first = stream.next(20)
    assert [s["spiffe_id"] for s in first["svids"]] == ["spiffe://example.org/agent/a"]
    running.entry("/agent/b", "host-a")
    created = time.time()
    update = stream.until(lambda m: len(m.get("svids", [])) == 2, timeout=5)
    assert update["t"] - created < 1.0, f"new entry took {update['t'] - created:.3f}s to reach the workload"


def test_deleted_entry_stream_gets_permission_denied_within_one_second(running):
    import time

    entry_id = running.entry("/agent/a", "host-a")
    stream = running.stream("host-a")
    assert stream.next(20)["event"] == "update"
    running.cli("entry", "delete", entry_id)
    deleted = time.time()
    msg = stream.until(lambda m: m["event"] == "error", timeout=5)
    assert "PERMISSION_DENIED" in msg["error"]
    assert msg["t"] - deleted < 1.0, f"deletion took {msg['t'] - deleted:.3f}s to reach the workload"


def test_open_stream_receives_rotated_svid_before_the_old_one_expires(running):
    entry_id = running.entry("/agent/a", "host-a", x509_ttl="20s")
    stream = running.stream("host-a")
    first = stream.next(20)["svids"][0]
    assert 15 <= first["not_after"] - first["not_before"] <= 60  # 20 s plus the clock-skew backdate
    rotated = stream.until(lambda m: m["svids"][0]["serial"] != first["serial"], timeout=25)
    assert rotated["t"] < first["not_after"], "the new SVID must arrive before the old one expires"
    assert rotated["svids"][0]["key_pem"] != first["key_pem"]
    # Rotation happens at half-life, not in a loop: about one new serial per 10 s.
    with running.db() as db:
        count = db.execute("SELECT COUNT(*) FROM issued WHERE entry_id=?", (entry_id,)).fetchone()[0]
    assert 2 <= count <= 4, f"{count} SVIDs minted for one entry in ~12 s"


def test_api_fetch_writes_pem_files_with_a_private_key_file(running, tmp_path):
    running.entry("/agent/a", "host-a")
    from harness import BIN

    out = tmp_path / "svid"
    r = subprocess.run([str(BIN / "tessera-sidecar"), "api", "fetch", "--socket", str(running.socket("host-a")),
                        "--out", str(out)], capture_output=True, text=True, timeout=30)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "spiffe://example.org/agent/a"
    assert (out / "key.pem").stat().st_mode & 0o777 == 0o600
    v = openssl_verify(out / "bundle.pem", out / "svid.pem")
    assert v.returncode == 0, v.stderr
    # The key belongs to the certificate.
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization

    cert = x509.load_pem_x509_certificate((out / "svid.pem").read_bytes())
    key = serialization.load_pem_private_key((out / "key.pem").read_bytes(), None)
    assert cert.public_key().public_numbers() == key.public_key().public_numbers()


def test_api_fetch_without_identity_is_one_line_error(running, tmp_path):
    from harness import BIN

    r = subprocess.run([str(BIN / "tessera-sidecar"), "api", "fetch", "--socket", str(running.socket("host-a")),
                        "--out", str(tmp_path / "x")], capture_output=True, text=True, timeout=30)
    one_line_error(r, "no identity issued", "PERMISSION_DENIED")


def test_what_a_workload_matches_follows_every_entry_change_and_expiry():
    from agent_sidecar.cache import CacheManager
    from tessera.v1 import types_pb2

    now = time.time()

    def entry(eid, selectors, expires_in=3600):
        return types_pb2.Entry(id=eid, spiffe_id=f"spiffe://example.org/{eid}", selectors=selectors, state="active",
                               expires_at=int(now + expires_in), created_at=int(now))

    mine = frozenset({"unix:uid:1000", "unix:gid:1000"})
    cache = CacheManager(sign=None)
    cache.apply_snapshot([entry("a", ["unix:uid:1000"])], b"")
    ids = lambda at=now: [e.id for e in cache.matching(mine, at)]  # noqa: E731
    assert ids() == ["a"]
    cache.apply_upsert(entry("b", ["unix:uid:1000", "unix:gid:1000"], expires_in=60))
    assert ids() == ["a", "b"]
    cache.apply_upsert(entry("a", ["unix:uid:2000"]))  # re-scoped to another user
    assert ids() == ["b"]
    assert ids(now + 120) == []  # b expired since the match was computed
    disabled = entry("b", ["unix:uid:1000"])
    disabled.state = "disabled"
    cache.apply_upsert(disabled)
    assert ids() == []
    cache.apply_upsert(entry("c", ["unix:uid:1000"]))
    cache.apply_delete("c")
    assert ids() == []
    cache.apply_upsert(entry("d", ["unix:uid:1000"]))
    cache.cut_off()
    assert ids() == []
