"""CSR verification and certificate signing in worker processes, so every core signs.

The issuer's main process serves gRPC and holds the GIL for that; the per-CSR
crypto (verify the CSR, build and sign the leaf with the one profile builder via
CertificateAuthority.sign, DER-encode) runs in spawned workers that hold the CA
key in memory. Jobs from concurrent callers are coalesced into chunks, so a
unary call costs the main process a queue append and one wake-up, not a
round trip of its own to a worker.

Authorization stays in the main process (issuer/signing.py), and so does
recording: a worker only turns (CSR, SPIFFE ID, TTL) into a certificate, and
no certificate is handed back to a caller before its serial is committed.
Callers are coroutines on the gRPC event loop; the commit happens on a feeding
thread, never on the loop, and a whole chunk's callers are woken with one
call into their loop.
"""

from __future__ import annotations

import asyncio
import collections
import ctypes
import datetime as dt
import multiprocessing
import signal
import threading
from dataclasses import dataclass
from typing import Callable, Sequence

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.serialization import Encoding

from issuer.ca import CertificateAuthority
from tessera import pem, spiffeid, x509svid
from tessera.loops import call_on_loops

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


def astuple_signed(s: Signed) -> tuple:
    return (s.cert_der, s.serial, s.not_after, s.error)


# -- worker side ------------------------------------------------------------------------------

def _die_with_parent() -> None:
    # A worker holds the CA key: it must not outlive the issuer, even after kill -9.
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except OSError:
        pass


def _worker_main(conn, cert_pem: bytes, key_pem: bytes, trust_domain: str) -> None:
    _die_with_parent()
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the issuer decides when workers stop
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    key = serialization.load_pem_private_key(key_pem, password=None)
    ca = CertificateAuthority(x509.load_pem_x509_certificate(cert_pem), key, trust_domain)
    while True:
        try:
            jobs = [SignJob(*t) for t in conn.recv()]
        except (EOFError, OSError):
            return  # the issuer closed the pipe: stop
        try:
            # Plain tuples cross the pipe: pickling dataclasses costs the issuer's main process more.
            conn.send([astuple_signed(s) for s in sign_jobs(ca, jobs)])
        except Exception as e:  # noqa: BLE001 - reported to the caller, the worker carries on
            conn.send(RuntimeError(f"signing worker failed: {e!r}"))


# -- main-process side --------------------------------------------------------------------------

Finish = Callable[[list[Signed]], tuple[list, list, object]]  # signed -> (issued serials, audit events, answer)
Record = Callable[[list, list], None]  # durably record issued serials and audit events


class _Request:
    __slots__ = ("jobs", "finish", "future", "value", "error")

    def __init__(self, jobs: list[SignJob], finish: Finish, future: asyncio.Future):
        self.jobs = jobs
        self.finish = finish
        self.future = future
        self.value: object = None
        self.error: BaseException | None = None


def _resolve(batch: list[_Request]) -> None:
    """On the callers' loop: hand each request its answer (a caller that went away is skipped)."""
    for r in batch:
        if r.future.done():
            continue
        if r.error is not None:
            r.future.set_exception(r.error)
        else:
            r.future.set_result(r.value)


class SigningPool:
    """Signs jobs in `workers` processes and records what was signed before anyone sees it.

    Per worker process, a feeding thread takes whatever requests are queued (up to
    CHUNK_MAX jobs), sends them down the worker's pipe, turns the answers into records
    with each request's `finish`, records the whole chunk in one commit, and only then
    resolves the callers' futures. A caller costs one queue append; a chunk, one commit
    and one wake-up of the event loop.
    """

    def __init__(self, ca: CertificateAuthority, workers: int, record: Record):
        self._record = record
        self._ctx = multiprocessing.get_context("spawn")  # not fork: gRPC threads do not survive a fork
        key_pem = pem.key_pem(ca.key)
        self._args = (pem.certs_pem([ca.cert]), key_pem, ca.trust_domain)
        self._cond = threading.Condition()
        self._queue: collections.deque[_Request] = collections.deque()
        self._closed = False
        self._busy = 0  # feeders with a chunk at their worker
        self._queued = 0  # jobs waiting in _queue (a request without jobs counts as one)
        self._procs: list = []
        self._conns: list = []
        self._threads: list[threading.Thread] = []
        for i in range(workers):
            conn, proc = self._spawn(i)
            self._conns.append(conn)
            self._procs.append(proc)
            t = threading.Thread(target=self._feed, args=(i,), name=f"signing-feed-{i}", daemon=True)
            t.start()
            self._threads.append(t)

    def _spawn(self, i: int):
        parent, child = self._ctx.Pipe()
        proc = self._ctx.Process(target=_worker_main, args=(child, *self._args), name=f"tessera-signer-{i}",
                                 daemon=True)
        proc.start()
        child.close()
        return parent, proc

    async def sign_and_record(self, jobs: Sequence[SignJob], finish: Finish):
        """Sign `jobs`, record what `finish` makes of the results, and return its answer.

        A request with no jobs (every item denied) still goes through a feeder: its audit
        records are a commit, which does not belong on the event loop.
        """
        req = _Request(list(jobs), finish, asyncio.get_running_loop().create_future())
        with self._cond:
            if self._closed:
                raise RuntimeError("signing pool is closed")
            self._queue.append(req)
            self._queued += max(1, len(req.jobs))
            if self._worker_may_take():  # else no idle feeder may take it: let them sleep
                self._cond.notify()
        return await req.future

    def _worker_may_take(self) -> bool:
        """Under self._cond: an idle worker may take what is queued (see _take)."""
        return not self._busy or self._queued >= CHUNK_MIN

    def _take(self) -> list[_Request] | None:
        with self._cond:
            # While another worker is busy, requests wait for it unless there are enough to fill a chunk:
            # each trip to a worker costs pickling, pipe writes and wake-ups in this process, so a second
            # worker pays for itself only under batch-sized load. Waiting requests batch naturally.
            while not self._closed and not (self._queue and self._worker_may_take()):
                self._cond.wait()
            if self._closed:
                return None
            # Coalesce whole requests up to CHUNK_MAX jobs (a larger request goes alone).
            batch = [self._queue.popleft()]
            size = len(batch[0].jobs)
            while self._queue and size + len(self._queue[0].jobs) <= CHUNK_MAX:
                size += len(self._queue[0].jobs)
                batch.append(self._queue.popleft())
            self._queued -= sum(max(1, len(r.jobs)) for r in batch)
            self._busy += 1
            return batch

    def _feed(self, i: int) -> None:
        while (batch := self._take()) is not None:
            jobs = [j for r in batch for j in r.jobs]
            try:
                answer = []
                if jobs:
                    self._conns[i].send([(j.csr_der, j.spiffe_id, j.ttl, j.not_after_cap) for j in jobs])
                    answer = self._conns[i].recv()
                    if isinstance(answer, list):
                        answer = [Signed(*t) for t in answer]
            except (EOFError, OSError) as e:
                answer = RuntimeError(f"signing worker {i} died: {e!r}")
                if not self._closed:  # replace it; the callers of this batch get the error
                    self._conns[i].close()
                    self._conns[i], self._procs[i] = self._spawn(i)
            with self._cond:
                self._busy -= 1  # this feeder takes what is queued next; the others need no wake-up
            # Finishing here rather than on another thread saves a hand-off per chunk; meanwhile the
            # other workers' feeders keep signing.
            self._complete(batch, answer)

    def _complete(self, batch: list[_Request], answer: list[Signed] | BaseException) -> None:
        issued: list = []
        audits: list = []
        ok: list[_Request] = []
        k = 0
        for r in batch:
            if isinstance(answer, BaseException):
                r.error = answer
                continue
            try:
                r_issued, r_audits, r.value = r.finish(answer[k:k + len(r.jobs)])
            except Exception as e:  # noqa: BLE001 - this caller's error only
                r.error = e
            else:
                issued += r_issued
                audits += r_audits
                ok.append(r)
            k += len(r.jobs)
        if issued or audits:
            try:
                self._record(issued, audits)
            except BaseException as e:  # noqa: BLE001 - nothing of this chunk leaves unrecorded
                for r in ok:
                    r.error = e
        call_on_loops(batch, lambda r: r.future.get_loop(), _resolve)

    def close(self) -> None:
        with self._cond:
            self._closed = True
            pending, self._queue = list(self._queue), collections.deque()
            self._cond.notify_all()
        for r in pending:
            r.error = RuntimeError("signing pool is closed")
        call_on_loops(pending, lambda r: r.future.get_loop(), _resolve)
        for t in self._threads:
            t.join(timeout=5)
        for conn in self._conns:
            conn.close()  # the worker sees EOF and exits
        for proc in self._procs:
            proc.join(timeout=5)
            if proc.is_alive():
                proc.kill()
                proc.join()
