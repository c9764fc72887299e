"""Following the change feed: each issuer process can apply every committed change once, in order.

A ChangeFollower reads `changes_after(position)` from any Datastore, hands each
batch to its handler, and only then saves the batch's last position durably
(tessera.safefs.atomic_write: the old or the new position, never a torn one). After
a restart it resumes after the saved position: no change is skipped, and none is
handed over again once its position is saved. A crash between a handler's return
and the save hands that one batch over again; each Change carries its position, so
a handler that keeps its own state can tell a replay (`position <= what it applied`).
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

Handler = Callable[[list[Change]], None]


class ChangeFollower:
    def __init__(self, store: Datastore, position_file: str | Path, handler: Handler, batch: int = 500):
        self.store = store
        self.position_file = Path(position_file)
        self.handler = handler
        self.batch = batch
        self.position = self._load()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _load(self) -> int:
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
            safefs.atomic_write(self.position_file, f"{self.position}\n".encode(), 0o600,
                                what="change feed position")
            n += len(changes)

    def start(self, interval: float = 0.5) -> None:
        """Poll on a thread of its own every `interval` seconds until stop()."""
        self._thread = threading.Thread(target=self._run, args=(interval,), name="change-feed", daemon=True)
        self._thread.start()

    def _run(self, interval: float) -> None:
        while not self._stop.is_set():
            try:
                self.poll()
            except Exception:  # noqa: BLE001 - the saved position is unchanged: the next poll retries
                log.exception("following the change feed failed; retrying", position=self.position)
            self._stop.wait(interval)

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
