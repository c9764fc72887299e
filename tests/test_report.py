"""The trust-debt report: every kind of debt found, as data and through `tessera report`."""

import json
import time

import pytest

from harness import one_line_error
from issuer.audit import report
from issuer.core.models import Actor, AuditEvent, Authority, Entry, IssuedSerial, Sidecar
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


# -- authorities running out ----------------------------------------------------------------------

def authority(name: str, kind: str, state: str, now: int, *, life: int, left: int, source: str = "root",
              created_ago: int | None = None, signed: bool = True) -> Authority:
    """A record as the Authorities service stores it; `left` seconds to its notAfter out of `life`."""
    not_after = now + left
    return Authority(id=name, kind=kind, state=state, source=source, parent="root" if kind == "x509" else None,
                     public_der=b"k", cert_der=b"c" if signed and kind != "jwt" else b"", sealed_key=b"s", kek_id="x",
                     not_before=not_after - life, not_after=not_after,
                     created_at=now - (created_ago if created_ago is not None else life - left))


def test_authorities_in_the_last_third_of_their_life_or_7_days_are_expiring_if_they_sign():
    now = int(time.time())
    week, ten_years = 7 * DAY, 3650 * DAY
    records = [
        authority("root-soon", "root", "active", now, life=ten_years, left=6 * DAY, source="created"),
        authority("root-fine", "root", "prepared", now, life=ten_years, left=8 * DAY, source="created"),
        authority("stalled", "x509", "active", now, life=week, left=2 * DAY),  # a rotation that did not happen
        authority("young", "x509", "prepared", now, life=week, left=3 * DAY),  # a third of 7d is 2.33d
        authority("retired", "x509", "retired", now, life=week, left=DAY),  # nothing new depends on it
        authority("tainted", "x509", "tainted", now, life=week, left=DAY),
        authority("gone", "x509", "active", now, life=week, left=-1),
        authority("jwt-soon", "jwt", "active", now, life=3600, left=1000),
        authority("csr-waiting", "x509", "prepared", now, life=0, left=0, source="offline", signed=False),
    ]
    rows = report.expiring_authorities(records, now)
    assert [r["id"] for r in rows] == ["jwt-soon", "stalled", "root-soon"]  # soonest first
    assert rows[0]["window_seconds"] == 1200 and rows[2]["window_seconds"] == 7 * DAY
    assert rows[1]["expires_in_seconds"] == 2 * DAY


def test_an_offline_signed_intermediate_past_half_its_life_without_a_signed_successor_is_listed():
    now = int(time.time())
    life = 30 * DAY
    active = authority("old", "x509", "active", now, life=life, left=10 * DAY, source="offline")
    waiting = authority("next", "x509", "prepared", now, life=0, left=0, source="offline", signed=False, created_ago=DAY)
    rows = report.offline_without_successor([active, waiting], now)
    assert [(r["id"], r["awaiting_certificate"]) for r in rows] == [("old", "next")]
    assert report.offline_without_successor([active], now)[0]["awaiting_certificate"] is None
    # Before half its life: not yet. With a signed successor, or signed by the root here: nothing to do.
    early = authority("early", "x509", "active", now, life=life, left=20 * DAY, source="offline")
    signed = authority("signed", "x509", "prepared", now, life=life, left=life, source="offline", created_ago=0)
    local = authority("local", "x509", "active", now, life=life, left=DAY, source="root")
    assert report.offline_without_successor([early], now) == []
    assert report.offline_without_successor([active, signed], now) == []
    assert report.offline_without_successor([local], now) == []


def test_the_report_carries_the_authorities_it_is_given(store):
    now = int(time.time())
    records = [authority("stalled", "x509", "active", now, life=7 * DAY, left=DAY, source="offline")]
    rep = build(store, now, authorities=records)
    assert [r["id"] for r in rep["expiring_authorities"]] == ["stalled"]
    assert [r["id"] for r in rep["offline_intermediates_without_successor"]] == ["stalled"]
    assert rep["thresholds"]["authority_window_max_seconds"] == 7 * DAY
    assert build(store, now)["expiring_authorities"] == []


def test_tessera_report_table_names_the_expiring_authority_and_the_csr_to_sign(store, capsys):
    from issuer.cli import _print_report

    now = int(time.time())
    old = authority("a1b2c3d4e5f60718293a4b5c6d7e8f9012345678", "x509", "active", now, life=30 * DAY, left=DAY,
                    source="offline")
    waiting = authority("ffee" * 10, "x509", "prepared", now, life=0, left=0, source="offline", signed=False,
                        created_ago=DAY)
    _print_report(build(store, now, authorities=[old, waiting]))
    out = capsys.readouterr().out
    assert "== Authorities expiring (within a third of their life, at most 7 days): 1" in out
    assert "== Offline-signed intermediates with no signed successor" in out
    assert "a1b2c3d4e5f60718" in out and "ffee" * 10 in out and "1d" in out
