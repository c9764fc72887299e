"""The sidecar's Prometheus metrics: cache contents, sync state and how fast issuer changes arrive."""

from __future__ import annotations

import time
from typing import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from tessera import metricsserver

REGISTRY = CollectorRegistry(auto_describe=True)

_DELAY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)

PROPAGATION_DELAY = Histogram(
    "tessera_sidecar_propagation_delay_seconds",
    "From the issuer committing a change to this sidecar applying it, by sync event kind "
    "(entry_upsert, entry_deleted, bundle, and revocations once they flow through sync)",
    ["event"], buckets=_DELAY_BUCKETS, registry=REGISTRY)
SYNC_EVENTS = Counter("tessera_sidecar_sync_events", "Sync events applied, by kind", ["event"], registry=REGISTRY)
CACHED_SVIDS = Gauge("tessera_sidecar_cached_svids", "SVIDs held in the cache, ready to serve", registry=REGISTRY)
CACHED_ENTRIES = Gauge("tessera_sidecar_cached_entries", "Entries this sidecar may serve", registry=REGISTRY)
CRL_NUMBER = Gauge("tessera_sidecar_crl_number", "CRL number of each signing authority's CRL this sidecar enforces",
                   ["authority"], registry=REGISTRY)
CRL_ENTRIES = Gauge("tessera_sidecar_crl_entries", "Revoked serials in all the CRLs this sidecar enforces",
                    registry=REGISTRY)
ISSUER_FAILOVERS = Counter("tessera_sidecar_issuer_failovers",
                           "Times the sync stream moved to another issuer address after the current one was lost",
                           registry=REGISTRY)
SYNCED = Gauge("tessera_sidecar_synced", "1 once a snapshot from the issuer has been applied", registry=REGISTRY)


def observe_sync_event(kind: str, committed_at: float) -> None:
    """Count an applied sync event and, when the issuer stamped it, how long it took to get here."""
    SYNC_EVENTS.labels(kind).inc()
    if committed_at > 0:
        # Issuer and sidecar clocks differ slightly; a negative delay means "no measurable delay".
        PROPAGATION_DELAY.labels(kind).observe(max(0.0, time.time() - committed_at))


def set_crls(numbers: dict[str, int], entries: int) -> None:
    """The sidecar's revocation handling calls this after putting a set of CRLs in force (authority id -> number);
    authorities no longer in the set leave the metric."""
    CRL_NUMBER.clear()
    for authority, number in numbers.items():
        CRL_NUMBER.labels(authority).set(number)
    CRL_ENTRIES.set(entries)


def watch_cache(svids: Callable[[], int], entries: Callable[[], int], synced: Callable[[], bool]) -> None:
    CACHED_SVIDS.set_function(svids)
    CACHED_ENTRIES.set_function(entries)
    SYNCED.set_function(lambda: 1.0 if synced() else 0.0)


def serve(address: str):
    """Serve this daemon's /metrics on HOST:PORT; returns the HTTP server."""
    return metricsserver.serve(address, REGISTRY)
