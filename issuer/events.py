"""Push of committed changes to connected sidecars' sync streams.

Each sync stream holds a subscription (a queue). Publishing never blocks: the
issuer commits first, then publishes; a sidecar that misses an event (it was
disconnected) gets a fresh snapshot when it reconnects.
"""

from __future__ import annotations

import queue
import threading
import time
from typing import Any

CLOSE = object()  # tells a stream to end (the sidecar was banned)


def _stamp(event: Any) -> Any:
    # Publishing happens right after the commit: this is the commit time sidecars measure delay from.
    return (*event, time.time()) if isinstance(event, tuple) else event


class Subscription:
    def __init__(self, hub: "EventHub", sidecar_id: str):
        self.hub = hub
        self.sidecar_id = sidecar_id
        self.queue: "queue.SimpleQueue[Any]" = queue.SimpleQueue()

    def get(self, timeout: float) -> Any:
        try:
            return self.queue.get(timeout=timeout)
        except queue.Empty:
            return None

    def close(self) -> None:
        self.hub._remove(self)


class EventHub:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._subs: dict[str, list[Subscription]] = {}

    def subscribe(self, sidecar_id: str) -> Subscription:
        sub = Subscription(self, sidecar_id)
        with self._lock:
            self._subs.setdefault(sidecar_id, []).append(sub)
        return sub

    def _remove(self, sub: Subscription) -> None:
        with self._lock:
            subs = self._subs.get(sub.sidecar_id, [])
            if sub in subs:
                subs.remove(sub)
            if not subs:
                self._subs.pop(sub.sidecar_id, None)

    def publish(self, sidecar_id: str, event: Any) -> None:
        """Queue `event` (a (kind, payload) pair, stamped with the time) for one sidecar's streams."""
        event = _stamp(event)
        with self._lock:
            subs = list(self._subs.get(sidecar_id, ()))
        for s in subs:
            s.queue.put(event)

    def broadcast(self, event: Any) -> None:
        event = _stamp(event)
        with self._lock:
            subs = [s for group in self._subs.values() for s in group]
        for s in subs:
            s.queue.put(event)

    def connected(self) -> set[str]:
        with self._lock:
            return set(self._subs)
