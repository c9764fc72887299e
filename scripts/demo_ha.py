"""`scripts/demo --ha`: the kill switch with no single point of failure, end to end, in a temporary directory.

A throwaway PostgreSQL cluster (tests/pgcluster.py: initdb and pg_ctl on a Unix socket in a temporary directory)
holds one database; three equal issuer processes run on it; two sidecars are attached to different issuers, each
configured with all three addresses; unmodified `spiffe` clients fetch and stream SVIDs behind both. Then the
issuer host-a uses is killed with SIGKILL: host-a fails over to another issuer and keeps serving. A revocation made
at a third issuer cuts the open streams on both sidecars and reaches both sidecars' crl.pem, and `tessera audit
verify` checks the one audit chain the three issuers wrote. Everything is stopped and removed at the end, also
after a failure or Ctrl-C.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from demo import step, write_file  # noqa: E402
from harness import Deployment, openssl_says_revoked, peer_deployments, wait_for  # noqa: E402
from pgcluster import Cluster  # noqa: E402

OWNER = "demo-team"


def synced_lines(d: Deployment, name: str) -> list[dict]:
    """The sidecar's "synced with issuer" log lines: one after each reconnect, with the issuer and the time it took."""
    out = []
    for line in d.sidecars[name].log_path.read_text(errors="replace").splitlines():
        if line.startswith("{") and '"synced with issuer"' in line:
            out.append(json.loads(line))
    return out


def crl_serials(path: Path) -> set[str]:
    from tessera import crl as crl_mod

    return {s for c in crl_mod.load_all(path.read_bytes()) for s in crl_mod.serials(c)} if path.exists() else set()


def run(root: Path, dsn: str, issuers: list[Deployment]) -> bool:
    step("start three equal issuers on that one database (one key-encryption key, in TESSERA_KEK)")
    one, two, three = issuers
    for i, d in enumerate(issuers, 1):
        d.start_issuer()
        print(f"issuer {i}: 127.0.0.1:{d.port}, admin socket {d.admin_socket}")
    print("their authorities, created once by the first and adopted by the others (issuer 3's view):")
    print(three.cli("ca", "list").stdout.rstrip())

    step("two sidecars on different issuers, each configured with all three addresses")
    addresses = [f"127.0.0.1:{d.port}" for d in issuers]
    sidecars = {"host-a": (one, addresses), "host-b": (three, [addresses[2], addresses[0], addresses[1]])}
    for name, (d, order) in sidecars.items():
        d.start_sidecar(name, output_dir=str(root / f"out-{name}"), issuer_address=order)
        print(f"{name}: joined with a token from issuer {issuers.index(d) + 1}; issuer_address {order}")

    step(f"register an identity behind each sidecar at issuer 2 (owner {OWNER}); it reaches the others' sidecars")
    uid = f"unix:uid:{os.getuid()}"
    entries = {name: two.entry(f"/agent/{name}", name, uid, owner=OWNER, purpose="the HA demo", x509_ttl="10m")
               for name in sidecars}
    for name, entry_id in entries.items():
        print(f"{name}: entry {entry_id}")

    step("fetch an X.509-SVID behind each sidecar with the unmodified `spiffe` client, and keep a stream open")
    svids: dict[str, dict] = {}
    streams = {}
    for name, (d, _) in sidecars.items():
        streams[name] = d.stream(name)
        update = streams[name].until(lambda m: m["event"] == "update", timeout=30)
        svids[name] = update["svids"][0]
        write_file(root / f"{name}-svid.pem", svids[name]["svid_pem"])
        print(f"{name}: {svids[name]['spiffe_id']}  serial {svids[name]['serial']}  (stream open)")

    step("kill -9 issuer 1, the issuer host-a is connected to")
    before = len(synced_lines(one, "host-a"))
    one.issuer.kill9()
    print(f"issuer 1 (pid {one.issuer.proc.pid}) killed")
    ctx = one.fetch("host-a")
    if ctx.get("event") != "update":
        print(f"host-a's Workload API failed while its issuer was down: {ctx}", file=sys.stderr)
        return False
    print(f"host-a's Workload API meanwhile: serial {ctx['svids'][0]['serial']} (served from the sidecar's cache)")
    line = wait_for(lambda: synced_lines(one, "host-a")[before:], timeout=30, interval=0.05,
                    what="host-a resynced on another issuer")[0]
    n = addresses.index(line["issuer"]) + 1 if line["issuer"] in addresses else line["issuer"]
    print(f"host-a failed over to issuer {n} ({line['issuer']}) and resynced there "
          f"{line['after_seconds']:.2f} s after losing its stream")

    step(f"revoke everything owner {OWNER} holds, at issuer 2 (host-a is now on issuer {n}, host-b on issuer 3): "
         "both open streams are cut")
    started = time.time()
    print(two.cli("revoke", "--owner", OWNER, "--reason", "demo: agents retired").stdout.strip())
    returned = time.time()
    print(f"revoke returned after {1000 * (returned - started):.0f} ms (committed in PostgreSQL)")
    ok = True
    for name, (d, _) in sidecars.items():
        msg = streams[name].until(lambda m: m["event"] == "error", timeout=10)
        lag = msg["t"] - returned
        when = f"{1000 * lag:.0f} ms after that" if lag > 0 else "before the CLI had even printed"
        print(f"{name}: the open stream was told to stop using its SVIDs {when}: {msg['error']}")

    step("each sidecar's crl.pem lists both serials; openssl, with only the sidecar's files, rejects them")
    serials = {s["serial"] for s in svids.values()}
    for name, (d, _) in sidecars.items():
        crl = root / f"out-{name}" / "crl.pem"
        try:
            wait_for(lambda: serials <= crl_serials(crl), timeout=10, what=f"both serials in {name}'s crl.pem")
        except AssertionError as e:
            print(e, file=sys.stderr)
            ok = False
            continue
        verdicts = [openssl_says_revoked(root / f"out-{name}" / "bundle.pem", root / f"{other}-svid.pem", crl)
                    for other in sidecars]
        print(f"{name}: crl.pem lists both serials; openssl -crl_check_all: "
              f"{'certificate revoked, for both SVIDs' if all(verdicts) else verdicts}")
        ok = ok and all(verdicts)

    step("restart issuer 1: it rejoins as an equal peer, with what was committed while it was down")
    one.issuer.start()
    state = json.loads(one.cli("entry", "show", entries["host-a"], "--output", "json").stdout)["state"]
    print(f"issuer 1 sees host-a's entry as {state}")
    ok = ok and state == "revoked"

    step("tessera audit verify: one hash chain, written by three issuer processes")
    for label, r in (("through issuer 3", three.cli("audit", "verify", check=False)),
                     ("straight from the database", two.cli("audit", "verify", "--db", dsn, check=False))):
        print(f"{label}: {(r.stdout or r.stderr).strip()}")
        ok = ok and r.returncode == 0
    return ok


def _interrupt(*_) -> None:
    raise KeyboardInterrupt


def main() -> int:
    signal.signal(signal.SIGTERM, _interrupt)  # a kill ends the demo through the same clean-up as Ctrl-C
    ok = False
    with tempfile.TemporaryDirectory(prefix="tessera-demo-ha-") as tmp:
        root = Path(tmp)
        pg: Cluster | None = None
        issuers: list[Deployment] = []
        try:
            step("start a throwaway PostgreSQL: initdb and pg_ctl in a temporary directory")
            pg = Cluster.start()
            dsn = pg.new_database("demo")
            print(f"PostgreSQL {pg.bindir.parent.name}, on a Unix socket only (no TCP port): {dsn}")
            issuers = peer_deployments(root, 3, dsn)
            ok = run(root, dsn, issuers)
        except KeyboardInterrupt:
            print("\ninterrupted", file=sys.stderr)
        except AssertionError as e:  # a wait that timed out, a daemon that did not start: says what
            print(f"failed: {e}", file=sys.stderr)
        finally:
            for sig in (signal.SIGINT, signal.SIGTERM):  # a second Ctrl-C or kill does not cut the clean-up short
                signal.signal(sig, signal.SIG_IGN)
            step("stop everything: workloads, sidecars, issuers, PostgreSQL")
            for d in issuers:
                d.close()
            if pg is not None:
                pg.stop()
    print("done" if ok else "the demo did not complete")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
