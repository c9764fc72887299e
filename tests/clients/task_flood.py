"""A workload that floods the sidecar's task API: N task requests at once, 50 per connection
(a connection to the sidecar carries at most 100 streams at once).

  task_flood.py SOCKET N TASK_PREFIX SETTLE_SECONDS SCOPE...

Prints one JSON line once every request has an answer (its first update, or its error) or after
SETTLE_SECONDS, whichever comes first: {"pending": n, "issued": n, "waiting": n, "errors": {CODE: n},
"messages": {CODE: [its distinct messages]}}. Then holds the pending streams open until it is killed.
"""

import asyncio
import json
import sys
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import grpc  # noqa: E402

from tessera.uds import socket_target  # noqa: E402
from tessera.v1 import task_pb2, task_pb2_grpc  # noqa: E402

HEADER = (("workload.spiffe.io", "true"),)
PER_CONNECTION = 50


async def one(stub, task_id: str, scopes: list[str], outcomes: Counter, messages: dict, settled: list) -> None:
    call = stub.StartTask(task_pb2.StartTaskRequest(task_id=task_id, scopes=scopes, ttl_seconds=60),
                          metadata=HEADER)
    try:
        update = await call.read()
        outcomes["pending" if update.WhichOneof("update") == "pending" else "issued"] += 1
    except grpc.aio.AioRpcError as e:
        outcomes[e.code().name] += 1
        messages.setdefault(e.code().name, set()).add(e.details())
    settled.append(call)


async def main() -> None:
    socket_path, n, prefix, settle, *scopes = sys.argv[1:]
    outcomes: Counter = Counter()
    messages: dict = {}
    settled: list = []
    # A channel of its own each, not one shared connection.
    channels = [grpc.aio.insecure_channel(socket_target(socket_path), options=[("grpc.use_local_subchannel_pool", 1)])
                for _ in range((int(n) + PER_CONNECTION - 1) // PER_CONNECTION)]
    stubs = [task_pb2_grpc.TasksStub(ch) for ch in channels]
    jobs = [asyncio.ensure_future(one(stubs[i // PER_CONNECTION], f"{prefix}-{i}", scopes, outcomes, messages,
                                      settled)) for i in range(int(n))]
    await asyncio.wait(jobs, timeout=float(settle))
    errors = {k: v for k, v in outcomes.items() if k not in ("pending", "issued")}
    print(json.dumps({"pending": outcomes["pending"], "issued": outcomes["issued"],
                      "waiting": sum(not j.done() for j in jobs), "errors": errors,
                      "messages": {k: sorted(v) for k, v in messages.items()}}),
          flush=True)
    await asyncio.Event().wait()  # until killed


if __name__ == "__main__":
    asyncio.run(main())
