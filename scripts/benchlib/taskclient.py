"""A workload process for scripts/bench.py: sequential StartTask calls on a sidecar's task API.

It reuses one channel to the sidecar's Unix socket (as a long-lived agent would) and times each
call from StartTask to the credential in hand. It prints one JSON line with the latencies and
serials, then stays alive until stdin closes: its tasks are tied to this process, and ending
them (when it exits) revokes their serials.

  taskclient.py SOCKET SPIFFE_ID SCOPE COUNT
"""

from __future__ import annotations

import json
import sys
import time

import grpc

from agent_sidecar.workload_client import HEADER
from tessera.uds import socket_target
from tessera.v1 import task_pb2, task_pb2_grpc


def start(stub: task_pb2_grpc.TasksStub, req: task_pb2.StartTaskRequest) -> task_pb2.TaskCredential:
    stream = stub.StartTask(req, metadata=HEADER, timeout=30)
    try:
        for update in stream:
            if update.WhichOneof("update") == "credential":
                return update.credential
    finally:
        stream.cancel()
    raise RuntimeError("the sidecar ended the stream without a credential")


def main() -> int:
    socket_path, spiffe_id, scope, count = sys.argv[1:]
    lat, serials = [], []
    with grpc.insecure_channel(socket_target(socket_path)) as ch:
        stub = task_pb2_grpc.TasksStub(ch)
        run = f"{time.time():.0f}"
        for i in range(-3, int(count)):  # three untimed calls warm the channel and the issuer's code paths
            req = task_pb2.StartTaskRequest(task_id=f"bench-{run}-{i}", scopes=[scope], ttl_seconds=600,
                                            spiffe_id=spiffe_id)
            t0 = time.perf_counter()
            cred = start(stub, req)
            t1 = time.perf_counter()
            if not cred.cert_chain or cred.spiffe_id != spiffe_id:
                raise RuntimeError(f"unexpected credential for {cred.spiffe_id!r}")
            if i >= 0:
                lat.append(round((t1 - t0) * 1000, 3))
                serials.append(cred.serial)
    print(json.dumps({"lat_ms": lat, "serials": serials}), flush=True)
    sys.stdin.read()
    return 0


if __name__ == "__main__":
    sys.exit(main())
