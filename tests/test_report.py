"""The trust-debt report: every kind of debt found, as data and through `tessera report`."""

import json
import time

import pytest

from harness import one_line_error
from issuer.audit import report
from issuer.core.models import Actor, AuditEvent, Entry, IssuedSerial, Sidecar
from issuer.datastore.sqlite import SQLiteDatastore

TD = "example.org"
DAY = 86400
OP = Actor("operator", "uid:0")
HOST_A = f"spiffe://{TD}/tessera/sidecar/host-a"


def entry(name: str, now: int, *, created_days_ago: int = 0, expires_in: int = 100 * DAY, tier: str = "low",
          selectors: tuple[str, ...] | None = None, state: str = "active") -> Entry:
    return Entry(id=f"id-{name}", spiffe_id=f"spiffe://{TD}/agent/{name}", parent_id=HOST_A,
                 selectors=selectors or (f"unix:path:/opt/{name}",), owner="alice", purpose="test", tier=tier,
                 scopes=(), x509_ttl=600, expires_at=now + expires_in, state=state, created_by="uid:0",
                 created_at=now - created_days_ago * DAY, updated_at=now - created_days_ago * DAY)


def seed(store: SQLiteDatastore, now: int) -> None:
    """One of each kind of debt, and things that are not debt next to them."""
    entries = [
        entry("unused", now, created_days_ago=60),
        entry("used", now, created_days_ago=60),
        entry("expiring", now, expires_in=3 * DAY),
        entry("expired", now, created_days_ago=1, expires_in=-3600),
        entry("high", now, tier="high"),
        entry("twin-1", now, selectors=("unix:uid:1234",)),
        entry("twin-2", now, selectors=("unix:uid:1234",)),
    ]
    for e in entries:
        store.create_entry(e, AuditEvent("entry.create", OP, "done", subject=e.id))
    store.upsert_sidecar(Sidecar(f"spiffe://{TD}/tessera/sidecar/host-silent", "host-silent", "active",
                                 now - 10 * DAY, now - 3 * DAY, "aa", now + 3600), None)
    store.upsert_sidecar(Sidecar(HOST_A, "host-a", "active", now - 10 * DAY, now, "bb", now + 3600), None)
    store.record_issued([IssuedSerial("c1", f"spiffe://{TD}/agent/used", "identity", "id-used", HOST_A,
                                      now - DAY, now + 600)], [])
    sidecar = Actor("sidecar", HOST_A)
    store.append_audit([
        AuditEvent("svid.deny", sidecar, "deny", reason="entry 'x' is not registered to " + HOST_A, subject="x"),
        AuditEvent("svid.deny", sidecar, "deny", reason="entry 'y' is not registered to " + HOST_A, subject="y"),
        AuditEvent("task.deny", sidecar, "deny", reason="scope too wide", details={"rule": "scope-cap"}),
        *[AuditEvent("task.issue", sidecar, "allow", details={"serial": f"t{i}", "kind": "task", "latency_ms": ms})
          for i, ms in enumerate([100, 200, 300, 400, 1000])],
    ])


def ids(rows):
    return sorted(r["id"] for r in rows)


def check_every_debt(rep: dict) -> None:
    assert ids(rep["unused_entries"]) == ["id-unused"]
    assert ids(rep["expiring_entries"]) == ["id-expiring"]
    assert ids(rep["expired_entries"]) == ["id-expired"]
    [shared] = rep["shared_selector_sets"]
    assert shared["entries"] == ["id-twin-1", "id-twin-2"] and shared["selectors"] == ["unix:uid:1234"]
    assert [s["id"] for s in rep["silent_sidecars"]] == [f"spiffe://{TD}/tessera/sidecar/host-silent"]
    ttc = rep["time_to_credential"]
    assert ttc == {"count": 5, "median_ms": 300, "p95_ms": 1000}
    denials = {(d["action"], d["reason"]): d["count"] for d in rep["denials_by_reason"]}
    assert denials == {("svid.deny", "entry <value> is not registered to <spiffe-id>"): 2,
                       ("task.deny", "scope-cap"): 1}


@pytest.fixture
def seeded(store):
    now = int(time.time())
    seed(store, now)
    return store, now


def build(store, now, **kw):
    return report.build(entries=store.list_entries(), sidecars=store.list_sidecars(),
                        last_issued=store.last_issued_by_entry(), audit=store.audit_records(), connected=set(),
                        now=now, **kw)


def test_report_finds_every_kind_of_debt(seeded):
    store, now = seeded
    rep = build(store, now, approval_covers=lambda e: False)
    check_every_debt(rep)
    assert ids(rep["uncovered_high_tier_entries"]["entries"]) == ["id-high"]


def test_high_tier_coverage_is_unavailable_without_a_policy_rather_than_guessed(seeded):
    store, now = seeded
    rep = build(store, now)
    assert rep["uncovered_high_tier_entries"] == {
        "available": False, "reason": "no approval policy is loaded in this issuer", "entries": []}
    covered = build(store, now, approval_covers=lambda e: e.tier == "high")
    assert covered["uncovered_high_tier_entries"] == {"available": True, "entries": []}


def test_connected_sidecar_is_not_silent(seeded):
    store, now = seeded
    rep = report.build(entries=[], sidecars=store.list_sidecars(), last_issued={}, audit=[],
                       connected={f"spiffe://{TD}/tessera/sidecar/host-silent"}, now=now)
    assert rep["silent_sidecars"] == []


def test_thresholds_change_what_counts_as_debt(seeded):
    store, now = seeded
    rep = build(store, now, thresholds=report.Thresholds(unused_days=90, expiring_days=1, silent_hours=100))
    assert rep["unused_entries"] == [] and rep["expiring_entries"] == [] and rep["silent_sidecars"] == []


def test_percentile_is_nearest_rank():
    assert report.percentile([], 95) is None
    assert report.percentile([5.0], 95) == 5.0
    assert report.percentile(list(range(1, 101)), 95) == 95


def test_tessera_report_json_on_a_seeded_store_lists_every_debt(deployment):
    d = deployment
    d.issuer_dir.mkdir(parents=True)
    store = SQLiteDatastore(d.issuer_dir / "tessera.db")
    seed(store, int(time.time()))
    store.close()
    # A policy whose high tier needs no human and whose only approval rule is about prod:
    # the seeded high-tier entry is then access no approval rule covers.
    d.start_issuer(policy={"tiers": {"low": {"max_task_ttl": "1h", "max_identity_ttl": "1h"},
                                     "high": {"max_task_ttl": "15m", "max_identity_ttl": "30m"}},
                           "rules": [{"name": "prod-needs-a-human", "effect": "require_approval",
                                      "condition": 'has(context.env) && context.env == "prod"',
                                      "reason": "prod needs a human"},
                                     {"name": "allow", "effect": "allow", "condition": "true", "reason": "ok"}]})
    rep = json.loads(d.cli("report", "--output", "json").stdout)
    check_every_debt(rep)
    assert rep["uncovered_high_tier_entries"]["available"] is True
    assert ids(rep["uncovered_high_tier_entries"]["entries"]) == ["id-high"]
    table = d.cli("report").stdout
    for needle in ("id-unused", "id-expiring", "id-expired", "id-twin-1", "host-silent", "scope-cap",
                   "median 300.0 ms", "id-high"):
        assert needle in table, needle
    bad = d.cli("report", "--unused-days", "-1", check=False)
    one_line_error(bad)
