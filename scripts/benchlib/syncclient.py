"""Light sidecars for scripts/bench.py: many sidecar identities in one process, each holding an
Issuer.Sync stream over mTLS, recording when each revocation arrives and is applied.

Each identity attests with its own join token (AttestSidecar), then opens Sync with its sidecar
SVID exactly like agent_sidecar. Input: one JSON line on stdin {"issuer", "bundle", "tokens"};
the process prints {"ready": N} once every stream has its snapshot, then, on each later stdin line,
{"received": [[stream, seq, unix_time, committed_at], ...]} for the revocations applied so far.
"""

from __future__ import annotations

import asyncio
import json
import sys
import time
from pathlib import Path

from cryptography import x509

from agent_sidecar.issuer_client import IssuerClient
from tessera.configfile import default_bootstrap_address


def emit(obj: dict) -> None:
    sys.stdout.write(json.dumps(obj) + "\n")
    sys.stdout.flush()


async def stream(i: int, client: IssuerClient, ready: asyncio.Event, snapshots: list[int], received: list,
                 revoked: set[str], total: int) -> None:
    async for ev in client.sync():
        kind = ev.WhichOneof("event")
        if kind == "snapshot":
            snapshots[0] += 1
            if snapshots[0] == total:
                ready.set()
        elif kind == "revocation":
            revoked.update(ev.revocation.serials)  # applied: this light sidecar now refuses these serials
            received.append((i, ev.revocation.seq, time.time(), ev.committed_at))


async def main_async() -> int:
    cfg = json.loads(sys.stdin.readline())
    bundle = tuple(x509.load_pem_x509_certificates(Path(cfg["bundle"]).read_bytes()))
    clients = []
    for token in cfg["tokens"]:
        c = IssuerClient(cfg["issuer"], default_bootstrap_address(cfg["issuer"]), "tessera-issuer")
        await c.connect(await c.attest(token, bundle))
        clients.append(c)
    ready, snapshots, received, revoked = asyncio.Event(), [0], [], set()
    tasks = [asyncio.create_task(stream(i, c, ready, snapshots, received, revoked, len(clients)))
             for i, c in enumerate(clients)]
    await asyncio.wait_for(ready.wait(), 60)
    emit({"ready": len(clients)})
    loop = asyncio.get_running_loop()
    while True:
        line = await loop.run_in_executor(None, sys.stdin.readline)
        if not line:
            break
        failed = [t for t in tasks if t.done()]
        if failed:
            raise RuntimeError(f"{len(failed)} sync streams ended: {failed[0].exception()!r}")
        emit({"received": received})
    for t in tasks:
        t.cancel()
    for c in clients:
        await c.close()
    return 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main_async()))
