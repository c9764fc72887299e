"""CSR verification, certificate signing and recording in worker processes, so every core works.

The issuer's main process serves gRPC and holds the GIL for that; the per-CSR
work (verify the CSR, build and sign the leaf with the one profile builder via
CertificateAuthority.sign, DER-encode) and the commit of what was signed (the
serial rows and their audit records, one transaction per chunk) run in spawned
workers that hold the CA key in memory and write the issuer's database through
a store of their own, opened with the picklable `Opener` the issuer's store gives
(`store.opener()`). Jobs from concurrent callers are coalesced into
chunks, so a unary call costs the main process a queue append and its share of
one pipe round trip.

Authorization stays in the main process (issuer/issuance/signer.py): a worker only turns
jobs the main process allowed into certificates and records. No certificate is
handed back to a caller before its serial is committed: the worker commits, then
answers. The worker returns the audit records it committed, and the main process's
event loop publishes them to the issuer's AuditRelay (the JSON-lines file, metrics,
the evidence stream) before it resolves the callers.
"""

from __future__ import annotations

import asyncio
import collections
import ctypes
import datetime as dt
import multiprocessing
import os
import pickle
import select
import signal
import struct
import threading
import time
from dataclasses import dataclass
from typing import Callable, Sequence


from issuer.audit.relay import AuditRelay
from issuer.ca.authorities import Authorities
from issuer.ca.authority import SigningAuthority
from issuer.core.models import Actor, AuditEvent, AuditRecord, IssuedSerial, audit_record_tuple
from issuer.datastore.interface import Datastore, Opener
from tessera import logs, spiffeid, x509svid
from tessera.errors import Code, FailedPrecondition, TesseraError

log = logs.get("signing-pool")

CHUNK_MAX = 256  # CSRs per trip to a worker: large enough to amortise the trip, small enough to spread
# While one worker is busy, another is engaged only when at least CHUNK_MIN jobs are waiting (see
# SigningPool._dispatch). Idle, nothing waits.
CHUNK_MIN = 32
READY = "ready"  # a worker's first message: it holds the key and has opened the database


@dataclass(frozen=True)
class SignJob:
    csr_der: bytes
    spiffe_id: str
    ttl: int
    not_after_cap: int  # unix seconds
    entry_id: str  # what the record names: the entry, the sidecar that asked, and when
    sidecar_id: str
    issued_at: int


@dataclass(frozen=True)
class Signed:
    chain_der: bytes = b""  # DER, the leaf then its signer
    serial: int = 0
    not_after: int = 0
    error: str = ""  # why nothing was signed for this job (its caller's message); empty when signed
    code: int = 0  # with error: the status (tessera.errors.Code) of this job alone

    @property
    def serial_hex(self) -> str:
        return x509svid.serial_hex(self.serial)


def sign_jobs(ca: SigningAuthority, jobs: Sequence[SignJob]) -> list[Signed]:
    """The per-CSR work, the same in a worker and in-process.

    Each job succeeds or fails on its own: whatever one job raises becomes that job's error
    status, so one bad CSR or entry never fails the other jobs of its chunk (other callers').
    """
    out = []
    for job in jobs:
        try:
            out.append(_sign_one(ca, job))
        except TesseraError as e:
            out.append(Signed(error=f"cannot sign for entry {job.entry_id}: {e.message}", code=int(e.code)))
        except Exception as e:  # noqa: BLE001 - this job's failure, not its neighbours'
            log.error("signing one job failed", entry_id=job.entry_id, error=repr(e))
            out.append(Signed(error=f"cannot sign for entry {job.entry_id}: internal error", code=int(Code.INTERNAL)))
    return out


def _sign_one(ca: SigningAuthority, job: SignJob) -> Signed:
    try:
        public_key = x509svid.verified_key(job.csr_der)
    except ValueError as e:
        return Signed(error=f"invalid CSR for entry {job.entry_id}: {e}", code=int(Code.INVALID_ARGUMENT))
    try:
        cap = dt.datetime.fromtimestamp(job.not_after_cap, dt.timezone.utc)
    except (OverflowError, OSError, ValueError):
        raise FailedPrecondition(f"the entry's expiry {job.not_after_cap} is out of range for a certificate; "
                           "set a new one with `tessera entry update --expires-in`") from None
    return Signed(*ca.sign_der(public_key, spiffeid.parse(job.spiffe_id), job.ttl, not_after_cap=cap))


def issuance_records(jobs: Sequence[SignJob], signed: Sequence[Signed],
                     authority: str) -> tuple[list[IssuedSerial], list[AuditEvent]]:
    """The serial rows and audit events that must commit before these certificates leave."""
    issued, audits = [], []
    for job, s in zip(jobs, signed):
        if s.error:
            continue
        record = IssuedSerial(s.serial_hex, job.spiffe_id, "identity", job.entry_id, job.sidecar_id, job.issued_at,
                              s.not_after, authority=authority)
        issued.append(record)
        audits.append(AuditEvent(
            "svid.issue", Actor("sidecar", job.sidecar_id), "allow",
            reason="entry active, unexpired, parent is the caller", subject=job.spiffe_id,
            details={**record.audit_details(), "entry_id": job.entry_id, "sidecar_id": job.sidecar_id}))
    return issued, audits


def sign_and_record_jobs(ca: SigningAuthority, store: Datastore, jobs: Sequence[SignJob],
                         audits: Sequence[AuditEvent]) -> list[Signed]:
    """Sign, then commit the serials with `audits` and the issuance records: the same in a worker and in-process."""
    signed = sign_jobs(ca, jobs)
    issued, issue_audits = issuance_records(jobs, signed, ca.id)
    if issued or audits:
        store.record_issued(issued, [*audits, *issue_audits])
    return signed


# Plain tuples cross the worker pipe: pickling dataclasses costs the issuer's main process more.
def astuple_job(j: SignJob) -> tuple:
    return (j.csr_der, j.spiffe_id, j.ttl, j.not_after_cap, j.entry_id, j.sidecar_id, j.issued_at)


def astuple_signed(s: Signed) -> tuple:
    return (s.chain_der, s.serial, s.not_after, s.error, s.code)


# -- worker side ------------------------------------------------------------------------------

def _die_with_parent() -> None:
    # A worker holds the CA key: it must not outlive the issuer, even after kill -9.
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except OSError:
        pass


def _worker_main(conn, opener: Opener) -> None:
    _die_with_parent()
    logs.setup()  # a spawned process starts with structlog's defaults: JSON lines, as the issuer writes
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the issuer decides when workers stop
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    ca: SigningAuthority | None = None  # the issuer sends the active authority with the first chunk after a change
    # Its own store on the issuer's data; its relay passes on only what this worker committed, unordered:
    # the issuer's relay orders them among everyone's.
    relay = AuditRelay(in_order=False)
    committed: list[AuditRecord] = []
    relay.subscribe(committed.extend)
    store = opener.open(relay=relay)
    answer: object = READY  # a worker that dies before this never read a chunk: its chunk may go elsewhere
    while True:
        try:
            conn.send(answer)
            authority, job_tuples, audits = conn.recv()
        except (EOFError, OSError):
            store.close()
            return  # the issuer closed the pipe (it is stopping, or gone): stop
        committed.clear()
        try:
            if authority is not None:
                ca = SigningAuthority.from_portable(authority)
            assert ca is not None, "a chunk came before any signing authority"
            signed = sign_and_record_jobs(ca, store, [SignJob(*t) for t in job_tuples], audits)
            answer = ([astuple_signed(s) for s in signed], [audit_record_tuple(r) for r in committed])
        except TesseraError as e:  # e.g. UNAVAILABLE: the database stayed locked; the caller gets its status
            answer = e
        except Exception as e:  # noqa: BLE001 - reported to the caller, the worker carries on
            answer = RuntimeError(f"signing worker failed: {e!r}")


# -- main-process side --------------------------------------------------------------------------

Committed = Callable[[list[AuditRecord]], None]  # told of audit records a worker committed

MAX_START_FAILURES = 3  # workers in a row that died before READY: then callers get an error, not a wait
RESTART_DELAY = (0.1, 10.0)  # seconds before restarting after a failed start: first, and at most
CLOSE_WAIT = 5.0  # seconds close() waits for chunks at workers to be answered, and for workers to exit
_READ_SIZE = 1 << 18
_HEADER = struct.Struct("!i")  # multiprocessing.Connection's framing, which the worker side uses
_LONG_HEADER = struct.Struct("!Q")  # after a header of -1, for messages of 2 GiB or more


class _Request:
    __slots__ = ("jobs", "audits", "future", "weight")

    def __init__(self, jobs: list[SignJob], audits: list[AuditEvent], future: asyncio.Future):
        self.jobs = jobs
        self.audits = audits
        self.future = future
        self.weight = max(1, len(jobs))  # what it counts for in SigningPool._queued (no jobs: one, for its commit)


class _WorkerPipe:
    """The main process's end of one worker's pipe, non-blocking, driven by the event loop.

    The worker keeps a plain blocking multiprocessing.Connection; this end speaks the same
    framing (a length header, then a pickle) without blocking the loop: what does not fit in
    the socket buffer is written by a writer callback, and answers are taken apart as their
    bytes arrive. A failure closes the pipe at once, so nothing more is sent to it, and is
    reported on the loop's next turn, when no pool code is on the stack.
    """

    def __init__(self, conn, proc):
        self.conn = conn
        self.proc = proc
        self.fd = conn.fileno()
        os.set_blocking(self.fd, False)
        self.batch: list[_Request] | None = None  # the chunk at this worker
        self.authority: str | None = None  # id of the signing authority this worker holds
        self.ready = False  # READY came: the worker started
        self._loop: asyncio.AbstractEventLoop | None = None
        self._on_message: Callable[[_WorkerPipe, object], None] | None = None
        self._on_failure: Callable[[_WorkerPipe, BaseException], None] | None = None
        self._out = memoryview(b"")
        self._in = bytearray()

    @property
    def closed(self) -> bool:
        return self.conn.closed

    def attach(self, loop: asyncio.AbstractEventLoop, on_message: Callable[[_WorkerPipe, object], None],
               on_failure: Callable[[_WorkerPipe, BaseException], None]) -> None:
        self._loop, self._on_message, self._on_failure = loop, on_message, on_failure
        loop.add_reader(self.fd, self._readable)

    def send(self, message: object) -> bool:
        """Send a message; False when none of it could be written (the pipe failed: the worker has nothing)."""
        data = pickle.dumps(message, pickle.HIGHEST_PROTOCOL)
        n = len(data)
        header = _HEADER.pack(n) if n <= 0x7FFFFFFF else _HEADER.pack(-1) + _LONG_HEADER.pack(n)
        try:
            sent = os.writev(self.fd, [header, data])
        except BlockingIOError:
            sent = 0
        except OSError as e:
            self._failed(e)
            return False
        if sent < len(header) + n:  # the rest when the socket has room
            self._out = memoryview(header + data)[sent:]
            self._loop.add_writer(self.fd, self._writable)
        return True

    def _writable(self) -> None:
        try:
            sent = os.write(self.fd, self._out)
        except BlockingIOError:
            return
        except OSError as e:
            self._failed(e)
            return
        self._out = self._out[sent:]
        if not self._out:
            self._loop.remove_writer(self.fd)

    def _readable(self) -> None:
        # One read per callback: the reader is level-triggered, so the rest comes on the next turns.
        try:
            chunk = os.read(self.fd, _READ_SIZE)
        except BlockingIOError:
            chunk = None
        except OSError as e:
            self._failed(e)
            return
        if chunk == b"":
            self._failed(EOFError("the worker closed its pipe"))
            return
        if chunk:
            self._in += chunk
        while True:
            try:
                message = self._take_message()
            except Exception as e:  # noqa: BLE001 - an answer that cannot be read: the worker is failed
                self.ready = True  # whatever it was, the worker ran: its chunk may have been signed
                self._failed(RuntimeError(f"unreadable answer from a signing worker: {e!r}"))
                return
            if message is None:
                return
            self._on_message(self, message)

    def _take_message(self) -> object | None:
        if len(self._in) < 4:
            return None
        (n,), start = _HEADER.unpack_from(self._in), 4
        if n == -1:
            if len(self._in) < 12:
                return None
            (n,), start = _LONG_HEADER.unpack_from(self._in, 4), 12
        if len(self._in) < start + n:
            return None
        with memoryview(self._in) as view:
            message = pickle.loads(view[start:start + n])
        del self._in[:start + n]
        return message

    def _failed(self, error: BaseException) -> None:
        if not self.closed:
            self.close()
            self._loop.call_soon(self._on_failure, self, error)

    def finish(self, deadline: float) -> object | None:
        """Blocking, for close(): send what is left of the chunk and wait for its answer until `deadline`
        (time.monotonic()). None if no answer came."""
        self._unregister()
        try:
            while self._out:
                if not _wait(self.fd, select.POLLOUT, deadline):
                    return None
                self._out = self._out[os.write(self.fd, self._out):]
            while True:
                message = self._take_message()
                if message is not None and message != READY:
                    return message
                if message is None:
                    if not _wait(self.fd, select.POLLIN, deadline):
                        return None
                    chunk = os.read(self.fd, _READ_SIZE)
                    if not chunk:
                        return None
                    self._in += chunk
        except Exception:  # noqa: BLE001 - closing: an answer that cannot be had is no answer
            return None

    def _unregister(self) -> None:
        if self._loop is not None and not self._loop.is_closed():
            self._loop.remove_reader(self.fd)
            self._loop.remove_writer(self.fd)

    def close(self) -> None:
        self._unregister()
        self.conn.close()  # the worker sees EOF and exits


class SigningPool:
    """Signs jobs in `workers` processes and records what was signed before anyone sees it.

    The pool lives on its callers' event loop (the issuer's gRPC loop) and has no thread of
    its own. A caller queues a request; an idle worker takes whatever is queued (up to
    CHUNK_MAX jobs) down its pipe; the worker signs the chunk, commits all of its records in
    one transaction to the store `opener` opens and answers. When the answer is readable,
    the loop gives the worker its next chunk, passes the committed audit records to
    `committed` and only then resolves the callers' futures. A caller costs one queue append;
    a chunk, one pickled message each way. (Feeding threads, one per worker, cost each chunk
    two hand-offs of the GIL and a wake-up of the loop: side by side, ~5 % fewer unary calls.)

    A worker that dies is replaced; the callers of a chunk it held get an error, unless it
    never received the chunk or never started (then nothing was signed, and the chunk goes
    to another worker). Workers that keep dying before they start are restarted with a
    growing delay, and after MAX_START_FAILURES in a row callers get an error.

    Bound to the loop of its first caller.
    """

    def __init__(self, authorities: Authorities, workers: int, opener: Opener, committed: Committed):
        self._committed = committed
        self._ctx = multiprocessing.get_context("spawn")  # not fork: gRPC threads do not survive a fork
        self._authorities = authorities
        self._args = (opener,)
        self._queue: collections.deque[_Request] = collections.deque()
        self._queued = 0  # the weight of the requests in _queue: jobs, a request without jobs counting one
        self._closed = False
        self._loop: asyncio.AbstractEventLoop | None = None
        self._start_failures = 0  # in a row
        self._start_error: BaseException | None = None
        self._restart_at = 0.0  # time.monotonic() before which no worker is restarted
        self._restart_timer: asyncio.TimerHandle | None = None
        self._workers = [self._spawn(i) for i in range(workers)]

    def _spawn(self, i: int) -> _WorkerPipe:
        parent, child = self._ctx.Pipe()
        proc = self._ctx.Process(target=_worker_main, args=(child, *self._args), name=f"tessera-signer-{i}",
                                 daemon=True)
        proc.start()
        child.close()
        pipe = _WorkerPipe(parent, proc)
        if self._loop is not None:
            pipe.attach(self._loop, self._message, self._died)
        return pipe

    async def sign_and_record(self, jobs: Sequence[SignJob], audits: Sequence[AuditEvent] = ()) -> list[Signed]:
        """Sign `jobs`, commit their serials and issuance records together with `audits`, and return them.

        A request with no jobs (every item denied) still goes through a worker: its audit
        records are a commit, which does not belong on the event loop.
        """
        if self._closed:
            raise RuntimeError("signing pool is closed")
        loop = asyncio.get_running_loop()
        if self._loop is None:
            self._loop = loop
            for pipe in self._workers:
                pipe.attach(loop, self._message, self._died)
        elif loop is not self._loop:
            raise RuntimeError("the signing pool serves the event loop it was first called from")
        req = _Request(list(jobs), list(audits), loop.create_future())
        self._queue.append(req)
        self._queued += req.weight
        self._dispatch()
        return await req.future

    def _dispatch(self) -> None:
        """Give queued requests to idle workers.

        While another worker is busy, requests wait for it unless there are enough to fill a
        chunk: each trip to a worker costs pickling and pipe writes here, so a second worker
        pays for itself only under batch-sized load. Waiting requests batch naturally.
        """
        if self._closed:
            return
        self._restart_dead()
        while self._queue:
            live = [w for w in self._workers if not w.closed]
            if not live:
                self._no_worker()
                return
            idle = [w for w in live if w.batch is None]
            if not idle or (len(idle) < len(live) and self._queued < CHUNK_MIN):
                return
            # Coalesce whole requests up to CHUNK_MAX jobs (a larger request goes alone).
            batch = [self._queue.popleft()]
            size = len(batch[0].jobs)
            while self._queue and size + len(self._queue[0].jobs) <= CHUNK_MAX:
                size += len(self._queue[0].jobs)
                batch.append(self._queue.popleft())
            self._queued -= sum(r.weight for r in batch)
            pipe = idle[0]
            pipe.batch = batch
            # A worker learns of a rotation with its next chunk: the key crosses its pipe, never a file.
            signer = self._authorities.signer()
            authority = signer.portable() if pipe.authority != signer.id else None
            if not pipe.send((authority, [astuple_job(j) for r in batch for j in r.jobs],
                              [a for r in batch for a in r.audits])):
                pipe.batch = None  # it got nothing: the chunk waits for another worker
                self._requeue(batch)
            else:
                pipe.authority = signer.id

    def _requeue(self, batch: list[_Request]) -> None:
        self._queue.extendleft(reversed(batch))
        self._queued += sum(r.weight for r in batch)

    def _no_worker(self) -> None:
        """Requests are queued and no worker is alive: wait for a restart, or fail them after repeated failed starts."""
        if self._start_failures >= MAX_START_FAILURES:
            waiting = list(self._queue)
            self._queue.clear()
            self._queued = 0
            _resolve(waiting, RuntimeError(f"no signing worker could be started ({self._start_failures} failed "
                                           f"in a row; last: {self._start_error!r})"))
        elif self._restart_timer is None:
            delay = max(0.0, self._restart_at - time.monotonic())
            self._restart_timer = self._loop.call_later(delay, self._restart_due)

    def _restart_due(self) -> None:
        self._restart_timer = None
        self._dispatch()

    def _restart_dead(self) -> None:
        """Replace workers whose pipe failed, unless a failed start asked to wait."""
        if self._closed or time.monotonic() < self._restart_at:
            return
        for i, pipe in enumerate(self._workers):
            if pipe.closed:
                try:
                    self._workers[i] = self._spawn(i)
                except OSError as e:  # e.g. out of processes
                    log.error("could not start a signing worker", worker=i, error=repr(e))
                    self._start_failed(e)
                    return

    def _start_failed(self, error: BaseException) -> None:
        self._start_failures += 1
        self._start_error = error
        first, most = RESTART_DELAY
        self._restart_at = time.monotonic() + min(most, first * 2 ** min(self._start_failures - 1, 16))

    def _message(self, pipe: _WorkerPipe, message: object) -> None:
        if message == READY:
            pipe.ready = True
            self._start_failures = 0
            return
        batch, pipe.batch = pipe.batch, None
        if batch is None:
            log.error("a signing worker answered without a chunk; ignored")
            return
        try:
            self._dispatch()  # the worker starts on the next chunk while this one's callers are answered
        finally:
            self._deliver(batch, message)

    def _deliver(self, batch: list[_Request], answer: object) -> None:
        if not isinstance(answer, BaseException):
            signed, records = answer
            try:
                # Committed: the listeners hear of it before any caller sees a certificate.
                self._committed([AuditRecord(*t) for t in records])
                answer = [Signed(*t) for t in signed]
            except Exception as e:  # noqa: BLE001 - whatever went wrong, this chunk's callers hear of it
                log.exception("relaying a signing worker's records failed; its callers get the error")
                answer = e
        _resolve(batch, answer)

    def _died(self, pipe: _WorkerPipe, error: BaseException) -> None:
        """A worker's pipe failed: the worker died, or its answer could not be read."""
        batch, pipe.batch = pipe.batch, None
        if self._closed:  # a pipe close() no longer saw (already replaced): its callers still get an answer
            if batch is not None:
                _resolve(batch, RuntimeError("signing pool is closed"))
            return
        if not pipe.ready:
            log.error("a signing worker died before it started", error=repr(error))
            self._start_failed(error)
        if batch is not None:
            if pipe.ready:  # it may have signed and committed: its callers get the error
                _resolve(batch, RuntimeError(f"a signing worker died: {error!r}"))
            else:
                self._requeue(batch)
        self._dispatch()

    def close(self) -> None:
        """Stop the workers once the chunks they hold are answered (at most CLOSE_WAIT seconds).

        Queued requests get an error. From another thread while the pool's loop runs, the
        work is done on the loop.
        """
        loop = self._loop
        if loop is not None and loop.is_running() and not _running_in(loop):
            done = threading.Event()

            def close_on_loop() -> None:
                try:
                    self._close()
                finally:
                    done.set()

            try:
                loop.call_soon_threadsafe(close_on_loop)
            except RuntimeError:  # the loop closed meanwhile
                self._close()
                return
            if not done.wait(3 * CLOSE_WAIT):
                log.error("the event loop did not close the signing pool; stopping its workers")
                for pipe in self._workers:
                    pipe.proc.kill()
            return
        self._close()

    def _close(self) -> None:
        self._closed = True
        if self._restart_timer is not None:
            self._restart_timer.cancel()
        queued = list(self._queue)
        self._queue.clear()
        _resolve(queued, RuntimeError("signing pool is closed"))
        deadline = time.monotonic() + CLOSE_WAIT
        for pipe in self._workers:
            if pipe.batch is not None:
                batch, pipe.batch = pipe.batch, None
                answer = None if pipe.closed else pipe.finish(deadline)
                self._deliver(batch, answer if answer is not None else RuntimeError("signing pool is closed"))
        for pipe in self._workers:
            pipe.close()
        for pipe in self._workers:
            pipe.proc.join(timeout=max(0.0, deadline - time.monotonic()))
            if pipe.proc.is_alive():
                pipe.proc.kill()
                pipe.proc.join()


def _wait(fd: int, events: int, deadline: float) -> bool:
    """Block until fd is ready for `events` or time.monotonic() passes `deadline` (poll: any fd number)."""
    poller = select.poll()
    poller.register(fd, events)
    return bool(poller.poll(max(0, int((deadline - time.monotonic()) * 1000))))


def _running_in(loop: asyncio.AbstractEventLoop) -> bool:
    try:
        return asyncio.get_running_loop() is loop
    except RuntimeError:
        return False


def _resolve(batch: list[_Request], answer: list[Signed] | BaseException) -> None:
    """Hand each request of a chunk its certificates, or the chunk's error.

    A caller that went away is skipped, and so is a loop that is closed (its callers are gone).
    """
    k = 0
    for r in batch:
        start, k = k, k + len(r.jobs)
        if r.future.done() or r.future.get_loop().is_closed():
            continue
        if isinstance(answer, BaseException):
            r.future.set_exception(answer)
        else:
            r.future.set_result(answer[start:k])
