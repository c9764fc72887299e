"""Tessera's main job, end to end, in a temporary directory.

An issuer (SQLite datastore) and a sidecar start as real processes; an entry is
registered for the current user; the unmodified `spiffe` client fetches an
X.509-SVID over the Workload API. Everything is stopped at the end.
"""

from __future__ import annotations

import datetime as dt
import os
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from harness import Deployment  # noqa: E402  (the same harness the end-to-end tests drive)


def step(msg: str) -> None:
    print(f"\n== {msg}", flush=True)


def main() -> int:
    with tempfile.TemporaryDirectory(prefix="tessera-demo-") as tmp:
        d = Deployment(Path(tmp))
        try:
            step("start the issuer (CA + SQLite datastore)")
            d.start_issuer()
            print(f"issuer listening on 127.0.0.1:{d.port}; admin socket {d.admin_socket}")

            step("create a join token and start a sidecar with it")
            d.start_sidecar("host-a")
            print(f"sidecar attested as {d.sidecar_id('host-a')}; Workload API at {d.socket('host-a')}")

            step(f"register an identity for uid {os.getuid()}")
            entry_id = d.entry("/agent/demo", "host-a", f"unix:uid:{os.getuid()}", owner="demo-team",
                               purpose="show the main job", x509_ttl="10m")
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
        finally:
            step("stop everything")
            d.close()
    print("done")
    return 0


if __name__ == "__main__":
    sys.exit(main())
