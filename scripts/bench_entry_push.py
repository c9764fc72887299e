"""How fast registration changes reach a workload: entry create/delete to an open `spiffe` stream.

Run with the project's virtualenv: `.venv/bin/python scripts/bench_entry_push.py [rounds]`.
Real issuer and sidecar (the test harness), the unmodified `spiffe` client in its own process.
Times are taken from the moment the `tessera entry create|delete` process is started, and the
CLI's own start-up time is printed beside them for scale.
"""

from __future__ import annotations

import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from harness import BIN, Deployment  # noqa: E402


def main(rounds: int) -> int:
    with tempfile.TemporaryDirectory(prefix="tessera-push-") as tmp:
        d = Deployment(Path(tmp))
        try:
            d.start_issuer()
            d.start_sidecar("host-a")
            d.entry("/agent/base", "host-a")
            stream = d.stream("host-a")
            stream.next(20)
            added, removed = [], []
            for i in range(rounds):
                t0 = time.time()
                entry_id = d.entry(f"/agent/x{i}", "host-a")
                msg = stream.until(lambda m: any(s["spiffe_id"].endswith(f"/x{i}") for s in m.get("svids", [])), 10)
                added.append((msg["t"] - t0) * 1000)
                t0 = time.time()
                d.cli("entry", "delete", entry_id)
                msg = stream.until(lambda m: not any(s["spiffe_id"].endswith(f"/x{i}") for s in m.get("svids", [])),
                                   10)
                removed.append((msg["t"] - t0) * 1000)
            cli = []
            for _ in range(5):
                t0 = time.time()
                subprocess.run([str(BIN / "tessera"), "--help"], capture_output=True)
                cli.append((time.time() - t0) * 1000)
        finally:
            d.close()
    print(f"entry create -> open stream holds the new SVID: median {statistics.median(added):.0f} ms, "
          f"max {max(added):.0f} ms ({rounds} rounds)")
    print(f"entry delete -> open stream drops it:          median {statistics.median(removed):.0f} ms, "
          f"max {max(removed):.0f} ms")
    print(f"for scale, `tessera --help` alone:              median {statistics.median(cli):.0f} ms")
    return 0


if __name__ == "__main__":
    sys.exit(main(int(sys.argv[1]) if len(sys.argv) > 1 else 10))
