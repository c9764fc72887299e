"""A small Workload API client for the sidecar's shell commands (`api fetch`)."""

from __future__ import annotations

import os
from pathlib import Path

import grpc

from tessera import pem
from tessera.workload import workload_pb2, workload_pb2_grpc

HEADER = (("workload.spiffe.io", "true"),)


def socket_target(path: str) -> str:
    if path.startswith("unix:"):
        path = path[len("unix://"):] if path.startswith("unix://") else path[len("unix:"):]
    return f"unix://{os.path.abspath(path)}"


def fetch_x509(socket_path: str, timeout: float = 15.0) -> workload_pb2.X509SVIDResponse:
    with grpc.insecure_channel(socket_target(socket_path)) as ch:
        stream = workload_pb2_grpc.SpiffeWorkloadAPIStub(ch).FetchX509SVID(
            workload_pb2.X509SVIDRequest(), metadata=HEADER, timeout=timeout)
        try:
            return next(iter(stream))
        finally:
            stream.cancel()


def write_svid_files(out: Path, chain_der: bytes, key_der: bytes, bundle_der: bytes,
                     crls: list[bytes] | None = None) -> None:
    """svid.pem (leaf first), key.pem (0600), bundle.pem; like `spire-agent api fetch x509`."""
    from cryptography.hazmat.primitives import serialization

    out.mkdir(parents=True, exist_ok=True)
    key = serialization.load_der_private_key(key_der, password=None)
    pem.write_atomic(out / "key.pem", pem.key_pem(key), 0o600)
    pem.write_atomic(out / "svid.pem", pem.certs_pem(pem.split_der(chain_der)), 0o644)
    pem.write_atomic(out / "bundle.pem", pem.certs_pem(pem.split_der(bundle_der)), 0o644)
