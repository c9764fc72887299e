"""An SQLite store written by an earlier release upgrades in place, losing no record.

Each store is made here with that release's own schema SQL and rows, then opened by
today's code: its migrations run once, every record reads back as it was, the audit
chain still verifies, and the store takes new writes (the newer-release refusal is in
the contract suite, for every engine)."""

import dataclasses
import sqlite3

import pytest

from issuer.audit.records import verify_chain
from issuer.core.models import GENESIS_HASH, ISSUED_FIELDS, Actor, AuditEvent, Entry, IssuedSerial, JoinToken, Revocation, Sidecar
from issuer.datastore import rows
from issuer.datastore.sqlite import SCHEMA_VERSION, SQLiteDatastore

NOW = 1_900_000_000
SID = "spiffe://example.org/tessera/sidecar/h"
CA = "ab" * 20

_COMMON = """
CREATE TABLE entries (id TEXT PRIMARY KEY, spiffe_id TEXT NOT NULL, parent_id TEXT NOT NULL, selectors TEXT NOT NULL,
    owner TEXT NOT NULL, purpose TEXT NOT NULL, tier TEXT NOT NULL, scopes TEXT NOT NULL, x509_ttl INTEGER NOT NULL,
    expires_at INTEGER NOT NULL, state TEXT NOT NULL, created_by TEXT NOT NULL, created_at INTEGER NOT NULL,
    updated_at INTEGER NOT NULL, revision INTEGER NOT NULL);
CREATE INDEX entries_parent ON entries(parent_id);
CREATE TABLE sidecars (id TEXT PRIMARY KEY, name TEXT NOT NULL, state TEXT NOT NULL, attested_at INTEGER NOT NULL,
    last_seen INTEGER NOT NULL, svid_serial TEXT NOT NULL, svid_expires_at INTEGER NOT NULL);
CREATE TABLE join_tokens (token_hash TEXT PRIMARY KEY, sidecar_name TEXT NOT NULL, expires_at INTEGER NOT NULL,
    created_by TEXT NOT NULL, created_at INTEGER NOT NULL, used_at INTEGER);
CREATE TABLE issued (serial TEXT PRIMARY KEY, spiffe_id TEXT NOT NULL, kind TEXT NOT NULL, entry_id TEXT,
    sidecar_id TEXT, task_id TEXT, issued_at INTEGER NOT NULL, not_after INTEGER NOT NULL, revoked_at INTEGER,
    revocation_reason TEXT);
CREATE INDEX issued_entry ON issued(entry_id);
CREATE INDEX issued_not_after ON issued(not_after);
CREATE INDEX issued_task ON issued(task_id);
CREATE INDEX issued_spiffe ON issued(spiffe_id);
CREATE TABLE revocations (seq INTEGER PRIMARY KEY, ts INTEGER NOT NULL, kind TEXT NOT NULL, target TEXT NOT NULL,
    reason TEXT NOT NULL, reason_code TEXT NOT NULL, serials TEXT NOT NULL, entry_ids TEXT NOT NULL);
CREATE TABLE meta (key TEXT PRIMARY KEY, value INTEGER NOT NULL);
CREATE TABLE audit (seq INTEGER PRIMARY KEY, ts REAL NOT NULL, action TEXT NOT NULL, actor TEXT NOT NULL,
    decision TEXT NOT NULL, reason TEXT NOT NULL, subject TEXT NOT NULL, details TEXT NOT NULL,
    prev_hash TEXT NOT NULL, hash TEXT NOT NULL);
"""

# Before the datastore contract: the last signed CRL kept in `crl`, no change feed, no authorities.
BEFORE_CHANGE_FEED = _COMMON + """
CREATE TABLE crl (id INTEGER PRIMARY KEY CHECK (id = 1), number INTEGER NOT NULL, this_update INTEGER NOT NULL,
    next_update INTEGER NOT NULL, der BLOB NOT NULL);
INSERT INTO crl VALUES (1, 7, 1899999000, 1899999600, x'3082');
"""

# The release before authorities (main's schema): CA fingerprints noted in `authorities`, the change feed.
BEFORE_AUTHORITIES = _COMMON + f"""
CREATE TABLE authorities (fingerprint TEXT PRIMARY KEY, not_after INTEGER NOT NULL, first_seen INTEGER NOT NULL);
INSERT INTO authorities VALUES ('{"cd" * 32}', {NOW + 86400}, {NOW});
CREATE TABLE changes (position INTEGER PRIMARY KEY AUTOINCREMENT, ts REAL NOT NULL, kind TEXT NOT NULL,
    op TEXT NOT NULL, key TEXT NOT NULL, payload TEXT NOT NULL);
INSERT INTO changes (ts, kind, op, key, payload) VALUES (1900000000.5, 'entry', 'create', 'e1', '{{}}');
INSERT INTO changes (ts, kind, op, key, payload) VALUES (1900000001.5, 'sidecar', 'upsert', '{SID}', '{{}}');
"""

ENTRY = Entry(id="e1", spiffe_id="spiffe://example.org/a", parent_id=SID, selectors=("unix:uid:1",), owner="bob",
              purpose="p", tier="standard", scopes=("read",), x509_ttl=300, expires_at=NOW + 3600, state="active",
              created_by="uid:0", created_at=NOW, updated_at=NOW)
SIDECAR = Sidecar(SID, "h", "active", NOW, NOW, "aa", NOW + 60)
TOKEN = JoinToken("th", "h", NOW + 60, "uid:0", NOW)
ISSUED = [IssuedSerial("1", "spiffe://example.org/a", "identity", "e1", SID, issued_at=NOW, not_after=NOW + 300),
          IssuedSerial("2", "spiffe://example.org/a", "identity", "e1", SID, issued_at=NOW, not_after=NOW + 300,
                       revoked_at=NOW + 5, revocation_reason="stolen")]
REVOCATION = Revocation(1, NOW + 5, "serial", "2", "stolen", "keyCompromise", ("2",), ())
OP = Actor("operator", "uid:0")
AUDIT = rows.chain([AuditEvent("entry.create", OP, "done", subject="e1"),
                    AuditEvent("revoke", OP, "done", subject="serial:2", details={"serial": "2"})], 0, GENESIS_HASH)


def old_store(path, schema: str) -> None:
    """A store as that release left it, rows written with its SQL."""
    db = sqlite3.connect(path)
    db.executescript(schema)
    db.execute("INSERT INTO entries VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?,?)", rows.entry_row(ENTRY))
    db.execute("INSERT INTO sidecars VALUES (?,?,?,?,?,?,?)", dataclasses.astuple(SIDECAR))
    db.execute("INSERT INTO join_tokens VALUES (?,?,?,?,?,NULL)", (TOKEN.token_hash, TOKEN.sidecar_name,
                                                                    TOKEN.expires_at, TOKEN.created_by, TOKEN.created_at))
    columns = ISSUED_FIELDS[:-1]  # all but `authority`, which these releases did not have
    db.executemany(f"INSERT INTO issued ({', '.join(columns)}) VALUES ({', '.join('?' * len(columns))})",
                   [rows.issued_row(s)[:-1] for s in ISSUED])
    db.execute("INSERT INTO revocations VALUES (?,?,?,?,?,?,?,?)",
               (1, REVOCATION.ts, "serial", "2", "stolen", "keyCompromise", '["2"]', "[]"))
    db.execute("INSERT INTO meta VALUES ('crl_number', 7)")
    db.executemany(f"INSERT INTO audit ({rows.AUDIT_COLUMNS}) VALUES (?,?,?,?,?,?,?,?,?,?)",
                   [rows.audit_row(r) for r in AUDIT])
    db.commit()
    db.close()


def tables(path) -> set[str]:
    with sqlite3.connect(path) as db:
        return {r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type='table'")}


@pytest.mark.parametrize("schema", [BEFORE_CHANGE_FEED, BEFORE_AUTHORITIES], ids=["before-change-feed",
                                                                                   "before-authorities"])
def test_a_store_of_an_earlier_release_upgrades_in_place_with_every_record(tmp_path, schema):
    path = tmp_path / "tessera.db"
    old_store(path, schema)
    feed_before = 2 if "changes" in schema else 0

    store = SQLiteDatastore(path)
    try:
        assert store.list_entries() == [ENTRY] and store.list_sidecars() == [SIDECAR]
        assert store.consume_join_token("th", NOW + 1) == TOKEN
        assert store.find_issued() == ISSUED  # authority None: signed by the one CA of then
        assert store.revocations() == [REVOCATION] and store.last_revocation_seq() == 1
        assert store.audit_records() == AUDIT and verify_chain(store.audit_since()).ok
        assert store.last_change_position() == feed_before
        # The one CA of then adopts the serials and the CRL numbers; numbering goes on, never back.
        assert store.adopt_unattributed(CA) == 2 and store.next_crl_number(CA) == 8
        store.create_entry(dataclasses.replace(ENTRY, id="e2"), AuditEvent("entry.create", OP, "done", subject="e2"))
        assert [c.position for c in store.changes_after(0)][-1] == feed_before + 1
        assert verify_chain(store.audit_since()).ok and store.newest_audit_seq() == 3
        assert store.list_authorities() == []  # the fingerprint notes are gone; authorities start empty
        assert store.list_approvals(NOW) == []  # pending approvals were in memory then: none to carry over
    finally:
        store.close()
    assert "crl" not in tables(path) and {"schema_version", "authorities", "changes", "approvals"} <= tables(path)
    with sqlite3.connect(path) as db:
        assert db.execute("SELECT version FROM schema_version").fetchall() == [(SCHEMA_VERSION,)]
        assert "authority" in {r[1] for r in db.execute("PRAGMA table_info(issued)")}

    again = SQLiteDatastore(path)  # opening an upgraded store migrates nothing and changes nothing
    try:
        assert len(again.find_issued()) == 2 and again.newest_audit_seq() == 3 and again.next_crl_number(CA) == 9
    finally:
        again.close()


def test_a_new_store_starts_at_the_current_schema_version(tmp_path):
    SQLiteDatastore(tmp_path / "t.db").close()
    with sqlite3.connect(tmp_path / "t.db") as db:
        assert db.execute("SELECT version FROM schema_version").fetchall() == [(SCHEMA_VERSION,)]
