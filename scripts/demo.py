"""Tessera's main job, end to end, in a temporary directory.

An issuer (SQLite datastore) and a sidecar start as real processes; an entry is
registered for the current user; the unmodified `spiffe` client fetches an
X.509-SVID over the Workload API; a task credential is started (its own serial
and scopes, decided by policy) and ended; openssl rejects the ended task's
certificate from the sidecar's crl.pem; and revoking the entry cuts off an open
Workload API stream. Everything is stopped at the end.

`--ha`: several issuers on PostgreSQL instead, one of them killed mid-way (scripts/demo_ha.py).
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from harness import Deployment, openssl_says_revoked, openssl_verify, wait_for  # noqa: E402
from taskutil import end_task, policy, start_task  # noqa: E402  (the same harness the end-to-end tests drive)

# Tasks are denied unless a rule allows them: the demo allows the scopes an entry grants.
DEMO_POLICY = policy()


def write_file(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def step(msg: str) -> None:
    print(f"\n== {msg}", flush=True)


def task_step(d: Deployment, out: Path) -> bool:
    from cryptography import x509

    from tessera import taskext

    r = start_task(d, "review-pr-7", out, "repo:read", context={"pr": 7})
    if r.returncode != 0:
        print(f"task start failed: {r.stderr}", file=sys.stderr)
        return False
    cert = x509.load_pem_x509_certificates((out / "svid.pem").read_bytes())[0]
    binding = taskext.read(cert)
    print(f"task:      {binding.task_id}")
    print(f"serial:    {r.stdout.strip()}")
    print(f"scopes:    {', '.join(binding.scopes)}")
    print(f"expires:   {cert.not_valid_after_utc.isoformat()}")
    step("end the task: its serial is revoked at once")
    r = end_task(d, "review-pr-7")
    if r.returncode != 0:
        print(f"task end failed: {r.stderr}", file=sys.stderr)
        return False
    print(f"revoked:   {r.stdout.strip()}")
    return True


def revocation_steps(d: Deployment, tmp: Path, entry_id: str) -> bool:
    out = tmp / "host-a-out"
    step("openssl, with only the sidecar's bundle.pem and crl.pem, rejects the ended task's certificate")
    cert = tmp / "task" / "svid.pem"
    try:
        wait_for(lambda: openssl_says_revoked(out / "bundle.pem", cert, out / "crl.pem"), timeout=5,
                 what="crl.pem listing the ended task")
    except AssertionError as e:
        print(e, file=sys.stderr)
        return False
    r = openssl_verify(out / "bundle.pem", cert, out / "crl.pem")
    print(next(line for line in (r.stdout + r.stderr).splitlines() if "revoked" in line))

    step("kill switch: revoke the agent's entry while a `spiffe` client holds an open stream")
    stream = d.stream("host-a")
    stream.next(20)
    started = time.time()
    print(d.cli("revoke", "--entry", entry_id, "--reason", "demo: agent retired").stdout.strip())
    returned = time.time()
    msg = stream.until(lambda m: m["event"] == "error", timeout=10)
    print(f"revoke returned after {1000 * (returned - started):.0f} ms (on disk)")
    lag = msg["t"] - returned
    when = f"{1000 * lag:.0f} ms after that" if lag > 0 else "before the CLI had even printed"
    print(f"open stream told to stop using its SVIDs {when}: {msg['error']}")
    after = d.fetch("host-a")
    print(f"a new fetch: {after.get('error', after.get('event'))}")
    return after.get("event") == "error"


def main() -> int:
    with tempfile.TemporaryDirectory(prefix="tessera-demo-") as tmp:
        d = Deployment(Path(tmp))
        try:
            step("start the issuer (CA + SQLite datastore)")
            d.start_issuer(policy=DEMO_POLICY)
            print(f"issuer listening on 127.0.0.1:{d.port}; admin socket {d.admin_socket}")

            step("its authorities: a root in the trust bundle, a rotating intermediate that signs, a JWT key")
            print(d.cli("ca", "list").stdout.rstrip())

            step("create a join token and start a sidecar with it (--join-token-file, a 0600 file: never in argv)")
            d.start_sidecar("host-a", output_dir=str(Path(tmp) / "host-a-out"))
            print(f"sidecar attested as {d.sidecar_id('host-a')}; Workload API at {d.socket('host-a')}")

            step(f"register an identity for uid {os.getuid()}")
            entry_id = d.entry("/agent/demo", "host-a", f"unix:uid:{os.getuid()}", owner="demo-team",
                               purpose="show the main job", x509_ttl="10m", scope=["repo:read", "repo:write"])
            print(f"entry {entry_id}")

            step("fetch an X.509-SVID with the unmodified `spiffe` client")
            ctx = d.fetch("host-a")
            if ctx.get("event") != "update":
                print(f"fetch failed: {ctx}", file=sys.stderr)
                return 1
            svid = ctx["svids"][0]
            print(f"SPIFFE ID: {svid['spiffe_id']}")
            print(f"serial:    {svid['serial']}")
            print(f"expires:   {dt.datetime.fromtimestamp(svid['not_after'], dt.timezone.utc).isoformat()}")
            r = openssl_verify(write_file(Path(tmp) / "roots.pem", ctx["bundle_pem"]),
                               write_file(Path(tmp) / "svid.pem", svid["svid_pem"]))
            print(f"openssl:   {r.stdout.strip()} (the root alone as CAfile, the intermediate sent with the leaf)")

            step("start a task: its own key, serial, scopes and a 5m lifetime")
            if not task_step(d, Path(tmp) / "task"):
                return 1
            if not revocation_steps(d, Path(tmp), entry_id):
                return 1
        finally:
            step("stop everything")
            d.close()
    print("done")
    return 0


if __name__ == "__main__":
    parser = argparse.ArgumentParser(prog="scripts/demo", description=__doc__.split("\n\n")[0])
    parser.add_argument("--ha", action="store_true", help="three issuers on a throwaway PostgreSQL, two sidecars, "
                                                          "one issuer killed mid-way")
    if parser.parse_args().ha:
        from demo_ha import main as ha_main
        sys.exit(ha_main())
    sys.exit(main())
