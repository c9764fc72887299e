"""Light sidecars for scripts/bench.py: many sidecar identities in one process, each holding an
Issuer.Sync stream over mTLS, recording when each revocation arrives and is applied, and, when asked
to, holding identity SVIDs that it replaces when their signer is tainted.

Each identity attests with its own join token (AttestSidecar), then opens Sync with its sidecar
SVID exactly like agent_sidecar. Input: one JSON line on stdin {"issuer", "bundle", "tokens", "svids"};
with "svids" N > 0 each identity signs, after its snapshot, N SVIDs for the entries parented to it
(exactly N must exist) in one SignX509SVIDs batch, and on a SyncEvent.taint naming their signer signs
them again in one batch for new keys. The process prints {"ready": N, "signers": [...]} (the authorities
that signed the leaves held) once every stream has its snapshot and SVIDs, then answers each later stdin
line {"want": "revocations"} with {"revocations": [[stream, seq, unix_time, committed_at], ...]} and
{"want": "taints"} with {"taints": [[stream, arrived, replaced, committed_at, count], ...]};
{"error": ...} when something failed.
"""

from __future__ import annotations

import asyncio
import json
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from cryptography import x509

from agent_sidecar.issuer_client import IssuerClient
from tessera import chain, pem, x509svid
from tessera.configfile import default_bootstrap_address


def emit(obj: dict) -> None:
    sys.stdout.write(json.dumps(obj) + "\n")
    sys.stdout.flush()


@dataclass
class Held:
    """The SVIDs one light sidecar holds, by entry id: the authorities above each chain (what a taint may name),
    and the one that signed each leaf."""

    signers: dict[str, frozenset[str]] = field(default_factory=dict)
    leaf_signer: dict[str, str | None] = field(default_factory=dict)


@dataclass
class Shared:
    total: int
    ready: asyncio.Event = field(default_factory=asyncio.Event)
    snapshots: int = 0
    revocations: list = field(default_factory=list)
    taints: list = field(default_factory=list)
    revoked: set = field(default_factory=set)


async def sign(client: IssuerClient, held: Held, entry_ids: list[str], csrs: list[bytes]) -> None:
    """One SignX509SVIDs batch for these entries; each must come back signed."""
    items = await client.sign(list(zip(entry_ids, csrs)))
    if len(items) != len(entry_ids):
        raise RuntimeError(f"asked for {len(entry_ids)} SVIDs, got {len(items)}")
    for item in items:
        if item.status_code != 0 or not item.cert_chain:
            raise RuntimeError(f"SVID for entry {item.entry_id} refused: {item.status_code} {item.error}")
        certs = pem.split_der(item.cert_chain)
        held.signers[item.entry_id] = chain.signers(certs)
        held.leaf_signer[item.entry_id] = chain.authority_key_id(certs[0])


async def stream(i: int, client: IssuerClient, sidecar_id: str, svids: int, shared: Shared, held: Held) -> None:
    # Keys made up front (initial and replacement): the figures are the issuer's and the protocol's, not keygen's.
    csrs = [x509svid.make_csr(x509svid.new_key()) for _ in range(2 * svids)]
    async for ev in client.sync():
        kind = ev.WhichOneof("event")
        if kind == "snapshot":
            mine = [e.id for e in ev.snapshot.entries if e.parent_id == sidecar_id]
            if len(mine) != svids:
                raise RuntimeError(f"{sidecar_id} has {len(mine)} entries, expected {svids}")
            if mine:
                await sign(client, held, mine, csrs[:svids])
            shared.snapshots += 1
            if shared.snapshots == shared.total:
                shared.ready.set()
        elif kind == "revocation":
            shared.revoked.update(ev.revocation.serials)  # applied: this light sidecar now refuses these serials
            shared.revocations.append((i, ev.revocation.seq, time.time(), ev.committed_at))
        elif kind == "taint":
            arrived = time.time()
            tainted = set(ev.taint.authority_ids)
            due = [e for e, signers in held.signers.items() if signers & tainted]
            if due:
                await sign(client, held, due, csrs[svids:svids + len(due)])
                still = [e for e in due if held.signers[e] & tainted]
                if still:
                    raise RuntimeError(f"replacements for {len(still)} entries are signed by a tainted authority")
                shared.taints.append((i, arrived, time.time(), ev.committed_at, len(due)))


async def main_async() -> int:
    cfg = json.loads(sys.stdin.readline())
    bundle = tuple(x509.load_pem_x509_certificates(Path(cfg["bundle"]).read_bytes()))
    svids = int(cfg.get("svids", 0))
    clients = []
    for token in cfg["tokens"]:
        c = IssuerClient((cfg["issuer"],), (default_bootstrap_address(cfg["issuer"]),), "tessera-issuer")
        ident = await c.attest(token, bundle)
        await c.connect(ident)
        clients.append((c, ident.sidecar_id))
    shared = Shared(total=len(clients))
    helds = [Held() for _ in clients]
    tasks = [asyncio.create_task(stream(i, c, sid, svids, shared, helds[i]))
             for i, (c, sid) in enumerate(clients)]
    waiter = asyncio.create_task(shared.ready.wait())
    await asyncio.wait([waiter, *tasks], timeout=60, return_when=asyncio.FIRST_COMPLETED)
    failed = [t for t in tasks if t.done()]
    if failed or not waiter.done():
        emit({"error": f"{len(failed)} streams ended: {failed[0].exception()!r}" if failed else
              "streams not ready within 60s"})
        return 1
    emit({"ready": len(clients), "signers": sorted({str(a) for h in helds for a in h.leaf_signer.values()})})
    loop = asyncio.get_running_loop()
    while True:
        line = await loop.run_in_executor(None, sys.stdin.readline)
        if not line:
            break
        failed = [t for t in tasks if t.done()]
        if failed:
            emit({"error": f"{len(failed)} sync streams ended: {failed[0].exception()!r}"})
            break
        want = json.loads(line)["want"]
        emit({want: shared.revocations if want == "revocations" else shared.taints})
    for t in tasks:
        t.cancel()
    for c, _ in clients:
        await c.close()
    return 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main_async()))
