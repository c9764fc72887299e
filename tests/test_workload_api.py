"""The SPIFFE Workload API end to end: real issuer and sidecar processes, unmodified SPIFFE clients."""

import os
import subprocess

import grpc
import pytest

from harness import wait_for
from tessera.workload import workload_pb2, workload_pb2_grpc


def openssl_verify(tmp_path, bundle_pem: str, svid_pem: str) -> subprocess.CompletedProcess:
    (tmp_path / "ca.pem").write_text(bundle_pem)
    (tmp_path / "leaf.pem").write_text(svid_pem)
    return subprocess.run(["openssl", "verify", "-CAfile", str(tmp_path / "ca.pem"), str(tmp_path / "leaf.pem")],
                          capture_output=True, text=True)


def test_spiffe_client_fetches_svid_that_chains_to_bundle(running, tmp_path):
    running.entry("/agent/a", "host-a")
    ctx = running.fetch("host-a")
    assert ctx["event"] == "update", ctx
    svid = ctx["svids"][0]
    assert svid["spiffe_id"] == "spiffe://example.org/agent/a"
    r = openssl_verify(tmp_path, ctx["bundle_pem"], svid["svid_pem"])
    assert r.returncode == 0 and ": OK" in r.stdout, r.stdout + r.stderr


def test_request_without_security_header_is_invalid_argument(running):
    running.entry("/agent/a", "host-a")
    with grpc.insecure_channel(f"unix://{running.socket('host-a')}") as ch:
        stub = workload_pb2_grpc.SpiffeWorkloadAPIStub(ch)
        with pytest.raises(grpc.RpcError) as e:
            next(iter(stub.FetchX509SVID(workload_pb2.X509SVIDRequest(), timeout=5)))
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "security header" in e.value.details()
