"""CSR verification, certificate signing and recording in worker processes, so every core works.

The issuer's main process serves gRPC and holds the GIL for that; the per-CSR
work (verify the CSR, build and sign the leaf with the one profile builder via
CertificateAuthority.sign, DER-encode) and the commit of what was signed (the
serial rows and their audit records, one transaction per chunk) run in spawned
workers that hold the CA key in memory and write the issuer's database through
their own `SQLiteDatastore`. Jobs from concurrent callers are coalesced into
chunks, so a unary call costs the main process a queue append and its share of
one pipe round trip.

Authorization stays in the main process (issuer/signing.py): a worker only turns
jobs the main process allowed into certificates and records. No certificate is
handed back to a caller before its serial is committed: the worker commits, then
answers. The worker returns the audit records it committed, and the main process's
event loop hands them to the store's listeners (the JSON-lines file, metrics)
before it resolves the callers.
"""

from __future__ import annotations

import asyncio
import collections
import ctypes
import datetime as dt
import multiprocessing
import os
import pickle
import signal
import struct
from dataclasses import dataclass
from typing import Callable, Sequence

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.serialization import Encoding

from issuer.ca import CertificateAuthority
from issuer.datastore import Datastore
from issuer.models import Actor, AuditEvent, AuditRecord, IssuedSerial
from tessera import logs, pem, spiffeid, x509svid
from tessera.errors import TesseraError

log = logs.get("signing-pool")

CHUNK_MAX = 256  # CSRs per trip to a worker: large enough to amortise the trip, small enough to spread
# While one worker is busy, another is engaged only when at least CHUNK_MIN jobs are waiting (see
# SigningPool._take). Idle, nothing waits.
CHUNK_MIN = 32


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
    cert_der: bytes = b""
    serial: int = 0
    not_after: int = 0
    error: str = ""  # set when the CSR is invalid; nothing was signed

    @property
    def serial_hex(self) -> str:
        return x509svid.serial_hex(self.serial)


def sign_jobs(ca: CertificateAuthority, jobs: Sequence[SignJob]) -> list[Signed]:
    """The per-CSR work, the same in a worker and in-process."""
    out = []
    for job in jobs:
        try:
            public_key = x509svid.load_csr(job.csr_der).public_key()
        except ValueError as e:
            out.append(Signed(error=str(e)))
            continue
        signed = ca.sign(public_key, spiffeid.parse(job.spiffe_id), job.ttl,
                         not_after_cap=dt.datetime.fromtimestamp(job.not_after_cap, dt.timezone.utc))
        out.append(Signed(signed.cert.public_bytes(Encoding.DER), signed.serial,
                          int(signed.not_after.timestamp())))
    return out


def issuance_records(jobs: Sequence[SignJob], signed: Sequence[Signed]) -> tuple[list[IssuedSerial],
                                                                                   list[AuditEvent]]:
    """The serial rows and audit events that must commit before these certificates leave."""
    issued, audits = [], []
    for job, s in zip(jobs, signed):
        if s.error:
            continue
        serial = s.serial_hex
        issued.append(IssuedSerial(serial, job.spiffe_id, "identity", job.entry_id, job.sidecar_id, job.issued_at,
                                   s.not_after))
        audits.append(AuditEvent(
            "svid.issue", Actor("sidecar", job.sidecar_id), "allow",
            reason="entry active, unexpired, parent is the caller", subject=job.spiffe_id,
            details={"serial": serial, "entry_id": job.entry_id, "sidecar_id": job.sidecar_id,
                     "ttl": s.not_after - job.issued_at, "kind": "identity"}))
    return issued, audits


def sign_and_record_jobs(ca: CertificateAuthority, store: Datastore, jobs: Sequence[SignJob],
                         audits: Sequence[AuditEvent]) -> list[Signed]:
    """Sign, then commit the serials with `audits` and the issuance records: the same in a worker and in-process."""
    signed = sign_jobs(ca, jobs)
    issued, issue_audits = issuance_records(jobs, signed)
    if issued or audits:
        store.record_issued(issued, [*audits, *issue_audits])
    return signed


# Plain tuples cross the worker pipe: pickling dataclasses costs the issuer's main process more.
def astuple_job(j: SignJob) -> tuple:
    return (j.csr_der, j.spiffe_id, j.ttl, j.not_after_cap, j.entry_id, j.sidecar_id, j.issued_at)


def astuple_signed(s: Signed) -> tuple:
    return (s.cert_der, s.serial, s.not_after, s.error)


def astuple_record(r: AuditRecord) -> tuple:
    return (r.seq, r.ts, r.action, r.actor, r.decision, r.reason, r.subject, r.details, r.prev_hash, r.hash)


# -- worker side ------------------------------------------------------------------------------

def _die_with_parent() -> None:
    # A worker holds the CA key: it must not outlive the issuer, even after kill -9.
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except OSError:
        pass


def _worker_main(conn, cert_pem: bytes, key_pem: bytes, trust_domain: str, db_path: str) -> None:
    _die_with_parent()
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the issuer decides when workers stop
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    from issuer.sqlite_store import SQLiteDatastore  # the worker's own connection to the issuer's database

    key = serialization.load_pem_private_key(key_pem, password=None)
    ca = CertificateAuthority(x509.load_pem_x509_certificate(cert_pem), key, trust_domain)
    store = SQLiteDatastore(db_path, relay_all=False)  # hands the issuer only what it committed itself
    committed: list[AuditRecord] = []
    store.audit_listeners.append(committed.extend)
    while True:
        try:
            job_tuples, audits = conn.recv()
        except (EOFError, OSError):
            store.close()
            return  # the issuer closed the pipe: stop
        committed.clear()
        try:
            signed = sign_and_record_jobs(ca, store, [SignJob(*t) for t in job_tuples], audits)
            conn.send(([astuple_signed(s) for s in signed], [astuple_record(r) for r in committed]))
        except TesseraError as e:  # e.g. UNAVAILABLE: the database stayed locked; the caller gets its status
            conn.send(e)
        except Exception as e:  # noqa: BLE001 - reported to the caller, the worker carries on
            conn.send(RuntimeError(f"signing worker failed: {e!r}"))


# -- main-process side --------------------------------------------------------------------------

Committed = Callable[[list[AuditRecord]], None]  # told of audit records a worker committed

_HEADER = struct.Struct("!i")  # multiprocessing.Connection's framing, which the worker side uses
_LONG_HEADER = struct.Struct("!Q")  # after a header of -1, for messages of 2 GiB or more


class _Request:
    __slots__ = ("jobs", "audits", "future")

    def __init__(self, jobs: list[SignJob], audits: list[AuditEvent], future: asyncio.Future):
        self.jobs = jobs
        self.audits = audits
        self.future = future


class _WorkerPipe:
    """The main process's end of one worker's pipe, non-blocking, driven by the event loop.

    The worker keeps a plain blocking multiprocessing.Connection; this end speaks the same
    framing (a length header, then a pickle) without ever blocking the loop: a message that
    does not fit in the socket buffer is finished by a writer callback, and an answer is
    taken apart as its bytes arrive.
    """

    def __init__(self, conn, proc):
        self.conn = conn
        self.proc = proc
        self.fd = conn.fileno()
        os.set_blocking(self.fd, False)
        self.loop: asyncio.AbstractEventLoop | None = None
        self.batch: list[_Request] | None = None  # the chunk at this worker
        self._out = bytearray()
        self._in = bytearray()
        self._on_message: Callable[[object], None] = lambda message: None
        self._on_failure: Callable[[BaseException], None] = lambda error: None

    @property
    def closed(self) -> bool:
        return self.conn.closed

    def attach(self, loop: asyncio.AbstractEventLoop, on_message: Callable[[object], None],
               on_failure: Callable[[BaseException], None]) -> None:
        self.loop, self._on_message, self._on_failure = loop, on_message, on_failure
        loop.add_reader(self.fd, self._readable)

    def send(self, message: object) -> None:
        data = pickle.dumps(message, pickle.HIGHEST_PROTOCOL)
        n = len(data)
        header = _HEADER.pack(n) if n <= 0x7FFFFFFF else _HEADER.pack(-1) + _LONG_HEADER.pack(n)
        pending = not self._out
        self._out += header
        self._out += data
        if pending:
            self._writable()
            if self._out:
                self.loop.add_writer(self.fd, self._writable)

    def _writable(self) -> None:
        if self.closed:
            return
        try:
            sent = os.write(self.fd, self._out)
        except BlockingIOError:
            return
        except OSError as e:
            self._failed(e)
            return
        del self._out[:sent]
        if not self._out:
            self.loop.remove_writer(self.fd)

    def _readable(self) -> None:
        failure: BaseException | None = None
        try:
            while chunk := os.read(self.fd, 1 << 20):
                self._in += chunk
            failure = EOFError("the worker closed its pipe")
        except BlockingIOError:
            pass
        except OSError as e:
            failure = e
        # An answer that arrived before the worker went away still counts: its chunk was committed.
        while True:
            try:
                message = self._take_message()
            except Exception as e:  # noqa: BLE001 - an answer that cannot be read: treat the worker as failed
                failure = RuntimeError(f"unreadable answer from a signing worker: {e!r}")
                break
            if message is None:
                break
            self._on_message(message)
        if failure is not None and not self.closed:
            self._failed(failure)

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
        message = pickle.loads(self._in[start:start + n])
        del self._in[:start + n]
        return message

    def _failed(self, error: BaseException) -> None:
        self.close()
        self._on_failure(error)

    def detach(self) -> None:
        if self.loop is not None and not self.loop.is_closed():
            self.loop.remove_reader(self.fd)
            self.loop.remove_writer(self.fd)
        self.loop = None

    def close(self) -> None:
        self.detach()
        self.conn.close()


class SigningPool:
    """Signs jobs in `workers` processes and records what was signed before anyone sees it.

    The pool lives on its callers' event loop (the issuer's gRPC loop) and has no thread of
    its own. A caller queues a request; an idle worker takes whatever is queued (up to
    CHUNK_MAX jobs) down its pipe; the worker signs the chunk, commits all of its records in
    one transaction to the database at `db_path` and answers. When the answer is readable,
    the loop gives the worker its next chunk, passes the committed audit records to
    `committed` and only then resolves the callers' futures. A caller costs one queue append;
    a chunk, one pickled message each way. (Feeding threads, one per worker, cost each chunk
    two hand-offs of the GIL and a wake-up of the loop: side by side, ~7 % fewer unary calls.)

    Bound to the loop of its first caller; close() it on that loop or after the loop stopped.
    """

    def __init__(self, ca: CertificateAuthority, workers: int, db_path: str, committed: Committed):
        self._committed = committed
        self._ctx = multiprocessing.get_context("spawn")  # not fork: gRPC threads do not survive a fork
        key_pem = pem.key_pem(ca.key)
        self._args = (pem.certs_pem([ca.cert]), key_pem, ca.trust_domain, str(db_path))
        self._queue: collections.deque[_Request] = collections.deque()
        self._queued = 0  # jobs waiting in _queue (a request without jobs counts as one)
        self._closed = False
        self._loop: asyncio.AbstractEventLoop | None = None
        self._workers = [self._spawn(i) for i in range(workers)]

    def _spawn(self, i: int) -> _WorkerPipe:
        parent, child = self._ctx.Pipe()
        proc = self._ctx.Process(target=_worker_main, args=(child, *self._args), name=f"tessera-signer-{i}",
                                 daemon=True)
        proc.start()
        child.close()
        pipe = _WorkerPipe(parent, proc)
        if self._loop is not None:
            self._attach(i, pipe)
        return pipe

    def _attach(self, i: int, pipe: _WorkerPipe) -> None:
        pipe.attach(self._loop, lambda message: self._answered(i, message), lambda error: self._died(i, error))

    @property
    def _procs(self) -> list:
        return [w.proc for w in self._workers]

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
            for i, pipe in enumerate(self._workers):
                self._attach(i, pipe)
        elif loop is not self._loop:
            raise RuntimeError("the signing pool serves the event loop it was first called from")
        req = _Request(list(jobs), list(audits), loop.create_future())
        self._queue.append(req)
        self._queued += max(1, len(req.jobs))
        self._dispatch()
        return await req.future

    def _dispatch(self) -> None:
        """Give queued requests to idle workers.

        While another worker is busy, requests wait for it unless there are enough to fill a
        chunk: each trip to a worker costs pickling and pipe writes here, so a second worker
        pays for itself only under batch-sized load. Waiting requests batch naturally.
        """
        failure = self._revive()
        while self._queue:
            # Afresh each time: a failed send below ends up here again, through _died.
            live = [w for w in self._workers if not w.closed]
            if not live:  # none could be started: nothing would ever answer these callers
                waiting, self._queue, self._queued = list(self._queue), collections.deque(), 0
                _resolve(waiting, RuntimeError(f"no signing worker could be started: {failure!r}"))
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
            self._queued -= sum(max(1, len(r.jobs)) for r in batch)
            pipe = idle[0]
            pipe.batch = batch
            pipe.send(([astuple_job(j) for r in batch for j in r.jobs], [a for r in batch for a in r.audits]))

    def _answered(self, i: int, answer: object) -> None:
        pipe = self._workers[i]
        batch, pipe.batch = pipe.batch, None
        self._dispatch()  # the worker starts on the next chunk while this one's callers are answered
        if batch is None:
            log.error("a signing worker answered without a chunk; ignored", worker=i)
            return
        if not isinstance(answer, BaseException):
            signed, records = answer
            try:
                # Committed: the listeners hear of it before any caller sees a certificate.
                self._committed([AuditRecord(*t) for t in records])
                answer = [Signed(*t) for t in signed]
            except Exception as e:  # noqa: BLE001 - whatever went wrong, this chunk's callers hear of it
                log.exception("relaying a signing worker's records failed; its callers get the error", worker=i)
                answer = e
        _resolve(batch, answer)

    def _died(self, i: int, error: BaseException) -> None:
        """Worker i's pipe failed (the worker died): its chunk's callers get the error, and it is replaced.

        A worker that died after its commit leaves recorded serials nobody holds.
        """
        batch, self._workers[i].batch = self._workers[i].batch, None
        if batch is not None:
            _resolve(batch, RuntimeError(f"signing worker {i} died: {error!r}"))
        self._dispatch()

    def _revive(self) -> BaseException | None:
        """Replace workers whose pipe failed; the error of the last replacement that failed, if any."""
        failure = None
        for i, pipe in enumerate(self._workers):
            if pipe.closed and not self._closed:
                try:
                    self._workers[i] = self._spawn(i)
                except OSError as e:  # e.g. out of processes: the next dispatch tries again
                    log.error("could not restart a signing worker", worker=i, error=repr(e))
                    failure = e
        return failure

    def close(self) -> None:
        self._closed = True
        pending = [*self._queue, *(r for w in self._workers if w.batch for r in w.batch)]
        self._queue.clear()
        if self._loop is not None and not self._loop.is_closed():
            _resolve(pending, RuntimeError("signing pool is closed"))
        for pipe in self._workers:
            pipe.close()  # the worker sees EOF and exits
        for pipe in self._workers:
            pipe.proc.join(timeout=5)
            if pipe.proc.is_alive():
                pipe.proc.kill()
                pipe.proc.join()


def _resolve(batch: list[_Request], answer: list[Signed] | BaseException) -> None:
    """Hand each request of a chunk its certificates, or the chunk's error (a caller that went away is skipped)."""
    k = 0
    for r in batch:
        start, k = k, k + len(r.jobs)
        if r.future.done():
            continue
        if isinstance(answer, BaseException):
            r.future.set_exception(answer)
        else:
            r.future.set_result(answer[start:k])
