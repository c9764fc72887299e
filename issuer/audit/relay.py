"""The audit relay: committed audit records, published once each, to every subscriber, in seq order.

A store publishes what it commits; in the issuer, the signing workers' records are
published too, by the event loop that receives their answers (SigningPool's
`committed`). Subscribers (the JSON-lines file, metrics, the evidence stream) are
given every record once and in seq order: records published out of order (each
thread publishes its own, the event loop each signing worker's) wait for the gap
before them to fill; a gap older than `grace` seconds (a signing worker that died
between its commit and its answer) is read back from the store it is attached to
(every record before a committed one is committed too). The read-back runs on the
gap timer's thread without the relay lock, so a publisher (the event loop) never
waits for the database.

A relay with `in_order=False` passes records straight through (a signing worker's,
which relays only what its own store committed, to the issuer).
"""

from __future__ import annotations

import threading
import time
from typing import Callable, Iterable

from issuer.core.models import AuditRecord
from tessera import logs

log = logs.get("issuer.audit.relay")
# Retried every few seconds while the database is down: one line a minute, repeats counted.
_read_back_log = logs.Throttled(log, window=60, level="error")

GAP_GRACE = 1.0  # seconds a gap in the published records may last before it is read back from the store

Listener = Callable[[list[AuditRecord]], None]
ReadBack = Callable[[int, int], list[AuditRecord]]  # (after seq, at most) -> committed records in seq order


class AuditRelay:
    def __init__(self, in_order: bool = True, grace: float | None = None):
        self._in_order = in_order
        self._grace = grace  # None: GAP_GRACE, looked up when used
        self._listeners: list[Listener] = []
        self._lock = threading.Lock()
        self._relayed = 0  # the last seq given to the subscribers
        self._read_back: ReadBack | None = None
        self._waiting: dict[int, AuditRecord] = {}  # published, waiting for an earlier record
        self._gap_since: float | None = None
        self._gap_timer: threading.Timer | None = None
        self._gap_timer_armed = False
        self._closed = False

    def subscribe(self, listener: Listener) -> None:
        """`listener` gets lists of committed records; one that raises does not stop the others."""
        with self._lock:
            self._listeners.append(listener)

    def attach(self, head_seq: int, read_back: ReadBack) -> None:
        """Called by the store this relay belongs to, when it opens: records up to `head_seq` were committed
        before (the audit file catches up with those itself); `read_back` fills a gap that lasts."""
        with self._lock:
            self._relayed, self._read_back = head_seq, read_back

    def publish(self, records: Iterable[AuditRecord]) -> None:
        """Give committed records to the subscribers: with `in_order`, each once and in seq order."""
        records = list(records)
        with self._lock:
            if self._closed:
                return
            if self._in_order:
                due = self._merge(records)
                self._watch_gap(new=bool(due))
                records = due
            self._tell(records)

    def close(self) -> None:
        """Nothing more is relayed; what still waits reaches the audit file at the next start (its catch-up)."""
        with self._lock:
            self._closed = True
            if self._gap_timer is not None:
                self._gap_timer.cancel()

    def _grace_seconds(self) -> float:
        return GAP_GRACE if self._grace is None else self._grace

    # -- under the lock ----------------------------------------------------------------

    def _tell(self, records: list[AuditRecord]) -> None:
        if not records:
            return
        for listener in self._listeners:
            try:
                listener(records)
            except Exception:  # noqa: BLE001 - committed is committed: a listener must not fail the write
                log.exception("an audit listener failed", listener=repr(listener))

    def _merge(self, records: list[AuditRecord]) -> list[AuditRecord]:
        """Take in records not relayed yet; those now due, in seq order."""
        for r in records:
            if r.seq > self._relayed:
                self._waiting[r.seq] = r
        return self._contiguous()

    def _contiguous(self) -> list[AuditRecord]:
        run = []
        while (r := self._waiting.pop(self._relayed + 1, None)) is not None:
            run.append(r)
            self._relayed = r.seq
        return run

    def _watch_gap(self, new: bool) -> None:
        """While records wait, time the gap (from now if `new`) and keep the timer armed."""
        if not self._waiting:
            self._gap_since = None
            return
        if new or self._gap_since is None:
            self._gap_since = time.monotonic()
        self._arm_gap_timer()

    def _arm_gap_timer(self) -> None:
        """Make sure a gap is looked at again even if nothing else is published."""
        if not self._gap_timer_armed and not self._closed:
            self._gap_timer_armed = True
            self._gap_timer = threading.Timer(self._grace_seconds() * 1.1, self._gap_timer_fired)
            self._gap_timer.daemon = True
            self._gap_timer.start()

    # -- the gap timer's thread ----------------------------------------------------------

    def _gap_timer_fired(self) -> None:
        # The timer counts as armed until this returns: a publish meanwhile starts no second one.
        with self._lock:
            if (self._closed or not self._waiting or self._read_back is None
                    or time.monotonic() - self._gap_since < self._grace_seconds()):
                self._gap_timer_armed = False
                self._watch_gap(new=False)
                return
            after, first, read_back = self._relayed, min(self._waiting), self._read_back
        try:  # without the lock: records published meanwhile do not wait for this read
            missing = [r for r in read_back(after, first - after - 1) if r.seq < first]
        except Exception as e:  # noqa: BLE001 - whatever the engine raises: nothing moved on, try again
            with self._lock:
                self._gap_timer_armed = False
                if not self._closed:  # (closing the store under the read is not a fault)
                    _read_back_log.log("read-back", "could not read back audit records missing from the relay",
                                       error=str(e))
                    self._arm_gap_timer()
            return
        with self._lock:
            self._gap_timer_armed = False
            if self._closed:
                return
            due = self._merge(missing)
            # Seqs before `first` that the store does not have either cannot come: pass each such hole.
            while self._waiting and (nxt := min(self._waiting)) <= first and nxt > self._relayed + 1:
                log.error("audit records missing from the database were skipped by the relay",
                          after=self._relayed, before=nxt)
                self._relayed = nxt - 1
                due += self._contiguous()
            self._watch_gap(new=True)
            self._tell(due)
