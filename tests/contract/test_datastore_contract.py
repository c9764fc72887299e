"""The datastore contract: what every engine must do, run against each engine in conftest.ENGINES.

Every method of the Datastore protocol; durability of each acknowledged write (a writer
killed with SIGKILL right after its call returned loses nothing); the audit chain (linked,
tamper found by the verifier, old chains still verify); the change feed (order, atomicity
with the change, resume after a restart with no gap and no duplicate)."""

import pickle
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from issuer.audit.records import verify_chain
from issuer.audit.relay import AuditRelay
from issuer.core.models import (GENESIS_HASH, ApprovalCap, AuditEvent, AuditRecord, Change, JoinToken, Revocation,
                                Sidecar, audit_hash)
from issuer.datastore import open_reader
from issuer.datastore.feed import ChangeFollower
from tessera.errors import AlreadyExists, NotFound, Unavailable

from writes import A1, CHECKS, NOW, OP, SID, SIDECAR, WRITES, approval, authority, entry, event, issued

WRITES_PY = Path(__file__).with_name("writes.py")


# -- entries --------------------------------------------------------------------------------


def test_entries_are_created_listed_by_parent_updated_and_deleted(store):
    store.create_entry(entry("e1"), event("entry.create"))
    store.create_entry(entry("e2", parent_id="spiffe://example.org/other", created_at=NOW + 1), event("entry.create"))
    assert [e.id for e in store.list_entries()] == ["e1", "e2"]
    assert [e.id for e in store.list_entries(SID)] == ["e1"]
    store.update_entry(entry("e1", state="disabled", revision=2), event("entry.update"))
    assert store.list_entries(SID) == [entry("e1", state="disabled", revision=2)]
    store.delete_entry("e1", event("entry.delete"))
    assert [e.id for e in store.list_entries()] == ["e2"]
    assert [r.action for r in store.audit_records()] == ["entry.create"] * 2 + ["entry.update", "entry.delete"]


def test_entry_writes_refuse_duplicates_and_missing_entries_and_record_nothing(store):
    store.create_entry(entry("e1"), event("entry.create"))
    with pytest.raises(AlreadyExists):
        store.create_entry(entry("e1"), event("entry.create"))
    with pytest.raises(NotFound):
        store.update_entry(entry("nope"), event("entry.update"))
    with pytest.raises(NotFound):
        store.delete_entry("nope", event("entry.delete"))
    assert len(store.audit_records()) == 1 and [c.op for c in store.changes_after(0)] == ["create"]


# -- join tokens and sidecars -------------------------------------------------------------------


def test_join_token_is_marked_used_once_and_the_store_decides_nothing(store):
    tok = JoinToken("h", "host", NOW + 60, "uid:0", NOW)
    store.create_join_token(tok, event("join_token.create"))
    assert store.consume_join_token("unknown", NOW) is None
    assert store.consume_join_token("h", NOW + 1) == tok  # as it was: unused; now marked used
    assert store.consume_join_token("h", NOW + 2).used_at == NOW + 1  # used before: the caller refuses it
    expired = JoinToken("x", "host", NOW, "uid:0", NOW)
    store.create_join_token(expired, event("join_token.create"))
    assert store.consume_join_token("x", NOW + 5) == expired  # expired: returned as found, the caller refuses it


def test_a_consumed_token_is_unmarked_when_the_callers_transaction_rolls_back(store):
    store.create_join_token(JoinToken("h", "host", NOW + 60, "uid:0", NOW), event("join_token.create"))
    with pytest.raises(RuntimeError):
        with store.transaction():
            store.consume_join_token("h", NOW)
            raise RuntimeError("the caller refused it")
    assert store.consume_join_token("h", NOW).used_at is None


def test_sidecars_are_upserted_touched_and_listed(store):
    store.upsert_sidecar(SIDECAR, event("sidecar.attest", SID))
    other = Sidecar("spiffe://example.org/tessera/sidecar/a", "a", "active", NOW, NOW, "bb", NOW + 60)
    store.upsert_sidecar(other, None)
    store.touch_sidecar(SID, NOW + 30)
    banned = Sidecar(SID, "h", "banned", NOW, NOW + 30, "aa", NOW + 60)
    store.upsert_sidecar(banned, event("sidecar.ban", SID))
    assert store.list_sidecars() == [other, banned]  # ordered by id


# -- issued serials ---------------------------------------------------------------------------


def test_issued_serials_are_found_by_every_filter(store):
    store.record_issued([issued(1, task_id="t1", kind="task"), issued(2, entry_id="e2", not_after=NOW + 10),
                         issued(3, entry_id=None, sidecar_id="spiffe://example.org/tessera/sidecar/a",
                                spiffe_id="spiffe://example.org/tessera/sidecar/a", kind="sidecar", issued_at=NOW + 5)],
                        [event("svid.issue")])
    assert store.get_issued("1") == issued(1, task_id="t1", kind="task") and store.get_issued("9") is None
    assert [s.serial for s in store.find_issued(task_id="t1")] == ["1"]
    assert [s.serial for s in store.find_issued(entry_id="e2")] == ["2"]
    assert [s.serial for s in store.find_issued(spiffe_id="spiffe://example.org/e1")] == ["1", "2"]
    assert [s.serial for s in store.find_issued(sidecar_id=SID)] == ["1", "2"]
    assert [s.serial for s in store.find_issued(unexpired_at=NOW + 30)] == ["1", "3"]
    assert [s.serial for s in store.find_issued(serials=["3", "1", "9"])] == ["1", "3"]
    assert [s.serial for s in store.find_issued(serials=["1", "2"], unexpired_at=NOW + 30)] == ["1"]
    assert store.find_issued(serials=[]) == []
    store.revoke_serials(["2"], "test", NOW, None)
    assert [s.serial for s in store.find_issued(revoked=True)] == ["2"]
    assert [s.serial for s in store.find_issued(revoked=False)] == ["1", "3"]
    assert store.last_issued_by_entry() == {"e1": NOW, "e2": NOW}


def test_two_stores_racing_for_one_join_token_have_exactly_one_winner(engine):
    """As two issuers (or processes) on one database: each race is won once, the loser sees the token used."""
    a, b = engine.opener().open(), engine.opener().open()
    try:
        for n in range(20):
            a.create_join_token(JoinToken(f"t{n}", "host", NOW + 60, "uid:0", NOW), event("join_token.create"))
            start, found = threading.Barrier(2), {}

            def consume(s, who):
                start.wait()
                found[who] = s.consume_join_token(f"t{n}", NOW + 1)

            threads = [threading.Thread(target=consume, args=(s, w)) for s, w in ((a, "a"), (b, "b"))]
            for t in threads:
                t.start()
            for t in threads:
                t.join(10)
            assert sorted(tok.used_at is None for tok in found.values()) == [False, True], (n, found)
    finally:
        a.close()
        b.close()


def task(n: int, task_id: str = "t1", **kw):
    return issued(n, kind="task", task_id=task_id, **kw)


def test_a_task_gets_a_second_credential_only_once_its_live_one_is_revoked_or_expired(store):
    store.record_task_issued(task(1), event("task.issue"))
    with pytest.raises(AlreadyExists, match="'t1' already has a live credential"):
        store.record_task_issued(task(2), event("task.issue"))
    assert store.get_issued("2") is None and len(store.audit_records()) == 1  # the refused one recorded nothing
    with pytest.raises(AlreadyExists):  # a serial recorded before, for another task
        store.record_task_issued(task(1, task_id="t9"), event("task.issue"))
    assert store.find_issued(task_id="t9") == [] and len(store.audit_records()) == 1
    store.record_task_issued(task(3, task_id="t2"), event("task.issue"))  # another task of the entry
    store.record_task_issued(task(4, entry_id="e2"), event("task.issue"))  # the same task id under another entry
    store.revoke_serials(["1"], "ended", NOW + 1, None)
    store.record_task_issued(task(5, issued_at=NOW + 2), event("task.issue"))
    store.record_task_issued(task(6, task_id="t2", issued_at=NOW + 60), event("task.issue"))  # 3 expired at NOW + 60
    assert [s.serial for s in store.find_issued(task_id="t1", revoked=False)] == ["4", "5"]
    assert len(store.audit_records()) == 5


def test_two_stores_racing_to_record_one_task_record_one_credential(engine):
    """As two issuers asked for one task at once (a sidecar's retry after losing its issuer): one wins."""
    a, b = engine.opener().open(), engine.opener().open()
    try:
        for n in range(20):
            start, outcome = threading.Barrier(2), {}

            def record(s, serial):
                start.wait()
                try:
                    s.record_task_issued(task(serial, task_id=f"race-{n}"), event("task.issue"))
                    outcome[serial] = "recorded"
                except AlreadyExists:
                    outcome[serial] = "refused"

            threads = [threading.Thread(target=record, args=(s, 2 * n + k)) for k, s in enumerate((a, b))]
            for t in threads:
                t.start()
            for t in threads:
                t.join(10)
            assert sorted(outcome.values()) == ["recorded", "refused"], (n, outcome)
            assert len(a.find_issued(task_id=f"race-{n}")) == 1
    finally:
        a.close()
        b.close()


def test_revoke_serials_marks_each_once(store):
    store.record_issued([issued(1, task_id="t1"), issued(2)], [])
    assert store.revoke_serials(["1", "2"], "test", 5, AuditEvent("revoke", OP, "done")) == ["1", "2"]
    assert store.revoke_serials(["1"], "again", 6, None) == []
    assert store.get_issued("1").revoked_at == 5 and store.get_issued("1").revocation_reason == "test"


def test_concurrent_record_issued_commits_every_serial_once(store, engine):
    def worker(start):
        for i in range(start, start + 50):
            store.record_issued([issued(i)], [AuditEvent("svid.issue", OP, "allow", subject=str(i))])

    threads = [threading.Thread(target=worker, args=(k * 1000,)) for k in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    reopened = engine.opener().open()
    assert len(reopened.find_issued()) == 400
    assert len(reopened.audit_records()) == 400
    reopened.close()


def test_close_during_concurrent_issuance_commits_or_refuses_every_caller(engine):
    s = engine.opener().open()
    outcomes: dict[int, str] = {}

    def worker(start):
        for i in range(start, start + 200):
            try:
                s.record_issued([issued(i)], [])
                outcomes[i] = "ok"
            except Exception as e:  # noqa: BLE001 - anything but a clean refusal is a failure below
                outcomes[i] = "refused" if isinstance(e, RuntimeError) and "closed" in str(e) else repr(e)
                return

    threads = [threading.Thread(target=worker, args=(k * 1000,)) for k in range(8)]
    for t in threads:
        t.start()
    time.sleep(0.05)
    s.close()
    for t in threads:
        t.join(10)
        assert not t.is_alive()  # nobody is left waiting for a commit that never comes
    assert set(outcomes.values()) <= {"ok", "refused"}, outcomes
    reopened = engine.opener().open()
    committed = {r.serial for r in reopened.find_issued()}
    reopened.close()
    assert committed == {f"{i:x}" for i, o in outcomes.items() if o == "ok"}


def test_issued_rows_and_their_audit_records_read_back_exactly_whatever_characters_they_hold(store):
    # PostgreSQL takes many rows by COPY, whose text format escapes tabs, newlines and backslashes, and a few
    # by INSERT: one record, then ten.
    odd = "tab\there\nnew line, back\\slash, \\N, \r, \u00e9 \u2028 end"
    for serials in ([1], range(2, 12)):
        records = [issued(n, entry_id=odd, task_id=None, authority=A1) for n in serials]
        store.record_issued(records, [AuditEvent("svid.issue", OP, "allow", reason=odd, subject=odd,
                                                 details={"odd": odd, "none": None, "n": 1.5}) for _ in records])
        assert [store.get_issued(r.serial) for r in records] == records
    assert len(store.audit_records()) == 11
    for r in store.audit_records():
        assert (r.reason, r.subject, r.details) == (odd, odd, {"odd": odd, "none": None, "n": 1.5})
    assert verify_chain(store.audit_records()).ok


def test_failed_group_commit_records_nothing_and_raises(store):
    store.record_issued([issued(1)], [])
    with pytest.raises(AlreadyExists):
        store.record_issued([issued(2), issued(1)], [event("svid.issue")])  # a duplicate: all rolls back
    assert store.get_issued("2") is None and store.audit_records() == []


# -- revocations, CRL numbers, authorities ----------------------------------------------------------


def test_revocations_are_logged_in_order_and_read_by_kind_and_seq(store):
    assert store.last_revocation_seq() == 0
    a = store.record_revocation(Revocation(0, NOW, "serial", "1", "r", "keyCompromise", ("1",)))
    b = store.record_revocation(Revocation(0, NOW, "spiffe_id", "spiffe://example.org/x", "r", "privilegeWithdrawn",
                                           (), ("e1",)))
    assert (a, b) == (1, 2) and store.last_revocation_seq() == 2
    assert [r.seq for r in store.revocations()] == [1, 2]
    assert store.revocations(["spiffe_id"]) == [Revocation(2, NOW, "spiffe_id", "spiffe://example.org/x", "r",
                                                           "privilegeWithdrawn", (), ("e1",))]
    assert [r.seq for r in store.revocations(since_seq=1)] == [2]


def test_a_revocation_commits_as_one_transaction_or_not_at_all(store):
    """The serials marked, the log row, the audit record and the CRL number: all or nothing."""
    store.record_issued([issued(1)], [])
    with pytest.raises(RuntimeError):
        with store.transaction():
            store.revoke_serials(["1"], "keyCompromise", NOW, None)
            store.record_revocation(Revocation(0, NOW, "serial", "1", "r", "keyCompromise", ("1",)))
            store.append_audit([event("revoke")])
            store.next_crl_number(A1)
            raise RuntimeError("signing the CRL failed")
    assert store.get_issued("1").revoked_at is None and store.revocations() == []
    assert store.audit_records() == [] and store.next_crl_number(A1) == 1
    assert [c.kind for c in store.changes_after(0)] == []


def test_crl_numbers_are_never_handed_out_twice_and_each_authority_counts_its_own(store, engine):
    assert [store.next_crl_number(A1) for _ in range(3)] == [1, 2, 3]
    other = engine.opener().open()
    assert other.next_crl_number(A1) == 4
    assert other.next_crl_number("ef" * 20) == 1
    other.close()


def test_heads_are_every_counter_the_database_has_come_to_read_alike_with_or_without_a_store(store, engine):
    from issuer.core.models import Heads
    from issuer.datastore import read_heads

    assert store.heads() == Heads()
    store.create_entry(entry(), event("entry.create"))
    store.record_revocation(Revocation(0, NOW, "serial", "1", "r", "keyCompromise", ("1",)))
    store.next_crl_number(A1)
    store.next_crl_number(A1)
    heads = Heads(change_position=store.last_change_position(), revocation_seq=1, audit_seq=1, crl_numbers={A1: 2})
    assert heads.change_position == 2 and store.heads() == heads
    assert read_heads(engine.reader_source()) == heads  # as the issuer reads it at start, before opening the store


def test_the_heads_of_a_store_not_created_yet_are_zero_and_reading_them_creates_nothing(engine):
    from issuer.core.models import Heads
    from issuer.datastore import read_heads

    assert read_heads(engine.reader_source()) == Heads()
    if engine.name == "sqlite":
        assert not Path(engine.reader_source()).exists()
    else:
        import psycopg

        with psycopg.connect(engine.dsn) as db:
            assert db.execute("SELECT tablename FROM pg_tables WHERE schemaname = current_schema()").fetchall() == []


def test_raising_crl_numbers_moves_each_up_to_its_floor_never_down_with_its_audit_record(store):
    other = "ef" * 20
    for _ in range(5):
        store.next_crl_number(A1)
    store.raise_crl_numbers({A1: 3, other: 7}, event("datastore.restore_accepted"))
    assert store.next_crl_number(A1) == 6 and store.next_crl_number(other) == 8
    assert [r.action for r in store.audit_records()] == ["datastore.restore_accepted"]


def test_an_authority_is_added_once_and_moved_only_from_the_state_it_is_in(store):
    store.put_authority(authority(), event("ca.prepare"))
    with pytest.raises(AlreadyExists):
        store.put_authority(authority(), event("ca.prepare"))
    active = authority(state="active", activated_at=NOW + 1)
    assert store.put_authority(active, event("ca.activate"), expect_state="prepared") is True
    # A second issuer that read it as prepared loses the race: nothing written, no audit record, no change.
    assert store.put_authority(authority(state="tainted"), event("ca.taint"), expect_state="prepared") is False
    assert store.list_authorities() == [active]
    assert [r.action for r in store.audit_records()] == ["ca.prepare", "ca.activate"]
    assert [(c.kind, c.op, c.key, c.payload) for c in store.changes_after(0)] == [
        ("authority", "add", A1, {"id": A1, "kind": "x509", "state": "prepared"}),
        ("authority", "update", A1, {"id": A1, "kind": "x509", "state": "active"})]


def test_serials_of_an_earlier_release_are_adopted_by_its_one_ca(store):
    store.record_issued([issued(1), issued(2, authority="ef" * 20)], [])
    store.adopt_unattributed(A1)
    assert {s.serial: s.authority for s in store.find_issued()} == {"1": A1, "2": "ef" * 20}
    assert store.count_outstanding(A1, NOW) == 1 and store.count_outstanding(A1, NOW + 60) == 0


# -- transactions and other processes ------------------------------------------------------------


def test_a_writer_waits_for_another_writer_readers_do_not_and_a_stuck_one_is_an_error(store, engine, monkeypatch):
    other = engine.opener().open()  # another store on the same data: another writer, as a signing worker is
    holding, release = threading.Event(), threading.Event()

    def hold():
        with other.transaction():
            other.append_audit([event("other")])
            holding.set()
            release.wait(10)

    t = threading.Thread(target=hold)
    t.start()
    try:
        assert holding.wait(5)
        wrote = threading.Event()
        writer = threading.Thread(target=lambda: (store.append_audit([event("mine")]), wrote.set()))
        writer.start()
        assert not wrote.wait(0.3)  # queued behind the other writer...
        assert store.audit_records() == [] and store.newest_audit_seq() == 0  # ...while a reader goes ahead
        release.set()
        writer.join(10)
        assert wrote.is_set()
        assert [r.action for r in store.audit_records()] == ["other", "mine"]  # one chain from both writers

        release.clear()
        holding.clear()
        t = threading.Thread(target=hold)
        t.start()
        assert holding.wait(5)
        engine.shorten_lock_timeout(monkeypatch, 0.2)
        with pytest.raises(Unavailable, match="stayed locked by another writer"):
            store.append_audit([event("stuck")])
    finally:
        release.set()
        t.join(10)
        other.close()
    store.append_audit([event("after")])
    assert verify_chain(store.audit_since()).ok and store.newest_audit_seq() == 4


def test_the_opener_is_picklable_and_opens_the_same_data(store):
    store.create_entry(entry("e1"), event("entry.create"))
    again = pickle.loads(pickle.dumps(store.opener())).open()
    try:
        assert [e.id for e in again.list_entries()] == ["e1"]
    finally:
        again.close()


def test_committed_audit_records_are_published_to_the_relay_in_order_and_rolled_back_ones_never(engine):
    relay, heard = AuditRelay(), []
    relay.subscribe(heard.extend)
    s = engine.opener().open(relay=relay)
    try:
        s.append_audit([event("a")])
        with pytest.raises(RuntimeError):
            with s.transaction():
                s.append_audit([event("lost")])
                raise RuntimeError("boom")
        s.create_entry(entry(), event("entry.create"))
        assert [r.action for r in heard] == ["a", "entry.create"] and heard == s.audit_records()
    finally:
        s.close()


# -- approvals -----------------------------------------------------------------------------------------


def test_an_approval_is_listed_while_pending_and_unexpired_and_read_back_whole(store):
    assert store.create_approval(approval("a1"), [], event("task.approval_request")) is None
    assert store.create_approval(approval("a2", created_at=NOW + 1, expires_at=NOW + 10), [],
                                 event("task.approval_request")) is None
    assert store.get_approval("a1") == approval("a1") and store.get_approval("nope") is None
    assert [a.id for a in store.list_approvals(NOW)] == ["a1", "a2"]  # oldest first
    assert [a.id for a in store.list_approvals(NOW + 10)] == ["a1"]  # a2 expired: no longer listed
    assert [a.id for a in store.list_approvals(NOW + 10, expired=True)] == ["a2"]  # what a sweep would expire
    assert [r.action for r in store.audit_records()] == ["task.approval_request"] * 2
    [c1, c2] = store.changes_after(0)
    assert (c1.kind, c1.op, c1.key) == ("approval", "create", "a1") and c1.payload["workload"]["uid"] == 1000
    with pytest.raises(AlreadyExists):
        store.create_approval(approval("a1"), [], event("task.approval_request"))


def test_an_approval_leaves_pending_once_and_only_as_its_expiry_allows(store):
    for i in range(4):
        store.create_approval(approval(f"a{i}"), [], event("task.approval_request"))
    late, early = NOW + 60, NOW + 59

    def finish(approval_id, state, now):
        return store.finish_approvals([approval(approval_id, state=state, decided_by="uid:0", decision_reason="r")],
                                      [event(f"task.{state}")], now)

    assert finish("a0", "approved", late) == []  # a decision after expiry is refused
    assert finish("a0", "expired", early) == []  # an expiry before it, too
    [won] = finish("a0", "approved", early)
    assert won == approval("a0", state="approved", decided_by="uid:0", decision_reason="r") == store.get_approval("a0")
    assert finish("a0", "denied", early) == [] and finish("a0", "cancelled", early) == []  # once only
    assert [a.state for a in finish("a1", "denied", early) + finish("a2", "expired", late)
            + finish("a3", "cancelled", late)] == ["denied", "expired", "cancelled"]
    assert store.list_approvals(NOW) == [] and store.list_approvals(late, expired=True) == []
    # Each outcome that won, and only those, has its audit record and its change.
    assert [r.action for r in store.audit_records()][4:] == ["task.approved", "task.denied", "task.expired",
                                                              "task.cancelled"]
    assert [(c.op, c.key, c.payload["state"]) for c in store.changes_after(0)][4:] == [
        ("approve", "a0", "approved"), ("deny", "a1", "denied"), ("expire", "a2", "expired"),
        ("cancel", "a3", "cancelled")]


def test_a_full_cap_refuses_a_request_and_records_nothing(store):
    def create(approval_id, **kw):
        req = approval(approval_id, **kw)
        caps = [ApprovalCap("max_pending_per_workload", (("sidecar_id", SID), ("uid", req.uid)), 3, f"uid {req.uid}"),
                ApprovalCap("max_pending_per_entry", (("entry_id", req.entry_id),), 2, f"entry {req.entry_id}")]
        full = store.create_approval(req, caps, event("task.approval_request"))
        return full and full.setting

    assert create("a1") is None and create("a2", entry_id="e2") is None and create("a3") is None
    assert create("a4", workload={"uid": 7}) == "max_pending_per_entry"  # e1 has two
    assert create("a5", entry_id="e3") == "max_pending_per_workload"  # uid 1000 has three
    assert create("a6", entry_id="e3", workload={"uid": 7}) is None  # another uid and entry count on their own
    assert store.get_approval("a4") is None and len(store.audit_records()) == 4 and len(store.changes_after(0)) == 4
    # Only pending, unexpired requests count: a decided one and expired ones make room.
    store.finish_approvals([approval("a1", state="denied")], [event("task.approval_deny")], NOW + 1)
    assert create("a7", created_at=NOW + 1) is None and create("a8", created_at=NOW + 1) == "max_pending_per_workload"
    assert create("a8", created_at=NOW + 60, expires_at=NOW + 120) is None


def test_two_stores_deciding_one_approval_at_once_have_exactly_one_winner(engine):
    """As two operators on two issuers: each race is won once, and only the winner's decision is recorded."""
    a, b = engine.opener().open(), engine.opener().open()
    try:
        for n in range(20):
            a.create_approval(approval(f"r{n}"), [], event("task.approval_request"))
            start, won = threading.Barrier(2), {}

            def decide(s, who, state):
                start.wait()
                won[who] = s.finish_approvals([approval(f"r{n}", state=state, decided_by=who)],
                                              [event(f"task.{state}")], NOW + 1)

            threads = [threading.Thread(target=decide, args=(s, w, st))
                       for s, w, st in ((a, "a", "approved"), (b, "b", "denied"))]
            for t in threads:
                t.start()
            for t in threads:
                t.join(10)
            winners = [w for w, got in won.items() if got]
            assert len(winners) == 1 and len(won) == 2, (n, won)
            assert b.get_approval(f"r{n}").decided_by == winners[0]
        decisions = [r.action for r in a.audit_records() if r.action != "task.approval_request"]
        assert len(decisions) == 20 and len([c for c in a.changes_after(0) if c.op != "create"]) == 20
    finally:
        a.close()
        b.close()


def test_two_stores_filling_one_cap_at_once_never_pass_it(engine):
    """As two issuers taking requests at once: the caps are counted under the write lock, so together they stop
    exactly at the limit."""
    a, b = engine.opener().open(), engine.opener().open()
    cap = [ApprovalCap("max_pending", (), 7, "the issuer")]
    start, refused = threading.Barrier(4), []
    try:
        def fill(s, who):
            start.wait()
            for i in range(5):
                if s.create_approval(approval(f"{who}{i}"), cap, event("task.approval_request")) is not None:
                    refused.append(f"{who}{i}")

        threads = [threading.Thread(target=fill, args=(s, w)) for s, w in ((a, "a"), (b, "b"), (a, "c"), (b, "d"))]
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
        assert len(a.list_approvals(NOW)) == 7 and len(refused) == 13
        assert len([r for r in b.audit_records() if r.action == "task.approval_request"]) == 7
    finally:
        a.close()
        b.close()


def test_a_store_of_the_previous_schema_version_gains_the_approvals_table_in_place(engine):
    s = engine.opener().open()
    s.create_entry(entry("e1"), event("entry.create"))
    s.close()
    engine.sql("DROP TABLE approvals")  # as the release before approvals left it
    engine.sql("UPDATE schema_version SET version = version - 1")
    again = engine.opener().open()
    try:
        assert [e.id for e in again.list_entries()] == ["e1"] and len(again.audit_records()) == 1
        assert again.create_approval(approval(), [], event("task.approval_request")) is None
        assert again.list_approvals(NOW) == [approval()]
    finally:
        again.close()


# -- durability --------------------------------------------------------------------------------------


@pytest.mark.parametrize("write", sorted(WRITES))
def test_an_acknowledged_write_survives_sigkill(engine, write):
    opener = engine.opener()
    opener.open().close()  # the empty store exists before the writer starts
    proc = subprocess.Popen([sys.executable, str(WRITES_PY), pickle.dumps(opener).hex(), write],
                            stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "acked"
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
    reopened = opener.open()
    try:
        assert CHECKS[write](reopened), write
    finally:
        reopened.close()


# -- the audit chain ---------------------------------------------------------------------------------


def test_audit_records_form_a_hash_chain(store):
    store.append_audit([AuditEvent("a", OP, "done"), AuditEvent("b", OP, "deny", reason="why")])
    recs = store.audit_records()
    prev = GENESIS_HASH
    for r in recs:
        assert r.prev_hash == prev and r.hash == audit_hash(r)
        prev = r.hash
    assert [r.seq for r in recs] == [1, 2] and store.newest_audit_seq() == 2
    assert store.audit_records(1) == recs[1:] and store.audit_records(0, limit=1) == recs[:1]
    assert list(store.audit_since(recs[1].ts)) == [r for r in recs if r.ts >= recs[1].ts]


def test_rolled_back_transaction_leaves_audit_chain_unbroken(store):
    with pytest.raises(RuntimeError):
        with store.transaction():
            store.append_audit([AuditEvent("lost", OP, "done")])
            raise RuntimeError("boom")
    store.append_audit([AuditEvent("kept", OP, "done")])
    recs = store.audit_records()
    assert [r.action for r in recs] == ["kept"] and recs[0].prev_hash == GENESIS_HASH


@pytest.mark.parametrize("column, value", [("reason", "nothing to see"), ("details", '{"serial":"ff"}'),
                                           ("actor", "not json")])
def test_the_verifier_finds_a_tampered_record_through_a_read_only_reader(store, engine, column, value):
    store.append_audit([event("a"), AuditEvent("b", OP, "deny", reason="why", details={"serial": "aa"}), event("c")])
    reader = open_reader(engine.reader_source())
    assert verify_chain(reader.audit_since()).ok
    engine.tamper_audit(2, column, value)
    check = verify_chain(reader.audit_since())
    assert not check.ok and check.bad_seq == 2 and "altered" in check.problem


def test_a_chain_written_before_the_record_was_spelled_once_still_verifies():
    """Two records and their hashes as the earlier code computed them (its own JSON body, field by field)."""
    r1 = AuditRecord(1, 1764745200.123456, "entry.create", {"kind": "operator", "id": "uid:0"}, "done", "", "e1",
                     {"spiffe_id": "spiffe://example.org/a", "scopes": ["x"]}, GENESIS_HASH,
                     "12ab83ae613ca31aeec665093a27059d9f983e4272e93c4b0d9ef41a13305427")
    r2 = AuditRecord(2, 1764745201.5, "svid.deny", {"kind": "sidecar", "id": "spiffe://example.org/tessera/sidecar/h"},
                     "deny", "entry 'e1' is disabled", "spiffe://example.org/a", {}, r1.hash,
                     "6342d3824eaa76806953dca37dfa78f143fb9df643345047071eda4aa79976aa")
    assert verify_chain([r1, r2]).ok


# -- the change feed -----------------------------------------------------------------------------------


def test_every_kind_of_change_is_on_the_feed_in_commit_order(store):
    store.create_entry(entry("e1"), event("entry.create"))
    store.update_entry(entry("e1", state="disabled", revision=2), event("entry.update"))
    store.upsert_sidecar(SIDECAR, event("sidecar.attest"))
    store.upsert_sidecar(Sidecar(SID, "h", "banned", NOW, NOW, "aa", NOW + 60), event("sidecar.ban"))
    store.upsert_sidecar(SIDECAR, event("sidecar.unban"))
    seq = store.record_revocation(Revocation(0, NOW, "entry", "e1", "r", "privilegeWithdrawn", (), ("e1",)))
    store.delete_entry("e1", event("entry.delete"))
    store.put_authority(authority("cd" * 20), event("ca.prepare"))
    store.touch_sidecar(SID, NOW + 1)  # last-seen only: not a change other issuers need
    changes = store.changes_after(0)
    assert [(c.kind, c.op, c.key) for c in changes] == [
        ("entry", "create", "e1"), ("entry", "update", "e1"), ("sidecar", "upsert", SID), ("sidecar", "ban", SID),
        ("sidecar", "unban", SID), ("revocation", "create", str(seq)), ("entry", "delete", "e1"),
        ("authority", "add", "cd" * 20)]
    positions = [c.position for c in changes]
    assert positions == sorted(set(positions)) and store.last_change_position() == positions[-1]
    assert changes[1].payload["state"] == "disabled" and changes[5].payload["entry_ids"] == ["e1"]
    assert all(isinstance(c, Change) for c in changes)
    assert store.changes_after(positions[2], limit=2) == changes[3:5]


def test_changes_commit_with_their_change_or_not_at_all(store):
    with pytest.raises(RuntimeError):
        with store.transaction():
            store.create_entry(entry("e1"), event("entry.create"))
            raise RuntimeError("boom")
    assert store.changes_after(0) == [] and store.last_change_position() == 0


def test_positions_increase_in_commit_order_across_writers(store, engine):
    other = engine.opener().open()
    try:
        def write(s, prefix):
            for i in range(30):
                s.create_entry(entry(f"{prefix}{i}"), event("entry.create"))

        threads = [threading.Thread(target=write, args=(s, p)) for s, p in ((store, "a"), (other, "b"))]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        changes = other.changes_after(0)
        assert len(changes) == 60 and [c.position for c in changes] == sorted({c.position for c in changes})
        # Each writer's own changes appear in the order it committed them.
        for p in "ab":
            assert [c.key for c in changes if c.key.startswith(p)] == [f"{p}{i}" for i in range(30)]
    finally:
        other.close()


def test_a_reader_during_concurrent_commits_never_steps_over_a_position(engine):
    """Positions are given in commit order: whatever a reader sees, every position before it is already there
    (a position taken before a slower transaction commits would be stepped over for good by a follower)."""
    stores = [engine.opener().open() for _ in range(3)]
    reader = engine.opener().open()
    done, seen, problems = threading.Event(), [], []

    def write(s, prefix):
        for i in range(25):
            s.create_entry(entry(f"{prefix}{i}"), event("entry.create"))
            s.record_revocation(Revocation(0, NOW, "serial", f"{prefix}{i}", "r", "keyCompromise", ()))

    def follow():
        last = 0
        while not done.is_set() or last < 150:
            for c in reader.changes_after(last):
                if c.position != last + 1:
                    problems.append((last, c.position))
                last = c.position
                seen.append(c)

    writers = [threading.Thread(target=write, args=(s, p)) for s, p in zip(stores, "abc")]
    follower = threading.Thread(target=follow)
    try:
        follower.start()
        for t in writers:
            t.start()
        for t in writers:
            t.join(60)
        done.set()
        follower.join(30)
        assert problems == [] and len(seen) == 150
        # One revocation sequence, without gap, whichever store wrote; one audit chain.
        assert [r.seq for r in reader.revocations()] == list(range(1, 76))
        assert verify_chain(reader.audit_since()).ok and reader.newest_audit_seq() == 75
    finally:
        done.set()
        for s in stores + [reader]:
            s.close()


def test_a_follower_on_another_store_object_resumes_after_a_restart_with_no_gap_and_no_duplicate(engine, tmp_path):
    writer, follower_store = engine.opener().open(), engine.opener().open()
    position_file = tmp_path / "feed.position"
    seen: list[Change] = []
    try:
        for i in range(5):
            writer.create_entry(entry(f"e{i}"), event("entry.create"))
        follower = ChangeFollower(follower_store, position_file, seen.extend, batch=2)
        assert follower.poll() == 5 and follower.poll() == 0
        follower_store.close()  # the follower's process stops...
        writer.update_entry(entry("e0", state="disabled", revision=2), event("entry.update"))
        writer.delete_entry("e1", event("entry.delete"))
        follower_store = engine.opener().open()  # ...and starts again, from its saved position
        follower = ChangeFollower(follower_store, position_file, seen.extend)
        assert follower.position == seen[4].position
        follower.start(interval=0.02)
        writer.upsert_sidecar(SIDECAR, event("sidecar.attest"))
        deadline = time.monotonic() + 5
        while len(seen) < 8 and time.monotonic() < deadline:
            time.sleep(0.02)
        follower.stop()
    finally:
        writer.close()
        follower_store.close()
    assert [c.position for c in seen] == [c.position for c in writer_changes(engine)]
    assert [(c.kind, c.op, c.key) for c in seen[5:]] == [("entry", "update", "e0"), ("entry", "delete", "e1"),
                                                          ("sidecar", "upsert", SID)]
    assert int(position_file.read_text()) == seen[-1].position


def writer_changes(engine) -> list[Change]:
    s = engine.opener().open()
    try:
        return s.changes_after(0)
    finally:
        s.close()


def test_a_bad_position_file_is_a_clear_error(store, tmp_path):
    from tessera.errors import ConfigError

    for bad in (b"twelve\n", b"\xff\xfe1\n"):  # words, or bytes that are not text at all
        (tmp_path / "feed.position").write_bytes(bad)
        with pytest.raises(ConfigError, match="must be a whole number"):
            ChangeFollower(store, tmp_path / "feed.position", lambda changes: None)


def test_a_store_of_a_newer_release_is_refused_and_left_as_it_is(engine):
    from tessera.errors import FailedPrecondition

    s = engine.opener().open()
    s.create_entry(entry("e1"), event("entry.create"))
    s.close()
    engine.sql("UPDATE schema_version SET version = version + 1")
    with pytest.raises(FailedPrecondition, match="newer than this issuer knows"):
        engine.opener().open()
    engine.sql("UPDATE schema_version SET version = version - 1")
    again = engine.opener().open()
    try:
        assert [e.id for e in again.list_entries()] == ["e1"]
    finally:
        again.close()


def test_the_store_offers_every_method_of_the_contract_with_its_parameters(store):
    """A new engine that leaves a method out, or names its parameters differently, fails here first."""
    import inspect

    from issuer.datastore.interface import Datastore

    names = {n for c in Datastore.__mro__ if c.__module__ == "issuer.datastore.interface" for n, v in vars(c).items()
             if callable(v) and not n.startswith("_")}
    assert {"transaction", "changes_after", "audit_since", "opener", "consume_join_token"} <= names
    for name in sorted(names):
        want = [p for p in inspect.signature(getattr(Datastore, name)).parameters if p != "self"]
        assert list(inspect.signature(getattr(store, name)).parameters) == want, name
    assert isinstance(store.relay, AuditRelay)


def test_only_each_engine_module_knows_its_engine():
    """Callers go through the contract: no other program module imports sqlite3, psycopg or an engine module
    (issuer/datastore/__init__.py picks the engine)."""
    root = Path(__file__).resolve().parents[2]
    datastore = root / "issuer" / "datastore"
    owners = {"import sqlite3": datastore / "sqlite.py", "import psycopg": datastore / "postgres.py",
              "from psycopg": datastore / "postgres.py"}
    offenders = []
    for package in ("issuer", "agent_sidecar", "tessera"):
        for path in sorted((root / package).rglob("*.py")):
            text = path.read_text()
            for needle, owner in owners.items():
                if needle in text and path != owner:
                    offenders.append((str(path.relative_to(root)), needle))
            for module in ("datastore.sqlite import", "datastore.postgres import"):
                if module in text and path != datastore / "__init__.py":
                    offenders.append((str(path.relative_to(root)), module))
    assert offenders == []


def test_a_store_knows_the_changes_it_committed_and_not_those_of_another_or_rolled_back(engine):
    """What an issuer's follower skips (issuer/peers.py): its own commits, and only those."""
    mine, other = engine.opener().open(), engine.opener().open()
    try:
        mine.create_entry(entry("m1"), event("entry.create"))
        other.create_entry(entry("o1"), event("entry.create"))
        with pytest.raises(RuntimeError):
            with mine.transaction():
                mine.create_entry(entry("gone"), event("entry.create"))
                raise RuntimeError("rolled back")
        other.create_entry(entry("o2"), event("entry.create"))  # may take the rolled-back position
        changes = mine.changes_after(0)
        assert [c.key for c in changes] == ["m1", "o1", "o2"]
        assert [mine.own_changes.mine(c.position) for c in changes] == [True, False, False]
        assert not any(other.own_changes.mine(c.position) for c in changes[:1])
        mine.own_changes.forget_through(changes[-1].position)
        assert not mine.own_changes.mine(changes[0].position)
    finally:
        mine.close()
        other.close()


def test_a_started_follower_sees_another_store_objects_commit_within_a_second(engine):
    """PostgreSQL wakes it by NOTIFY; SQLite by its poll: either way well within the issuer's one-second bound."""
    writer, follower_store = engine.opener().open(), engine.opener().open()
    seen: list[tuple[Change, float]] = []
    follower = ChangeFollower(follower_store, None, lambda cs: seen.extend((c, time.monotonic()) for c in cs),
                              start=follower_store.last_change_position())
    try:
        writer.create_entry(entry("before"), event("entry.create"))  # before the start position: in the caches
        follower.position = follower_store.last_change_position()
        follower.start()
        time.sleep(0.3)  # the listening connection is up
        delays = []
        for i in range(5):
            t0 = time.monotonic()
            writer.create_entry(entry(f"e{i}"), event("entry.create"))
            deadline = time.monotonic() + 1.0
            while len(seen) < i + 1 and time.monotonic() < deadline:
                time.sleep(0.005)
            assert len(seen) == i + 1, f"change {i} not seen within a second"
            delays.append(seen[-1][1] - t0)
        assert [c.key for c, _ in seen] == [f"e{i}" for i in range(5)]
        if follower_store.poll_interval >= 1.0:  # PostgreSQL: woken by the NOTIFY, not by its 1 s poll
            assert max(delays) < 0.2, delays
    finally:
        follower.stop()
        writer.close()
        follower_store.close()


def test_a_change_that_fails_to_apply_holds_the_feed_counted_as_failing_until_it_applies(engine):
    """The follower never skips a change: it retries the one that failed, and `failures` (the issuer's
    tessera_issuer_change_feed_failing metric) says so meanwhile."""
    writer, follower_store = engine.opener().open(), engine.opener().open()
    applied: list[str] = []
    broken = threading.Event()
    broken.set()

    def apply(changes):
        if broken.is_set() and any(c.key == "bad" for c in changes):
            raise RuntimeError("cannot apply")
        applied.extend(c.key for c in changes)

    follower = ChangeFollower(follower_store, None, apply, start=follower_store.last_change_position())
    try:
        follower.start(interval=0.02)
        writer.create_entry(entry("bad"), event("entry.create"))
        writer.create_entry(entry("after"), event("entry.create"))
        deadline = time.monotonic() + 5
        while follower.failures < 2 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert follower.failures >= 2 and applied == []  # "after" waits behind "bad"
        broken.clear()
        while (applied != ["bad", "after"] or follower.failures) and time.monotonic() < deadline + 5:
            time.sleep(0.01)
        assert applied == ["bad", "after"] and follower.failures == 0
    finally:
        follower.stop()
        writer.close()
        follower_store.close()
