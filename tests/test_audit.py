"""The audit trail: hash chain verification, the JSON-lines file, and every decision audited end to end."""

import dataclasses
import errno
import json
import os
import sqlite3
import subprocess
import threading
import time

import grpc
import pytest

from harness import one_line_error, wait_for
from issuer.audit import records as audit
from issuer.audit import relay as relay_mod
from issuer.audit.records import AuditFile, read_jsonl, verify_chain
from issuer.audit.relay import AuditRelay
from issuer.core.models import Actor, AuditEvent, AuditRecord, audit_hash
from issuer.datastore import open_reader
from issuer.datastore import sqlite as sqlite_store
from issuer_client import attest, sidecar_stub, sign

OP = Actor("operator", "uid:0")


def fill(store, n):
    for i in range(n):
        store.append_audit([AuditEvent("entry.create", OP, "done", reason=f"r{i}", subject=f"e{i}")])


def heard_by_a_listener(store) -> list:
    heard: list = []
    store.relay.subscribe(heard.extend)
    return heard


def committed_by_a_worker(store, n) -> list:
    """n records a signing worker committed through its own connection; returns them, not yet handed over."""
    worker = store.opener().open(relay=AuditRelay(in_order=False))
    committed = heard_by_a_listener(worker)
    try:
        fill(worker, n)
    finally:
        worker.close()
    return committed


@pytest.fixture(autouse=True)
def quick_retries(monkeypatch):
    """Audit files here retry a failed write after 50 ms; a test that looks at the failed state sets longer."""
    monkeypatch.setattr(audit, "RETRY_SECONDS", 0.05)


def gap_timer_by_hand(store, monkeypatch) -> list:
    """A gap is past its grace after 0.1 s and read back only when fire_gap_timer says; what listeners heard."""
    monkeypatch.setattr(relay_mod, "GAP_GRACE", 0.05)
    monkeypatch.setattr(store.relay, "_arm_gap_timer", lambda: None)
    return heard_by_a_listener(store)


def fire_gap_timer(store) -> None:
    """Run the gap timer's callback on a thread of its own, as the timer does, and wait for it."""
    timer = threading.Thread(target=store.relay._gap_timer_fired)
    timer.start()
    timer.join(10)
    assert not timer.is_alive()


# -- verification --------------------------------------------------------------------------


def test_untouched_chain_verifies(store):
    fill(store, 5)
    check = verify_chain(store.audit_records())
    assert check.ok and check.records == 5 and check.last_seq == 5 and check.bad_seq == 0


def test_edited_record_is_named_as_the_first_bad_one(store, tmp_path):
    fill(store, 5)
    subprocess.run(["sqlite3", str(tmp_path / "t.db"), "UPDATE audit SET reason='nothing to see' WHERE seq=3"],
                   check=True)
    check = verify_chain(store.audit_records())
    assert not check.ok and check.bad_seq == 3 and check.last_seq == 2
    assert "altered" in check.problem


def test_deleted_record_breaks_the_chain_at_its_successor(store, tmp_path):
    fill(store, 5)
    subprocess.run(["sqlite3", str(tmp_path / "t.db"), "DELETE FROM audit WHERE seq=2"], check=True)
    check = verify_chain(store.audit_records())
    assert not check.ok and check.bad_seq == 3 and "missing" in check.problem


def test_row_edited_into_invalid_json_is_named_not_a_crash(store, tmp_path):
    fill(store, 3)
    subprocess.run(["sqlite3", str(tmp_path / "t.db"), "UPDATE audit SET actor='{oops' WHERE seq=2"], check=True)
    check = verify_chain(open_reader(tmp_path / "t.db").audit_since())
    assert not check.ok and check.bad_seq == 2


def test_audit_hash_is_the_one_chains_were_written_with():
    # Pinned from the hash as first written (a deep copy of the record through dataclasses.asdict): computing it
    # any cheaper must not change a byte, or every stored chain stops verifying. Tuples, None, non-ASCII text and
    # a dataclass inside details included.
    r = AuditRecord(7, 1700000000.123456, "svid.issue",
                    {"kind": "sidecar", "id": "spiffe://example.org/tessera/sidecar/é"}, "allow", "entry active",
                    "spiffe://example.org/a",
                    {"serial": "ab", "scopes": ("x", "y"), "nested": [{"n": 1, "none": None}],
                     "by": Actor("operator", "alice")}, "1" * 64, "")
    assert audit_hash(r) == "7dc0ac84e389c3df5eaa8c013d8b3cbd6a10b81f4d9b4ede6878e7cf22498e76"


def test_recomputed_hash_does_not_hide_an_edit(store, tmp_path):
    # An attacker who rewrites a record and its own hash still breaks the link from the next record.
    fill(store, 4)
    recs = store.audit_records()

    r = recs[1]
    forged = audit_hash(dataclasses.replace(r, reason="forged"))
    subprocess.run(["sqlite3", str(tmp_path / "t.db"),
                    f"UPDATE audit SET reason='forged', hash='{forged}' WHERE seq=2"], check=True)
    check = verify_chain(store.audit_records())
    assert not check.ok and check.bad_seq == 3 and "does not point" in check.problem


# -- the JSON-lines file ---------------------------------------------------------------------


def test_audit_file_holds_every_record_in_order_with_concurrent_writers(store, tmp_path, monkeypatch):
    path, f, _ = running_audit_file(store, tmp_path, monkeypatch)

    def worker(k):
        for i in range(40):
            store.append_audit([AuditEvent("svid.issue", OP, "allow", subject=f"{k}-{i}")])

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    f.close()
    lines = list(read_jsonl(path))
    assert [r.seq for r in lines] == list(range(1, 241))
    assert verify_chain(lines).ok
    assert lines == store.audit_records()
    assert os.stat(path).st_mode & 0o777 == 0o600


def test_listeners_hear_records_handed_over_out_of_order_once_and_in_order(store, monkeypatch):
    monkeypatch.setattr(relay_mod, "GAP_GRACE", 60.0)  # the late hand-over below, not a read-back, fills the gap
    heard = heard_by_a_listener(store)
    committed = committed_by_a_worker(store, 2)  # committed first, handed over last (its feeder ran late)
    fill(store, 1)
    assert heard == []  # record 3 waits for 1 and 2
    store.relay.publish(committed)
    assert [r.seq for r in heard] == [1, 2, 3]
    store.relay.publish(committed[:1])  # handed over twice: relayed once
    assert [r.seq for r in heard] == [1, 2, 3] and heard == store.audit_records()


class FullDisk:
    """Fault injection at the OS boundary, for the audit file's fd only: while `writes` > 0, a write puts
    half its bytes on disk and fails as a full disk does; while `fsyncs` > 0, an fsync fails (after
    `during_fsync` ran); while `truncates` > 0, an ftruncate fails. Each failure counts one down."""

    def __init__(self, monkeypatch, f: AuditFile, writes: int = 0, fsyncs: int = 0, truncates: int = 0):
        self.writes, self.fsyncs, self.truncates = writes, fsyncs, truncates
        self.during_fsync = lambda: None  # what else happens before a failing fsync returns
        real_write, real_fsync, real_ftruncate = os.write, os.fsync, os.ftruncate

        def write(fd, data):
            if fd == f._fd and self.writes > 0:
                self.writes -= 1
                real_write(fd, bytes(data[:len(data) // 2]))
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            return real_write(fd, data)

        def fsync(fd):
            if fd == f._fd and self.fsyncs > 0:
                self.fsyncs -= 1
                self.during_fsync()
                raise OSError(errno.EIO, os.strerror(errno.EIO))
            return real_fsync(fd)

        def ftruncate(fd, length):
            if fd == f._fd and self.truncates > 0:
                self.truncates -= 1
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            return real_ftruncate(fd, length)

        monkeypatch.setattr(os, "write", write)
        monkeypatch.setattr(os, "fsync", fsync)
        monkeypatch.setattr(os, "ftruncate", ftruncate)


def caught_up_audit_file(store, tmp_path, records: int = 0) -> tuple:
    """(path, an audit file holding the store's first `records` records)."""
    path = tmp_path / "audit.jsonl"
    fill(store, records)
    f = AuditFile(path, store.audit_records)
    f.catch_up()
    return path, f


def running_audit_file(store, tmp_path, monkeypatch, records_before: int = 0, **faults) -> tuple:
    """(path, a running audit file holding `records_before` records, its FullDisk)."""
    path, f = caught_up_audit_file(store, tmp_path, records_before)
    f.start()
    store.relay.subscribe(f)
    return path, f, FullDisk(monkeypatch, f, **faults)


def closed_audit_file(store, tmp_path, records: int):
    """The path of an audit file holding the store's first `records` records, its writer closed."""
    path, f = caught_up_audit_file(store, tmp_path, records)
    f.close()
    return path


def whole_lines(path) -> list[int]:
    """The seqs in the file, asserting that every line is complete JSON (no partial line, no NUL bytes)."""
    raw = path.read_bytes()
    assert raw == b"" or raw.endswith(b"\n")
    return [json.loads(line)["seq"] for line in raw.splitlines()]


def test_a_failed_audit_write_leaves_no_partial_line_while_the_disk_stays_full(store, tmp_path, monkeypatch):
    monkeypatch.setattr(audit, "RETRY_SECONDS", 3600.0)  # no retry while the file is looked at
    path, f, disk = running_audit_file(store, tmp_path, monkeypatch, 2, writes=10**6)
    fill(store, 3)  # the database commits regardless; the file's writes fail halfway
    wait_for(lambda: f.behind, what="the audit file to fall behind")
    assert whole_lines(path) == [1, 2] and f.written_seq == 2
    disk.writes = 0
    assert f.catch_up() == 3 and not f.behind
    f.close()
    assert whole_lines(path) == [1, 2, 3, 4, 5]


def test_audit_file_catches_up_by_its_retry_timer_alone(store, tmp_path, monkeypatch):
    path, f, disk = running_audit_file(store, tmp_path, monkeypatch, 2, writes=3)
    # One commit, so one hand-over: after its write fails, only the timer retries (twice more in vain).
    store.append_audit([AuditEvent("entry.create", OP, "done", subject=f"e{i}") for i in range(4)])
    wait_for(lambda: f.written_seq == 6 and not f.behind, what="the audit file to catch up")
    assert disk.writes == 0
    fill(store, 1)
    f.close()
    assert whole_lines(path) == list(range(1, 8))
    records = list(read_jsonl(path))
    assert records == store.audit_records() and verify_chain(records).ok


def test_a_failed_fsync_is_written_again_without_duplicates(store, tmp_path, monkeypatch):
    path, f, disk = running_audit_file(store, tmp_path, monkeypatch, fsyncs=2)
    fill(store, 3)
    wait_for(lambda: f.written_seq == 3 and not f.behind and disk.fsyncs == 0, what="the audit file to catch up")
    f.close()
    assert whole_lines(path) == [1, 2, 3]


def test_an_audit_file_closed_while_behind_is_whole_and_the_next_start_catches_up(store, tmp_path, monkeypatch):
    path, f, disk = running_audit_file(store, tmp_path, monkeypatch, 1, writes=10**6)
    fill(store, 2)
    wait_for(lambda: f.behind, what="the audit file to fall behind")
    f.close()
    assert whole_lines(path) == [1]
    disk.writes = 0
    g = AuditFile(path, store.audit_records)
    assert g.catch_up() == 2
    g.close()
    assert whole_lines(path) == [1, 2, 3]


def test_a_file_truncated_around_a_failed_write_is_not_padded(store, tmp_path, monkeypatch):
    monkeypatch.setattr(audit, "RETRY_SECONDS", 3600.0)  # only the catch-ups below retry
    path, f, disk = running_audit_file(store, tmp_path, monkeypatch, 2, writes=1)
    fill(store, 1)
    wait_for(lambda: f.behind, what="the write of record 3 to fail")
    os.truncate(path, 0)  # rotated by copy and truncate after the failure
    assert f.catch_up() == 1 and whole_lines(path) == [3]
    disk.fsyncs, disk.during_fsync = 1, lambda: os.truncate(path, 0)  # and while a failing fsync runs
    fill(store, 1)
    wait_for(lambda: f.behind, what="the write of record 4 to fail")
    assert f.catch_up() == 1 and not f.behind
    f.close()
    assert b"\0" not in path.read_bytes() and whole_lines(path) == [4]


def test_a_failed_write_whose_cut_fails_too_is_cut_before_the_file_is_rotated_away(store, tmp_path, monkeypatch):
    monkeypatch.setattr(audit, "RETRY_SECONDS", 3600.0)  # only the catch-up below retries
    path, f, disk = running_audit_file(store, tmp_path, monkeypatch, 2, writes=1, truncates=1)
    fill(store, 4)
    wait_for(lambda: f.behind, what="the write to fail")
    os.rename(path, tmp_path / "audit.jsonl.1")
    assert f.catch_up() == 4 and not f.behind and disk.truncates == 0
    f.close()
    assert whole_lines(tmp_path / "audit.jsonl.1") == [1, 2] and whole_lines(path) == [3, 4, 5, 6]


def test_an_issuer_starts_beside_a_file_that_is_not_an_audit_trail_and_leaves_it_alone(store, tmp_path, monkeypatch):
    monkeypatch.setattr(audit, "RETRY_SECONDS", 3600.0)  # only the catch-ups below retry
    path = tmp_path / "audit.jsonl"
    fill(store, 2)
    for foreign in (b"operator notes\n", b"operator notes: do not touch"):  # the second has no final newline
        path.write_bytes(foreign)
        f = AuditFile(path, store.audit_records)  # does not raise: the file is behind, as while running
        assert f.behind and f.catch_up() == 0 and f.behind
        f.close()
        assert path.read_bytes() == foreign
    path.write_bytes(b"\n")  # emptied with `echo >`
    f = AuditFile(path, store.audit_records)
    assert f.catch_up() == 2 and not f.behind
    f.close()
    assert [r.seq for r in read_jsonl(path)] == [1, 2]


def test_an_audit_file_ahead_of_a_restored_database_is_refused_not_silently_skipped(store, tmp_path, monkeypatch):
    monkeypatch.setattr(audit, "RETRY_SECONDS", 3600.0)  # only the catch-ups below retry
    path = closed_audit_file(store, tmp_path, 5)
    written = path.read_bytes()
    restored = sqlite_store.SQLiteDatastore(tmp_path / "restored.db")  # an older backup: other records 1-2
    try:
        fill(restored, 2)
        f = AuditFile(path, restored.audit_records)  # the file's record 5 is not this database's
        assert f.behind and f.catch_up() == 0 and f.behind
        f.close()
        assert path.read_bytes() == written
        path.write_bytes(b"")  # emptied: its saved position, record 5, is not this database's either
        f = AuditFile(path, restored.audit_records)
        assert f.behind and path.read_bytes() == b""
        f.close()
        os.unlink(path)
        os.unlink(tmp_path / ".audit.jsonl.seq")  # both moved away: the file starts again from the database
        f = AuditFile(path, restored.audit_records)
        assert f.catch_up() == 2 and not f.behind
        f.close()
        assert list(read_jsonl(path)) == restored.audit_records()
    finally:
        restored.close()


def test_a_failed_write_after_the_file_was_rotated_does_not_pad_it(store, tmp_path, monkeypatch):
    path, f, disk = running_audit_file(store, tmp_path, monkeypatch, 2, writes=1)
    os.truncate(path, 0)  # logrotate's copytruncate: the file continues from here
    fill(store, 2)
    wait_for(lambda: f.written_seq == 4 and not f.behind and disk.writes == 0, what="the audit file to catch up")
    f.close()
    assert b"\0" not in path.read_bytes()
    assert whole_lines(path) == [3, 4]


def test_a_restart_after_the_audit_file_was_rotated_goes_on_without_writing_the_trail_again(store, tmp_path):
    path = closed_audit_file(store, tmp_path, 3)
    os.truncate(path, 0)  # rotated by copy and truncate while the issuer was stopped
    fill(store, 2)
    f = AuditFile(path, store.audit_records)
    assert f.catch_up() == 2
    f.close()
    assert whole_lines(path) == [4, 5]
    os.rename(path, tmp_path / "audit.jsonl.1")  # rotated by renaming
    fill(store, 1)
    f = AuditFile(path, store.audit_records)
    assert f.catch_up() == 1
    f.close()
    assert whole_lines(path) == [6] and whole_lines(tmp_path / "audit.jsonl.1") == [4, 5]
    position = tmp_path / ".audit.jsonl.seq"
    os.chmod(position, 0o644)
    AuditFile(path, store.audit_records).close()
    assert os.stat(position).st_mode & 0o777 == 0o600


def test_a_rotated_file_verifies_from_its_first_record_and_an_edit_in_it_is_still_found(store):
    fill(store, 5)
    tail = store.audit_records()[2:]  # records 3-5: 1 and 2 were rotated away
    check = verify_chain(tail, from_genesis=False)
    assert check.ok and (check.first_seq, check.last_seq, check.records) == (3, 5, 3)
    assert not verify_chain(tail).ok  # from genesis, records are missing
    edited = [tail[0], dataclasses.replace(tail[1], reason="edited"), tail[2]]
    check = verify_chain(edited, from_genesis=False)
    assert not check.ok and check.bad_seq == 4
    # A whole chain re-hashed from a made-up anchor: record 1 must still point at genesis.
    forged, prev = [], "f" * 64
    for r in store.audit_records():
        h = audit_hash(dataclasses.replace(r, prev_hash=prev))
        forged.append(dataclasses.replace(r, prev_hash=prev, hash=h))
        prev = h
    check = verify_chain(forged, from_genesis=False)
    assert not check.ok and check.bad_seq == 1


def test_a_running_audit_file_follows_a_rename_rotation(store, tmp_path, monkeypatch):
    path, f, _ = running_audit_file(store, tmp_path, monkeypatch, 2)
    os.rename(path, tmp_path / "audit.jsonl.1")
    path.touch(mode=0o644)  # as logrotate's `create 0644` leaves it
    os.chmod(path, 0o644)
    fill(store, 2)
    wait_for(lambda: f.written_seq == 4, what="the records after the rotation")
    f.close()
    assert whole_lines(tmp_path / "audit.jsonl.1") == [1, 2] and whole_lines(path) == [3, 4]
    assert os.stat(path).st_mode & 0o777 == 0o600


def test_an_older_audit_file_put_back_gets_its_gap_filled(store, tmp_path, monkeypatch):
    backup = closed_audit_file(store, tmp_path, 2).read_bytes()
    path, f, _ = running_audit_file(store, tmp_path, monkeypatch, 2)
    path.with_name("restored").write_bytes(backup)
    os.rename(path.with_name("restored"), path)  # put back while running: records 3 and 4 are missing
    fill(store, 1)
    wait_for(lambda: f.written_seq == 5, what="the restored file to catch up")
    assert whole_lines(path) == [1, 2, 3, 4, 5]
    path.write_bytes(backup)  # copied back over the same file (same inode)
    fill(store, 1)
    wait_for(lambda: f.written_seq == 6, what="the copied-back file to catch up")
    assert not f.behind
    f.close()
    assert whole_lines(path) == [1, 2, 3, 4, 5, 6]
    path.write_bytes(backup)  # and put back while stopped
    f = AuditFile(path, store.audit_records)
    assert f.catch_up() == 4
    f.close()
    assert whole_lines(path) == [1, 2, 3, 4, 5, 6]


def test_a_file_put_in_place_that_does_not_end_in_an_audit_record_is_not_written_to(store, tmp_path, monkeypatch):
    path, f, _ = running_audit_file(store, tmp_path, monkeypatch, 2)
    foreign = b"this is not an audit record\n" * 100
    path.write_bytes(foreign)
    fill(store, 1)
    wait_for(lambda: f.behind, what="the writer to refuse the file")
    assert f.catch_up() == 0 and f.behind  # a retry refuses it too
    assert path.read_bytes() == foreign  # neither cut nor appended to
    path.write_bytes(b"")  # the operator empties it: the writer goes on from where it was
    wait_for(lambda: f.written_seq == 3 and not f.behind, what="the writer to go on")
    f.close()
    assert whole_lines(path) == [3]


def test_audit_file_resumes_after_restart_without_duplicates_or_gaps(store, tmp_path):
    path = tmp_path / "audit.jsonl"
    fill(store, 3)
    f = AuditFile(path, store.audit_records)
    assert f.catch_up() == 3
    f.close()
    # Committed while no file writer ran (the issuer died between commit and file write).
    fill(store, 2)
    # And a torn last line from a crash mid-write.
    with open(path, "ab") as fh:
        fh.write(b'{"seq": 4, "trunc')
    f = AuditFile(path, store.audit_records)
    assert f.written_seq == 3
    assert f.catch_up() == 2
    f.close()
    f = AuditFile(path, store.audit_records)
    assert f.catch_up() == 0
    f.close()
    records = list(read_jsonl(path))
    assert [r.seq for r in records] == [1, 2, 3, 4, 5] and verify_chain(records).ok


# -- end to end ------------------------------------------------------------------------------


def export(d, *args) -> list[dict]:
    return [json.loads(x) for x in d.cli("audit", "export", *args).stdout.splitlines()]


def find(records, **want):
    return [r for r in records if all(r.get(k) == v for k, v in want.items())]


def test_editing_one_audit_row_with_sqlite3_makes_verify_exit_1_naming_it(running):
    d = running
    d.entry("/agent/a", "host-a")
    ok = d.cli("audit", "verify")
    assert ok.returncode == 0 and "intact" in ok.stdout
    n = len(export(d))
    assert n >= 3
    db = d.issuer_dir / "tessera.db"
    subprocess.run(["sqlite3", str(db), "UPDATE audit SET subject='someone-else' WHERE seq=3"], check=True)
    bad = d.cli("audit", "verify", check=False)
    assert bad.returncode == 1, bad.stdout + bad.stderr
    assert "record 3" in bad.stderr and len(bad.stderr.strip().splitlines()) == 1
    # The database can also be checked directly, with the issuer down.
    d.issuer.stop()
    direct = d.cli("audit", "verify", "--db", str(db), check=False)
    assert direct.returncode == 1 and "record 3" in direct.stderr


def test_untouched_store_verifies_from_the_database_and_the_file(running):
    d = running
    d.entry("/agent/a", "host-a")
    assert d.cli("audit", "verify").returncode == 0
    n = len(export(d))
    path = d.issuer_dir / "audit.jsonl"
    wait_for(lambda: path.exists() and len(path.read_text().splitlines()) >= n, what="the audit file")
    r = d.cli("audit", "verify", "--file", str(path))
    assert r.returncode == 0 and f"{n} records, last seq {n}" in r.stdout
    d.issuer.stop()
    assert d.cli("audit", "verify", "--db", str(d.issuer_dir / "tessera.db")).returncode == 0


def test_a_rotated_audit_file_is_followed_by_the_issuer_and_verifies(running):
    d = running
    path = d.issuer_dir / "audit.jsonl"
    d.entry("/agent/a", "host-a")
    wait_for(lambda: path.exists() and len(path.read_text().splitlines()) >= len(export(d)), what="the audit file")
    os.rename(path, d.issuer_dir / "audit.jsonl.1")
    d.entry("/agent/b", "host-a")
    n = len(export(d))
    wait_for(lambda: path.exists() and whole_lines(path)[-1:] == [n], what="the new audit file")
    unsaid = d.cli("audit", "verify", "--file", str(path), check=False)  # from genesis unless told
    assert unsaid.returncode == 1 and "--rotated" in unsaid.stderr
    r = d.cli("audit", "verify", "--file", str(path), "--rotated")
    assert r.returncode == 0 and f"to {n}" in r.stdout and "were not checked" in r.stdout
    assert whole_lines(d.issuer_dir / "audit.jsonl.1") + whole_lines(path) == list(range(1, n + 1))


def test_each_decision_type_appears_in_the_trail_with_actor_and_reason(running):
    d = running
    uid = f"uid:{os.getuid()}"
    host_a = d.sidecar_id("host-a")
    # Admin changes.
    token = d.token("host-b")
    mine = d.entry("/agent/a", "host-a")
    d.cli("entry", "update", mine, "--expires-in", "60d", "--reason", "project extended")
    theirs = d.entry("/agent/b", "host-b")
    doomed = d.entry("/agent/c", "host-a")
    d.cli("entry", "delete", doomed)
    # A sidecar attests with a token; reusing the token is refused.
    attest(d, token)
    with pytest.raises(grpc.RpcError) as e:
        attest(d, token)
    assert e.value.code() == grpc.StatusCode.PERMISSION_DENIED
    # Issuance: host-a mints the SVID of its entry. Denial: it asks for host-b's entry.
    wait_for(lambda: find(export(d, "--filter", "action=svid.issue"), subject=f"spiffe://{d.td}/agent/a"),
             what="issuance")
    item = sign(sidecar_stub(d, "host-a"), theirs)
    assert item.status_code == grpc.StatusCode.PERMISSION_DENIED.value[0]

    trail = export(d)
    # token create and entry changes: the operator's uid from the kernel.
    [tok] = find(trail, action="join_token.create", subject=d.sidecar_id("host-b"))
    assert tok["actor"]["kind"] == "operator" and tok["actor"]["id"] == uid and tok["decision"] == "done"
    [created] = find(trail, action="entry.create", subject=mine)
    assert created["actor"]["id"] == uid and created["details"]["owner"] == "alice"
    [updated] = find(trail, action="entry.update", subject=mine)
    assert updated["actor"]["id"] == uid and updated["reason"] == "project extended"
    assert "expires_at" in updated["details"]["changed"]
    [deleted] = find(trail, action="entry.delete", subject=doomed)
    assert deleted["actor"]["id"] == uid
    # Attestation allowed (join token) and denied (reused token), with the peer address.
    allowed = find(trail, action="sidecar.attest", decision="allow", subject=d.sidecar_id("host-b"))
    assert allowed and allowed[0]["actor"] == {"kind": "sidecar", "id": d.sidecar_id("host-b"),
                                               "details": {"peer": allowed[0]["actor"]["details"]["peer"]}}
    assert allowed[0]["reason"] == "join token" and allowed[0]["details"]["serial"]
    [denied] = find(trail, action="sidecar.attest", decision="deny")
    assert denied["reason"] == "join token was already used" and "peer" in denied["actor"]["details"]
    # Issuance: serial, SPIFFE ID, sidecar, TTL; by the sidecar.
    [issued] = find(trail, action="svid.issue", subject=f"spiffe://{d.td}/agent/a")[:1]
    assert issued["actor"] == {"kind": "sidecar", "id": host_a}
    assert issued["details"]["serial"] and issued["details"]["ttl"] > 0 and issued["details"]["sidecar_id"] == host_a
    assert issued["reason"] == "entry active, unexpired, parent is the caller"
    # Denial: which sidecar asked for what, and why.
    [refused] = find(trail, action="svid.deny", subject=theirs)
    assert refused["actor"]["id"] == host_a and refused["decision"] == "deny"
    assert "not registered to" in refused["reason"]
    assert d.cli("audit", "verify").returncode == 0


def test_audit_tail_follow_prints_only_new_records_as_they_commit(running):
    d = running
    env = {**os.environ, "TESSERA_ADMIN_SOCKET": str(d.admin_socket)}
    from harness import BIN, LineReader

    old = d.entry("/agent/old", "host-a")
    proc = subprocess.Popen([str(BIN / "tessera"), "audit", "tail", "--follow", "-n", "0", "--output", "json",
                             "--filter", "action=entry."], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                            text=True, env=env)
    reader = LineReader(proc)
    d.children.append(reader)
    # The tail may not be connected yet when an entry commits: keep creating until one shows up.
    created: list[str] = []
    deadline = time.monotonic() + 15
    while True:
        created.append(d.entry(f"/agent/new{len(created)}", "host-a"))
        try:
            first = reader.next(timeout=0.5)
            break
        except AssertionError:
            if time.monotonic() > deadline:
                raise
    assert first["subject"] in created and first["subject"] != old
    assert first["action"] == "entry.create" and first["actor"]["kind"] == "operator"


def test_audit_tail_filters_and_bad_arguments_are_one_line_errors(running):
    d = running
    d.entry("/agent/a", "host-a")
    out = d.cli("audit", "tail", "--filter", "decision=done", "--filter", "actor=uid:", "--output", "json").stdout
    assert out and all(json.loads(x)["decision"] == "done" and json.loads(x)["actor"]["kind"] == "operator"
                       for x in out.splitlines())
    wait_for(lambda: export(d, "--filter", "action=svid.issue"), what="the sidecar's issuance")  # then quiet
    last2 = [json.loads(x) for x in d.cli("audit", "tail", "-n", "2", "--output", "json").stdout.splitlines()]
    assert last2 == export(d)[-2:]
    bad = d.cli("audit", "tail", "--filter", "colour=blue", check=False)
    one_line_error(bad, "KEY=VALUE")
    one_line_error(d.cli("audit", "export", "--since", "yesterday-ish", check=False))
    assert export(d, "--since", "1h") and not export(d, "--since", "2999-01-01T00:00:00Z")


def test_audit_file_survives_issuer_kill9_without_duplicates(running):
    d = running
    d.entry("/agent/a", "host-a")
    d.restart_issuer(kill9=True)
    d.entry("/agent/b", "host-a")
    n = len(export(d))
    path = d.issuer_dir / "audit.jsonl"
    wait_for(lambda: len(path.read_text().splitlines()) >= n, what="the audit file to catch up")
    records = list(read_jsonl(path))
    assert [r.seq for r in records] == list(range(1, len(records) + 1))
    assert verify_chain(records).ok


def test_audit_file_resume_reads_only_the_tail_of_a_large_file(store, tmp_path):
    path = tmp_path / "audit.jsonl"
    store.append_audit([AuditEvent("entry.create", OP, "done", reason="x" * 500, subject=f"e{i}") for i in range(400)])
    f = AuditFile(path, store.audit_records)
    f.catch_up()
    f.close()
    assert path.stat().st_size > 3 * 65536
    with open(path, "ab") as fh:
        fh.write(b'{"seq": 401, "torn')
    f = AuditFile(path, store.audit_records)
    assert f.written_seq == 400
    f.close()
    assert [r.seq for r in read_jsonl(path)] == list(range(1, 401))


def test_sidecar_renewal_is_audited_with_the_sidecar_as_actor(deployment):
    d = deployment
    d.start_issuer(sidecar_svid_ttl="6s")  # renewed at half-life, 3 s in
    d.start_sidecar("host-a")
    renewed = wait_for(lambda: find(export(d, "--filter", "action=sidecar.renew"), decision="allow"), timeout=20,
                       what="a renewal record")
    assert renewed[0]["actor"] == {"kind": "sidecar", "id": d.sidecar_id("host-a")}
    assert renewed[0]["details"]["serial"] and renewed[0]["details"]["ttl"] == 6


def test_task_policy_approval_and_revocation_decisions_are_in_the_trail(deployment, tmp_path):
    from taskutil import ALLOW_ALL, policy, start_task, task_argv

    d = deployment
    uid = f"uid:{os.getuid()}"
    deny_prod = {"name": "no-prod-writes", "effect": "deny", "condition": 'has(context.env) && context.env == "prod"',
                 "reason": "agents do not write to prod"}
    d.start_issuer(policy=policy(deny_prod, ALLOW_ALL))
    d.start_sidecar("host-a")
    low = d.entry("/agent/low", "host-a", scope=["repo:read"], tier="low")
    d.entry("/agent/high", "host-a", "unix:uid:0", "unix:gid:0", scope=["pay:write"], tier="high")
    # Policy denial, with the rule and the request.
    low_id, high_id = f"spiffe://{d.td}/agent/low", f"spiffe://{d.td}/agent/high"
    denied = start_task(d, "t-deny", tmp_path / "x", "repo:read", context={"env": "prod"}, spiffe_id=low_id)
    assert denied.returncode != 0 and "agents do not write to prod" in denied.stderr
    # Issuance by policy, for a workload the kernel described.
    ok = start_task(d, "t-ok", tmp_path / "ok", "repo:read", spiffe_id=low_id)
    assert ok.returncode == 0, ok.stderr
    # Approval: pending, then approved by an operator with a reason.
    waiting = subprocess.Popen(task_argv(d, "t-high", tmp_path / "h", "pay:write", wait="60s", spiffe_id=high_id),
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    pending = wait_for(lambda: json.loads(d.cli("approval", "list", "--output", "json").stdout), what="pending")
    d.cli("approval", "approve", pending[0]["id"], "--reason", "ticket OPS-9")
    assert waiting.wait(30) == 0
    # Revocation by an operator, and a sidecar ban.
    d.cli("revoke", "--entry", low, "--reason", "agent retired")
    d.cli("sidecar", "ban", "host-a", "--reason", "host compromised")

    trail = export(d)
    [deny] = find(trail, action="task.deny")
    assert deny["decision"] == "deny" and deny["reason"] == "agents do not write to prod"
    assert deny["details"]["rule"] == "no-prod-writes" and deny["details"]["context"] == {"env": "prod"}
    assert deny["actor"]["kind"] == "workload" and deny["actor"]["details"]["uid"] == os.getuid()
    issued = find(trail, action="task.issue")
    assert {i["details"]["task_id"] for i in issued} == {"t-ok", "t-high"}
    ok_rec = next(i for i in issued if i["details"]["task_id"] == "t-ok")
    assert ok_rec["actor"]["details"]["pid"] > 0 and ok_rec["actor"]["details"]["exe"]
    assert ok_rec["details"]["rule"] == "allow-entry-scopes" and ok_rec["details"]["serial"]
    [req] = find(trail, action="task.approval_request")
    assert req["decision"] == "pending" and "requires approval" in req["reason"]
    [approve] = find(trail, action="task.approve")
    assert approve["actor"]["id"] == uid and approve["reason"] == "ticket OPS-9"
    revokes = find(trail, action="revoke")
    by_entry = next(r for r in revokes if r["subject"] == f"entry:{low}")
    assert by_entry["actor"]["id"] == uid and by_entry["reason"] == "agent retired" and by_entry["details"]["count"] >= 1
    ban = [r for r in trail if r["action"].startswith("sidecar.ban") or r["subject"].startswith("sidecar:")]
    assert ban and all(r["actor"]["id"] == uid for r in ban) and any(r["reason"] == "host compromised" for r in ban)
    assert d.cli("audit", "verify").returncode == 0


def test_a_gap_is_read_back_by_time_alone_when_nothing_else_commits(store, monkeypatch):
    monkeypatch.setattr(relay_mod, "GAP_GRACE", 0.1)
    heard = heard_by_a_listener(store)
    committed_by_a_worker(store, 2)  # then the worker died before handing them over
    fill(store, 1)  # the gap is noticed; nothing commits after it
    wait_for(lambda: len(heard) == 3, timeout=10, what="the gap to be read back")
    assert heard == store.audit_records()


def test_a_gap_is_read_back_on_the_timer_thread_without_the_relay_lock(store, monkeypatch):
    """The signing pool hands records over on the event loop: that call must never wait for the database."""
    heard = gap_timer_by_hand(store, monkeypatch)
    committed_by_a_worker(store, 2)  # then the worker died before handing them over
    readers = []
    read_back = store.audit_records

    def recorded(*args, **kwargs):
        readers.append(threading.current_thread())
        # The relay lock is free while the database is read: a hand-over now would not wait for it.
        assert store.relay._lock.acquire(blocking=False)
        store.relay._lock.release()
        return read_back(*args, **kwargs)

    monkeypatch.setattr(store, "audit_records", recorded)
    fill(store, 1)  # record 3 waits for 1 and 2
    time.sleep(0.1)
    fill(store, 1)  # past the grace, on this thread: record 4 waits too, nothing is read
    assert readers == [] and heard == []
    fire_gap_timer(store)
    assert len(readers) == 1 and readers[0] is not threading.current_thread()
    assert [r.seq for r in heard] == [1, 2, 3, 4]


def test_records_handed_over_during_the_read_back_are_relayed_once(store, monkeypatch):
    heard = gap_timer_by_hand(store, monkeypatch)
    late = committed_by_a_worker(store, 2)  # its answer is slow, not lost
    fill(store, 1)
    time.sleep(0.1)
    read_back = store.audit_records

    def answer_arrives_meanwhile(*args, **kwargs):
        store.relay.publish(late)  # the event loop relays the worker's answer while the timer reads
        return read_back(*args, **kwargs)

    monkeypatch.setattr(store, "audit_records", answer_arrives_meanwhile)
    fire_gap_timer(store)
    assert [r.seq for r in heard] == [1, 2, 3] and not store.relay._waiting


def test_a_record_missing_from_the_database_is_skipped_and_the_ones_after_it_are_relayed(store, monkeypatch):
    heard = gap_timer_by_hand(store, monkeypatch)
    committed_by_a_worker(store, 4)
    with sqlite3.connect(store.path) as db:  # damage: a row gone from the middle of the trail
        db.execute("DELETE FROM audit WHERE seq = 2")
    fill(store, 1)  # record 5 waits for 1-4
    time.sleep(0.1)
    fire_gap_timer(store)
    assert [r.seq for r in heard] == [1, 3, 4, 5] and not store.relay._waiting
    fill(store, 1)
    assert [r.seq for r in heard][-1] == 6


def test_a_failed_read_back_loses_nothing_and_is_tried_again(store, monkeypatch):
    monkeypatch.setattr(relay_mod, "GAP_GRACE", 0.05)
    heard = heard_by_a_listener(store)
    committed_by_a_worker(store, 2)  # then the worker died before handing them over
    read_back = store.audit_records
    failures = []

    def failing_once(*args, **kwargs):  # a fault in the read-back, as a locked or damaged file gives
        if not failures:
            failures.append(1)
            raise sqlite3.OperationalError("disk I/O error")
        return read_back(*args, **kwargs)

    monkeypatch.setattr(store, "audit_records", failing_once)
    fill(store, 1)  # record 3 waits for 1 and 2; the first read-back fails, the next one is timed again
    wait_for(lambda: len(heard) == 3, timeout=10, what="the read-back to be tried again")
    assert failures == [1] and [r.seq for r in heard] == [1, 2, 3]
    fill(store, 1)
    assert [r.seq for r in heard] == [1, 2, 3, 4]
