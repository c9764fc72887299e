"""The audit trail outside the database: chain verification, record filters, and the JSON-lines file.

The database is the source of truth (each record commits with the change it
describes). The JSON-lines file is a second, append-only copy apart from the
operational logs, for shipping to a SIEM: a background thread appends and
fsyncs it, and catches up from the database at start and after a failed write,
so a crash between the database commit and the file write, or a full disk,
loses nothing, duplicates nothing and leaves no partial line.
"""

from __future__ import annotations

import contextlib
import json
import os
import queue
import re
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Iterator

from issuer.core.models import GENESIS_HASH, AuditRecord, audit_hash, audit_record_dict, audit_record_from_dict
from tessera import logs, safefs

log = logs.get("issuer.audit.records")


# -- verification (pure) ---------------------------------------------------------------


@dataclass(frozen=True)
class ChainCheck:
    ok: bool
    records: int  # how many records were checked
    last_seq: int
    last_hash: str
    bad_seq: int = 0  # the first record that breaks the chain (0 when ok)
    problem: str = ""
    first_seq: int = 0  # where the checked records start (1 from genesis)


def verify_chain(records: Iterable[AuditRecord], from_genesis: bool = True) -> ChainCheck:
    """Recompute the chain from the genesis hash; stop at the first record that breaks it.

    A record breaks the chain when its content no longer matches its hash (edited), when it
    does not point at its predecessor's hash (reordered or a predecessor was replaced), or
    when its seq is not one more than its predecessor's (deleted or inserted). With
    `from_genesis` False (an audit file whose start was rotated away), a first record after
    record 1 is taken with its seq and predecessor hash as they are, and the chain is
    checked from there; record 1 always points at the genesis hash.
    """
    prev_seq, prev_hash, n, first = 0, GENESIS_HASH, 0, 0
    for r in records:
        if not n:
            first = r.seq
            if not from_genesis and r.seq > 1:
                prev_seq, prev_hash = r.seq - 1, r.prev_hash
        n += 1
        if r.seq != prev_seq + 1:
            return ChainCheck(False, n, prev_seq, prev_hash, r.seq,
                              f"record {r.seq} follows record {prev_seq}: records are missing or inserted", first)
        if r.prev_hash != prev_hash:
            return ChainCheck(False, n, prev_seq, prev_hash, r.seq,
                              f"record {r.seq} does not point at the hash of record {prev_seq}", first)
        if r.hash != audit_hash(r):
            return ChainCheck(False, n, prev_seq, prev_hash, r.seq,
                              f"record {r.seq} ({r.action}) was altered: its content does not match its hash", first)
        prev_seq, prev_hash = r.seq, r.hash
    return ChainCheck(True, n, prev_seq, prev_hash, first_seq=first)


# -- record shapes ---------------------------------------------------------------------------


def record_line(r: AuditRecord) -> str:
    """The file's line: the record's fields (issuer/core/models.py) as compact JSON."""
    return json.dumps(audit_record_dict(r), sort_keys=True, separators=(",", ":"))


@dataclass(frozen=True)
class AuditFilter:
    """Which records an operator asked for; every given field must match."""

    action: str = ""  # exact, or a prefix ending in "." (e.g. "svid.")
    decision: str = ""
    actor: str = ""  # substring of the actor id
    subject: str = ""  # substring of the subject
    since_ts: float = 0.0

    def matches(self, r: AuditRecord) -> bool:
        if self.action and not (r.action == self.action or
                                (self.action.endswith(".") and r.action.startswith(self.action))):
            return False
        if self.decision and r.decision != self.decision:
            return False
        if self.actor and self.actor not in str(r.actor.get("id", "")):
            return False
        if self.subject and self.subject not in r.subject:
            return False
        return r.ts >= self.since_ts


def read_jsonl(path: str | Path) -> Iterator[AuditRecord]:
    """Records from an audit JSON-lines file; a torn last line (crash mid-write) and blank lines (a file
    emptied with `echo >`) are skipped."""
    with open(path, "rb") as f:
        for raw in f:
            if not raw.endswith(b"\n"):
                return
            if raw.strip():
                yield audit_record_from_dict(json.loads(raw))


_NOISE = (
    (re.compile(r"spiffe://\S+"), "<spiffe-id>"),
    (re.compile(r"'[^']*'|\"[^\"]*\""), "<value>"),
    (re.compile(r"\b[0-9a-f]{8,}\b|\b[0-9a-f]{8}-[0-9a-f-]{27,}\b"), "<id>"),
    (re.compile(r"\b\d+\b"), "<n>"),
)


def denial_reason(record: AuditRecord) -> str:
    """A bounded label for why something was denied.

    The policy rule's name when the decision names one (details["rule"]); otherwise the
    reason text with identifiers, quoted values and numbers replaced, so that label values
    stay few ("entry <value> is not registered to <spiffe-id>").
    """
    rule = record.details.get("rule") if isinstance(record.details, dict) else None
    if rule:
        return str(rule)[:64]
    text = record.reason or "unspecified"
    for pattern, repl in _NOISE:
        text = pattern.sub(repl, text)
    return text[:96]


# -- the JSON-lines file ----------------------------------------------------------------------


_STOP = object()
RETRY_SECONDS = 1.0  # after a failed write, how soon the file tries again from the database
REMIND_SECONDS = 300.0  # while the file lags, its error is logged again this often (and whenever it changes)
CATCH_UP_PAGE = 5000  # records read from the database per step of a catch-up

Reader = Callable[[int, int], list[AuditRecord]]  # (after seq, at most) -> committed records in seq order


class AuditFile:
    """Appends committed audit records, in seq order, to a JSON-lines file (mode 0600).

    The file is a copy of the database's audit table, which `records` reads. At
    start it catches up with what the database committed while no writer ran;
    after that the datastore hands over every record once, in seq order
    (through the AuditRelay), so the file only appends what it has not written yet.

    A write that fails (a full disk) is cut back at once to the last complete line,
    and from then on the file catches up from the database every RETRY_SECONDS
    until it succeeds; what is handed over meanwhile is in the database already. The
    file lags, but holds no partial line, no gap and no duplicate; `behind` says it
    lags, and the error is logged when it starts, when it changes and every
    REMIND_SECONDS. A failure never reaches the committing threads.

    The file may be rotated from outside, by renaming it or by copying and truncating
    it: a running writer goes on in a new file at the path, and a restart goes on from
    the last seq written (kept in `.NAME.seq` beside it), not from the first record.
    """

    def __init__(self, path: str | Path, records: Reader):
        self.path = Path(path)
        self._records = records
        self._lock = threading.Lock()  # one writer at a time: the thread, catch_up() or close()
        self._queue: "queue.SimpleQueue" = queue.SimpleQueue()
        # The last seq written, kept beside the file: after the file was rotated away (renamed, or
        # copied and truncated), a restart goes on from there instead of writing the whole trail again.
        self._seq_path = _position_path(self.path)
        self.behind = False  # a write failed: the file lags the database until a catch-up succeeds
        self._retry_at = 0.0
        self._error = ""  # the failure last logged, and when
        self._logged_at = 0.0
        self._abandon = False  # close() gave up waiting: a catch-up stops at its next page
        self._closed = False
        self._dirty = False  # a write failed and its cut too: what it left is cut before anything else
        self._thread: threading.Thread | None = None
        self._seq_fd = self._open_position()
        self._fd, self._good_size = -1, 0  # the file written to, and where its last complete, fsynced write ended
        self.written_seq = self._saved_seq()
        try:
            self._follow_outside_changes()
        except safefs.UnsafePath:  # a path another user controls: the issuer does not start
            self.close()
            raise
        except Exception as e:  # noqa: BLE001 - as while running: the issuer starts, the file catches up later
            self._failed(e)
        self._save_position(sync=True)  # a new position file holds it before anything can rotate the file

    @staticmethod
    def set_aside(path: str | Path, why: str) -> Path | None:
        """Rename the file at `path` to `NAME.WHY-<UTC time>` beside it, and forget its saved position: the next
        writer starts a new file from the database's first record. The renamed file, or None if there was none.
        For a file that no longer matches the database (restored from an older backup): it is kept, as evidence."""
        path = Path(path)
        safefs.make_dir(path.parent, "audit_file", private=False, create=False)
        if not os.path.lexists(path):
            return None
        target = path.with_name(f"{path.name}.{why}-{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())}")
        os.rename(path, target)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(_position_path(path))
        return target

    def _saved_seq(self) -> int:
        if self._seq_fd < 0:
            return 0
        try:
            return int(os.pread(self._seq_fd, 64, 0) or b"0")
        except (OSError, ValueError) as e:
            log.warning("unreadable audit file position; going by the file alone", path=str(self._seq_path),
                        error=str(e))
            return 0

    def _open_position(self) -> int:
        """The position file's descriptor, -1 if it cannot be kept; UnsafePath (the issuer does not start) if
        it, or the directory it shares with the audit file, is not ours alone to write."""
        try:
            safefs.make_dir(self.path.parent, "audit_file", private=False)
            return _open_0600(self._seq_path, os.O_RDWR)
        except OSError as e:
            log.warning("cannot keep the audit file's position: a restart after a rotation will write the "
                        "whole trail into the new file", path=str(self._seq_path), error=str(e))
            return -1

    def _save_position(self, sync: bool = False) -> None:
        # Not fsynced after each write: after a crash the file's own last line is the newer word, and a
        # rotation comes long after the kernel has written this out.
        if self._seq_fd < 0:
            return
        try:
            os.pwrite(self._seq_fd, b"%020d" % self.written_seq, 0)
            if sync:
                os.fsync(self._seq_fd)
        except OSError as e:
            log.warning("cannot save the audit file's position", path=str(self._seq_path), error=str(e))

    def _repair_and_last_record(self) -> tuple[int, str]:
        """The seq and hash of the file's last record ((0, "") for an empty or blank file), after cutting a
        torn final line left by a crash. A file that does not end in an audit record raises, left as it is;
        one that is a link, not a regular file, or not ours alone raises UnsafePath, untouched."""
        try:
            fd = safefs.open_regular(self.path, os.O_RDWR, what="audit_file")
        except FileNotFoundError:
            safefs.make_dir(self.path.parent, "audit_file", private=False)
            return 0, ""
        with os.fdopen(fd, "r+b") as f:
            size = f.seek(0, os.SEEK_END)
            # Read backwards until the tail holds a whole non-blank line (or the whole file).
            chunk, tail = 65536, b""
            while True:
                start = max(0, size - len(tail) - chunk)
                f.seek(start)
                tail = f.read(size - start)
                end = tail.rfind(b"\n") + 1
                whole = tail[:end] if start == 0 else tail[tail.find(b"\n") + 1:end]
                lines = [line for line in whole.splitlines() if line.strip()]
                if start == 0 or lines:
                    break
            record = json.loads(lines[-1]) if lines else {"seq": 0, "hash": ""}  # raises on a file not ours
            last = (record["seq"], record["hash"])
            torn = tail[end:]
            if torn and not lines and not torn.startswith(b'{"action":'):  # record lines start so (sorted keys)
                raise ValueError("the file does not end in an audit record")
            if torn:  # a torn final line from a crash mid-write
                f.truncate(start + end)
                f.flush()
                os.fsync(f.fileno())
        return last

    def catch_up(self) -> int:
        """Write what the database committed but the file lacks; returns how many records that was.

        Called at start. A failure there is logged and left to the thread's retries, as while
        running: the issuer serves on, and the database holds every record.
        """
        with self._lock:
            return self._attempt(self._catch_up) or 0

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="audit-file", daemon=True)
        self._thread.start()

    def __call__(self, records: list[AuditRecord]) -> None:
        """A datastore audit listener: hand off, never block the committing thread."""
        if records:
            self._queue.put(records)

    def _run(self) -> None:
        while True:
            try:
                wait = max(0.0, self._retry_at - time.monotonic()) if self.behind else None
                batch = [self._queue.get(timeout=wait)]
            except queue.Empty:
                batch = []
            while not self._queue.empty():  # one fsync for everything already waiting
                batch.append(self._queue.get())
            stop = _STOP in batch
            with self._lock:
                if not self.behind:
                    self._attempt(lambda: self._write([r for records in batch if records is not _STOP
                                                       for r in records]))
                elif stop or time.monotonic() >= self._retry_at:
                    # The failed records and everything since come from the database.
                    self._attempt(self._catch_up)
                if stop and self.behind:
                    log.error("audit file stops behind the database; the next start catches up",
                              path=str(self.path), written_seq=self.written_seq)
            if stop:
                return

    def _attempt(self, write: Callable[[], int | None]) -> int | None:
        """Under self._lock: run one write or catch-up; on failure the file is behind until a catch-up succeeds."""
        try:
            result = write()
        except Exception as e:  # noqa: BLE001 - a full disk or a busy database must not stop the file for good
            self._failed(e)
            return None
        if self.behind:
            log.warning("audit file caught up after a failed write", path=str(self.path), written_seq=self.written_seq)
            self.behind, self._error = False, ""
        return result

    def _failed(self, e: Exception) -> None:
        now = time.monotonic()
        text = str(e) or repr(e)
        if not self.behind or text != self._error or now - self._logged_at >= REMIND_SECONDS:
            log.error("cannot append to the audit file; retrying from the database", path=str(self.path),
                      error=text, written_seq=self.written_seq)
            self._error, self._logged_at = text, now
        self.behind = True
        self._retry_at = now + RETRY_SECONDS

    def _catch_up(self) -> int:
        if self._dirty:  # a failed write whose cut failed too: cut it before the file may be rotated away
            self._cut()
            self._dirty = False
        self._follow_outside_changes()
        before = self.written_seq
        self._fill_to(None)
        return self.written_seq - before

    def _fill_to(self, seq: int | None) -> None:
        """Append the database's records after written_seq and before `seq` (None: all), a page at a time."""
        while seq is None or self.written_seq + 1 < seq:
            if self._abandon:
                raise RuntimeError("the audit file closed during a catch-up")
            page = [r for r in self._records(self.written_seq, CATCH_UP_PAGE) if seq is None or r.seq < seq]
            if seq is not None and not page:
                raise RuntimeError(f"records {self.written_seq + 1} to {seq - 1} are not in the database")
            self._append(page)
            if seq is None and len(page) < CATCH_UP_PAGE:
                return

    def _cut(self) -> None:
        """Drop what a failed write left after the last complete line. Never extends the file: one
        truncated from outside meanwhile (rotated by copy and truncate) is not padded with NULs; the
        next write sees that change."""
        if self._fd >= 0 and os.fstat(self._fd).st_size > self._good_size:
            os.ftruncate(self._fd, self._good_size)

    def _write(self, records: list[AuditRecord]) -> None:
        """Append what of `records` the file lacks (the file it goes by may change first, see below)."""
        if not records:
            return
        self._follow_outside_changes()
        records = [r for r in records if r.seq > self.written_seq]
        if records and records[0].seq > self.written_seq + 1:
            self._fill_to(records[0].seq)  # never a gap (an older copy was put back): from the database
        self._append(records)

    def _append(self, records: list[AuditRecord]) -> None:
        """Write records that follow written_seq, fsync, and move written_seq; a failure leaves no partial line."""
        if not records:
            return
        data = memoryview(b"".join(record_line(r).encode() + b"\n" for r in records))
        self._dirty = True
        try:
            written = 0
            while written < len(data):
                written += os.write(self._fd, data[written:])
            os.fsync(self._fd)
        except BaseException:
            with contextlib.suppress(OSError):  # else the next catch-up cuts it first
                self._cut()  # no partial line while the disk stays full
                self._dirty = False
            raise
        self._dirty = False
        self._good_size += len(data)
        self.written_seq = records[-1].seq
        self._save_position()

    def _follow_outside_changes(self) -> None:
        """Before a write: if the file at the path is not the one this writer left (renamed or deleted,
        truncated, or replaced, by a rotation or an operator), go on in the file now at the path. An
        empty one continues from `written_seq`; one with records goes by its last line. One that does
        not end in an audit record is not written to: the error says so, and the file stays behind."""
        if self._fd >= 0:
            mine = os.fstat(self._fd)
            try:
                st = os.lstat(self.path)  # a link put at the name is a change (and then refused)
                if (st.st_dev, st.st_ino, st.st_size) == (mine.st_dev, mine.st_ino, self._good_size):
                    return
            except FileNotFoundError:
                pass
        last, last_hash = self._repair_and_last_record()  # raises, changing nothing, if not ours to append to
        self._check_against_database(last or self.written_seq, last_hash)
        fd = _open_0600(self.path, os.O_WRONLY | os.O_APPEND)
        if self._fd >= 0:
            os.close(self._fd)
            log.info("audit file changed from outside (rotated?); going on in the file at its path",
                     path=str(self.path), after_seq=last or self.written_seq)
        self._fd = fd
        self._good_size = os.fstat(fd).st_size
        if last:
            self.written_seq = last

    def _check_against_database(self, seq: int, record_hash: str) -> None:
        """Records the file (or its saved position) says are written must be the database's: else new
        records would be taken for written ones and never reach the file (a database restored from an
        older backup, a file from another issuer). Raises, changing nothing, on a mismatch."""
        if not seq:
            return
        found = self._records(seq - 1, 1)
        if not found or found[0].seq != seq or (record_hash and found[0].hash != record_hash):
            raise ValueError(f"the audit file goes up to record {seq}, which the database does not hold as it is "
                             "(was the database restored, or is the file another issuer's?); move the file away")

    def close(self) -> None:
        if self._thread is not None:
            self._queue.put(_STOP)
            self._thread.join(timeout=10)
            if self._thread.is_alive():
                self._abandon = True
                log.error("audit file writer still busy at close; the next start catches up", path=str(self.path))
        with self._lock:  # never under a write of the thread's
            if self._closed:
                return
            self._closed = True
            self._save_position(sync=True)
            for fd in (self._fd, self._seq_fd):
                if fd >= 0:
                    os.close(fd)
            self._fd = self._seq_fd = -1


def _position_path(path: Path) -> Path:
    return path.with_name(f".{path.name}.seq")


def _open_0600(path: Path, flags: int) -> int:
    """Open or create an audit file (or its position file) 0600: never through a link, never another's file."""
    fd = safefs.open_regular(path, flags | os.O_CREAT, 0o600, what="audit_file")
    try:
        os.fchmod(fd, 0o600)  # also when it existed with a wider mode (say, made by a rotation tool)
    except BaseException:
        os.close(fd)
        raise
    return fd
