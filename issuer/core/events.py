"""Push of committed changes to connected sidecars' sync streams.

Each sync stream holds a subscription: a queue on the event loop that serves the
stream. Publishing never blocks and may happen on any thread (the admin socket's
loop, a blocking-call thread, the revocation service): the issuer commits first,
then publishes, and each loop is woken once per event however many of its streams
receive it. A sidecar that misses an event (it was disconnected) gets a fresh
snapshot when it reconnects.
"""

from __future__ import annotations

import asyncio
import threading
import time
from typing import Any

from tessera.loops import call_on_loops

CLOSE = object()  # tells a stream to end (the sidecar was banned)


def _stamp(event: Any) -> Any:
    # Publishing happens right after the commit: this is the commit time sidecars measure delay from.
    return (*event, time.time()) if isinstance(event, tuple) else event


class Subscription:
    def __init__(self, hub: "EventHub", sidecar_id: str, loop: asyncio.AbstractEventLoop):
        self.hub = hub
        self.sidecar_id = sidecar_id
        self.loop = loop
        self.queue: asyncio.Queue[Any] = asyncio.Queue()

    async def get(self, timeout: float) -> Any:
        """The next event, or None after `timeout` seconds without one."""
        try:
            async with asyncio.timeout(timeout):  # no extra task per event, unlike wait_for on 3.11
                return await self.queue.get()
        except TimeoutError:
            return None

    def close(self) -> None:
        self.hub._remove(self)


def _deliver(subs: list[Subscription], event: Any) -> None:
    for s in subs:
        s.queue.put_nowait(event)


class EventHub:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._subs: dict[str, list[Subscription]] = {}

    def subscribe(self, sidecar_id: str) -> Subscription:
        """A subscription read on the running event loop (call this from a coroutine)."""
        sub = Subscription(self, sidecar_id, asyncio.get_running_loop())
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
        with self._lock:
            subs = list(self._subs.get(sidecar_id, ()))
        self._send(subs, _stamp(event))

    def broadcast(self, event: Any) -> None:
        with self._lock:
            subs = [s for group in self._subs.values() for s in group]
        self._send(subs, _stamp(event))

    @staticmethod
    def _send(subs: list[Subscription], event: Any) -> None:
        call_on_loops(subs, lambda sub: sub.loop, lambda group: _deliver(group, event))

    def connected(self) -> set[str]:
        with self._lock:
            return set(self._subs)
