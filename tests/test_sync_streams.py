"""Connected sidecars cost the issuer no thread: more sync streams than its blocking-call threads all
get their snapshot and their pushes, and signing still answers while they are open."""

import queue
import threading

import grpc

from issuer_client import attested_stub, sign
from tessera.v1 import issuer_pb2

THREADS = 8  # the issuer's max_workers (its smallest allowed value)
SIDECARS = 3 * THREADS


def test_more_sync_streams_than_issuer_threads_all_get_snapshots_and_pushes(deployment):
    d = deployment
    d.start_issuer(max_workers=THREADS)
    events: "queue.Queue[tuple[int, str]]" = queue.Queue()
    stubs, calls = [], []
    for i in range(SIDECARS):
        stubs.append(attested_stub(d, f"s{i}"))
        calls.append(stubs[i].Sync(issuer_pb2.SyncRequest()))  # no deadline: cancelled when the test ends

        def read(i=i, call=calls[i]):
            try:
                for ev in call:
                    events.put((i, ev.WhichOneof("event")))
            except grpc.RpcError as e:  # cancelled at the end; anything else shows up in the failure
                events.put((i, f"ended: {e.code().name}"))

        threading.Thread(target=read, daemon=True).start()
    try:
        snapshots: set[int] = set()
        while len(snapshots) < SIDECARS:
            i, kind = events.get(timeout=20)
            assert not kind.startswith("ended"), (i, kind)
            if kind == "snapshot":
                snapshots.add(i)
        # With every stream open, a new entry is pushed to its sidecar, and signing answers.
        last = SIDECARS - 1
        entry = d.entry("/agent/last", f"s{last}")
        while events.get(timeout=10) != (last, "entry_upsert"):
            pass
        item = sign(stubs[last], entry)
        assert item.status_code == 0 and item.cert_chain
        # A revocation is pushed to every stream.
        d.cli("revoke", "--serial", item.serial, "--reason", "test")
        revoked: set[int] = set()
        while len(revoked) < SIDECARS:
            i, kind = events.get(timeout=10)
            assert not kind.startswith("ended"), (i, kind)
            if kind == "revocation":
                revoked.add(i)
    finally:
        for call in calls:
            call.cancel()
