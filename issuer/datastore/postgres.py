"""The shared datastore: one PostgreSQL database, through psycopg 3 and its connection pool.

Several processes may write it at once (signing workers today, several issuers next). Each
write transaction first takes one transaction-level advisory lock (`_WRITE_LOCK`), held to
its COMMIT: writers are serialised across every process on the database, as the flock
serialises them on the SQLite file. Under that lock the transaction reads the audit
chain's head, the last change feed position and the last revocation seq, and extends
them; the lock is released only after the commit is durable and visible, so
- the audit records of every process form one hash chain (the next writer reads this one's
  head), and
- feed positions and revocation seqs increase in commit order with no gap: a sequence or
  serial would not do (numbers are taken at INSERT, and a transaction that took a smaller
  one can commit after one that took a larger one, so a follower reading between the two
  commits would step over the smaller for good).
Writes that touch neither the chain nor the feed (a sidecar's last-seen, a join token's
use, a CRL number) take no advisory lock: their row locks order them (UPDATE ... WHERE
used_at IS NULL RETURNING has one winner; an INSERT ... ON CONFLICT DO UPDATE ...
RETURNING counts up atomically). Readers take no lock at all (MVCC).

Every commit is durable before the call returns (synchronous_commit=on, set on each
connection). A database that cannot be reached, or that goes away mid-call, is Unavailable
(tessera.errors) after at most a few seconds (CONNECT_TIMEOUT, POOL_TIMEOUT), with the
transaction rolled back, or, if the connection died during COMMIT, not acknowledged.

Concurrent record_issued callers share one transaction (rows.GroupCommit), as on SQLite.
The schema grows by forward migrations (MIGRATIONS, schema_version), applied at open under
their own advisory lock, so issuers starting at once migrate once.

The DSN is a `postgresql://` URI; it carries no password (issuer/config.py refuses one):
libpq reads it from PGPASSFILE / ~/.pgpass, a `passfile=` parameter, or PGPASSWORD.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import threading
import time
import weakref
from typing import Any, Callable, Iterable, Iterator, Mapping, Sequence

import psycopg
from psycopg import errors as pgerrors
from psycopg.conninfo import conninfo_to_dict
from psycopg.rows import dict_row
from psycopg_pool import ConnectionPool, PoolClosed, PoolTimeout

from issuer.audit.relay import AuditRelay
from issuer.core.models import (APPROVAL_FINAL_OPS, AUTHORITY_FIELDS, GENESIS_HASH, ISSUED_FIELDS,
                                ApprovalCap, ApprovalRequest, AuditEvent, AuditRecord, Authority, Change, Entry,
                                Heads, IssuedSerial, JoinToken, Revocation, Sidecar)
from issuer.datastore.interface import DUPLICATE_SERIAL, live_task_message
from issuer.datastore.rows import (APPROVAL_COLUMNS, AUDIT_COLUMNS, CRL_NUMBERS_QUERY, GroupCommit, OwnChanges, Pending,
                                   approval_cap_where, approval_from, approval_row, approval_still_open, audit_record,
                                   audit_row,
                                   authority_from, authority_row, chain, change_payload, check_schema_version, dumps,
                                   entry_from, entry_row, issued_from, issued_row, sidecar_from)
from tessera import logs
from tessera.errors import AlreadyExists, FailedPrecondition, NotFound, Unavailable

log = logs.get("datastore")
# psycopg_pool writes a plain line for every failed connection attempt; the store says it once a minute instead.
logging.getLogger("psycopg.pool").setLevel(logging.ERROR)
# An unreachable database fails every call until it is back: one line per minute, repeats counted.
_db_log = logs.Throttled(log, window=60, level="error")

WRITE_LOCK_TIMEOUT = 30.0  # seconds a writer waits for another writer (or any row lock) before Unavailable
CONNECT_TIMEOUT = 3  # seconds to open a connection (libpq's connect_timeout; whole seconds, at least 2)
POOL_TIMEOUT = 3.0  # seconds a call waits for a pooled connection (the database down: none comes)
PROBE_AFTER = 1.0  # seconds: a pooled connection idle longer is probed before it is lent (see _check)
# Seconds the pool keeps retrying a lost connection by itself (after 1 s, then 2 s, ...) before it leaves the next
# call to ask for one again. psycopg_pool's backoff doubles up to this: at its default (5 min) a pool that lost its
# connections in a 30 s outage tried next only 30 s later, and calls failed that long after the database was back.
RECONNECT_TIMEOUT = 5.0
DEFAULT_POOL_SIZE = 10  # connections per store object at most (each signing worker has its own store)
STATEMENT_TIMEOUT = "30s"  # one statement, at most (a wedged query must not hold the write lock for ever)
IDLE_IN_TRANSACTION_TIMEOUT = "60s"  # a stopped process's open transaction (and write lock) is ended by the server

# Advisory lock keys: one 64-bit space per database; constants unlikely to collide with another application's.
_WRITE_LOCK = 0x7465_7373_6572_6101  # "tessera" 01
_MIGRATE_LOCK = 0x7465_7373_6572_6102
CHANGES_CHANNEL = "tessera_changes"  # NOTIFY'd by each transaction that appends to the change feed
CHANGE_POLL = 1.0  # seconds: a follower reads the feed at least this often (a NOTIFY lost across a reconnect)

# -- schema ---------------------------------------------------------------------------------------------

_V1 = (
    """CREATE TABLE entries (
        id TEXT PRIMARY KEY,
        spiffe_id TEXT NOT NULL,
        parent_id TEXT NOT NULL,
        selectors TEXT NOT NULL,
        owner TEXT NOT NULL,
        purpose TEXT NOT NULL,
        tier TEXT NOT NULL,
        scopes TEXT NOT NULL,
        x509_ttl BIGINT NOT NULL,
        expires_at BIGINT NOT NULL,
        state TEXT NOT NULL,
        created_by TEXT NOT NULL,
        created_at BIGINT NOT NULL,
        updated_at BIGINT NOT NULL,
        revision BIGINT NOT NULL)""",
    "CREATE INDEX entries_parent ON entries(parent_id)",
    """CREATE TABLE sidecars (
        id TEXT PRIMARY KEY,
        name TEXT NOT NULL,
        state TEXT NOT NULL,
        attested_at BIGINT NOT NULL,
        last_seen BIGINT NOT NULL,
        svid_serial TEXT NOT NULL,
        svid_expires_at BIGINT NOT NULL)""",
    """CREATE TABLE join_tokens (
        token_hash TEXT PRIMARY KEY,
        sidecar_name TEXT NOT NULL,
        expires_at BIGINT NOT NULL,
        created_by TEXT NOT NULL,
        created_at BIGINT NOT NULL,
        used_at BIGINT)""",
    """CREATE TABLE issued (
        serial TEXT PRIMARY KEY,
        spiffe_id TEXT NOT NULL,
        kind TEXT NOT NULL,
        entry_id TEXT,
        sidecar_id TEXT,
        issued_at BIGINT NOT NULL,
        not_after BIGINT NOT NULL,
        task_id TEXT,
        revoked_at BIGINT,
        revocation_reason TEXT,
        authority TEXT)""",
    "CREATE INDEX issued_entry ON issued(entry_id)",
    "CREATE INDEX issued_not_after ON issued(not_after)",
    "CREATE INDEX issued_task ON issued(task_id)",
    "CREATE INDEX issued_spiffe ON issued(spiffe_id)",
    "CREATE INDEX issued_authority ON issued(authority)",
    """CREATE TABLE revocations (
        seq BIGINT PRIMARY KEY,
        ts BIGINT NOT NULL,
        kind TEXT NOT NULL,
        target TEXT NOT NULL,
        reason TEXT NOT NULL,
        reason_code TEXT NOT NULL,
        serials TEXT NOT NULL,
        entry_ids TEXT NOT NULL)""",
    "CREATE TABLE meta (key TEXT PRIMARY KEY, value BIGINT NOT NULL)",
    """CREATE TABLE authorities (
        id TEXT PRIMARY KEY,
        kind TEXT NOT NULL,
        state TEXT NOT NULL,
        source TEXT NOT NULL,
        parent TEXT,
        public_der BYTEA NOT NULL,
        cert_der BYTEA NOT NULL,
        sealed_key BYTEA NOT NULL,
        kek_id TEXT NOT NULL,
        not_before BIGINT NOT NULL,
        not_after BIGINT NOT NULL,
        created_at BIGINT NOT NULL,
        activated_at BIGINT,
        retired_at BIGINT,
        tainted_at BIGINT,
        revoked_at BIGINT)""",
    # position and seq are given under the write lock, in commit order (see the module's docstring)
    """CREATE TABLE changes (
        position BIGINT PRIMARY KEY,
        ts DOUBLE PRECISION NOT NULL,
        kind TEXT NOT NULL,
        op TEXT NOT NULL,
        key TEXT NOT NULL,
        payload TEXT NOT NULL)""",
    # actor and details are JSON text, kept byte for byte as hashed (a jsonb column would re-spell them)
    """CREATE TABLE audit (
        seq BIGINT PRIMARY KEY,
        ts DOUBLE PRECISION NOT NULL,
        action TEXT NOT NULL,
        actor TEXT NOT NULL,
        decision TEXT NOT NULL,
        reason TEXT NOT NULL,
        subject TEXT NOT NULL,
        details TEXT NOT NULL,
        prev_hash TEXT NOT NULL,
        hash TEXT NOT NULL)""",
    "CREATE INDEX audit_ts ON audit(ts)",
)

# Pending approvals move from one issuer's memory to the database, so every issuer sees and decides them.
_V2_APPROVALS = (
    """CREATE TABLE approvals (
        id TEXT PRIMARY KEY,
        task_id TEXT NOT NULL,
        entry_id TEXT NOT NULL,
        spiffe_id TEXT NOT NULL,
        owner TEXT NOT NULL,
        tier TEXT NOT NULL,
        scopes TEXT NOT NULL,
        ttl BIGINT NOT NULL,
        context TEXT NOT NULL,
        sidecar_id TEXT NOT NULL,
        workload TEXT NOT NULL,
        reason TEXT NOT NULL,
        rule TEXT NOT NULL,
        created_at BIGINT NOT NULL,
        expires_at BIGINT NOT NULL,
        state TEXT NOT NULL,
        decided_by TEXT NOT NULL,
        decision_reason TEXT NOT NULL,
        uid BIGINT NOT NULL)""",
    "CREATE INDEX approvals_pending ON approvals(state, expires_at)",
)

MIGRATIONS: tuple[tuple[str, ...], ...] = (_V1, _V2_APPROVALS)  # MIGRATIONS[n - 1] brings a database to version n
SCHEMA_VERSION = len(MIGRATIONS)


def _migrate(db: psycopg.Connection, where: str) -> None:
    """Bring the database to SCHEMA_VERSION in one transaction; a newer release's schema is refused, never changed."""
    with db.transaction():
        db.execute("SELECT pg_advisory_xact_lock(%s)", (_MIGRATE_LOCK,))  # issuers starting at once: one migrates
        db.execute("CREATE TABLE IF NOT EXISTS schema_version (version INTEGER NOT NULL)")
        row = db.execute("SELECT version FROM schema_version").fetchone()
        version = row[0] if row else 0
        check_schema_version(version, SCHEMA_VERSION, where)
        for n in range(version + 1, SCHEMA_VERSION + 1):
            for statement in MIGRATIONS[n - 1]:
                db.execute(statement)
        if row is not None and version != SCHEMA_VERSION:  # an upgrade is worth a line; a new database is not
            log.info("datastore schema migrated", database=where, version_from=version, version=SCHEMA_VERSION)
        if row is None:
            db.execute("INSERT INTO schema_version VALUES (%s)", (SCHEMA_VERSION,))
        elif version != SCHEMA_VERSION:
            db.execute("UPDATE schema_version SET version=%s", (SCHEMA_VERSION,))


def check_dsn(dsn: str) -> str:
    """A `postgresql://` URI libpq accepts, carrying no password (ValueError otherwise): a DSN is written in
    config files and typed on command lines, where a password would be read by whoever sees them."""
    if not dsn.startswith(("postgresql://", "postgres://")):
        raise ValueError("must be a postgresql:// URI (e.g. postgresql://tessera@/tessera?host=/run/postgresql)")
    try:
        params = conninfo_to_dict(dsn)
    except psycopg.ProgrammingError as e:
        raise ValueError(f"is not a valid PostgreSQL URI: {_first_line(e)}") from None
    if "password" in params:
        raise ValueError("must not carry a password: put it in a password file (PGPASSFILE, ~/.pgpass or "
                         "?passfile=/path, mode 0600) or PGPASSWORD in the issuer's environment")
    return dsn


def describe(dsn: str) -> str:
    """The database a DSN names, for messages (never its password, should one be there)."""
    try:
        d = conninfo_to_dict(dsn)
    except psycopg.ProgrammingError:
        return "(an unparseable DSN)"
    return f"{d.get('dbname') or d.get('user') or '(default)'} on {d.get('host') or '(default host)'}"


def _connect(dsn: str, where: str, **kwargs) -> psycopg.Connection:
    try:
        return psycopg.connect(dsn, connect_timeout=CONNECT_TIMEOUT, autocommit=True,
                               application_name="tessera-issuer", **kwargs)
    except psycopg.OperationalError as e:
        raise Unavailable(f"cannot connect to the PostgreSQL database {where}: {_first_line(e)}") from None
    except psycopg.ProgrammingError as e:  # a malformed DSN
        raise FailedPrecondition(f"bad PostgreSQL DSN: {_first_line(e)}") from None


def _first_line(e: BaseException) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0]


# record_task_issued's check (find_issued's filters), sent in its pipeline: find_issued would fetch at once.
_LIVE_TASK = ("SELECT 1 FROM issued WHERE entry_id=%s AND task_id=%s AND not_after>%s AND revoked_at IS NULL"
              " LIMIT 1")
_ISSUED_COLUMNS = ", ".join(ISSUED_FIELDS)
# Rows go in by COPY when there are many: for a signing worker's chunk ~15 us of the worker's CPU and ~31 us of
# PostgreSQL's per row, where one INSERT per row cost ~45 and ~53. A few go in by one INSERT statement: one round
# trip, which can share a pipeline (COPY takes two, and cannot).
_COPY_FROM = 8


def _insert_rows(db: psycopg.Connection, table: str, columns: str, rows: Sequence[tuple]) -> None:
    """`rows` into `table`; a duplicate key raises UniqueViolation (and aborts the transaction) either way.
    Inside a pipeline, fewer than _COPY_FROM rows only."""
    if len(rows) >= _COPY_FROM:
        with db.cursor() as cur, cur.copy(f"COPY {table} ({columns}) FROM STDIN") as copy:
            for row in rows:
                copy.write_row(row)
    elif rows:
        values = ", ".join([f"({', '.join(['%s'] * len(rows[0]))})"] * len(rows))
        db.execute(f"INSERT INTO {table} ({columns}) VALUES {values}", [v for row in rows for v in row])


_INSERT_AUTHORITY = (f"INSERT INTO authorities ({', '.join(AUTHORITY_FIELDS)}) "
                     f"VALUES ({', '.join(['%s'] * len(AUTHORITY_FIELDS))}) ON CONFLICT (id) DO NOTHING")
_UPDATE_AUTHORITY = (f"UPDATE authorities SET ({', '.join(AUTHORITY_FIELDS)}) = "
                     f"({', '.join(['%s'] * len(AUTHORITY_FIELDS))}) WHERE id=%s AND state=%s")
_INSERT_APPROVAL = (f"INSERT INTO approvals ({', '.join(APPROVAL_COLUMNS)}) "
                    f"VALUES ({', '.join(['%s'] * len(APPROVAL_COLUMNS))}) ON CONFLICT (id) DO NOTHING")
_AUDIT_BATCH = 1000  # audit_since reads this many records per query


# -- reads shared by the store and the read-only reader ------------------------------------------------


class _AuditReads:
    def _read(self) -> contextlib.AbstractContextManager[psycopg.Connection]:
        raise NotImplementedError

    def _rows(self, query: str, args: Sequence[Any] = ()) -> list[tuple]:
        with self._read() as db:
            return db.execute(query, args).fetchall()

    def _dicts(self, query: str, args: Sequence[Any] = ()) -> list[dict]:
        with self._read() as db, db.cursor(row_factory=dict_row) as cur:
            return cur.execute(query, args).fetchall()

    def audit_records(self, since_seq: int = 0, limit: int | None = None) -> list[AuditRecord]:
        return [audit_record(r) for r in self._rows(
            f"SELECT {AUDIT_COLUMNS} FROM audit WHERE seq > %s ORDER BY seq LIMIT %s", (since_seq, limit))]

    def audit_since(self, since_ts: float = 0.0) -> Iterator[AuditRecord]:
        """Every audit record with ts >= since_ts, in seq order (read lazily, a batch per query)."""
        after = 0
        while True:
            batch = self._rows(f"SELECT {AUDIT_COLUMNS} FROM audit WHERE seq > %s AND ts >= %s ORDER BY seq LIMIT %s",
                               (after, since_ts, _AUDIT_BATCH))
            for row in batch:
                yield audit_record(row)
            if len(batch) < _AUDIT_BATCH:
                return
            after = batch[-1][0]

    def newest_audit_seq(self) -> int:
        return self._rows("SELECT COALESCE(MAX(seq), 0) FROM audit")[0][0]

    def heads(self) -> Heads:
        """The database's heads; a table it lacks (an empty database) counts as 0."""
        with self._read() as db:
            tables = {r[0] for r in db.execute("SELECT tablename FROM pg_tables WHERE schemaname = current_schema()")}

            def top(table: str, column: str) -> int:
                if table not in tables:
                    return 0
                return db.execute(f"SELECT COALESCE(MAX({column}), 0) FROM {table}").fetchone()[0]

            crl = dict(db.execute(CRL_NUMBERS_QUERY).fetchall()) if "meta" in tables else {}
            return Heads(top("changes", "position"), top("revocations", "seq"), top("audit", "seq"), crl)


class PostgresReader(_AuditReads):
    """Read-only audit reads (for `tessera audit verify --db postgresql://...`): creates and changes nothing."""

    def __init__(self, dsn: str):
        self.dsn, self._where = dsn, describe(dsn)
        _connect(dsn, self._where).close()  # unreachable or refused: said now, not at the first read

    @contextlib.contextmanager
    def _read(self) -> Iterator[psycopg.Connection]:
        db = _connect(self.dsn, self._where)
        try:
            db.execute("SET default_transaction_read_only = on")
            yield db
        except psycopg.OperationalError as e:
            raise Unavailable(f"reading the PostgreSQL database {self._where} failed: {_first_line(e)}") from None
        except psycopg.Error as e:  # no audit table, no permission, ...
            raise FailedPrecondition(f"not a readable issuer database ({self._where}): {_first_line(e)}") from None
        finally:
            db.close()

    def close(self) -> None:
        pass  # each read opens and closes its own connection


@dataclasses.dataclass(frozen=True)
class PostgresOpener:
    """What a signing worker is handed to open its own store on the issuer's database (picklable)."""

    dsn: str
    pool_size: int = DEFAULT_POOL_SIZE

    def open(self, relay: AuditRelay | None = None) -> "PostgresDatastore":
        return PostgresDatastore(self.dsn, relay=relay, pool_size=self.pool_size)


class _Tx:
    """This thread's open write transaction on one connection, and what it appended."""

    __slots__ = ("db", "depth", "locked", "records", "audit_head", "next_position", "positions")

    def __init__(self, db: psycopg.Connection, locked: bool):
        self.db, self.depth, self.locked = db, 1, locked
        self.records: list[AuditRecord] = []
        self.audit_head: tuple[int, str] | None = None  # read with the write lock
        self.next_position: int | None = None
        self.positions: list[int] = []  # the feed positions this transaction appended


def _configure(db: psycopg.Connection) -> None:
    """Each new pooled connection: durable commits whatever the server's default, bounded statements."""
    db.execute(f"SET synchronous_commit = on; SET statement_timeout = '{STATEMENT_TIMEOUT}';"
               f" SET idle_in_transaction_session_timeout = '{IDLE_IN_TRANSACTION_TIMEOUT}'")


class PostgresDatastore(_AuditReads):
    def __init__(self, dsn: str, relay: AuditRelay | None = None, pool_size: int = DEFAULT_POOL_SIZE):
        """`relay` is given every audit record this store commits (default: a relay of its own, with no
        subscribers); in the issuer it also gets the signing workers' records, and reads gaps back from here."""
        self.dsn, self._where, self.pool_size = dsn, describe(dsn), pool_size
        with _connect(dsn, self._where) as db:
            try:
                _migrate(db, self._where)
            except psycopg.OperationalError as e:
                raise Unavailable(f"migrating the PostgreSQL database {self._where} failed: {_first_line(e)}") from None
        # When each pooled connection last answered (the pool's check skips the probe for a recent one).
        self._answered: weakref.WeakKeyDictionary[psycopg.Connection, float] = weakref.WeakKeyDictionary()
        self._pool = ConnectionPool(
            dsn, min_size=1, max_size=pool_size, open=False, timeout=POOL_TIMEOUT, name="tessera-datastore",
            kwargs={"autocommit": True, "connect_timeout": CONNECT_TIMEOUT, "application_name": "tessera-issuer"},
            configure=_configure, check=self._check, reconnect_timeout=RECONNECT_TIMEOUT)
        try:
            self._pool.open(wait=True, timeout=CONNECT_TIMEOUT + POOL_TIMEOUT)
        except PoolTimeout:
            self._pool.close()
            raise Unavailable(f"cannot connect to the PostgreSQL database {self._where}") from None
        self._local = threading.local()  # .tx: this thread's open transaction
        self.own_changes = OwnChanges()  # feed positions committed through this object (rows.OwnChanges)
        self._group = GroupCommit(self._commit_issued)
        self._closed = False
        self.relay = relay if relay is not None else AuditRelay()
        # Looked up at each read-back, not bound now: the relay follows this store as it is when a gap lasts.
        self.relay.attach(self.newest_audit_seq(), lambda after, n: self.audit_records(after, n))

    # -- connections and transactions ---------------------------------------------------------------

    def _unavailable(self, e: psycopg.Error) -> Unavailable:
        _db_log.log(f"pg:{self._where}", "the database cannot be used: calls fail until it is back",
                    database=self._where, error=_first_line(e))
        return Unavailable(f"the issuer cannot use its database ({self._where}): {_first_line(e)}; try again later")

    def _check(self, db: psycopg.Connection) -> None:
        """The pool's check before it lends `db`: a restarted server leaves dead connections in the pool, and
        the probe finds them. It is a round trip, so a connection that answered within PROBE_AFTER is lent
        as it is: a busy issuer reuses each many times a second. (One that died within that second fails its
        call with UNAVAILABLE, and the pool drops it.)"""
        if time.monotonic() - self._answered.get(db, -PROBE_AFTER) >= PROBE_AFTER:
            ConnectionPool.check_connection(db)

    def _getconn(self) -> psycopg.Connection:
        try:
            return self._pool.getconn()
        except PoolTimeout:
            _db_log.log(f"pg:{self._where}", "no database connection: calls fail until it is back",
                        database=self._where)
            raise Unavailable(f"the issuer cannot reach its database ({self._where}) within {POOL_TIMEOUT:g}s;"
                              " try again later") from None
        except PoolClosed:
            raise RuntimeError("datastore is closed") from None

    @contextlib.contextmanager
    def _read(self) -> Iterator[psycopg.Connection]:
        """This thread's transaction's connection (its own writes visible), or a pooled one in autocommit."""
        tx = getattr(self._local, "tx", None)
        if tx is not None:
            yield tx.db
            return
        db = self._getconn()
        try:
            yield db
            self._answered[db] = time.monotonic()
        except psycopg.OperationalError as e:
            raise self._unavailable(e) from None
        finally:
            self._pool.putconn(db)

    @contextlib.contextmanager
    def transaction(self) -> Iterator[None]:
        """One durable commit for every store call made inside (by this thread); nested uses join the outer one.
        An exception inside rolls all of it back."""
        with self._tx():
            yield

    @contextlib.contextmanager
    def _tx(self, lock: bool = True) -> Iterator[psycopg.Connection]:
        """A write transaction; `lock`: take the write lock (every write that appends to the audit chain, the
        change feed or the revocation log; see the module's docstring)."""
        tx: _Tx | None = getattr(self._local, "tx", None)
        if tx is not None:
            if lock and not tx.locked:
                self._lock(tx)
            tx.depth += 1
            try:
                yield tx.db
            finally:
                tx.depth -= 1
            return
        if self._closed:
            raise RuntimeError("datastore is closed")
        db = self._getconn()
        tx = _Tx(db, locked=False)
        self._local.tx = tx
        try:
            try:
                if lock:
                    self._lock(tx, begin=True)
                else:
                    db.execute("BEGIN")
                yield db
                self.own_changes.note(tx.positions)
                db.execute("COMMIT")  # returns once durable (synchronous_commit=on); fails: not acknowledged
                self._answered[db] = time.monotonic()
            except BaseException:
                self.own_changes.drop(tx.positions)
                with contextlib.suppress(psycopg.Error):
                    db.execute("ROLLBACK")
                raise
        except psycopg.OperationalError as e:
            raise self._unavailable(e) from None
        finally:
            self._local.tx = None
            self._pool.putconn(db)  # a broken connection is discarded by the pool
        self.relay.publish(tx.records)

    def _lock(self, tx: _Tx, begin: bool = False) -> None:
        """The write lock, or Unavailable once another writer held it for WRITE_LOCK_TIMEOUT; then the audit
        chain's head, read under it. `begin`: open the transaction in the same round trip (each one costs a
        busy issuer several hundred microseconds; simple-query statements run in order, the read after the lock)."""
        try:
            cur = tx.db.execute(f"{'BEGIN; ' if begin else ''}SET LOCAL lock_timeout = {int(WRITE_LOCK_TIMEOUT * 1000)};"
                                f" SELECT pg_advisory_xact_lock({_WRITE_LOCK});"
                                " SELECT seq, hash FROM audit ORDER BY seq DESC LIMIT 1")
            while cur.nextset():  # to the last statement's result
                pass
            row = cur.fetchone()
        except pgerrors.LockNotAvailable:
            raise Unavailable(f"the database {self._where} stayed locked by another writer for "
                              f"{WRITE_LOCK_TIMEOUT:g}s") from None
        tx.locked = True
        tx.audit_head = (row[0], row[1]) if row else (0, GENESIS_HASH)

    def _audit(self, db: psycopg.Connection, event: AuditEvent | None) -> None:
        if event is not None:
            self._audit_many(db, [event])

    def _audit_many(self, db: psycopg.Connection, events: Sequence[AuditEvent]) -> None:
        """Chain and insert audit records after the head this transaction read under the write lock."""
        if not events:
            return
        tx: _Tx = self._local.tx
        assert tx.locked and tx.audit_head is not None, "an audit record is appended only under the write lock"
        records = chain(events, *tx.audit_head)
        _insert_rows(db, "audit", AUDIT_COLUMNS, [audit_row(r) for r in records])
        tx.records.extend(records)
        tx.audit_head = (records[-1].seq, records[-1].hash)

    def _change(self, db: psycopg.Connection, kind: str, op: str, key: str, payload: dict[str, Any] | str) -> None:
        """Append to the change feed at the next position, in the caller's transaction (under the write lock)."""
        tx: _Tx = self._local.tx
        assert tx.locked, "a change is appended only under the write lock"
        if tx.next_position is None:
            tx.next_position = db.execute("SELECT COALESCE(MAX(position), 0) + 1 FROM changes").fetchone()[0]
            # Delivered at COMMIT (and only then) to every issuer LISTENing: they read the feed at once.
            db.execute("SELECT pg_notify(%s, '')", (CHANGES_CHANNEL,))
        db.execute("INSERT INTO changes (position, ts, kind, op, key, payload) VALUES (%s,%s,%s,%s,%s,%s)",
                   (tx.next_position, round(time.time(), 6), kind, op, key,
                    payload if isinstance(payload, str) else dumps(payload)))
        tx.positions.append(tx.next_position)
        tx.next_position += 1

    def append_audit(self, events: Iterable[AuditEvent]) -> None:
        with self._tx() as db:
            self._audit_many(db, list(events))

    # -- entries -----------------------------------------------------------------------------------------

    def create_entry(self, entry: Entry, audit: AuditEvent) -> None:
        with self._tx() as db:
            cur = db.execute(f"INSERT INTO entries VALUES ({', '.join(['%s'] * 15)}) ON CONFLICT (id) DO NOTHING",
                             entry_row(entry))
            if not cur.rowcount:
                raise AlreadyExists(f"entry {entry.id} already exists")
            self._change(db, "entry", "create", entry.id, change_payload(entry))
            self._audit(db, audit)

    def update_entry(self, entry: Entry, audit: AuditEvent) -> None:
        with self._tx() as db:
            cur = db.execute(
                "UPDATE entries SET spiffe_id=%s, parent_id=%s, selectors=%s, owner=%s, purpose=%s, tier=%s,"
                " scopes=%s, x509_ttl=%s, expires_at=%s, state=%s, updated_at=%s, revision=%s WHERE id=%s",
                (entry.spiffe_id, entry.parent_id, dumps(list(entry.selectors)), entry.owner,
                 entry.purpose, entry.tier, dumps(list(entry.scopes)), entry.x509_ttl, entry.expires_at,
                 entry.state, entry.updated_at, entry.revision, entry.id))
            if cur.rowcount == 0:
                raise NotFound(f"no entry with id {entry.id}")
            self._change(db, "entry", "update", entry.id, change_payload(entry))
            self._audit(db, audit)

    def delete_entry(self, entry_id: str, audit: AuditEvent) -> None:
        with self._tx() as db:
            with db.cursor(row_factory=dict_row) as cur:
                row = cur.execute("DELETE FROM entries WHERE id=%s RETURNING *", (entry_id,)).fetchone()
            if row is None:
                raise NotFound(f"no entry with id {entry_id}")
            self._change(db, "entry", "delete", entry_id, change_payload(entry_from(row)))
            self._audit(db, audit)

    def list_entries(self, parent_id: str | None = None) -> list[Entry]:
        if parent_id is None:
            rows = self._dicts("SELECT * FROM entries ORDER BY created_at, id")
        else:
            rows = self._dicts("SELECT * FROM entries WHERE parent_id=%s ORDER BY created_at, id", (parent_id,))
        return [entry_from(r) for r in rows]

    # -- join tokens and sidecars -------------------------------------------------------------------------

    def create_join_token(self, token: JoinToken, audit: AuditEvent) -> None:
        with self._tx() as db:
            db.execute("INSERT INTO join_tokens VALUES (%s,%s,%s,%s,%s,NULL)",
                       (token.token_hash, token.sidecar_name, token.expires_at, token.created_by, token.created_at))
            self._audit(db, audit)

    def consume_join_token(self, token_hash: str, now: int) -> JoinToken | None:
        """The token as it was before this call (None if unknown), marked used at `now` if it was not used.

        One statement marks it, so of two callers racing (in any processes) exactly one finds it unused: the
        other's UPDATE waits for the first's row lock, then finds used_at set and reads the token as used."""
        with self._tx(lock=False) as db:
            row = db.execute("UPDATE join_tokens SET used_at=%s WHERE token_hash=%s AND used_at IS NULL"
                             " RETURNING token_hash, sidecar_name, expires_at, created_by, created_at",
                             (now, token_hash)).fetchone()
            if row is not None:
                return JoinToken(*row, used_at=None)
            row = db.execute("SELECT token_hash, sidecar_name, expires_at, created_by, created_at, used_at"
                             " FROM join_tokens WHERE token_hash=%s", (token_hash,)).fetchone()
            return JoinToken(*row) if row else None

    def upsert_sidecar(self, sidecar: Sidecar, audit: AuditEvent | None) -> None:
        with self._tx() as db:
            before = db.execute("SELECT state FROM sidecars WHERE id=%s", (sidecar.id,)).fetchone()
            was_banned, banned = before is not None and before[0] == "banned", sidecar.state == "banned"
            op = "ban" if banned and not was_banned else "unban" if was_banned and not banned else "upsert"
            db.execute(
                "INSERT INTO sidecars VALUES (%s,%s,%s,%s,%s,%s,%s) ON CONFLICT (id) DO UPDATE SET"
                " state=excluded.state, attested_at=excluded.attested_at, last_seen=excluded.last_seen,"
                " svid_serial=excluded.svid_serial, svid_expires_at=excluded.svid_expires_at",
                (sidecar.id, sidecar.name, sidecar.state, sidecar.attested_at, sidecar.last_seen,
                 sidecar.svid_serial, sidecar.svid_expires_at))
            self._change(db, "sidecar", op, sidecar.id, change_payload(sidecar))
            self._audit(db, audit)

    def list_sidecars(self) -> list[Sidecar]:
        return [sidecar_from(r) for r in self._dicts("SELECT * FROM sidecars ORDER BY id")]

    def touch_sidecar(self, sidecar_id: str, now: int) -> None:
        with self._tx(lock=False) as db:
            db.execute("UPDATE sidecars SET last_seen=%s WHERE id=%s", (now, sidecar_id))

    # -- issued serials -----------------------------------------------------------------------------------

    def record_issued(self, serials: Sequence[IssuedSerial], audits: Sequence[AuditEvent] = ()) -> None:
        """Durably record issued serials before their certificates leave the issuer."""
        mine = Pending(serials, audits)
        tx = getattr(self._local, "tx", None)
        if tx is not None:  # inside this thread's own transaction: its commit is the one that counts
            if not tx.locked:
                self._lock(tx)
            self._insert_issued(tx.db, [mine])
            return
        self._group.submit(mine)

    def record_task_issued(self, serial: IssuedSerial, audit: AuditEvent) -> None:
        with self._tx() as db:
            try:
                # The check and the writes in one round trip (one row each: INSERTs); the writes roll back if the
                # check finds a live credential.
                with db.pipeline():
                    live = db.execute(_LIVE_TASK, (serial.entry_id, serial.task_id, serial.issued_at))
                    self._insert_issued(db, [Pending([serial], [audit])])
            except pgerrors.UniqueViolation:  # raised as the pipeline syncs, not in _insert_issued
                raise AlreadyExists(DUPLICATE_SERIAL) from None
            if live.fetchone():
                raise AlreadyExists(live_task_message(serial.task_id))

    def _commit_issued(self, group: list[Pending]) -> None:
        with self._tx() as db:
            self._insert_issued(db, group)

    def _insert_issued(self, db: psycopg.Connection, group: list[Pending]) -> None:
        rows = [issued_row(s) for p in group for s in p.serials]
        try:
            _insert_rows(db, "issued", _ISSUED_COLUMNS, rows)
        except pgerrors.UniqueViolation:  # the transaction is aborted: the whole group rolls back
            raise AlreadyExists(DUPLICATE_SERIAL) from None
        self._audit_many(db, [a for p in group for a in p.audits])

    def get_issued(self, serial: str) -> IssuedSerial | None:
        rows = self._dicts("SELECT * FROM issued WHERE serial=%s", (serial,))
        return issued_from(rows[0]) if rows else None

    def revoke_serials(self, serials: Sequence[str], reason: str, now: int,
                       audit: AuditEvent | None) -> list[str]:
        """Mark serials revoked, durably, with the audit record; returns those not revoked before (in the order given)."""
        with self._tx() as db:
            hit = {r[0] for r in db.execute(
                "UPDATE issued SET revoked_at=%s, revocation_reason=%s WHERE serial = ANY(%s) AND revoked_at IS NULL"
                " RETURNING serial", (now, reason, list(serials))).fetchall()}
            self._audit(db, audit)
        return list(dict.fromkeys(s for s in serials if s in hit))

    def find_issued(self, *, entry_id: str | None = None, task_id: str | None = None,
                    spiffe_id: str | None = None, sidecar_id: str | None = None,
                    unexpired_at: int | None = None, revoked: bool | None = None,
                    serials: Sequence[str] | None = None) -> list[IssuedSerial]:
        """Issued serials matching every given filter (`serials`: any of these)."""
        clauses, args = [], []
        if serials is not None:
            clauses.append("serial = ANY(%s)")
            args.append(list(serials))
        for col, val in (("entry_id", entry_id), ("task_id", task_id), ("spiffe_id", spiffe_id),
                         ("sidecar_id", sidecar_id)):
            if val is not None:
                clauses.append(f"{col}=%s")
                args.append(val)
        if unexpired_at is not None:
            clauses.append("not_after>%s")
            args.append(unexpired_at)
        if revoked is not None:
            clauses.append("revoked_at IS NOT NULL" if revoked else "revoked_at IS NULL")
        q = ("SELECT * FROM issued" + (" WHERE " + " AND ".join(clauses) if clauses else "")
             + " ORDER BY issued_at, serial")
        return [issued_from(r) for r in self._dicts(q, args)]

    def last_issued_by_entry(self) -> dict[str, int]:
        return dict(self._rows("SELECT entry_id, MAX(issued_at) FROM issued WHERE entry_id IS NOT NULL"
                               " GROUP BY entry_id"))

    # -- revocation log and CRL numbers -------------------------------------------------------------------

    def record_revocation(self, rec: Revocation) -> int:
        """Append one revocation to the log (join the caller's transaction); returns its seq, the next after the
        last committed one (under the write lock: seqs have no gap and follow commit order, whichever issuer)."""
        with self._tx() as db:
            seq = db.execute("SELECT COALESCE(MAX(seq), 0) + 1 FROM revocations").fetchone()[0]
            db.execute("INSERT INTO revocations (seq, ts, kind, target, reason, reason_code, serials, entry_ids)"
                       " VALUES (%s,%s,%s,%s,%s,%s,%s,%s)",
                       (seq, rec.ts, rec.kind, rec.target, rec.reason, rec.reason_code, dumps(list(rec.serials)),
                        dumps(list(rec.entry_ids))))
            self._change(db, "revocation", "create", str(seq), change_payload(dataclasses.replace(rec, seq=seq)))
            return seq

    def revocations(self, kinds: Sequence[str] | None = None, since_seq: int = 0) -> list[Revocation]:
        q, args = "SELECT * FROM revocations WHERE seq > %s", [since_seq]
        if kinds:
            q += " AND kind = ANY(%s)"
            args.append(list(kinds))
        return [Revocation(r["seq"], r["ts"], r["kind"], r["target"], r["reason"], r["reason_code"],
                           tuple(json.loads(r["serials"])), tuple(json.loads(r["entry_ids"])))
                for r in self._dicts(q + " ORDER BY seq", args)]

    def last_revocation_seq(self) -> int:
        return self._rows("SELECT COALESCE(MAX(seq), 0) FROM revocations")[0][0]

    def next_crl_number(self, authority: str) -> int:
        """Take `authority`'s next CRL number, durably: a number is never handed out twice, even across crashes or
        issuers (the row lock of the upsert orders them)."""
        with self._tx(lock=False) as db:
            return db.execute("INSERT INTO meta VALUES (%s, 1) ON CONFLICT (key) DO UPDATE SET value = meta.value + 1"
                              " RETURNING value", (f"crl_number:{authority}",)).fetchone()[0]

    def raise_crl_numbers(self, floors: Mapping[str, int], audit: AuditEvent) -> None:
        """Each authority's CRL number at least its floor (never lowered), with `audit`, in one transaction."""
        with self._tx() as db:
            with db.cursor() as cur:
                cur.executemany("INSERT INTO meta VALUES (%s, %s) ON CONFLICT (key) DO UPDATE"
                                " SET value = GREATEST(meta.value, EXCLUDED.value)",
                                [(f"crl_number:{a}", n) for a, n in sorted(floors.items())])
            self._audit(db, audit)

    # -- authorities ---------------------------------------------------------------------------------------

    def put_authority(self, authority: Authority, audit: AuditEvent | None, *,
                      expect_state: str | None = None) -> bool:
        """Add an authority (expect_state None; AlreadyExists if its id is taken) or replace one whose stored state
        is still `expect_state` (False, nothing written, when it is not): two issuers cannot both move it."""
        with self._tx() as db:
            if expect_state is None:
                if not db.execute(_INSERT_AUTHORITY, authority_row(authority)).rowcount:
                    raise AlreadyExists(f"authority {authority.id} already exists")
                op = "add"
            else:
                if not db.execute(_UPDATE_AUTHORITY, (*authority_row(authority), authority.id, expect_state)).rowcount:
                    return False
                op = "update"
            self._change(db, "authority", op, authority.id,
                         {"id": authority.id, "kind": authority.kind, "state": authority.state})
            self._audit(db, audit)
            return True

    def list_authorities(self) -> list[Authority]:
        return [authority_from(r) for r in self._dicts("SELECT * FROM authorities ORDER BY created_at, id")]

    def adopt_unattributed(self, authority: str) -> int:
        """Name `authority` as the signer of the serials, and the owner of the CRL numbers, written before
        authorities were tracked (the one CA of then); the number of serials it took."""
        with self._tx() as db:
            db.execute("INSERT INTO meta SELECT %s, value FROM meta WHERE key='crl_number' ON CONFLICT (key) DO NOTHING",
                       (f"crl_number:{authority}",))
            db.execute("DELETE FROM meta WHERE key='crl_number'")
            return db.execute("UPDATE issued SET authority=%s WHERE authority IS NULL", (authority,)).rowcount

    def count_outstanding(self, authority: str, now: int) -> int:
        """Unexpired, unrevoked certificates `authority` signed."""
        return self._rows("SELECT COUNT(*) FROM issued WHERE authority=%s AND not_after > %s AND revoked_at IS NULL",
                          (authority, now))[0][0]

    # -- approvals -----------------------------------------------------------------------------------------

    def create_approval(self, req: ApprovalRequest, caps: Sequence[ApprovalCap],
                        audit: AuditEvent) -> ApprovalCap | None:
        with self._tx() as db:  # under the write lock: no other issuer counts or inserts until this one commits
            for cap in caps:
                where, args = approval_cap_where(cap, req.created_at, "%s")
                if db.execute(f"SELECT COUNT(*) FROM approvals WHERE {where}", args).fetchone()[0] >= cap.limit:
                    return cap
            if not db.execute(_INSERT_APPROVAL, approval_row(req)).rowcount:
                raise AlreadyExists(f"approval {req.id} already exists")
            self._change(db, "approval", "create", req.id, change_payload(req))
            self._audit(db, audit)
            return None

    def finish_approvals(self, finals: Sequence[ApprovalRequest], audits: Sequence[AuditEvent],
                         now: int) -> list[ApprovalRequest]:
        """(See the protocol.) The UPDATE's row lock orders two stores; the write lock, taken first, already does."""
        won = []
        with self._tx() as db, db.cursor(row_factory=dict_row) as cur:
            for final, audit in zip(finals, audits, strict=True):
                row = cur.execute(f"UPDATE approvals SET state=%s, decided_by=%s, decision_reason=%s WHERE id=%s"
                                  f" AND state='pending' AND {approval_still_open(final.state, now)} RETURNING *",
                                  (final.state, final.decided_by, final.decision_reason, final.id)).fetchone()
                if row is None:
                    continue
                stored = approval_from(row)
                self._change(db, "approval", APPROVAL_FINAL_OPS[final.state], final.id, change_payload(stored))
                self._audit(db, audit)
                won.append(stored)
        return won

    def get_approval(self, approval_id: str) -> ApprovalRequest | None:
        rows = self._dicts("SELECT * FROM approvals WHERE id=%s", (approval_id,))
        return approval_from(rows[0]) if rows else None

    def list_approvals(self, now: int, expired: bool = False) -> list[ApprovalRequest]:
        return [approval_from(r) for r in self._dicts(
            f"SELECT * FROM approvals WHERE state='pending' AND expires_at {'<=' if expired else '>'} %s"
            " ORDER BY created_at, id", (now,))]

    # -- the change feed -----------------------------------------------------------------------------------

    def changes_after(self, position: int, limit: int = 1000) -> list[Change]:
        """Committed changes after `position`, in position order, at most `limit`."""
        rows = self._rows("SELECT position, ts, kind, op, key, payload FROM changes WHERE position > %s"
                          " ORDER BY position LIMIT %s", (position, limit))
        return [Change(p, ts, kind, op, key, json.loads(payload)) for p, ts, kind, op, key, payload in rows]

    def last_change_position(self) -> int:
        return self._rows("SELECT COALESCE(MAX(position), 0) FROM changes")[0][0]

    poll_interval = CHANGE_POLL

    def watch_changes(self, wake: Callable[[], None], stop: threading.Event) -> None:
        """Call `wake()` whenever another transaction committed a change (LISTEN on a connection of its own, outside
        the pool), and once after each (re)connect, until `stop` is set. Blocks: run it on a thread of its own. A
        NOTIFY sent while this was disconnected is lost; the wake after the reconnect, and the follower's
        poll_interval, cover it."""
        while not stop.is_set():
            try:
                with _connect(self.dsn, self._where) as db:
                    db.execute(f"LISTEN {CHANGES_CHANNEL}")
                    wake()
                    while not stop.is_set():
                        for _ in db.notifies(timeout=0.5, stop_after=1):
                            wake()
            except (psycopg.Error, Unavailable) as e:
                _db_log.log(f"pg-listen:{self._where}", "listening for changes failed; reconnecting",
                            database=self._where, error=_first_line(e) if isinstance(e, psycopg.Error) else str(e))
                stop.wait(1.0)

    def opener(self) -> PostgresOpener:
        """How another process opens a store on this same database (the signing workers)."""
        return PostgresOpener(self.dsn, self.pool_size)

    def close(self) -> None:
        self._group.close()  # callers already waiting get their commit
        self.relay.close()  # nothing more relayed; what still waits reaches the audit file at the next start
        self._closed = True  # no new transaction
        self._pool.close()  # connections in use (a transaction under way) are closed when it gives them back
