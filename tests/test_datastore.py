"""The SQLite datastore: durability rules, group commit, revocation marks and the audit chain."""

import os
import sqlite3
import threading
import time

import pytest

from issuer.datastore.interface import GENESIS_HASH, audit_hash
from issuer.core.models import Actor, AuditEvent, IssuedSerial
from issuer.datastore.sqlite import SQLiteDatastore
from tessera.errors import PermissionDenied

OP = Actor("operator", "uid:0")


def serial(n: int, **kw) -> IssuedSerial:
    base = dict(serial=f"{n:x}", spiffe_id="spiffe://example.org/a", kind="identity", entry_id="e1",
                sidecar_id="spiffe://example.org/tessera/sidecar/h", issued_at=1, not_after=int(time.time()) + 60)
    base.update(kw)
    return IssuedSerial(**base)


def test_concurrent_record_issued_commits_every_serial_once(store, tmp_path):
    def worker(start):
        for i in range(start, start + 50):
            store.record_issued([serial(i)], [AuditEvent("svid.issue", OP, "allow", subject=str(i))])

    threads = [threading.Thread(target=worker, args=(k * 1000,)) for k in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    reopened = SQLiteDatastore(tmp_path / "t.db")
    assert len(reopened.find_issued()) == 400
    assert len(reopened.audit_records()) == 400
    reopened.close()


def test_close_during_concurrent_issuance_commits_or_refuses_every_caller(tmp_path):
    s = SQLiteDatastore(tmp_path / "t.db")
    outcomes: dict[int, str] = {}

    def worker(start):
        for i in range(start, start + 200):
            try:
                s.record_issued([serial(i)])
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
    reopened = SQLiteDatastore(tmp_path / "t.db")
    committed = {r.serial for r in reopened.find_issued()}
    reopened.close()
    assert committed == {f"{i:x}" for i, o in outcomes.items() if o == "ok"}


def test_failed_group_commit_records_nothing_and_raises(store):
    store.record_issued([serial(1)])
    with pytest.raises(sqlite3.IntegrityError):
        store.record_issued([serial(2), serial(1)])  # duplicate serial: whole transaction rolls back
    assert store.get_issued("2") is None


def test_audit_records_form_a_hash_chain(store):
    store.append_audit([AuditEvent("a", OP, "done"), AuditEvent("b", OP, "deny", reason="why")])
    recs = store.audit_records()
    prev = GENESIS_HASH
    for r in recs:
        assert r.prev_hash == prev
        assert r.hash == audit_hash(prev, r.seq, r.ts, r.action, r.actor, r.decision, r.reason, r.subject, r.details)
        prev = r.hash


def test_rolled_back_transaction_leaves_audit_chain_unbroken(store):
    with pytest.raises(RuntimeError):
        with store.transaction():
            store.append_audit([AuditEvent("lost", OP, "done")])
            raise RuntimeError("boom")
    store.append_audit([AuditEvent("kept", OP, "done")])
    recs = store.audit_records()
    assert [r.action for r in recs] == ["kept"] and recs[0].prev_hash == GENESIS_HASH


def test_revoke_serials_marks_each_once(store):
    store.record_issued([serial(1, task_id="t1"), serial(2)])
    assert store.revoke_serials(["1", "2"], "test", 5, AuditEvent("revoke", OP, "done")) == ["1", "2"]
    assert store.revoke_serials(["1"], "again", 6, None) == []
    assert store.get_issued("1").revoked_at == 5
    assert [s.serial for s in store.find_issued(task_id="t1")] == ["1"]


def test_join_token_is_usable_once(store):
    from issuer.core.models import JoinToken

    store.create_join_token(JoinToken("h", "host", int(time.time()) + 60, "uid:0", 0), AuditEvent("t", OP, "done"))
    store.consume_join_token("h", int(time.time()))
    with pytest.raises(PermissionDenied, match="already used"):
        store.consume_join_token("h", int(time.time()))


def test_a_writer_waits_for_another_process_write_lock_readers_do_not_and_a_stuck_one_is_an_error(store,
                                                                                                  monkeypatch):
    import fcntl

    from issuer.datastore import sqlite as sqlite_store
    from tessera.errors import Unavailable

    event = AuditEvent("entry.create", Actor("operator", "op"), "done", subject="e1")
    other = os.open(f"{store.path}.write-lock", os.O_RDWR)  # another open file: another writer, as a worker is
    try:
        fcntl.flock(other, fcntl.LOCK_EX)
        wrote = threading.Event()
        writer = threading.Thread(target=lambda: (store.append_audit([event]), wrote.set()))
        writer.start()
        assert not wrote.wait(0.3)  # queued behind the other writer...
        assert store.audit_records() == []  # ...while a reader goes ahead
        fcntl.flock(other, fcntl.LOCK_UN)
        writer.join(10)
        assert wrote.is_set()
        fcntl.flock(other, fcntl.LOCK_EX)
        monkeypatch.setattr(sqlite_store, "WRITE_LOCK_TIMEOUT", 0.2)
        with pytest.raises(Unavailable, match="stayed locked by another writer"):
            store.append_audit([event])
    finally:
        os.close(other)
    store.append_audit([event])
    assert [r.seq for r in store.audit_records()] == [1, 2]
