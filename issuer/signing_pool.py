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
answers. The worker returns the audit records it committed, and the main process
hands them to the store's listeners (the JSON-lines file, metrics) before waking
the callers, one call into their loop per chunk.
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
from issuer.datastore import Datastore
from issuer.models import Actor, AuditEvent, AuditRecord, IssuedSerial
from tessera import logs, pem, spiffeid, x509svid
from tessera.errors import TesseraError
from tessera.loops import call_on_loops

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


class _Request:
    __slots__ = ("jobs", "audits", "future", "value", "error")

    def __init__(self, jobs: list[SignJob], audits: list[AuditEvent], future: asyncio.Future):
        self.jobs = jobs
        self.audits = audits
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
    CHUNK_MAX jobs) and sends them down the worker's pipe; the worker signs them and
    commits the whole chunk's records in one transaction to the database at `db_path`,
    then answers. The feeder passes the committed audit records to `committed` and only
    then resolves the callers' futures. A caller costs one queue append; a chunk, one
    pipe round trip and one wake-up of the event loop.
    """

    def __init__(self, ca: CertificateAuthority, workers: int, db_path: str, committed: Committed):
        self._committed = committed
        self._ctx = multiprocessing.get_context("spawn")  # not fork: gRPC threads do not survive a fork
        key_pem = pem.key_pem(ca.key)
        self._args = (pem.certs_pem([ca.cert]), key_pem, ca.trust_domain, str(db_path))
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

    async def sign_and_record(self, jobs: Sequence[SignJob], audits: Sequence[AuditEvent] = ()) -> list[Signed]:
        """Sign `jobs`, commit their serials and issuance records together with `audits`, and return them.

        A request with no jobs (every item denied) still goes through a worker: its audit
        records are a commit, which does not belong on the event loop.
        """
        req = _Request(list(jobs), list(audits), asyncio.get_running_loop().create_future())
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
            try:
                answer = self._trip(i, batch)
            except BaseException as e:  # noqa: BLE001 - whatever went wrong, this batch's callers hear of it
                answer = e if isinstance(e, Exception) else RuntimeError(f"signing feeder {i} failed: {e!r}")
                log.exception("signing feeder failed; its callers get the error", worker=i)
            with self._cond:
                self._busy -= 1  # this feeder takes what is queued next; the others need no wake-up
            # Finishing here rather than on another thread saves a hand-off per chunk; meanwhile the
            # other workers' feeders keep signing.
            self._complete(batch, answer)

    def _trip(self, i: int, batch: list[_Request]) -> list[Signed] | BaseException:
        """Send a batch to worker i and take its answer: certificates whose records it committed, or an error."""
        jobs = [astuple_job(j) for r in batch for j in r.jobs]
        try:
            self._conns[i].send((jobs, [a for r in batch for a in r.audits]))
            answer = self._conns[i].recv()
        except (EOFError, OSError) as e:
            if not self._closed:  # replace it; the callers of this batch get the error
                self._conns[i].close()
                try:
                    self._conns[i], self._procs[i] = self._spawn(i)
                except OSError as spawn_error:  # e.g. out of processes: the next batch tries again
                    log.error("could not restart a signing worker", worker=i, error=repr(spawn_error))
            return RuntimeError(f"signing worker {i} died: {e!r}")
        if isinstance(answer, BaseException):
            return answer
        signed, records = answer
        # Committed: the listeners hear of it before any caller sees a certificate.
        self._committed([AuditRecord(*t) for t in records])
        return [Signed(*t) for t in signed]

    def _complete(self, batch: list[_Request], answer: list[Signed] | BaseException) -> None:
        k = 0
        for r in batch:
            if isinstance(answer, BaseException):  # no certificate of this chunk leaves (a worker that died
                r.error = answer                       # after its commit leaves recorded serials nobody holds)
                continue
            r.value = answer[k:k + len(r.jobs)]
            k += len(r.jobs)
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
