"""A small Workload API client for the sidecar's shell commands (`api fetch`)."""

from __future__ import annotations

from pathlib import Path

import grpc

from tessera import pem, safefs
from tessera.uds import socket_target
from tessera.v1 import task_pb2, task_pb2_grpc
from tessera.workload import workload_pb2, workload_pb2_grpc

HEADER = (("workload.spiffe.io", "true"),)


def fetch_x509(socket_path: str, timeout: float = 15.0) -> workload_pb2.X509SVIDResponse:
    with grpc.insecure_channel(socket_target(socket_path)) as ch:
        stream = workload_pb2_grpc.SpiffeWorkloadAPIStub(ch).FetchX509SVID(
            workload_pb2.X509SVIDRequest(), metadata=HEADER, timeout=timeout)
        try:
            return next(iter(stream))
        finally:
            stream.cancel()


def start_task(socket_path: str, task_id: str, scopes: list[str], ttl: int, context: dict[str, str],
               wait: float, spiffe_id: str = "", bind_to_parent: bool = False,
               on_pending=lambda p: None) -> task_pb2.TaskCredential:
    """One task credential; `on_pending` sees each pending update while a human decides."""
    with grpc.insecure_channel(socket_target(socket_path)) as ch:
        stream = task_pb2_grpc.TasksStub(ch).StartTask(
            task_pb2.StartTaskRequest(task_id=task_id, scopes=scopes, ttl_seconds=ttl, context=context,
                                      spiffe_id=spiffe_id, bind_to_parent=bind_to_parent),
            metadata=HEADER, timeout=wait)
        try:
            for update in stream:
                if update.WhichOneof("update") == "pending":
                    on_pending(update.pending)
                else:
                    return update.credential
        finally:
            stream.cancel()
    raise grpc.RpcError("the sidecar ended the stream without a credential")


def end_task(socket_path: str, task_id: str, timeout: float = 30.0) -> list[str]:
    with grpc.insecure_channel(socket_target(socket_path)) as ch:
        resp = task_pb2_grpc.TasksStub(ch).EndTask(task_pb2.EndTaskRequest(task_id=task_id), metadata=HEADER,
                                                   timeout=timeout)
    return list(resp.revoked_serials)


def write_svid_files(out: Path, chain_der: bytes, key_der: bytes, bundle_der: bytes) -> None:
    """svid.pem (leaf first), key.pem (0600), bundle.pem; like `spire-agent api fetch x509`.

    `out` (made 0700 if missing) must be a directory only root and this user can write, reached
    without another user's links; each file is replaced by a rename within it (tessera.safefs)."""
    out = safefs.make_dir(out, "--out", 0o700)
    safefs.atomic_write(out / "key.pem", pem.key_pem_from_der(key_der), 0o600, "--out")
    safefs.atomic_write(out / "svid.pem", pem.certs_pem(pem.split_der(chain_der)), 0o644, "--out")
    safefs.atomic_write(out / "bundle.pem", pem.certs_pem(pem.split_der(bundle_der)), 0o644, "--out")
