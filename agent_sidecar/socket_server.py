"""The sidecar's local socket server: grpclib, with each caller attested when it connects and
everything a local user can send bounded. Any local user may reach this socket (mode 0666).

Invariants:
- Nothing is read from a connection before its caller is attested: the transport is paused from
  accept until the kernel's credentials and the process's executable are recorded (an AttestedPeer,
  kept for the connection's life). The server's SETTINGS go out only then. Handlers take the caller
  from `current_peer()`, never from anything the connection sends.
- Connections, concurrent calls, and calls still waiting for their request are counted per uid and
  overall (`SocketLimits`). Past a limit a connection is closed at once, a call is answered
  RESOURCE_EXHAUSTED without running a handler. Refusals are logged throttled, per uid.
- A request message longer than `max_request_bytes` is refused from its length prefix, before its
  bytes are read. HTTP/2 flow-control windows are 64 KiB, so a connection holds at most that much
  sent-but-unread data; a header block longer than `max_header_bytes` (h2 would buffer 64
  CONTINUATION frames) closes the connection.
- Time: a connection must start a call within `first_request_timeout` of being attested, a call must
  deliver its request within `request_timeout`, a connection with no call open for `idle_timeout` is
  closed (GOAWAY). While a peer does not read what is written to it, nothing more is read from it, so
  automatic answers (PING and SETTINGS acks) cannot pile up in the write buffer.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextvars
from collections import Counter
from dataclasses import dataclass, replace

import h2.connection
import h2.settings
from grpclib.config import Configuration
from grpclib.metadata import encode_grpc_message
from grpclib.protocol import Connection, EventsProcessor, H2Protocol
from grpclib.protocol import Stream as H2Stream
from grpclib.server import Handler, Server, request_handler
from h2.settings import SettingCodes

from agent_sidecar.attestation import AttestationError, AttestedPeer, WorkloadAttestor
from tessera import logs, peercred, rpc
from tessera.configfile import Section
from tessera.errors import DeadlineExceeded, PermissionDenied, ResourceExhausted, TesseraError, Unavailable

log = logs.get("sidecar.socket")
_refusals = logs.Throttled(log)

WINDOW = 65535       # HTTP/2's smallest flow-control window: what a connection may have sent unread
ATTEST_THREADS = 4
ATTEST_PER_UID = 2   # one uid's attestations in progress at once; more wait, the other uids' do not
FD_RESERVE = 256     # descriptors kept for the issuer connection, files, the metrics port
FDS_PER_CONNECTION = 2  # the socket and the caller's pidfd


@dataclass(frozen=True)
class SocketLimits:
    max_request_bytes: int = 64 * 1024
    max_header_bytes: int = 16 * 1024
    connections: int = 1024
    connections_per_uid: int = 64
    streams_per_connection: int = 16
    streams: int = 2048
    streams_per_uid: int = 128
    pending: int = 256
    pending_per_uid: int = 16
    first_request_timeout: float = 10.0
    request_timeout: float = 10.0
    idle_timeout: float = 300.0
    attest_timeout: float = 10.0


_KINDS = {"connections": "connections", "streams": "concurrent calls", "pending": "calls waiting for their request"}


# What each count may be set to; a request must hold its 5-byte gRPC prefix, and HTTP/2 header blocks
# below 1 KiB would refuse ordinary calls.
LIMIT_RANGES = {"max_request_bytes": (5, 4 * 1024 * 1024), "max_header_bytes": (1024, 64 * 1024)}


def load_limits(sec: Section) -> SocketLimits:
    """The `socket_limits` mapping of the sidecar's config; every key optional."""
    s = sec.section("socket_limits")
    d = SocketLimits()
    values = {}
    for key, default in vars(d).items():
        if key.endswith("_timeout"):
            values[key] = float(s.duration(key, int(default)))
            continue
        lo, hi = LIMIT_RANGES.get(key, (1, 1_000_000))
        values[key] = s.int(key, default, minimum=lo, maximum=hi)
    s.reject_unknown()
    return SocketLimits(**values)


def fit_to_descriptors(limits: SocketLimits, nofile: int) -> SocketLimits:
    """`limits` with no more connections than the descriptor limit allows after the reserve."""
    room = max(1, (nofile - FD_RESERVE) // FDS_PER_CONNECTION)
    if limits.connections <= room:
        return limits
    log.warning("socket_limits.connections lowered to fit the descriptor limit", configured=limits.connections,
                connections=room, nofile=nofile)
    return replace(limits, connections=room, connections_per_uid=min(limits.connections_per_uid, room))


class Tally:
    """Connections, calls and pending calls, per uid and overall. A uid with nothing open takes no room."""

    def __init__(self, limits: SocketLimits):
        self._limits = limits
        self._n: Counter = Counter()

    def admit(self, uid: int, kind: str) -> str | None:
        """Count one more `kind` for `uid`, or say why not."""
        total, per_uid = getattr(self._limits, kind), getattr(self._limits, f"{kind}_per_uid")
        if self._n[(None, kind)] >= total:
            return f"the sidecar is at its limit of {total} {_KINDS[kind]}"
        if self._n[(uid, kind)] >= per_uid:
            return f"uid {uid} is at its limit of {per_uid} {_KINDS[kind]}"
        self._n[(None, kind)] += 1
        self._n[(uid, kind)] += 1
        return None

    def release(self, uid: int, kind: str) -> None:
        for key in ((None, kind), (uid, kind)):
            self._n[key] -= 1
            if self._n[key] <= 0:
                del self._n[key]

    def count(self, uid: int | None, kind: str) -> int:
        return self._n[(uid, kind)]


class Guard:
    """What the server's connections share: the attestor, its threads, the limits and their tally."""

    def __init__(self, attestor: WorkloadAttestor, limits: SocketLimits):
        self.attestor = attestor
        self.limits = limits
        self.tally = Tally(limits)
        self._executor = concurrent.futures.ThreadPoolExecutor(ATTEST_THREADS, thread_name_prefix="attest")
        self._per_uid: dict[int, tuple[asyncio.Semaphore, int]] = {}  # uid -> (its semaphore, users)

    async def attest(self, uid: int, sock) -> AttestedPeer:
        """Attest on a thread (/proc reads, hashing), at most ATTEST_PER_UID at once per uid, within
        attest_timeout. A result that arrives after the caller gave up is closed, not leaked."""
        sem, users = self._per_uid.get(uid) or (asyncio.Semaphore(ATTEST_PER_UID), 0)
        self._per_uid[uid] = (sem, users + 1)
        owned = acquired = False
        job = None
        try:
            async with asyncio.timeout(self.limits.attest_timeout):
                await sem.acquire()
                acquired = True
                job = self._executor.submit(self.attestor.attest_socket, sock)
                peer = await asyncio.wrap_future(job)
                owned = True
                return peer
        finally:
            if job is None:
                self._release(uid, acquired)
            else:
                # The uid's slot is free only when its thread is: a job that outlives the timeout (a hung
                # read of its executable) keeps holding it, so one uid cannot take every attest thread.
                loop = asyncio.get_running_loop()
                job.add_done_callback(lambda _: loop.call_soon_threadsafe(self._release, uid, True))
                if not owned:
                    job.add_done_callback(_close_result)

    def _release(self, uid: int, acquired: bool) -> None:
        sem, users = self._per_uid[uid]
        if acquired:
            sem.release()
        if users == 1:
            del self._per_uid[uid]
        else:
            self._per_uid[uid] = (sem, users - 1)

    def close(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)


def _close_result(job: concurrent.futures.Future) -> None:
    if not job.cancelled() and job.exception() is None:
        job.result().close()


# -- calls ---------------------------------------------------------------------------------------

class Call:
    """One call (HTTP/2 stream) on a guarded connection, counted until it ends."""

    def __init__(self, conn: "GuardedProtocol", request_deadline: float):
        self.conn = conn
        self.request_deadline = request_deadline
        self.pending = True  # its request message has not been read yet
        self._in_message = False

    def read(self, data: bytes) -> None:
        """grpclib reads a message as its 5-byte prefix, then its body: the first body read, or the end
        of the stream before any message, ends the wait for the request."""
        if self._in_message or not data:
            self.request_read()
        else:
            self._in_message = True

    def request_read(self) -> None:
        if self.pending:
            self.pending = False
            self.conn.guard.tally.release(self.conn.uid, "pending")

    def end(self) -> None:
        self.request_read()
        self.conn.guard.tally.release(self.conn.uid, "streams")
        self.conn.call_ended()


_CALL: contextvars.ContextVar[Call] = contextvars.ContextVar("tessera_socket_call")


def current_peer() -> AttestedPeer:
    """The caller of the current call, as attested when its connection was accepted.
    Raises the call's typed error when that attestation failed."""
    conn = _CALL.get().conn
    if conn.peer is None:
        # A new error each time: re-raising the stored one would chain every call's frames onto it.
        kind, message = conn.attest_error
        raise kind(message)
    return conn.peer


class _BoundedStream(H2Stream):
    """An HTTP/2 stream whose request messages are checked for length before their bytes are read,
    and whose first message must arrive before the call's request deadline."""

    call: Call | None = None

    async def recv_data(self, size: int) -> bytes:
        call = self.call
        limit = call.conn.guard.limits.max_request_bytes
        if size > limit:
            raise ResourceExhausted(
                f"request message of {size} bytes is larger than the sidecar's limit of {limit} bytes")
        if not call.pending:
            return await super().recv_data(size)
        try:
            async with asyncio.timeout_at(call.request_deadline):
                data = await super().recv_data(size)
        except TimeoutError:
            raise DeadlineExceeded("no complete request message within "
                                   f"{call.conn.guard.limits.request_timeout:g}s of the call's start") from None
        call.read(data)
        return data


class _GuardedConnection(Connection):
    def create_stream(self, *, stream_id=None, wrapper=None) -> H2Stream:
        return _BoundedStream(self, self._connection, self._transport, stream_id=stream_id, wrapper=wrapper)


async def _refuse(stream: H2Stream, error: TesseraError, release_stream) -> None:
    """Answer a call with `error`'s status (trailers only) without running its handler."""
    status, message = rpc.grpclib_status(error)
    try:
        await stream.send_headers([
            (":status", "200"), ("content-type", "application/grpc"),
            ("grpc-status", str(status.value)), ("grpc-message", encode_grpc_message(message)),
        ], end_stream=True)
        if stream.closable:
            stream.reset_nowait()
    except Exception:  # noqa: BLE001 - the peer reset or left: nothing to tell it
        pass
    finally:
        release_stream()


def _once(fn):
    done = False

    def run() -> None:
        nonlocal done
        if not done:
            done = True
            fn()

    return run


class GuardedHandler(Handler):
    """grpclib's per-connection handler, counting calls and giving each its Call (see current_peer)."""

    def __init__(self, *args, conn: "GuardedProtocol"):
        super().__init__(*args)
        self.conn = conn

    def accept(self, stream: _BoundedStream, headers, release_stream) -> None:
        self.__gc_step__()
        refusal = self.conn.open_call()
        if refusal is not None:
            _refusals.log(f"call:{self.conn.uid}", "call refused", uid=self.conn.uid, reason=refusal)
            release = _once(release_stream)
            self._start(stream, _refuse(stream, ResourceExhausted(refusal), release), release)
            return
        call = Call(self.conn, self.loop.time() + self.conn.guard.limits.request_timeout)
        stream.call = call
        release = _once(lambda: (call.end(), release_stream()))
        ctx = contextvars.copy_context()
        ctx.run(_CALL.set, call)
        self._start(stream, request_handler(self.mapping, stream, headers, self.codec, self.status_details_codec,
                                            self.dispatch, release), release, ctx)

    def _start(self, stream, coro, release, context=None) -> None:
        # A task cancelled before its first step (the peer reset the stream at once) never runs its
        # `finally`: releasing when the task is done keeps the counts right whatever happens.
        task = self.loop.create_task(coro, context=context)
        task.add_done_callback(lambda _: release())
        self._tasks[stream] = task

    def cancel(self, stream) -> None:
        task = self._tasks.pop(stream, None)  # a refused call may be reset after it was answered
        if task is not None:
            task.cancel()
            self._cancelled.add(task)


class GuardedProtocol(H2Protocol):
    """One connection: admitted by uid, paused until attested, timed while it has no call open."""

    def __init__(self, config: Configuration, h2_config, guard: Guard):
        super().__init__(None, config, h2_config)
        self.guard = guard
        self.uid: int | None = None
        self.peer: AttestedPeer | None = None
        self.attest_error: tuple[type[TesseraError], str] | None = None  # raised anew in each call
        self.calls = 0
        self._admitted = False
        self._attested = False
        self._h2: h2.connection.H2Connection | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._attesting: asyncio.Task | None = None

    def connection_made(self, transport) -> None:
        self.transport = transport
        sock = transport.get_extra_info("socket")
        try:
            cred = peercred.from_socket(sock)
        except OSError:
            transport.abort()
            return
        self.uid = cred.uid
        refusal = self.guard.tally.admit(cred.uid, "connections")
        if refusal is not None:
            _refusals.log(f"conn:{cred.uid}", "connection refused", uid=cred.uid, pid=cred.pid, reason=refusal)
            transport.abort()
            return
        self._admitted = True
        transport.pause_reading()  # not a byte is read before the caller is attested
        limits = self.guard.limits
        conn = h2.connection.H2Connection(config=self.h2_config)
        # In force from the first frame (initial values, not an update the peer could leave unacknowledged).
        conn.local_settings = h2.settings.Settings(client=False, initial_values={
            SettingCodes.MAX_CONCURRENT_STREAMS: limits.streams_per_connection,
            SettingCodes.MAX_HEADER_LIST_SIZE: limits.max_header_bytes,
        })
        conn.decoder.max_header_list_size = limits.max_header_bytes
        conn.initiate_connection()
        self._h2 = conn
        self.connection = _GuardedConnection(conn, transport, config=self.config)
        self.processor = EventsProcessor(self.handler, self.connection)
        self._attesting = asyncio.get_running_loop().create_task(self._attest(sock))

    async def _attest(self, sock) -> None:
        try:
            self.peer = await self.guard.attest(self.uid, sock)
        except AttestationError as e:
            self.attest_error = PermissionDenied, f"workload attestation failed: {e}"
        except (OSError, TimeoutError, RuntimeError) as e:  # RuntimeError: the server is closing
            self.attest_error = Unavailable, f"workload attestation failed: {e or 'timed out'}"
        if self.attest_error is not None:
            _refusals.log(f"attest:{self.uid}", "workload attestation failed", uid=self.uid,
                          error=self.attest_error[1])
        self._attested = True
        self.connection.flush()  # the server's SETTINGS: the caller may speak now
        self.connection.initialize()
        self._arm(self.guard.limits.first_request_timeout)
        self.transport.resume_reading()

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        # h2 keeps an unfinished header block (HEADERS + CONTINUATION) whole until it ends.
        pending = getattr(self._h2.incoming_buffer, "_headers_buffer", ())
        if pending and sum(len(f.data) for f in pending) > self.guard.limits.max_header_bytes:
            _refusals.log(f"headers:{self.uid}", "header block too large; connection closed", uid=self.uid)
            self._close()

    def pause_writing(self) -> None:
        super().pause_writing()
        self.transport.pause_reading()  # the peer is not reading: stop reading what it sends

    def resume_writing(self) -> None:
        super().resume_writing()
        if self._attested and not self.transport.is_closing():
            self.transport.resume_reading()

    def open_call(self) -> str | None:
        tally = self.guard.tally
        refusal = tally.admit(self.uid, "streams")
        if refusal is None:
            refusal = tally.admit(self.uid, "pending")
            if refusal is not None:
                tally.release(self.uid, "streams")
        if refusal is None:
            self.calls += 1
            self._cancel_timer()
        return refusal

    def call_ended(self) -> None:
        self.calls -= 1
        if self.calls == 0 and self._admitted:
            self._arm(self.guard.limits.idle_timeout)

    def _arm(self, seconds: float) -> None:
        self._cancel_timer()
        self._timer = asyncio.get_running_loop().call_later(seconds, self._expire)

    def _cancel_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _expire(self) -> None:
        self._timer = None
        if self.calls == 0:
            self._close()

    def _close(self) -> None:
        try:
            self._h2.close_connection()  # GOAWAY: a gRPC client reconnects for its next call
            self.connection.flush()
        except Exception:  # noqa: BLE001 - h2 already closed: just drop the transport
            pass
        self.transport.close()

    def connection_lost(self, exc) -> None:
        if not self._admitted:
            self.handler.close()  # marked closing, so grpclib's server forgets it
            return
        self._admitted = False
        self._cancel_timer()
        if self._attesting is not None:
            self._attesting.cancel()
        self.guard.tally.release(self.uid, "connections")
        super().connection_lost(exc)  # cancels the calls
        if self.peer is not None:
            self.peer.close()


class GuardedServer(Server):
    """grpclib's Server with GuardedProtocol connections and 64 KiB receive windows."""

    def __init__(self, handlers, guard: Guard):
        super().__init__(handlers, codec=rpc.Codec(), config=Configuration(http2_connection_window_size=WINDOW,
                                                        http2_stream_window_size=WINDOW))
        self.guard = guard

    def _protocol_factory(self) -> GuardedProtocol:
        self.__gc_step__()
        proto = GuardedProtocol(self._config, self._h2_config, self.guard)
        proto.handler = GuardedHandler(self._mapping, self._codec, self._status_details_codec, self.__dispatch__,
                                       conn=proto)
        self._handlers.add(proto.handler)
        return proto

    def close(self) -> None:
        super().close()
        self.guard.close()
