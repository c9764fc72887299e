"""A fleet for the bench, driven through the real admin API and CLI: entries, and light sidecars
(benchlib/syncclient.py processes) holding Sync streams and, optionally, identity SVIDs.

`measure_taint` is the taint-to-replaced measurement; it also serves an end-to-end test:

    from benchlib import fleet
    result = fleet.measure_taint(dep, sidecars=10, svids=10)   # dep: tests/harness.Deployment, issuer running
    assert result.replaced_svids == 100 and result.max_ms < 5000

(scripts/ on sys.path; tests/harness on it too, as the `dep` comes from there.)
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from concurrent import futures
from dataclasses import dataclass
from pathlib import Path

import grpc

from benchlib import stats
from tessera.v1 import admin_pb2, admin_pb2_grpc, types_pb2

SYNC_CLIENT = Path(__file__).resolve().parent / "syncclient.py"


def admin_stub(dep) -> admin_pb2_grpc.AdminStub:
    return admin_pb2_grpc.AdminStub(grpc.insecure_channel(f"unix://{dep.admin_socket}"))


def create_entries(dep, parent: str, n: int, prefix: str) -> list[types_pb2.Entry]:
    """n entries parented to sidecar `parent` through the real admin API (each its own durable, audited commit),
    a few in flight."""
    stub = admin_stub(dep)
    expires = int(time.time()) + 30 * 86400
    selectors = [f"unix:uid:{os.getuid()}"]

    def one(i: int):
        return stub.CreateEntry.future(types_pb2.Entry(
            spiffe_id=f"spiffe://{dep.td}/{prefix}/{i}", parent_id=dep.sidecar_id(parent), selectors=selectors,
            owner="bench", purpose="benchmark", expires_at=expires), timeout=60)

    out, pending = [], []
    for i in range(n):
        pending.append(one(i))
        if len(pending) >= 32:
            out += [f.result() for f in pending]
            pending = []
    return out + [f.result() for f in pending]


class LightSidecars:
    """Light sidecars named `names` (real join tokens, mTLS Sync streams) spread over `procs` processes.

    With `svids` > 0 each one signs that many identity SVIDs (SignX509SVIDs, one batch) for the entries parented
    to it, which must exist before it starts, and replaces them in one batch when a SyncEvent.taint names their
    signer."""

    def __init__(self, dep, names: list[str], procs: int, svids: int = 0):
        stub = admin_stub(dep)
        tokens = [stub.CreateJoinToken(admin_pb2.CreateJoinTokenRequest(sidecar_name=n, ttl_seconds=600),
                                       timeout=30).token for n in names]
        procs = max(1, min(procs, len(names)))
        self.procs: list[subprocess.Popen] = []
        self.streams: list[int] = []  # how many streams each process holds, in order
        self.signers: set[str] = set()  # the authorities that signed the SVIDs held, once ready
        try:
            for p in range(procs):
                mine = tokens[p::procs]
                proc = subprocess.Popen([sys.executable, str(SYNC_CLIENT)], stdin=subprocess.PIPE,
                                        stdout=subprocess.PIPE, text=True)
                self.procs.append(proc)
                # Tokens go over stdin, not argv: argv is readable by every user on the host.
                self._send(proc, {"issuer": f"127.0.0.1:{dep.port}", "bundle": str(dep.bundle_path), "tokens": mine,
                                  "svids": svids})
                self.streams.append(len(mine))
            for proc in self.procs:
                msg = self._recv(proc)
                if "ready" not in msg:
                    raise RuntimeError(f"sync client: {msg}")
                self.signers.update(msg.get("signers", ()))
        except BaseException:
            self.close()
            raise

    @staticmethod
    def _send(proc: subprocess.Popen, msg: dict) -> None:
        proc.stdin.write(json.dumps(msg) + "\n")
        proc.stdin.flush()

    @staticmethod
    def _recv(proc: subprocess.Popen) -> dict:
        line = proc.stdout.readline()
        if not line:
            raise RuntimeError(f"sync client exited with {proc.wait()}")
        msg = json.loads(line)
        if msg.get("error"):
            raise RuntimeError(f"sync client: {msg['error']}")
        return msg

    def _ask(self, want: str) -> list[list]:
        """Every process's records of `want`, the stream index made global (first field)."""
        out, base = [], 0
        for proc, n in zip(self.procs, self.streams):
            self._send(proc, {"want": want})
            out += [[base + rec[0], *rec[1:]] for rec in self._recv(proc)[want]]
            base += n
        return out

    def received(self) -> list[tuple[int, int, float, float]]:
        """(stream, seq, time applied, issuer commit time) for every revocation applied so far."""
        return [tuple(r) for r in self._ask("revocations")]

    def replaced(self) -> list[tuple[int, float, float, float, int]]:
        """(stream, taint arrived, replacements in hand, issuer commit time, SVIDs replaced) per taint handled."""
        return [tuple(r) for r in self._ask("taints")]

    def close(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                try:
                    proc.stdin.close()
                    proc.wait(5)
                except (OSError, subprocess.TimeoutExpired):
                    proc.kill()
                    proc.wait()


@dataclass(frozen=True)
class TaintResult:
    """Per light sidecar, ms from `tessera ca taint` returning to its last SVID replaced (0 if before the CLI
    exited), and from the issuer's commit of the taint (SyncEvent.committed_at)."""

    authority: str
    sidecars: int
    replaced_svids: int
    from_return_ms: tuple[float, ...]
    from_commit_ms: tuple[float, ...]

    @property
    def p50_ms(self) -> float:
        return stats.percentile(self.from_return_ms, 50)

    @property
    def p99_ms(self) -> float:
        return stats.percentile(self.from_return_ms, 99)

    @property
    def max_ms(self) -> float:
        return max(self.from_return_ms)


def active_intermediate(dep) -> str:
    """The id of the intermediate signing now, as an operator finds it: `tessera ca list --output json`."""
    active = [a["id"] for a in json.loads(dep.cli("ca", "list", "--output", "json").stdout)
              if a["kind"] == "x509" and a["state"] == "active"]
    if len(active) != 1:
        raise RuntimeError(f"expected one active intermediate, `tessera ca list` shows {len(active)}")
    return active[0]


def measure_taint(dep, sidecars: int, svids: int, procs: int = 4, name: str = "bench-taint",
                  timeout: float = 60) -> TaintResult:
    """Taint the active intermediate while `sidecars` light sidecars each hold `svids` SVIDs it signed, and time
    each sidecar's replacement (one SignX509SVIDs batch on the SyncEvent.taint) from `tessera ca taint` returning.

    `dep` is a tests/harness Deployment with its issuer running (only its admin socket, port, bundle, trust domain,
    sidecar_id and cli are used). Creates the entries and join tokens; sidecars named f"{name}-{i}". Raises
    RuntimeError when a sidecar does not report its replacements within `timeout` seconds."""
    if sidecars < 1 or svids < 1:
        raise ValueError(f"measure_taint needs at least one sidecar and one SVID each, got {sidecars} x {svids}")
    names = [f"{name}-{i}" for i in range(sidecars)]
    with futures.ThreadPoolExecutor(4) as ex:
        list(ex.map(lambda n: create_entries(dep, n, svids, f"bench/{n}"), names))
    fleet = LightSidecars(dep, names, procs, svids)
    try:
        target = active_intermediate(dep)
        if fleet.signers != {target}:
            # A scheduled rotation between signing and now: the figure would not be one taint's.
            raise RuntimeError(f"the light sidecars' SVIDs are signed by {sorted(fleet.signers)}, not only by the "
                               f"active intermediate {target}")
        r = dep.cli("ca", "taint", target, "--reason", "benchmark", "--output", "json")
        returned = time.time()  # the operator's command has returned: the taint is committed and pushed
        if json.loads(r.stdout)["tainted"] != [target]:
            raise RuntimeError(f"tessera ca taint tainted {r.stdout!r}, expected [{target!r}]")
        deadline = time.time() + timeout
        while True:
            done = {rec[0]: rec for rec in fleet.replaced()}
            if len(done) == sidecars:
                break
            if time.time() > deadline:
                raise RuntimeError(f"{sidecars - len(done)} of {sidecars} light sidecars did not replace their SVIDs "
                                   f"within {timeout:.0f}s of the taint")
            time.sleep(0.1)
    finally:
        fleet.close()
    recs = [done[i] for i in sorted(done)]
    return TaintResult(
        authority=target, sidecars=sidecars, replaced_svids=sum(rec[4] for rec in recs),
        from_return_ms=tuple(max(0.0, (rec[2] - returned) * 1000) for rec in recs),
        from_commit_ms=tuple((rec[2] - rec[3]) * 1000 for rec in recs))
