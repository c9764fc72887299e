"""A grpclib server on a Unix socket with a bounded number of connections, overall and per peer uid.

Invariant: at most `max_connections` connections are open, at most `max_per_uid` from one uid (read
from the kernel, SO_PEERCRED); a connection past either cap is closed as soon as it is accepted, before
grpclib sees it, so it holds a descriptor for an instant and no memory. A connection that sends nothing
for `first_bytes_timeout` seconds after connecting is closed too.
"""

from __future__ import annotations

import asyncio

from grpclib.server import Server

from tessera import logs, peercred, rpc

log = logs.get("connlimit")


class _Gate(asyncio.Protocol):
    """Admits a connection or closes it; an admitted one is grpclib's from then on."""

    def __init__(self, server: "CappedServer"):
        self._server = server
        self._inner: asyncio.Protocol | None = None
        self._uid: int | None = None
        self._timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport) -> None:
        try:
            uid = peercred.from_socket(transport.get_extra_info("socket")).uid
        except (OSError, AttributeError):
            uid = -1
        if not self._server._admit(uid):
            transport.abort()
            return
        self._uid = uid
        self._timer = asyncio.get_running_loop().call_later(self._server.first_bytes_timeout, transport.abort)
        self._inner = self._server._grpclib_protocol()
        self._inner.connection_made(transport)

    def data_received(self, data: bytes) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._inner is not None:
            self._inner.data_received(data)

    def eof_received(self):
        return self._inner.eof_received() if self._inner is not None else None

    def pause_writing(self) -> None:
        if self._inner is not None:
            self._inner.pause_writing()

    def resume_writing(self) -> None:
        if self._inner is not None:
            self._inner.resume_writing()

    def connection_lost(self, exc) -> None:
        if self._timer is not None:
            self._timer.cancel()
        if self._inner is not None:
            self._server._release(self._uid)
            self._inner.connection_lost(exc)


class CappedServer(Server):
    def __init__(self, handlers, max_connections: int, max_per_uid: int, first_bytes_timeout: float = 10.0):
        super().__init__(handlers, codec=rpc.Codec())  # undecodable requests: INVALID_ARGUMENT, not a traceback
        self.max_connections = max_connections
        self.max_per_uid = max_per_uid
        self.first_bytes_timeout = first_bytes_timeout
        self._open = 0
        self._per_uid: dict[int, int] = {}
        self._log = logs.Throttled(log)

    def _protocol_factory(self):  # grpclib's hook for each accepted connection
        return _Gate(self)

    def _grpclib_protocol(self):
        return super()._protocol_factory()

    def _admit(self, uid: int) -> bool:
        if self._open >= self.max_connections or self._per_uid.get(uid, 0) >= self.max_per_uid:
            self._log.log(f"uid:{uid}", "connection refused: too many open", uid=uid, open=self._open,
                          max_connections=self.max_connections, max_per_uid=self.max_per_uid)
            return False
        self._open += 1
        self._per_uid[uid] = self._per_uid.get(uid, 0) + 1
        return True

    def _release(self, uid: int) -> None:
        self._open -= 1
        left = self._per_uid.pop(uid, 1) - 1
        if left:
            self._per_uid[uid] = left
