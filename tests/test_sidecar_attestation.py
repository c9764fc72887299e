"""Sidecars prove themselves to the issuer: join tokens once, then their SVID; only their own entries."""

import time

import grpc
import pytest

from issuer_client import attest, bootstrap_stub, sidecar_stub, sign
from tessera import pem
from tessera.v1 import issuer_pb2


def test_second_sidecar_cannot_get_an_svid_for_an_entry_parented_to_the_first(running):
    entry_a = running.entry("/agent/a", "host-a")
    running.start_sidecar("host-b")
    as_b = sign(sidecar_stub(running, "host-b"), entry_a)
    assert as_b.status_code == grpc.StatusCode.PERMISSION_DENIED.value[0]
    assert "not registered to spiffe://example.org/tessera/sidecar/host-b" in as_b.error
    assert not as_b.cert_chain
    as_a = sign(sidecar_stub(running, "host-a"), entry_a)
    assert as_a.status_code == 0 and as_a.spiffe_id == "spiffe://example.org/agent/a"


def test_reused_join_token_is_refused(deployment):
    deployment.start_issuer()
    token = deployment.token("host-x")
    first = attest(deployment, token)
    assert first.sidecar_id == "spiffe://example.org/tessera/sidecar/host-x"
    assert pem.split_der(first.svid_chain)
    with pytest.raises(grpc.RpcError) as e:
        attest(deployment, token)
    assert e.value.code() == grpc.StatusCode.PERMISSION_DENIED and "already used" in e.value.details()


def test_expired_join_token_is_refused(deployment):
    deployment.start_issuer()
    token = deployment.token("host-x", ttl="1s")
    time.sleep(1.5)
    with pytest.raises(grpc.RpcError) as e:
        attest(deployment, token)
    assert e.value.code() == grpc.StatusCode.PERMISSION_DENIED and "expired" in e.value.details()


def test_unknown_join_token_and_garbage_csr_are_refused_clearly(deployment):
    deployment.start_issuer()
    with pytest.raises(grpc.RpcError) as e:
        attest(deployment, "not-a-token")
    assert e.value.code() == grpc.StatusCode.PERMISSION_DENIED
    with pytest.raises(grpc.RpcError) as e:
        bootstrap_stub(deployment).AttestSidecar(
            issuer_pb2.AttestSidecarRequest(join_token=deployment.token("h"), csr=b"garbage"), timeout=10)
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "invalid CSR" in e.value.details()


def test_the_bootstrap_listener_cannot_sign(deployment):
    deployment.start_issuer()
    entry = deployment.entry("/agent/a", "host-a")
    # The bootstrap listener accepts no client certificate, so it can only ever attest.
    with pytest.raises(grpc.RpcError) as e:
        sign(bootstrap_stub(deployment), entry)
    assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED


def test_sidecar_renews_its_own_svid_over_mtls_and_keeps_syncing(deployment):
    deployment.start_issuer(sidecar_svid_ttl="20s")
    deployment.start_sidecar("host-a")
    deployment.entry("/agent/a", "host-a")
    from agent_sidecar.issuer_client import IdentityStore

    saved = IdentityStore(deployment.sidecar_dir("host-a") / "data")
    first = saved.load().chain[0].serial_number
    from harness import wait_for

    wait_for(lambda: "sidecar SVID renewed" in deployment.sidecars["host-a"].log(), timeout=25, what="renewal")
    assert saved.load().chain[0].serial_number != first
    stream = deployment.stream("host-a")
    assert stream.next(20)["event"] == "update"
    deployment.entry("/agent/b", "host-a")  # pushed over the sync stream rebuilt with the new SVID
    stream.until(lambda m: len(m.get("svids", [])) == 2, timeout=5)


def test_saved_identity_that_is_unreadable_or_mismatched_is_a_clear_error(tmp_path):
    from agent_sidecar.issuer_client import IdentityStore, SidecarIdentity
    from cautil import write_root
    from tessera import pem, spiffeid, x509svid
    from tessera.errors import ConfigError

    ca = write_root(tmp_path)
    key = x509svid.new_key()
    cert = ca.sign(key.public_key(), spiffeid.parse("spiffe://example.org/tessera/sidecar/h"), 600).cert
    store = IdentityStore(tmp_path / "data")
    (tmp_path / "data").mkdir()
    store.save(SidecarIdentity("spiffe://example.org/tessera/sidecar/h", (cert,), key, (ca.cert,)))
    assert store.identity.stat().st_mode & 0o777 == 0o600
    assert store.load().chain[0] == cert
    store.identity.write_bytes(pem.key_pem(x509svid.new_key()) + pem.certs_pem([cert]))
    with pytest.raises(ConfigError, match="do not match"):
        store.load()
    store.identity.write_bytes(b"garbage")
    with pytest.raises(ConfigError, match="unreadable"):
        store.load()


# -- workloads to the sidecar: the executable is that of the process that connected ----------------


def test_exe_selectors_cannot_be_borrowed_by_a_child_after_the_connecting_process_execs(running):
    """Finding 8: connect, fork, the connecting parent execs /usr/bin/sleep, the child asks. The path
    selector must describe the process that connected as it was then, so the child gets nothing."""
    import json
    import subprocess
    import sys

    from harness import CLIENTS

    running.entry("/agent/sleep", "host-a", "unix:path:/usr/bin/sleep")
    proc = subprocess.Popen([sys.executable, str(CLIENTS / "h2_client.py"), "borrow", str(running.socket("host-a")),
                             "/usr/bin/sleep"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        line = proc.stdout.readline()
    finally:
        proc.kill()
        proc.wait()
    assert line, proc.stderr.read()
    result = json.loads(line)
    assert result["event"] == "error", result
    assert result["status"] == 7  # PERMISSION_DENIED
    assert "executed another program since connecting" in result["message"], result
