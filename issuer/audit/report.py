"""The trust-debt report: access that has outlived its reason, authorities running out, and how fast
credentials arrive.

Pure computations over what the store holds. The approval-coverage check needs
the policy engine, so it is a parameter: without one the report says the item
is unavailable instead of guessing.

Authorities: one is "expiring" when it is active or prepared (it signs, or is meant to) and has less than
its expiry window left: a third of its lifetime or 7 days, whichever is shorter. An intermediate or JWT key
that rotates on its own is replaced at two thirds of its life, so one that shows up here is a rotation that
has not happened; a root (ten years) shows up 7 days ahead, time enough for `tessera ca prepare --kind root`
to reach the fleet. Retired and tainted authorities are not listed: nothing new depends on them, and
nothing they signed outlives them. Separately, an active intermediate signed by an offline root with no
signed successor is listed from half its life on (when the issuer starts warning in its log): Tessera
cannot renew it, only the operator can, by signing the prepared CSR and running `tessera ca activate`.
"""

from __future__ import annotations

import math
import statistics
from collections import Counter
from dataclasses import dataclass
from typing import Callable, Iterable, Mapping

from issuer.audit.records import denial_reason
from issuer.ca.authorities import WARN_OFFLINE_AT
from issuer.core.models import AuditRecord, Authority, Entry, Sidecar

DAY = 86400
HOUR = 3600
AUTHORITY_WINDOW_FRACTION = 1 / 3  # of an authority's lifetime: its expiry window ...
AUTHORITY_WINDOW_MAX = 7 * DAY  # ... unless this is shorter
DEFAULT_HIGH_TIERS = frozenset({"high", "critical"})


@dataclass(frozen=True)
class Thresholds:
    unused_days: int = 30  # entries with no issuance in this many days
    expiring_days: int = 14  # entries expiring within this many days
    silent_hours: int = 24  # sidecars not seen for this many hours


def _entry_row(e: Entry, **extra) -> dict:
    return {"id": e.id, "spiffe_id": e.spiffe_id, "owner": e.owner, "tier": e.tier, "state": e.state,
            "expires_at": e.expires_at, **extra}


def percentile(values: list[float], p: float) -> float | None:
    """Nearest-rank percentile (p in 0..100); None for no values."""
    if not values:
        return None
    ordered = sorted(values)
    return ordered[max(0, math.ceil(p / 100 * len(ordered)) - 1)]


def unused_entries(entries: Iterable[Entry], last_issued: Mapping[str, int], now: int, days: int) -> list[dict]:
    """Active entries older than `days` with no SVID issued in the last `days`."""
    cutoff = now - days * DAY
    out = []
    for e in entries:
        if e.state != "active" or e.created_at > cutoff:
            continue
        last = last_issued.get(e.id)
        if last is None or last < cutoff:
            out.append(_entry_row(e, last_issued_at=last))
    return out


def expiring_entries(entries: Iterable[Entry], now: int, days: int) -> list[dict]:
    return [_entry_row(e, expires_in_seconds=e.expires_at - now) for e in entries
            if e.state != "revoked" and now < e.expires_at <= now + days * DAY]


def expired_entries(entries: Iterable[Entry], now: int) -> list[dict]:
    """Entries past expiry still in the registry: they serve nothing but should be cleaned up or renewed."""
    return [_entry_row(e, expired_for_seconds=now - e.expires_at) for e in entries if e.expires_at <= now]


def uncovered_high_tier(entries: Iterable[Entry], approval_covers: Callable[[Entry], bool] | None,
                        high_tiers: frozenset[str]) -> dict:
    if approval_covers is None:
        return {"available": False, "reason": "no approval policy is loaded in this issuer", "entries": []}
    return {"available": True, "entries": [
        _entry_row(e) for e in entries
        if e.state == "active" and e.tier in high_tiers and not approval_covers(e)]}


def shared_selector_sets(entries: Iterable[Entry]) -> list[dict]:
    """Active entries on one sidecar with the same selector set: one process gets several identities."""
    groups: dict[tuple[str, tuple[str, ...]], list[Entry]] = {}
    for e in entries:
        if e.state == "active":
            groups.setdefault((e.parent_id, tuple(sorted(e.selectors))), []).append(e)
    return [{"parent_id": parent, "selectors": list(sels), "entries": [e.id for e in group],
             "spiffe_ids": sorted({e.spiffe_id for e in group})}
            for (parent, sels), group in sorted(groups.items()) if len(group) > 1]


def silent_sidecars(sidecars: Iterable[Sidecar], connected: set[str], now: int, hours: int) -> list[dict]:
    cutoff = now - hours * HOUR
    return [{"id": s.id, "last_seen": s.last_seen, "silent_seconds": now - s.last_seen}
            for s in sidecars if s.state == "active" and s.id not in connected and s.last_seen < cutoff]


def _has_validity(a: Authority) -> bool:
    """A JWT key, or a certificate: an intermediate waiting for its offline-signed one has no notAfter yet."""
    return a.kind == "jwt" or bool(a.cert_der)


def expiry_window(a: Authority) -> int:
    """How long before its notAfter an authority counts as expiring (see the module docstring)."""
    return int(min((a.not_after - a.not_before) * AUTHORITY_WINDOW_FRACTION, AUTHORITY_WINDOW_MAX))


def _authority_row(a: Authority, now: int, **extra) -> dict:
    return {"id": a.id, "kind": a.kind, "state": a.state, "source": a.source, "not_before": a.not_before,
            "not_after": a.not_after, "expires_in_seconds": a.not_after - now, **extra}


def expiring_authorities(authorities: Iterable[Authority], now: int) -> list[dict]:
    """Active and prepared authorities within their expiry window, soonest first."""
    rows = [_authority_row(a, now, window_seconds=expiry_window(a)) for a in authorities
            if a.state in ("active", "prepared") and _has_validity(a)
            and now < a.not_after <= now + expiry_window(a)]
    return sorted(rows, key=lambda r: r["not_after"])


def offline_without_successor(authorities: Iterable[Authority], now: int) -> list[dict]:
    """Active intermediates an offline root signed, past WARN_OFFLINE_AT of their life, with no prepared intermediate
    that holds its certificate yet; `awaiting_certificate` names the prepared one whose CSR waits to be signed."""
    authorities = list(authorities)
    signed = [a for a in authorities if a.kind == "x509" and a.state == "prepared" and a.cert_der and a.not_after > now]
    waiting = [a for a in authorities if a.kind == "x509" and a.state == "prepared" and not a.cert_der]
    out = []
    for a in authorities:
        if (a.kind != "x509" or a.state != "active" or a.source != "offline" or not a.cert_der
                or a.not_after <= now or now < a.not_before + (a.not_after - a.not_before) * WARN_OFFLINE_AT):
            continue
        if any(s.created_at >= a.created_at for s in signed):
            continue
        pending = [w.id for w in waiting if w.created_at >= a.created_at]
        out.append(_authority_row(a, now, awaiting_certificate=pending[0] if pending else None))
    return out


def time_to_credential(records: Iterable[AuditRecord]) -> dict:
    """Median and p95 of latency_ms over credential issuances (allowed records that carry latency_ms)."""
    values = [float(r.details["latency_ms"]) for r in records
              if r.decision == "allow" and isinstance(r.details.get("latency_ms"), (int, float))]
    return {"count": len(values),
            "median_ms": statistics.median(values) if values else None,
            "p95_ms": percentile(values, 95)}


def denials_by_reason(records: Iterable[AuditRecord]) -> list[dict]:
    counts = Counter((r.action, denial_reason(r)) for r in records if r.decision == "deny")
    return [{"action": a, "reason": why, "count": n}
            for (a, why), n in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))]


def build(*, entries: list[Entry], sidecars: list[Sidecar], last_issued: Mapping[str, int],
          audit: list[AuditRecord], connected: set[str], now: int, thresholds: Thresholds = Thresholds(),
          approval_covers: Callable[[Entry], bool] | None = None,
          high_tiers: frozenset[str] = DEFAULT_HIGH_TIERS, authorities: Iterable[Authority] = ()) -> dict:
    """The whole report as plain data (what `tessera report --output json` prints).

    `last_issued` maps entry ids to when a certificate was last issued for them; `audit` needs only
    the records of the last `unused_days` (older ones are ignored); `authorities` is every authority record.
    """
    authorities = list(authorities)
    since = now - thresholds.unused_days * DAY
    window = [r for r in audit if r.ts >= since]
    return {
        "generated_at": now,
        "thresholds": {"unused_days": thresholds.unused_days, "expiring_days": thresholds.expiring_days,
                       "silent_hours": thresholds.silent_hours, "high_tiers": sorted(high_tiers),
                       "authority_window_fraction": AUTHORITY_WINDOW_FRACTION,
                       "authority_window_max_seconds": AUTHORITY_WINDOW_MAX},
        "unused_entries": unused_entries(entries, last_issued, now, thresholds.unused_days),
        "expiring_entries": expiring_entries(entries, now, thresholds.expiring_days),
        "expired_entries": expired_entries(entries, now),
        "uncovered_high_tier_entries": uncovered_high_tier(entries, approval_covers, high_tiers),
        "shared_selector_sets": shared_selector_sets(entries),
        "silent_sidecars": silent_sidecars(sidecars, connected, now, thresholds.silent_hours),
        "expiring_authorities": expiring_authorities(authorities, now),
        "offline_intermediates_without_successor": offline_without_successor(authorities, now),
        # Over the same window as "unused": the last unused_days days of the trail.
        "time_to_credential": time_to_credential(window),
        "denials_by_reason": denials_by_reason(window),
    }
