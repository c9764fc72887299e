"""The issuer's Prometheus metrics: every family in one place, and the functions that feed them.

Issuances, denials and time to credential are derived from committed audit
records (`observe_audit`, an audit listener), so every decision any part of
the issuer audits is counted the same way and nothing is counted that did not
commit. Latency, gauges and the CRL are fed by the code that knows them.

Authorities' seconds to expiry are computed at each scrape from the records last handed to
`set_authorities` (called at start and after every authority change), so the value is current
between changes and an authority leaves the metric once it is revoked or expired.
"""

from __future__ import annotations

import threading
import time
from typing import Iterable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import GaugeMetricFamily

from issuer.audit import report
from issuer.audit.records import AuditFile, denial_reason
from issuer.core.events import EventHub
from issuer.core.models import AuditRecord, Authority
from issuer.datastore.feed import ChangeFollower
from tessera import metricsserver

REGISTRY = CollectorRegistry(auto_describe=True)

_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)
# Time to credential includes a human approving, so it spans seconds to hours.
_TTC_BUCKETS = (0.01, 0.05, 0.1, 0.5, 1, 5, 30, 60, 300, 900, 3600, 4 * 3600, 24 * 3600)

ISSUANCES = Counter("tessera_issuer_issuances", "Certificates issued, by kind (identity, task, sidecar)",
                    ["kind"], registry=REGISTRY)
ISSUANCE_LATENCY = Histogram("tessera_issuer_issuance_latency_seconds",
                             "Time from receiving a signing request to the durable, signed answer, by kind",
                             ["kind"], buckets=_LATENCY_BUCKETS, registry=REGISTRY)
DENIALS = Counter("tessera_issuer_denials", "Refused requests, by audited action and reason",
                  ["action", "reason"], registry=REGISTRY)
TIME_TO_CREDENTIAL = Histogram("tessera_issuer_time_to_credential_seconds",
                               "Time from a credential request to the credential, approvals included, by kind",
                               ["kind"], buckets=_TTC_BUCKETS, registry=REGISTRY)
PENDING_APPROVALS = Gauge("tessera_issuer_pending_approvals", "Task requests waiting for an operator's approval",
                          registry=REGISTRY)
REVOCATIONS = Counter("tessera_issuer_revocations", "Serials revoked, by what the revocation targeted",
                      ["target"], registry=REGISTRY)
CRL_NUMBER = Gauge("tessera_issuer_crl_number", "CRL number of each publishing authority's latest CRL",
                   ["authority"], registry=REGISTRY)
CRL_SIZE_BYTES = Gauge("tessera_issuer_crl_size_bytes", "DER size of all the CRLs published now", registry=REGISTRY)
CRL_ENTRIES = Gauge("tessera_issuer_crl_entries", "Revoked serials listed in all the CRLs published now",
                    registry=REGISTRY)
CONNECTED_SIDECARS = Gauge("tessera_issuer_connected_sidecars", "Sidecars with an open sync stream",
                           registry=REGISTRY)
CHANGE_FEED_POSITION = Gauge("tessera_issuer_change_feed_position",
                             "Last change-feed position this issuer has applied (compare across issuers)",
                             registry=REGISTRY)
CHANGE_FEED_FAILING = Gauge("tessera_issuer_change_feed_failing",
                            "Consecutive failed reads of the change feed: above 0, other issuers' changes are not "
                            "reaching this one's sidecars (alert on it)", registry=REGISTRY)
AUDIT_RECORDS = Counter("tessera_issuer_audit_records", "Audit records committed", registry=REGISTRY)
AUDIT_FILE_BEHIND = Gauge("tessera_issuer_audit_file_behind",
                          "1 while the JSON-lines audit file lags the database after a failed write", registry=REGISTRY)


class _Authorities:
    """tessera_authority_expiry_seconds{kind,id,state}: seconds from the scrape to each authority's notAfter;
    tessera_authority_awaiting_offline_signature: active offline-signed intermediates the report lists as
    having no signed successor (the operator must sign one; alert when above 0)."""

    EXPIRY = "tessera_authority_expiry_seconds"
    AWAITING = "tessera_authority_awaiting_offline_signature"

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._records: tuple[Authority, ...] = ()

    def set(self, authorities: Iterable[Authority]) -> None:
        with self._lock:
            self._records = tuple(authorities)

    def describe(self):
        return [GaugeMetricFamily(self.EXPIRY, "", labels=["kind", "id", "state"]), GaugeMetricFamily(self.AWAITING, "")]

    def collect(self):
        now = time.time()
        with self._lock:
            records = self._records
        expiry = GaugeMetricFamily(self.EXPIRY, "Seconds until each unexpired, unrevoked authority's notAfter",
                                   labels=["kind", "id", "state"])
        # Revoked ones are no longer trusted, expired ones no longer matter, and an intermediate waiting for its
        # offline-signed certificate has no notAfter yet; leaving them out keeps the label set small.
        for a in records:
            if a.state != "revoked" and (a.kind == "jwt" or a.cert_der) and a.not_after > now:
                expiry.add_metric([a.kind, a.id, a.state], a.not_after - now)
        yield expiry
        yield GaugeMetricFamily(self.AWAITING, "Active offline-signed intermediates past half their life with no "
                                "signed successor", value=len(report.offline_without_successor(records, int(now))))


AUTHORITIES = _Authorities()
REGISTRY.register(AUTHORITIES)


# -- fed from the audit trail ----------------------------------------------------------------

def issuance_kind(record: AuditRecord) -> str | None:
    """The kind of certificate an allowed audit record issued, or None when it issued none."""
    d = record.details if isinstance(record.details, dict) else {}
    if record.decision != "allow" or "serial" not in d or not d.get("kind"):
        return None
    return str(d["kind"])  # every issuing path records it: identity, task, sidecar, issuer


def observe_audit(records: Iterable[AuditRecord]) -> None:
    """Audit listener: count issuances and denials, and observe time to credential."""
    for r in records:
        AUDIT_RECORDS.inc()
        kind = issuance_kind(r)
        if kind is not None:
            ISSUANCES.labels(kind).inc()
            latency_ms = r.details.get("latency_ms")
            if isinstance(latency_ms, (int, float)):
                TIME_TO_CREDENTIAL.labels(kind).observe(latency_ms / 1000.0)
        elif r.decision == "deny":
            DENIALS.labels(r.action, denial_reason(r)).inc()


# -- fed by the features that own the state ------------------------------------------------


def observe_issuance_latency(kind: str, seconds: float, count: int = 1) -> None:
    """Signing paths call this once per request with how many certificates it produced."""
    h = ISSUANCE_LATENCY.labels(kind)
    for _ in range(count):
        h.observe(seconds)


def set_pending_approvals(n: int) -> None:
    """The approval queue calls this whenever the number of requests whose callers wait on this issuer changes."""
    PENDING_APPROVALS.set(n)


def count_revocations(target: str, serials: int) -> None:
    """The revocation service calls this after committing: target is serial|task|entry|spiffe_id|sidecar|owner."""
    if serials:
        REVOCATIONS.labels(target).inc(serials)


def set_crls(numbers: dict[str, int], size_bytes: int, entries: int) -> None:
    """The CRL publisher calls this after publishing the CRL set (authority id -> CRL number); authorities that no
    longer publish leave the metric."""
    CRL_NUMBER.clear()
    for authority, number in numbers.items():
        CRL_NUMBER.labels(authority).set(number)
    CRL_SIZE_BYTES.set(size_bytes)
    CRL_ENTRIES.set(entries)


def set_authorities(authorities: Iterable[Authority]) -> None:
    """The authorities' owner calls this with every record, at start and after each change."""
    AUTHORITIES.set(authorities)


def watch_connected_sidecars(hub: EventHub) -> None:
    CONNECTED_SIDECARS.set_function(lambda: len(hub.connected()))


def watch_change_feed(follower: ChangeFollower) -> None:
    CHANGE_FEED_POSITION.set_function(lambda: float(follower.position))
    CHANGE_FEED_FAILING.set_function(lambda: float(follower.failures))


def watch_audit_file(audit_file: AuditFile) -> None:
    AUDIT_FILE_BEHIND.set_function(lambda: float(audit_file.behind))


def serve(address: str):
    """Serve this daemon's /metrics on HOST:PORT; returns the HTTP server."""
    return metricsserver.serve(address, REGISTRY)
