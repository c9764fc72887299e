"""Following the change feed: each issuer process can apply every committed change once, in order.

A ChangeFollower reads `changes_after(position)` from any Datastore, hands each
batch to its handler, and only then saves the batch's last position durably
(tessera.safefs.atomic_write: the old or the new position, never a torn one). After
a restart it resumes after the saved position: no change is skipped, and none is
handed over again once its position is saved. A crash between a handler's return
and the save hands that one batch over again; each Change carries its position, so
a handler that keeps its own state can tell a replay (`position <= what it applied`).

With no position file (`position_file=None`) the follower starts at `start` and keeps its position in
memory only: the issuer's own follower (issuer/peers.py) is built so, since its caches are loaded from the
store at start and already hold every change committed before then.

start() reads the feed every `store.poll_interval` seconds, and at once whenever the store's watch_changes
reports a commit (PostgreSQL's LISTEN/NOTIFY; SQLite only polls).
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Callable

from issuer.core.models import Change
from issuer.datastore.interface import Datastore
from tessera import logs, safefs
from tessera.errors import ConfigError

log = logs.get("issuer.datastore.feed")
_fail_log = logs.Throttled(log, window=60, level="error")  # the database down: one line a minute, not one a second

Handler = Callable[[list[Change]], None]


class ChangeFollower:
    def __init__(self, store: Datastore, position_file: str | Path | None, handler: Handler, batch: int = 500,
                 start: int = 0):
        self.store = store
        self.position_file = Path(position_file) if position_file is not None else None
        self.handler = handler
        self.batch = batch
        self.position = self._load() if self.position_file is not None else start
        self.failures = 0  # consecutive failed reads or applies (a metric: a change that keeps failing holds the feed)
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None
        self._watcher: threading.Thread | None = None

    def _load(self) -> int:
        assert self.position_file is not None
        if not self.position_file.exists():
            return 0
        text = safefs.read_regular(self.position_file, "change feed position").decode("ascii", "replace").strip()
        if not text.isdigit():
            raise ConfigError(f"{self.position_file}: a change feed position must be a whole number, got {text!r}")
        return int(text)

    def poll(self) -> int:
        """Apply what was committed since the saved position, a batch at a time; returns how many changes."""
        n = 0
        while True:
            changes = self.store.changes_after(self.position, self.batch)
            if not changes:
                return n
            self.handler(changes)
            self.position = changes[-1].position
            if self.position_file is not None:
                safefs.atomic_write(self.position_file, f"{self.position}\n".encode(), 0o600,
                                    what="change feed position")
            n += len(changes)

    def start(self, interval: float | None = None) -> None:
        """Follow on a thread of its own until stop(): woken by the store's notifications, and every `interval`
        seconds (default: the store's poll_interval) in any case."""
        interval = self.store.poll_interval if interval is None else interval
        self._thread = threading.Thread(target=self._run, args=(interval,), name="change-feed", daemon=True)
        self._thread.start()
        self._watcher = threading.Thread(target=self.store.watch_changes, args=(self._wake.set, self._stop),
                                         name="change-feed-watch", daemon=True)
        self._watcher.start()

    def _run(self, interval: float) -> None:
        while not self._stop.is_set():
            self._wake.clear()  # before reading: a commit notified during the read wakes the next one
            try:
                self.poll()
                self.failures = 0
            except Exception as e:  # noqa: BLE001 - the saved position is unchanged: the next poll retries
                self.failures += 1
                _fail_log.log("poll", "following the change feed failed; retrying", position=self.position,
                              failures=self.failures, error=repr(e))
            self._wake.wait(interval)

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()
        for thread in (self._thread, self._watcher):
            if thread is not None:
                thread.join(timeout=5)
