"""Tessera benchmarks: real daemons beside the in-Python limit and beside cfssl, on SQLite and on PostgreSQL, on this
machine, in one run.

Run through scripts/bench (it prepares the virtualenv):
    scripts/bench [--quick] [--json FILE]
The issuer, the sidecar and the load clients are separate processes sharing this
machine's cores, so client CPU competes with the issuer: figures are honest for
"everything on one host", not for a dedicated issuer.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from concurrent import futures
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "scripts"))
sys.path.insert(0, str(REPO / "tests"))

import grpc  # noqa: E402

from issuer.ca.authorities import ACTIVATE_AT  # noqa: E402
from benchlib import cfssl, crlbench, fleet, limit, lookupbench, stats  # noqa: E402
from harness import (BIN, Deployment, accepted_connections, peer_deployments, share_one_port,  # noqa: E402
                     sidecar_syncs, wait_for, write_private)
from pgcluster import Cluster  # noqa: E402
from taskutil import policy  # noqa: E402
from tessera.v1 import types_pb2  # noqa: E402

BENCHLIB = REPO / "scripts" / "benchlib"
CLIENT = BENCHLIB / "signclient.py"


@dataclass(frozen=True)
class Sizes:
    limit_bursts: int       # the limit is the best of this many 0.5 s bursts
    phase_seconds: float
    phase_runs: int         # each throughput phase runs this often; the best run is reported
    clients: int
    batch: int
    batched_concurrency: int
    unary_concurrency: int
    unary_sweep: tuple[int, ...]  # further unary concurrencies, one run each: how the rate follows the load
    entries: int            # registered before the RSS reading (spread over the client sidecars)
    serials: int            # issued before the RSS reading
    sidecar_svids: int
    task_calls: int         # sequential StartTask calls timed from one workload
    sync_streams: int       # light sidecars holding Sync streams while revocations are timed
    sync_procs: int
    revocations: int        # `tessera revoke` runs, each timed to every stream
    crl_runs: int           # each CRL build is the best of this many
    taint_sidecars: int     # light sidecars holding SVIDs when their signer is tainted
    taint_svids: int        # SVIDs each of them holds
    rotation_ttl: int       # ca_ttl of the issuer timed through a scheduled rotation (its successor activates at 2/3)
    rotation_concurrency: int  # unary SignX509SVIDs calls in flight from one client through the rotation
    channels: int           # connections each signing load client spreads its calls over
    pg_entries: int         # entries per load client on PostgreSQL
    pg_streams: int         # light sync streams spread over three PostgreSQL peers
    pg_sync_procs: int
    failovers: int          # kill -9 of the sidecar's issuer, each timed to its resync on another


FULL = Sizes(limit_bursts=10, phase_seconds=8, phase_runs=3, clients=4, batch=64, batched_concurrency=2,
             unary_concurrency=32, unary_sweep=(4, 16, 64),
             entries=10_000, serials=100_000, sidecar_svids=1_000,
             task_calls=200, sync_streams=100, sync_procs=4, revocations=20, crl_runs=3,
             taint_sidecars=100, taint_svids=10, rotation_ttl=60, rotation_concurrency=2,
             channels=4, pg_entries=64, pg_streams=1_000, pg_sync_procs=6, failovers=10)
QUICK = Sizes(limit_bursts=4, phase_seconds=4, phase_runs=1, clients=4, batch=64, batched_concurrency=2,
              unary_concurrency=32, unary_sweep=(),
              entries=2_000, serials=20_000, sidecar_svids=1_000,
              task_calls=50, sync_streams=100, sync_procs=4, revocations=10, crl_runs=1,
              taint_sidecars=20, taint_svids=5, rotation_ttl=60, rotation_concurrency=2,
              channels=4, pg_entries=16, pg_streams=150, pg_sync_procs=3, failovers=3)


def log(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmRSS for pid {pid}")


def cpu_seconds(pids: list[int]) -> float:
    """User+system CPU time of these processes so far (clock ticks of /proc/PID/stat)."""
    total = 0
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += int(fields[11]) + int(fields[12])
    return total / os.sysconf("SC_CLK_TCK")


def children(pid: int) -> list[int]:
    out: list[int] = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            out += [int(c) for c in (task / "children").read_text().split()]
        except OSError:
            pass
    return out


def settle(pids: list[int], share: float = 0.05, window: float = 0.5, max_wait: float = 15.0) -> tuple[float, bool]:
    """Wait until these processes use under `share` of one CPU over `window` seconds (at most `max_wait`
    seconds): latency figures "at light load" must not include the previous phase's backlog.
    Returns (seconds waited, whether they did go idle)."""
    start = time.time()
    while time.time() - start < max_wait:
        c0 = cpu_seconds(pids)
        time.sleep(window)
        if cpu_seconds(pids) - c0 < share * window:
            return time.time() - start, True
    return time.time() - start, False


class LoadProc:
    """A load-client process driven by JSON lines (signclient.py, cfsslclient.py)."""

    def __init__(self, name: str, argv: list[str]):
        self.name = name
        self.proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)

    def send(self, cmd: dict) -> None:
        self.proc.stdin.write(json.dumps(cmd) + "\n")
        self.proc.stdin.flush()

    def recv(self) -> dict:
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"load client {self.name} exited with {self.proc.wait()}")
        return json.loads(line)

    def close(self) -> None:
        if self.proc.poll() is None:
            try:
                self.send({"cmd": "quit"})
                self.proc.wait(5)
            except (OSError, subprocess.TimeoutExpired):
                self.proc.kill()
                self.proc.wait()


class Client(LoadProc):
    """One load-client process holding its own sidecar SVID, calling over `channels` connections."""

    def __init__(self, dep: Deployment, name: str, csrs: int, channels: int = 1, sign_via: tuple[str, Path] | None = None):
        token_file = write_private(dep.root / f"{name}.join-token", dep.token(name))  # never in argv
        via = ["--sign-address", sign_via[0], "--sign-bundle", str(sign_via[1])] if sign_via else []
        super().__init__(name, [sys.executable, str(CLIENT), "--issuer", f"127.0.0.1:{dep.port}", "--bundle",
                                str(dep.bundle_path), "--join-token-file", str(token_file), "--csrs", str(csrs),
                                "--channels", str(channels), *via])


def start_clients(dep: Deployment, names: list[str], entries: int, channels: int,
                  sign_via: tuple[str, Path] | None = None) -> tuple[list[Client], float]:
    """Load clients, each ready with `entries` entries of its own created through the admin API; and the seconds
    the entries took to create. With `sign_via` (address, its roots), they call that server instead of the issuer."""
    clients = [Client(dep, name, 512, channels, sign_via) for name in names]
    try:
        for c in clients:
            c.recv()
        t0 = time.time()
        with futures.ThreadPoolExecutor(len(clients)) as ex:
            made = list(ex.map(lambda c: fleet.create_entries(dep, c.name, entries, f"bench/{c.name}"), clients))
        created = time.time() - t0
        for c, mine in zip(clients, made):
            # The floor server answers one fixed chain: no SPIFFE ID to check there.
            c.send({"cmd": "entries", "ids": [e.id for e in mine],
                    "spiffe_ids": [] if sign_via else [e.spiffe_id for e in mine]})
            c.recv()
    except BaseException:
        for c in clients:
            c.close()
        raise
    return clients, created


def signing_runs(clients: list[LoadProc], sz: Sizes, server_pids: list[int], what: str,
                 modes: tuple[str, ...] = ("batched", "unary"), db_pids: list[int] = ()) -> dict[str, dict]:
    """The best of sz.phase_runs runs per mode (batched: sz.batch CSRs per call; unary: one), with the CPU the
    server processes (and apart, the database's) spent per CSR and the share of the machine the server, the database
    and the clients got in that run."""
    shapes = {"batched": (sz.batch, sz.batched_concurrency), "unary": (1, sz.unary_concurrency)}
    best = {}
    client_pids = [c.proc.pid for c in clients]
    for mode in modes:
        batch, conc = shapes[mode]
        runs = []
        for n in range(sz.phase_runs):
            log(f"{what} {mode} run {n + 1}/{sz.phase_runs}: {len(clients)} clients x {conc} calls in flight x "
                f"{batch} CSRs/call, {sz.phase_seconds}s")
            dbs = [p for pid in db_pids for p in (pid, *children(pid))]  # PostgreSQL's backends, as of now
            t0, i0, c0, d0 = time.time(), cpu_seconds(server_pids), cpu_seconds(client_pids), cpu_seconds(dbs)
            run = run_phase(clients, batch, conc, duration=sz.phase_seconds)
            wall, i1, c1 = time.time() - t0, cpu_seconds(server_pids), cpu_seconds(client_pids)
            d1 = cpu_seconds(dbs)
            # CPU the server (main + signing workers) spent per CSR, and the share of the machine that the
            # processes measured got: both say how far other load on the host skewed the rate.
            run["server_cpu_us_per_csr"] = (i1 - i0) / max(1, run["ok"]) * 1e6
            run["db_cpu_us_per_csr"] = (d1 - d0) / max(1, run["ok"]) * 1e6
            run["cpu_share"] = ((i1 - i0) + (c1 - c0) + (d1 - d0)) / (wall * (os.cpu_count() or 1))
            runs.append(run)
        best[mode] = max(runs, key=lambda x: x["per_s"])
        best[mode]["issued"] = sum(r["ok"] for r in runs)
    return best


def run_phase(clients: list[LoadProc], batch: int, concurrency: int, duration: float | None = None,
              count: int | None = None) -> dict:
    start_at = time.time() + 0.5
    for c in clients:
        c.send({"cmd": "run", "batch": batch, "concurrency": concurrency, "start_at": start_at,
                "duration": duration, "count": count})
    results = [c.recv() for c in clients]
    errors = sum(r["errors"] for r in results)
    if errors:
        raise RuntimeError(f"{errors} CSRs failed: {next(r['first_error'] for r in results if r['errors'])}")
    ok = sum(r["ok"] for r in results)
    lat = [x for r in results for x in r["lat_ms"]]
    seconds = duration or max(r["elapsed"] for r in results)
    return {"ok": ok, "per_s": stats.rate(ok, seconds), "p50_ms": stats.percentile(lat, 50),
            "p99_ms": stats.percentile(lat, 99)}


def measure_issuer(dep: Deployment, sz: Sizes, figures: dict, issuer_config: dict) -> None:
    dep.start_issuer(**issuer_config)
    issuer_pid = dep.issuer.proc.pid
    log(f"issuer up (pid {issuer_pid}); starting {sz.clients} load clients")
    per_client = max(1, sz.entries // sz.clients)
    log(f"{sz.clients} load clients; creating {per_client * sz.clients} entries through the admin API")
    clients, created = start_clients(dep, [f"bench-{i}" for i in range(sz.clients)], per_client, sz.channels)
    figures["entry_create_per_s"] = stats.rounded(stats.rate(per_client * sz.clients, created))
    try:
        issued = 0
        best = signing_runs(clients, sz, [issuer_pid, *children(issuer_pid)], "SQLite")
        for mode, r in best.items():
            issued += r["issued"]
            figures[f"issuer_cpu_us_per_csr_{mode}"] = stats.rounded(r["server_cpu_us_per_csr"], 0)
            figures[f"bench_cpu_share_{mode}"] = stats.rounded(r["cpu_share"], 2)
            figures[f"issuer_sign_per_s_{mode}"] = stats.rounded(r["per_s"], 0)
            figures[f"issuer_sign_per_s_{mode}_p50_ms"] = stats.rounded(r["p50_ms"], 2)
            figures[f"issuer_sign_per_s_{mode}_p99_ms"] = stats.rounded(r["p99_ms"], 2)
            figures[f"ratio_{mode}"] = stats.rounded(r["per_s"] / figures["limit_sign_per_s"], 3)
        for conc in sz.unary_sweep:
            in_flight = conc * sz.clients
            log(f"unary at {in_flight} calls in flight: {sz.clients} clients x {conc}, {sz.phase_seconds}s")
            run = run_phase(clients, 1, conc, duration=sz.phase_seconds)
            issued += run["ok"]
            figures[f"unary_per_s_{in_flight}_in_flight"] = stats.rounded(run["per_s"], 0)
            figures[f"unary_p50_ms_{in_flight}_in_flight"] = stats.rounded(run["p50_ms"], 2)
        if issued < sz.serials:
            log(f"issuing {sz.serials - issued} more serials for the memory reading")
            calls = -(-(sz.serials - issued) // (sz.batch * sz.clients * sz.batched_concurrency))
            issued += run_phase(clients, sz.batch, sz.batched_concurrency,
                                count=calls * sz.batched_concurrency)["ok"]
        main_rss = rss_mb(issuer_pid)
        figures["issuer_rss_mb"] = stats.rounded(main_rss)
        figures["issuer_rss_mb_with_workers"] = stats.rounded(main_rss + sum(rss_mb(p) for p in children(issuer_pid)))
        figures["issuer_rss_serials"] = issued
        figures["issuer_rss_entries"] = per_client * sz.clients
    finally:
        for c in clients:
            c.close()


def served_ids(dep: Deployment, sidecar: str) -> list[str]:
    """SPIFFE IDs the sidecar's Workload API serves to this process now ([] while it is still minting)."""
    from agent_sidecar.workload_client import fetch_x509

    try:
        return [s.spiffe_id for s in fetch_x509(str(dep.socket(sidecar)), timeout=10).svids]
    except grpc.RpcError as e:
        if e.code() != grpc.StatusCode.UNAVAILABLE:
            raise
        return []


def measure_sidecar(dep: Deployment, sz: Sizes, figures: dict) -> None:
    name = "bench-rss"
    sidecar = dep.start_sidecar(name)
    log(f"sidecar up (pid {sidecar.proc.pid}); registering {sz.sidecar_svids} entries for it")
    fleet.create_entries(dep, name, sz.sidecar_svids, "bench/rss")

    wait_for(lambda: len(served_ids(dep, name)) >= sz.sidecar_svids, timeout=120, interval=0.5,
             what=f"{sz.sidecar_svids} SVIDs from the sidecar")
    figures["sidecar_rss_mb"] = stats.rounded(rss_mb(sidecar.proc.pid))
    figures["sidecar_rss_svids"] = sz.sidecar_svids
    sidecar.stop()  # measured; the next phases run at light load


# --- Time to credential, revocation push, CRL ----------------------------------------------------

TASK_SCOPE = "bench:run"
# The tests' policy (tests/taskutil.py): tiers "low" and "high", one rule allowing the entry's own scopes.
BENCH_POLICY = policy()


def measure_floor(dep: Deployment, sz: Sizes, figures: dict) -> None:
    """The unary load against benchlib/floorserver.py: grpcio's Python server over mTLS answering at once, called
    by load clients attested at `dep`'s issuer exactly as they call the issuer. What it sustains is what grpcio,
    the clients and the wire alone cost on this host: a ceiling for unary calls through grpcio here."""
    roots = dep.root / "floor-roots.pem"
    server = subprocess.Popen([sys.executable, str(BENCHLIB / "floorserver.py"), "--bundle", str(dep.bundle_path),
                               "--out-bundle", str(roots)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        line = server.stdout.readline()
        if not line:
            raise RuntimeError(f"the floor server exited with {server.wait()}")
        address = f"127.0.0.1:{json.loads(line)['port']}"
        log(f"floor: grpcio answering at once on {address} (pid {server.pid}); {sz.clients} load clients")
        clients, _ = start_clients(dep, [f"floor-{i}" for i in range(sz.clients)], 1, sz.channels, (address, roots))
        try:
            r = signing_runs(clients, sz, [server.pid], "floor", modes=("unary",))["unary"]
        finally:
            for c in clients:
                c.close()
    finally:
        server.stdin.close()
        try:
            server.wait(10)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()
    figures["floor_sign_per_s_unary"] = stats.rounded(r["per_s"], 0)
    figures["floor_cpu_us_per_call"] = stats.rounded(r["server_cpu_us_per_csr"], 0)
    figures["floor_cpu_share_unary"] = stats.rounded(r["cpu_share"], 2)


def measure_task_credential(dep: Deployment, sz: Sizes, figures: dict, prefix: str = "") -> tuple[subprocess.Popen,
                                                                                                  list[str]]:
    """Sequential StartTask calls from one workload process through a real sidecar (light load).

    Returns the still-running workload and its task serials: the tasks stay live for the
    revocation measurement, and end when the workload exits.
    """
    name = "bench-task"
    sidecar = dep.start_sidecar(name)
    spiffe_id = f"spiffe://{dep.td}/bench/task"
    fleet.admin_stub(dep).CreateEntry(types_pb2.Entry(
        spiffe_id=spiffe_id, parent_id=dep.sidecar_id(name), selectors=[f"unix:uid:{os.getuid()}"], owner="bench",
        purpose="benchmark", tier="low", scopes=[TASK_SCOPE], expires_at=int(time.time()) + 86400), timeout=30)
    log(f"sidecar up (pid {sidecar.proc.pid}); {sz.task_calls} sequential StartTask calls from one workload")
    wait_for(lambda: spiffe_id in served_ids(dep, name), timeout=60, interval=0.2,
             what=f"the sidecar to serve {spiffe_id}")
    waited, idle = settle([dep.issuer.proc.pid, sidecar.proc.pid])
    log(f"issuer and sidecar idle after {waited:.1f}s; timing StartTask" if idle else
        f"WARNING: issuer and sidecar still busy after {waited:.1f}s; timing StartTask under load")
    proc = subprocess.Popen([sys.executable, str(BENCHLIB / "taskclient.py"), str(dep.socket(name)), spiffe_id,
                             TASK_SCOPE, str(sz.task_calls)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    line = proc.stdout.readline()
    if not line:
        raise RuntimeError(f"task workload exited with {proc.wait()}")
    out = json.loads(line)
    figures[f"{prefix}task_credential_p50_ms"] = stats.rounded(stats.percentile(out["lat_ms"], 50), 2)
    figures[f"{prefix}task_credential_p99_ms"] = stats.rounded(stats.percentile(out["lat_ms"], 99), 2)
    figures["task_credential_calls"] = len(out["lat_ms"])
    return proc, out["serials"]


def measure_revocation_propagation(dep: Deployment, sz: Sizes, figures: dict, serials: list[str]) -> None:
    log(f"{sz.sync_streams} light sidecars attest and open Sync streams ({sz.sync_procs} processes)")
    clients = fleet.LightSidecars(dep, [f"bench-sync-{i}" for i in range(sz.sync_streams)], sz.sync_procs)
    try:
        delays, from_commit = time_revocations(dep, [clients], serials[:sz.revocations])
    finally:
        clients.close()
    record_propagation(figures, "", delays, from_commit)


def record_propagation(figures: dict, prefix: str, delays: list[float], from_commit: list[float]) -> None:
    """The revocation figures of one phase: from the CLI returning, and from the issuer's commit."""
    figures[f"{prefix}revocation_propagation_p50_ms"] = stats.rounded(stats.percentile(delays, 50), 2)
    figures[f"{prefix}revocation_propagation_p99_ms"] = stats.rounded(stats.percentile(delays, 99), 2)
    figures[f"{prefix}revocation_propagation_pairs"] = len(delays)
    figures[f"{prefix}revocation_push_from_commit_p50_ms"] = stats.rounded(stats.percentile(from_commit, 50), 2)
    figures[f"{prefix}revocation_push_from_commit_p99_ms"] = stats.rounded(stats.percentile(from_commit, 99), 2)


def time_revocations(dep: Deployment, groups: list[fleet.LightSidecars], serials: list[str]
                     ) -> tuple[list[float], list[float]]:
    """`tessera revoke --serial` at `dep`'s issuer for each serial, one at a time; ms from each command returning
    to each stream of `groups` applying it, and (the same arrivals) from the issuer's commit."""
    def received() -> list[tuple]:
        out, base = [], 0  # stream indices made global over the groups
        for g in groups:
            out += [(base + r[0], *r[1:]) for r in g.received()]
            base += sum(g.streams)
        return out

    env = {**os.environ, "TESSERA_ADMIN_SOCKET": str(dep.admin_socket)}
    returned_at: dict[int, float] = {}
    log(f"{len(serials)} x tessera revoke --serial, each timed to its arrival on every stream")
    for serial in serials:
        r = subprocess.run([str(BIN / "tessera"), "revoke", "--serial", serial, "--reason", "benchmark",
                            "--output", "json"], capture_output=True, text=True, env=env, timeout=30)
        done = time.time()  # the operator's command has returned: the revocation is durable
        if r.returncode != 0:
            raise RuntimeError(f"tessera revoke failed: {r.stderr.strip()}")
        returned_at[json.loads(r.stdout)["seq"]] = done
        time.sleep(0.2)  # one revocation at a time: the figure is propagation, not queueing
    streams = sum(sum(g.streams) for g in groups)
    deadline = time.time() + 10
    while True:
        try:
            got = received()
            delays = stats.propagation_delays(returned_at, [r[:3] for r in got], streams)
            break
        except ValueError:
            if time.time() > deadline:
                raise
            time.sleep(0.2)
    # The same arrivals measured from the issuer's commit (SyncEvent.committed_at): the push itself,
    # which the figure above hides when streams apply a revocation before the CLI process has exited.
    commits = {seq: committed for _, seq, _, committed in got if seq in returned_at}
    return delays, stats.propagation_delays(commits, [r[:3] for r in got], streams)


def measure_taint(dep: Deployment, sz: Sizes, figures: dict) -> None:
    log(f"taint: {sz.taint_sidecars} light sidecars x {sz.taint_svids} SVIDs; `tessera ca taint` of their signer, "
        "timed to each sidecar's replacements in hand")
    r = fleet.measure_taint(dep, sz.taint_sidecars, sz.taint_svids, sz.sync_procs)
    figures["taint_replaced_p50_ms"] = stats.rounded(r.p50_ms, 1)
    figures["taint_replaced_p99_ms"] = stats.rounded(r.p99_ms, 1)
    figures["taint_replaced_max_ms"] = stats.rounded(r.max_ms, 1)
    figures["taint_replaced_from_commit_p50_ms"] = stats.rounded(stats.percentile(r.from_commit_ms, 50), 1)
    figures["taint_replaced_from_commit_p99_ms"] = stats.rounded(stats.percentile(r.from_commit_ms, 99), 1)
    figures["taint_replaced_svids"] = r.replaced_svids


def measure_rotation(sz: Sizes, figures: dict, issuer_config: dict) -> None:
    """Unary SVID signing through a scheduled rotation: an issuer of its own with ca_ttl = sz.rotation_ttl, one
    load client from its start until just past the successor's activation; latencies near the preparation and the
    activation beside those far from both, in the same run."""
    root = Path(tempfile.mkdtemp(prefix="tessera-bench-rotation-", dir="/tmp"))
    dep = Deployment(root)
    client = None
    try:
        dep.start_issuer(**issuer_config, ca_ttl=sz.rotation_ttl)
        client = Client(dep, "bench-rotation", 64)
        client.recv()
        entries = fleet.create_entries(dep, client.name, 16, "bench/rotation")
        client.send({"cmd": "entries", "ids": [e.id for e in entries], "spiffe_ids": [e.spiffe_id for e in entries]})
        client.recv()
        first = [a for a in fleet.admin_stub(dep).ListAuthorities(types_pb2.Empty(), timeout=30).authorities
                 if a.kind == "x509" and a.state == "active"][0]
        # As issuer/ca/authorities.py schedules it: from its creation (not its backdated not_before), at
        # ACTIVATE_AT of the rest of its life; checked about once a second.
        start = max(first.not_before, min(first.created_at, first.not_after))
        due = start + (first.not_after - start) * ACTIVATE_AT
        start_at = time.time() + 0.5
        end = due + 1 + stats.ROTATION_WINDOW_S + stats.QUIET_S
        log(f"rotation: ca_ttl {sz.rotation_ttl}s, successor due at +{due - start_at:.0f}s; 1 client x "
            f"{sz.rotation_concurrency} unary SignX509SVIDs in flight until {end - start_at:.0f}s")
        client.send({"cmd": "run", "batch": 1, "concurrency": sz.rotation_concurrency, "start_at": start_at,
                     "duration": end - start_at, "count": None, "track_signer": True})
        r = client.recv()
        if r["errors"]:
            raise RuntimeError(f"{r['errors']} CSRs failed during the rotation: {r['first_error']}")
        if len(r["signers"]) != 2 or r["signers"][0][1] != first.id:
            raise RuntimeError(f"expected leaves from {first.id} then from one successor, got {r['signers']}")
        activated, successor = r["signers"][1]
        prepared = next(a.created_at for a in fleet.admin_stub(dep).ListAuthorities(types_pb2.Empty(), timeout=30)
                        .authorities if a.id == successor)
    except BaseException:
        log(f"rotation failed; daemon logs are in {root}")
        raise
    finally:
        if client is not None:
            client.close()
        dep.close()
    shutil.rmtree(root, ignore_errors=True)
    w = stats.rotation_windows(r["at"], r["lat_ms"], start_at + 1, prepared, activated)
    for name, lat in w.items():
        if not lat:
            raise RuntimeError(f"no signing calls in the {name} window of the rotation")
        figures[f"rotation_{name}_sign_p50_ms"] = stats.rounded(stats.percentile(lat, 50), 2)
        figures[f"rotation_{name}_sign_p99_ms"] = stats.rounded(stats.percentile(lat, 99), 2)
        figures[f"rotation_{name}_calls"] = len(lat)
    figures["rotation_activate_sign_max_ms"] = stats.rounded(max(w["activate"]), 2)


# --- The peer: cfssl ---------------------------------------------------------------------------------------

def measure_cfssl(sz: Sizes, figures: dict) -> None:
    """cfssl serve's sign API under sz.clients client processes x sz.unary_concurrency requests in flight, one CSR
    each: the rate Tessera's signing is compared with."""
    root = Path(tempfile.mkdtemp(prefix="tessera-bench-cfssl-", dir="/tmp"))
    with cfssl.Server(root) as server:
        log(f"cfssl serve up (pid {server.proc.pid}, {server.url}); {sz.clients} load clients")
        clients = [LoadProc(f"cfssl-{i}", [sys.executable, str(BENCHLIB / "cfsslclient.py"), "--url", server.url])
                   for i in range(sz.clients)]
        try:
            for c in clients:
                c.recv()
            r = signing_runs(clients, sz, [server.proc.pid], "cfssl", modes=("unary",))["unary"]
        finally:
            for c in clients:
                c.close()
    shutil.rmtree(root, ignore_errors=True)
    figures["cfssl_sign_per_s"] = stats.rounded(r["per_s"], 0)
    figures["cfssl_sign_p50_ms"] = stats.rounded(r["p50_ms"], 2)
    figures["cfssl_sign_p99_ms"] = stats.rounded(r["p99_ms"], 2)
    figures["cfssl_cpu_us_per_csr"] = stats.rounded(r["server_cpu_us_per_csr"], 0)
    figures["cfssl_cpu_share"] = stats.rounded(r["cpu_share"], 2)
    figures["cfssl_ratio"] = stats.rounded(r["per_s"] / figures["limit_sign_per_s"], 3)


def compare_with_cfssl(figures: dict) -> None:
    """Each Tessera signing rate as a multiple of cfssl's in this run."""
    peer = figures.get("cfssl_sign_per_s")
    for key in ("issuer_sign_per_s_batched", "issuer_sign_per_s_unary", "floor_sign_per_s_unary",
                *(f"pg{n}_sign_per_s_{mode}" for n in (1, 2) for mode in ("batched", "unary"))):
        if peer and figures.get(key):
            figures[key.replace("sign_per_s", "vs_cfssl")] = stats.rounded(figures[key] / peer, 2)
    floor = figures.get("floor_sign_per_s_unary")
    if floor and figures.get("issuer_sign_per_s_unary"):
        figures["issuer_unary_vs_floor"] = stats.rounded(figures["issuer_sign_per_s_unary"] / floor, 2)


# --- PostgreSQL ------------------------------------------------------------------------------------------------

def record_signing(figures: dict, prefix: str, best: dict[str, dict]) -> None:
    for mode, r in best.items():
        figures[f"{prefix}_sign_per_s_{mode}"] = stats.rounded(r["per_s"], 0)
        figures[f"{prefix}_sign_{mode}_p50_ms"] = stats.rounded(r["p50_ms"], 2)
        figures[f"{prefix}_sign_{mode}_p99_ms"] = stats.rounded(r["p99_ms"], 2)
        figures[f"{prefix}_ratio_{mode}"] = stats.rounded(r["per_s"] / figures["limit_sign_per_s"], 3)
        figures[f"{prefix}_cpu_us_per_csr_{mode}"] = stats.rounded(r["server_cpu_us_per_csr"], 0)
        figures[f"{prefix}_db_cpu_us_per_csr_{mode}"] = stats.rounded(r["db_cpu_us_per_csr"], 0)
        figures[f"{prefix}_cpu_share_{mode}"] = stats.rounded(r["cpu_share"], 2)


def postmaster(pg: Cluster) -> int:
    """The PostgreSQL server's main process (its backends are its children)."""
    return int((pg.data / "postmaster.pid").read_text().split()[0])


def issuer_pids(deps: list[Deployment]) -> list[int]:
    """The issuers' main processes and their signing workers."""
    return [p for d in deps for p in (d.issuer.proc.pid, *children(d.issuer.proc.pid))]


def measure_postgres_signing(pg, sz: Sizes, figures: dict, issuer_config: dict) -> None:
    """On one PostgreSQL database: signing with one issuer process, time to credential through it, then signing
    with a second issuer process serving the same port (share_port), each load client's connections spread over
    both by the kernel."""
    root = Path(tempfile.mkdtemp(prefix="tessera-bench-pg-", dir="/tmp"))
    deps = peer_deployments(root, 2, pg.new_database("bench"))
    share_one_port(deps)
    first, second = deps
    names = [f"bench-{i}" for i in range(sz.clients)]
    try:
        first.start_issuer(**issuer_config)
        log(f"PostgreSQL: issuer up (pid {first.issuer.proc.pid}); {sz.clients} load clients")
        clients, _ = start_clients(first, [f"pg1-{n}" for n in names], sz.pg_entries, sz.channels)
        try:
            record_signing(figures, "pg1", signing_runs(clients, sz, issuer_pids([first]), "PostgreSQL, 1 issuer:",
                                                        db_pids=[postmaster(pg)]))
        finally:
            for c in clients:
                c.close()
        workload, _ = measure_task_credential(first, sz, figures, prefix="pg_")
        workload.stdin.close()
        workload.wait(10)
        first.sidecars.pop("bench-task").stop()

        second.start_issuer(**issuer_config)
        log(f"PostgreSQL: a second issuer on the same port (pid {second.issuer.proc.pid}); {sz.clients} new load "
            f"clients x {sz.channels} connections")
        clients, _ = start_clients(first, [f"pg2-{n}" for n in names], sz.pg_entries, sz.channels)
        try:
            # Both issuers know the entries (the second through the change feed, within a second) before the runs.
            time.sleep(2)
            held = accepted_connections([first.issuer.proc.pid, second.issuer.proc.pid], first.port)
            figures["pg2_connections"] = " / ".join(str(n) for n in held.values())
            record_signing(figures, "pg2", signing_runs(clients, sz, issuer_pids(deps),
                                                        "PostgreSQL, 2 issuers on one port:", db_pids=[postmaster(pg)]))
        finally:
            for c in clients:
                c.close()
    except BaseException:
        log(f"PostgreSQL signing failed; daemon logs are in {root}")
        for d in deps:
            d.close()
        raise
    for d in deps:
        d.close()
    shutil.rmtree(root, ignore_errors=True)


def measure_postgres_fleet(pg, sz: Sizes, figures: dict, issuer_config: dict) -> None:
    """Three issuers on one PostgreSQL database, each on its own port: a revocation made at the first, timed to
    light sync streams spread over all three; then kill -9 of the issuer a real sidecar (configured with all three
    addresses) uses, timed to the sidecar resynced on another, the killed one restarted after each."""
    root = Path(tempfile.mkdtemp(prefix="tessera-bench-pgfleet-", dir="/tmp"))
    dsn = pg.new_database("fleet")
    deps = peer_deployments(root, 3, dsn)
    groups: list[fleet.LightSidecars] = []
    try:
        for d in deps:
            d.start_issuer(**issuer_config)
        # Serials to revoke: one batch signed through the first issuer, read back from the database.
        clients, _ = start_clients(deps[0], ["pg-serials"], 8, 1)
        try:
            run_phase(clients, sz.revocations, 1, count=1)
        finally:
            clients[0].close()
        import psycopg

        with psycopg.connect(dsn) as db:
            serials = [r[0] for r in db.execute("SELECT serial FROM issued WHERE kind = 'identity' LIMIT %s",
                                                (sz.revocations,))]
        per = [sz.pg_streams // len(deps) + (k < sz.pg_streams % len(deps)) for k in range(len(deps))]
        procs = max(1, sz.pg_sync_procs // len(deps))
        log(f"PostgreSQL: {sz.pg_streams} light sidecars open Sync streams, {' / '.join(map(str, per))} at the "
            f"{len(deps)} issuers ({procs} client processes per issuer)")
        for k, d in enumerate(deps):
            groups.append(fleet.LightSidecars(d, [f"pg-sync-{k}-{i}" for i in range(per[k])], procs))
        delays, from_commit = time_revocations(deps[0], groups, serials)
        for g in groups:
            g.close()
        record_propagation(figures, "pg_", delays, from_commit)

        addresses = {f"127.0.0.1:{d.port}": d for d in deps}
        sidecar = deps[0].start_sidecar("pg-failover", issuer_address=list(addresses))
        wait_for(lambda: sidecar_syncs(sidecar), timeout=30, what="the sidecar's first sync")
        log(f"PostgreSQL: {sz.failovers} x kill -9 of the issuer the sidecar uses, timed to its resync on another")
        times = []
        for _ in range(sz.failovers):
            before = sidecar_syncs(sidecar)
            current = addresses[before[-1]["issuer"]]
            killed_at = time.time()
            current.issuer.kill9()
            line = wait_for(lambda: len(sidecar_syncs(sidecar)) > len(before) and sidecar_syncs(sidecar)[-1],
                            timeout=30, interval=0.01, what="the sidecar resynced after kill -9")
            if addresses[line["issuer"]] is current:
                raise RuntimeError("the sidecar resynced with the issuer that was killed")
            times.append((dt.datetime.fromisoformat(line["timestamp"]).timestamp() - killed_at) * 1000)
            current.issuer.start()
        figures["pg_failover_p50_ms"] = stats.rounded(stats.percentile(times, 50), 0)
        figures["pg_failover_p99_ms"] = stats.rounded(stats.percentile(times, 99), 0)
        figures["pg_failover_max_ms"] = stats.rounded(max(times), 0)
        figures["pg_failovers"] = len(times)
    except BaseException:
        log(f"PostgreSQL fleet failed; daemon logs are in {root}")
        raise
    finally:
        for g in groups:
            g.close()
        for d in deps:
            d.close()
    shutil.rmtree(root, ignore_errors=True)


def measure_crl(sz: Sizes, figures: dict) -> None:
    log(f"CRL: tessera/crl.py build + sign + DER at 10,000 and 100,000 serials (best of {sz.crl_runs}); "
        "verifier lookup")
    r = crlbench.measure((10_000, 100_000), sz.crl_runs)
    figures["crl_build_ms_10k"] = stats.rounded(r[10_000]["build_ms"], 1)
    figures["crl_build_ms_100k"] = stats.rounded(r[100_000]["build_ms"], 1)
    figures["crl_rebuild_ms_100k"] = stats.rounded(r[100_000]["rebuild_ms"], 1)
    figures["crl_bytes_100k"] = r[100_000]["der_bytes"]
    figures["crl_lookup_ns"] = stats.rounded(r["lookup_ns"], 0)


def measure_lookups(figures: dict) -> None:
    log("lookups: Verifier.check on a presented certificate; the sidecar's selector match at 1,000 entries")
    figures["verifier_check_us"] = stats.rounded(lookupbench.verifier_check_us(), 1)
    figures["workload_match_us_1000"] = stats.rounded(lookupbench.match_us(1000), 1)


TARGETS = {"ratio_batched": (">=", 0.6), "ratio_unary": (">=", 0.25), "task_credential_p99_ms": ("<=", 10),
           "revocation_propagation_p99_ms": ("<=", 100), "crl_build_ms_100k": ("<=", 500),
           "pg_task_credential_p99_ms": ("<=", 10), "pg_revocation_propagation_p99_ms": ("<=", 100),
           "pg_failover_p99_ms": ("<=", 3000),
           **{f"{p}vs_cfssl_batched": (">=", 1.2) for p in ("issuer_", "pg1_", "pg2_")},
           **{f"{p}vs_cfssl_unary": (">=", 0.8) for p in ("issuer_", "pg1_", "pg2_")},
           "crl_lookup_ns": ("<=", 1000), "issuer_rss_mb": ("<=", 200), "sidecar_rss_mb": ("<=", 100)}


def note(key: str, figures: dict, sz: Sizes) -> str:
    parts = []
    if key in TARGETS:
        op, bound = TARGETS[key]
        v = figures.get(key)
        verdict = "" if v is None else ("ok" if (v >= bound if op == ">=" else v <= bound) else "MISSED")
        parts.append(f"target {op} {bound} {verdict}".rstrip())
    if key == "issuer_rss_mb":
        parts.append(f"after {figures.get('issuer_rss_serials', 0):,} serials, "
                     f"{figures.get('issuer_rss_entries', 0):,} entries")
    if key == "sidecar_rss_mb":
        parts.append(f"{figures.get('sidecar_rss_svids', 0):,} cached SVIDs")
    best = f", best of {sz.phase_runs} runs" if sz.phase_runs > 1 else ""
    if key == "issuer_sign_per_s_batched":
        parts.append(f"{sz.clients} client procs x {sz.batched_concurrency} in flight x {sz.batch} CSRs/call{best}")
    if key == "issuer_sign_per_s_unary":
        parts.append(f"{sz.clients} client procs x {sz.unary_concurrency} in flight x 1 CSR/call{best}")
    if key.startswith("unary_per_s_"):
        parts.append("the same unary calls at another load, one run")
    if key.startswith("issuer_cpu_us_per_csr"):
        parts.append("issuer main process + signing workers, in the reported run")
    if key == "cfssl_cpu_us_per_csr":
        parts.append("cfssl serve's CPU per signed CSR, in the reported run")
    if key.startswith("pg1_cpu_us") or key.startswith("pg2_cpu_us"):
        parts.append("the issuer processes + their signing workers (not PostgreSQL's), in the reported run")
    if "_db_cpu_us_per_csr_" in key:
        parts.append("PostgreSQL's processes, in the reported run")
    if key.startswith("pg1_cpu_share") or key.startswith("pg2_cpu_share"):
        parts.append("of all CPUs used by issuers + PostgreSQL + load clients in that run (the rest: other load)")
    elif key.startswith("bench_cpu_share") or key == "cfssl_cpu_share" or "_cpu_share_" in key:
        parts.append("of all CPUs used by the server (issuer or cfssl) + load clients in that run (the rest: other load)")
    if key == "limit_sign_per_s":
        parts.append(f"one process, no RPC or storage; best of {sz.limit_bursts} x 0.5 s")
    if key == "cfssl_sign_per_s":
        parts.append(f"cfssl serve, HTTP POST /api/v1/cfssl/sign, 1 CSR/request; {sz.clients} client procs x "
                     f"{sz.unary_concurrency} in flight, keep-alive{best}")
    if key.startswith("pg1_sign_per_s") or key.startswith("pg2_sign_per_s"):
        procs = "1 issuer process" if key.startswith("pg1") else "2 issuer processes on one port (share_port)"
        shape = (f"{sz.batched_concurrency} in flight x {sz.batch} CSRs/call" if key.endswith("batched") else
                 f"{sz.unary_concurrency} in flight x 1 CSR/call")
        parts.append(f"PostgreSQL, {procs}; {sz.clients} client procs x {shape}{best}")
    if key == "floor_sign_per_s_unary":
        parts.append(f"benchlib/floorserver.py: grpcio over mTLS answering at once, no issuer work; {sz.clients} client "
                     f"procs x {sz.unary_concurrency} in flight{best}")
    if key == "floor_cpu_us_per_call":
        parts.append("the floor server's CPU per call, in the reported run")
    if key == "issuer_unary_vs_floor":
        parts.append("issuer_sign_per_s_unary x floor_sign_per_s_unary, same run")
    if key == "pg2_connections":
        parts.append(f"load-client connections held by each issuer process ({sz.clients} x {sz.channels})")
    if "_vs_cfssl_" in key:
        parts.append("x cfssl_sign_per_s, same run")
    if key.startswith("cfssl_ratio") or key.startswith("pg1_ratio") or key.startswith("pg2_ratio"):
        parts.append("x limit_sign_per_s")
    if key.startswith("pg_task_credential"):
        parts.append("the same StartTask timing, issuer on PostgreSQL (one process)")
    elif key.startswith("pg_revocation_propagation"):
        parts.append(f"`tessera revoke` at issuer 1 returning -> applied on each of {sz.pg_streams} Sync streams "
                     f"spread over 3 PostgreSQL peers; {figures.get('pg_revocation_propagation_pairs', 0):,} pairs")
    elif key.startswith("pg_revocation_push"):
        parts.append("issuer 1's commit -> applied on each stream (same arrivals)")
    elif key.startswith("pg_failover"):
        parts.append(f"kill -9 of the sidecar's issuer -> sidecar resynced with another (its log); "
                     f"{figures.get('pg_failovers', 0)} kills, 3 peers")
    if key.startswith("task_credential"):
        parts.append(f"StartTask to credential through a real sidecar; {figures.get('task_credential_calls', 0)} "
                     "sequential calls from one workload")
    elif key.startswith("revocation_propagation"):
        parts.append(f"`tessera revoke` returning -> applied on each of {sz.sync_streams} Sync streams; "
                     f"{figures.get('revocation_propagation_pairs', 0):,} pairs (0 = before the CLI exited)")
    elif key.startswith("revocation_push_from_commit"):
        parts.append("issuer commit -> applied on each stream (same arrivals)")
    elif key.startswith("taint_replaced_from_commit"):
        parts.append("issuer commit of the taint -> replacements in hand (same sidecars)")
    elif key.startswith("taint_replaced"):
        parts.append(f"`tessera ca taint` returning -> each light sidecar's last SVID replaced (one SignX509SVIDs "
                     f"batch on SyncEvent.taint); {sz.taint_sidecars} sidecars x {sz.taint_svids} SVIDs, "
                     f"{figures.get('taint_replaced_svids', 0):,} replaced")
    elif key.startswith("rotation_"):
        phase = key.split("_")[1]
        where = {"activate": f"calls started within {stats.ROTATION_WINDOW_S:g} s of the successor's first leaf",
                 "prepare": "calls started in the second the successor was prepared (±1 s)",
                 "quiet": f"calls started >= {stats.QUIET_S:g} s from both, same run"}[phase]
        parts.append(f"unary SignX509SVIDs, ca_ttl {sz.rotation_ttl}s, 1 client x {sz.rotation_concurrency} in "
                     f"flight; {where}; {figures.get(f'rotation_{phase}_calls', 0):,} calls")
    elif key.startswith("crl_build"):
        parts.append("tessera/crl.py build + sign + DER from fresh records (cold)"
                     + (f", best of {sz.crl_runs}" if sz.crl_runs > 1 else ""))
    elif key.startswith("crl_rebuild"):
        parts.append("the issuer's rebuild after one more revocation (records kept between CRLs)")
    elif key == "crl_lookup_ns":
        parts.append("verifier.revoked_serial(cert) with 100,000 revoked, after Verifier.update applied the CRL")
    elif key == "verifier_check_us":
        parts.append("Verifier.check of the PEM a peer presents on every call (chain, validity, CRL, ID)")
    elif key == "workload_match_us_1000":
        parts.append("CacheManager.matching for one workload's selectors, 1,000 entries on the host")
    elif (key.endswith("_p50_ms") or key.endswith("_p99_ms")) and not key.startswith("pg_"):
        parts.append("per call (a batched call carries the batch)" if "batched" in key else "per call")
    return "; ".join(parts)


ORDER = ["limit_sign_per_s", "cfssl_sign_per_s", "cfssl_sign_p50_ms", "cfssl_sign_p99_ms", "cfssl_ratio",
         "cfssl_cpu_us_per_csr", "cfssl_cpu_share",
         "issuer_sign_per_s_batched", "issuer_sign_per_s_batched_p50_ms",
         "issuer_sign_per_s_batched_p99_ms", "ratio_batched", "issuer_vs_cfssl_batched", "issuer_sign_per_s_unary",
         "issuer_sign_per_s_unary_p50_ms", "issuer_sign_per_s_unary_p99_ms", "ratio_unary", "issuer_vs_cfssl_unary",
         "floor_sign_per_s_unary", "floor_vs_cfssl_unary", "floor_cpu_us_per_call", "floor_cpu_share_unary",
         "issuer_unary_vs_floor",
         *(k for p in ("pg1", "pg2") for m in ("batched", "unary")
           for k in (f"{p}_sign_per_s_{m}", f"{p}_sign_{m}_p50_ms", f"{p}_sign_{m}_p99_ms", f"{p}_ratio_{m}",
                     f"{p}_vs_cfssl_{m}", f"{p}_cpu_us_per_csr_{m}", f"{p}_db_cpu_us_per_csr_{m}",
                     f"{p}_cpu_share_{m}")),
         "pg2_connections",
         *(f"unary_{k}_{n * FULL.clients}_in_flight" for n in FULL.unary_sweep for k in ("per_s", "p50_ms")),
         "issuer_cpu_us_per_csr_batched", "issuer_cpu_us_per_csr_unary", "bench_cpu_share_batched",
         "bench_cpu_share_unary",
         "task_credential_p50_ms", "task_credential_p99_ms", "revocation_propagation_p50_ms",
         "revocation_propagation_p99_ms", "revocation_push_from_commit_p50_ms",
         "revocation_push_from_commit_p99_ms",
         "pg_task_credential_p50_ms", "pg_task_credential_p99_ms", "pg_revocation_propagation_p50_ms",
         "pg_revocation_propagation_p99_ms", "pg_revocation_push_from_commit_p50_ms",
         "pg_revocation_push_from_commit_p99_ms", "pg_failover_p50_ms", "pg_failover_p99_ms", "pg_failover_max_ms",
         "taint_replaced_p50_ms", "taint_replaced_p99_ms",
         "taint_replaced_max_ms", "taint_replaced_from_commit_p50_ms", "taint_replaced_from_commit_p99_ms",
         "rotation_quiet_sign_p50_ms", "rotation_quiet_sign_p99_ms", "rotation_prepare_sign_p50_ms",
         "rotation_prepare_sign_p99_ms", "rotation_activate_sign_p50_ms", "rotation_activate_sign_p99_ms",
         "rotation_activate_sign_max_ms", "crl_build_ms_10k", "crl_build_ms_100k", "crl_rebuild_ms_100k",
         "crl_lookup_ns", "verifier_check_us", "workload_match_us_1000",
         "issuer_rss_mb", "issuer_rss_mb_with_workers", "sidecar_rss_mb", "entry_create_per_s"]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="scripts/bench", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="smaller counts; finishes within a few minutes")
    p.add_argument("--json", metavar="FILE", help="also write the figures to FILE")
    p.add_argument("--signing-workers", type=int, default=None, metavar="N",
                   help="issuer signing_workers (default: the issuer's default, one per CPU; 0 signs in-process)")
    args = p.parse_args(argv)
    issuer_config = {} if args.signing_workers is None else {"signing_workers": args.signing_workers}
    issuer_config["policy"] = BENCH_POLICY  # task credentials need a policy; signing ignores it
    sz = QUICK if args.quick else FULL
    started = time.time()
    load_before = os.getloadavg()[0]  # other work on the machine skews every figure: say how much there was
    figures: dict = {}

    log(f"limit: parse+verify CSR, SigningAuthority.sign_der (leaf + intermediate) in one process, best of {sz.limit_bursts} bursts")
    figures["limit_sign_per_s"] = stats.rounded(limit.sign_per_s(sz.limit_bursts, 0.5, limit.make_csrs(64)), 0)
    measure_cfssl(sz, figures)
    measure_crl(sz, figures)
    measure_lookups(figures)

    root = Path(tempfile.mkdtemp(prefix="tessera-bench-", dir="/tmp"))
    dep = Deployment(root)
    try:
        measure_issuer(dep, sz, figures, issuer_config)
        measure_floor(dep, sz, figures)
        measure_sidecar(dep, sz, figures)
        workload, serials = measure_task_credential(dep, sz, figures)
        try:
            measure_revocation_propagation(dep, sz, figures, serials)
        finally:
            workload.stdin.close()
            workload.wait(10)
        measure_taint(dep, sz, figures)
    except BaseException:
        dep.close()
        log(f"failed; daemon logs are in {root}")
        raise
    dep.close()
    shutil.rmtree(root, ignore_errors=True)
    log("PostgreSQL: a throwaway cluster (tests/pgcluster.py)")
    with Cluster.start() as pg:
        measure_postgres_signing(pg, sz, figures, issuer_config)
        measure_postgres_fleet(pg, sz, figures, issuer_config)
    compare_with_cfssl(figures)
    measure_rotation(sz, figures, issuer_config)  # its own issuer: a 60 s ca_ttl would rotate under every phase above

    meta = {"mode": "quick" if args.quick else "full", "cpus": os.cpu_count(), "seconds": round(time.time() - started, 1),
            "clients": sz.clients, "batch": sz.batch, "phase_runs": sz.phase_runs,
            "loadavg_before": load_before, "loadavg_after": os.getloadavg()[0],
            "issuer_config": {k: v for k, v in issuer_config.items() if k != "policy"}}
    print(f"Tessera benchmark ({meta['mode']}, {meta['cpus']} CPUs shared by issuer, sidecar and load clients; "
          f"load average {load_before:.1f} before, {meta['loadavg_after']:.1f} after; {meta['seconds']}s)")
    print(stats.table([(k, figures.get(k), note(k, figures, sz)) for k in ORDER
                       if k in figures or not k.startswith("unary_")]))  # the sweep is not in --quick
    if args.json:
        Path(args.json).write_text(json.dumps({**figures, "meta": meta}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
