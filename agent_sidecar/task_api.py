"""Tessera's task API on the sidecar's socket: per-task credentials for attested workloads.

The caller is attested from the kernel as for the Workload API; the sidecar
picks the caller's entry from those selectors (the request may name one of its
SPIFFE IDs), generates the task key here, and forwards the request with the
selectors and process details to the issuer, which decides. Pending updates are
relayed as they come, so a caller waiting for approval holds one stream and
never polls.

Each task is tied to a process (the caller, or its parent for shell helpers),
watched with a pidfd on the event loop: when it exits, its tasks end and their
serials are revoked on the issuer. The table lives in memory: tasks started
before a sidecar restart are bounded by their TTL only.

When the authority that signed a task credential is tainted, the sidecar has it signed again
(ReissueTaskSVID: same task, new key) at once, and sends the new credential on the caller's
StartTask stream if the caller still holds it open: the stream stays open after the first
credential until the task ends or expires. Callers that want one credential read one and cancel,
as every client in this repository does.
"""

from __future__ import annotations

import asyncio
import os
import time
from dataclasses import dataclass, replace

import grpc

from agent_sidecar.attestation import AttestedPeer, Workload, alive
from agent_sidecar.cache import CacheManager
from agent_sidecar.issuer_client import IssuerClient
from agent_sidecar.socket_server import current_peer
from agent_sidecar.workload_api import caller
from tessera import chain, logs, pem, x509svid
from tessera.errors import Code, NotFound, PermissionDenied, TesseraError, Unavailable, for_code
from tessera.rpc import grpclib_handler
from tessera.taskspec import TaskSpec
from tessera.v1 import task_grpc, task_pb2

log = logs.get("sidecar.task_api")

END_RETRIES = 5


@dataclass(frozen=True)
class LiveTask:
    task_id: str
    entry_id: str
    serial: str
    pid: int
    expires_at: int
    cert_chain: bytes = b""  # DER, leaf first: what ReissueTaskSVID is shown
    authorities: frozenset[str] = frozenset()  # ids of the authorities above it: what a taint names

    @property
    def key(self) -> tuple[str, str]:
        return (self.entry_id, self.task_id)


def _signers_of(chain_der: bytes) -> frozenset[str]:
    try:
        return chain.signers(pem.split_der(chain_der))
    except ValueError:
        return frozenset()


def _ppid(pid: int) -> int:
    with open(f"/proc/{pid}/stat") as f:
        stat = f.read()
    # The command name may hold spaces and parentheses: fields resume after the last ')'.
    return int(stat[stat.rindex(")") + 2:].split()[1])


def owner_pidfd(peer: AttestedPeer, parent: bool) -> tuple[int, int]:
    """(pid, pidfd) of the process a task is tied to: the caller, or the caller's parent.

    The caller's pidfd is the one its connection was attested with, never one opened from a pid
    number that may have been recycled. The parent's is opened by number, then trusted only if the
    caller is still alive with the same parent: a living process's parent changes only by exiting.
    """
    wl = peer.workload
    if peer.pidfd is None or not alive(peer.pidfd):
        raise PermissionDenied("the calling process exited during the request")
    if not parent:
        return wl.pid, os.dup(peer.pidfd)
    ppid = _ppid(wl.pid)
    fd = os.pidfd_open(ppid)
    if not alive(peer.pidfd) or _ppid(wl.pid) != ppid:
        os.close(fd)
        raise PermissionDenied("the calling process's parent changed during the request")
    return ppid, fd


def _issuer_error(e: grpc.aio.AioRpcError) -> TesseraError:
    """Relay the issuer's status and message; the issuer's words are the rule's reason."""
    code = e.code()
    return for_code(code.value[0] if code is not None else Code.UNKNOWN, e.details() or code.name)


def _new_key_and_csr() -> tuple:
    key = x509svid.new_key()
    return key, x509svid.make_csr(key)


class TaskAPI(task_grpc.TasksBase):
    def __init__(self, cache: CacheManager, client: IssuerClient):
        self.cache = cache
        self.client = client
        self.tasks: dict[tuple[str, str], LiveTask] = {}  # (entry_id, task_id) -> task
        self._watched: dict[int, int] = {}  # pid -> pidfd
        self._background: set[asyncio.Task] = set()
        # (entry_id, task_id) -> the open StartTask stream's queue of replacement credentials (None: the task ended)
        self._streams: dict[tuple[str, str], asyncio.Queue] = {}
        self._spare: tuple | None = None  # a fresh key and its CSR, made after a task's credential went out

    def _key_and_csr(self) -> tuple:
        """A key no one has seen, and its CSR: the spare if there is one (each is used once), else made now."""
        spare, self._spare = self._spare, None
        return spare or _new_key_and_csr()

    def _make_spare(self) -> None:
        if self._spare is None:
            self._spare = _new_key_and_csr()

    async def _caller(self, stream):
        return await caller(stream, self.cache)

    def _entry(self, wl: Workload, spiffe_id: str):
        entries = self.cache.matching(wl.selectors)
        if spiffe_id:
            entries = [e for e in entries if e.spiffe_id == spiffe_id]
        if not entries:
            raise PermissionDenied("no identity issued" + (f" for {spiffe_id}" if spiffe_id else ""))
        return entries[0]

    @grpclib_handler
    async def StartTask(self, stream) -> None:
        req, wl = await self._caller(stream)
        entry = self._entry(wl, req.spiffe_id)
        try:
            pid, pidfd = owner_pidfd(current_peer(), req.bind_to_parent)
        except OSError as e:
            raise PermissionDenied(f"cannot watch the task's process: {e}") from None
        try:
            key, csr = self._key_and_csr()
            spec = TaskSpec(
                entry_id=entry.id, task_id=req.task_id, scopes=tuple(req.scopes), ttl=req.ttl_seconds,
                context=dict(req.context), csr=csr, selectors=frozenset(wl.selectors),
                workload={"pid": wl.pid, "uid": wl.uid, "gid": wl.gid, "exe": wl.exe or ""}).to_proto()
            svid = await self._request(stream, req.task_id, spec)
            if svid is None:
                raise Unavailable("the issuer ended the task request without an answer")
            task = LiveTask(svid.task_id, svid.entry_id, svid.serial, pid, svid.expires_at, svid.cert_chain,
                            _signers_of(svid.cert_chain))
            self.tasks[task.key] = task
            self._watch(pid, pidfd)
            pidfd = -1
            log.info("task credential issued", task_id=task.task_id, serial=task.serial, pid=pid)
            replacements: asyncio.Queue = asyncio.Queue()
            self._streams[task.key] = replacements
            try:
                await stream.send_message(task_pb2.TaskUpdate(credential=self._credential(svid, key)))
                # Key generation and the CSR's signature (~0.15 ms) leave the next caller's path.
                asyncio.get_running_loop().call_soon(self._make_spare)
                await self._send_replacements(stream, task, replacements)
            finally:
                if self._streams.get(task.key) is replacements:
                    del self._streams[task.key]
        finally:
            if pidfd >= 0:
                os.close(pidfd)

    async def _request(self, stream, task_id: str, spec):
        """The issuer's credential for `spec` (None if it ended the request without one), pending updates relayed.

        A request lost with its issuer (unreachable, before any answer) is asked once more of another issuer, the
        one the client moves to. Safe: an issuer refuses a second live credential for one task (AlreadyExists, a clear
        answer) if the lost one was committed; a credential committed but never delivered is for a key only this
        sidecar held, and EndTask revokes every credential of the task. Once the issuer said "pending", a human
        may be deciding there: the caller gets the error rather than a second approval request behind its back."""
        for attempt in (1, 2):
            address = self.client.address
            call = self.client.request_task(spec)
            pending = False
            try:
                async for update in call:
                    if update.WhichOneof("update") == "pending":
                        pending = True
                        log.info("task awaiting approval", task_id=task_id, approval_id=update.pending.approval_id)
                        await stream.send_message(task_pb2.TaskUpdate(pending=update.pending))
                        continue
                    return update.svid
                return None
            except grpc.aio.AioRpcError as e:
                if e.code() == grpc.StatusCode.UNAVAILABLE and not pending and attempt == 1:
                    now = await self.client.leave(address)
                    if now is not None and now != address:  # (an issuer answering UNAVAILABLE itself stays)
                        log.warning("task request lost with its issuer; asking again", task_id=task_id,
                                    issuer=address, now=now, error=e.details())
                        continue
                raise _issuer_error(e) from None
            finally:
                call.cancel()  # the caller left: the issuer withdraws a pending request
        return None

    def _credential(self, svid, key) -> task_pb2.TaskCredential:
        return task_pb2.TaskCredential(
            task_id=svid.task_id, spiffe_id=svid.spiffe_id, cert_chain=svid.cert_chain,
            key=pem.key_pkcs8_der(key), bundle=self.cache.bundle_der, serial=svid.serial,
            expires_at=svid.expires_at, scopes=list(svid.scopes), entry_id=svid.entry_id)

    async def _send_replacements(self, stream, task: LiveTask, replacements: asyncio.Queue) -> None:
        """Hold the stream open while the task lives, sending each re-issued credential; end it with the task."""
        while True:
            current = self.tasks.get(task.key)
            left = (current or task).expires_at - time.time()
            if current is None or left <= 0:
                return
            try:
                cred = await asyncio.wait_for(replacements.get(), left)
            except asyncio.TimeoutError:
                return
            if cred is None:
                return
            await stream.send_message(task_pb2.TaskUpdate(credential=cred))

    # -- taint ---------------------------------------------------------------------------------

    def taint(self, authority_ids: set[str]) -> int:
        """Have every live task credential one of `authority_ids` signed signed again now; returns how many."""
        due = [t for t in self.tasks.values() if t.authorities & authority_ids and t.expires_at > time.time()]
        for t in due:
            self._in_background(self._reissue(t))
        return len(due)

    async def _reissue(self, task: LiveTask) -> None:
        for attempt in range(END_RETRIES):
            if self.tasks.get(task.key) is not task or task.expires_at <= time.time():
                return  # ended, expired, or replaced meanwhile
            key, csr = self._key_and_csr()
            try:
                svid = await self.client.reissue_task(task.cert_chain, csr)
            except grpc.aio.AioRpcError as e:
                log.warning("could not have a tainted task credential signed again; retrying", task_id=task.task_id,
                            serial=task.serial, code=e.code().name, error=e.details())
                await asyncio.sleep(min(5.0, 0.5 * 2 ** attempt))
                continue
            if self.tasks.get(task.key) is not task:
                return  # ended while the issuer signed: the new credential is not handed out
            new = replace(task, serial=svid.serial, expires_at=svid.expires_at, cert_chain=svid.cert_chain,
                          authorities=_signers_of(svid.cert_chain))
            self.tasks[task.key] = new
            queue = self._streams.get(task.key)
            if queue is not None:
                queue.put_nowait(self._credential(svid, key))
            log.info("tainted task credential replaced", task_id=task.task_id, old_serial=task.serial,
                     serial=new.serial, delivered=queue is not None)
            return
        log.error("gave up replacing a tainted task credential", task_id=task.task_id, serial=task.serial)

    def _in_background(self, coro) -> None:
        job = asyncio.get_running_loop().create_task(coro)
        self._background.add(job)  # keep a reference until done, and cancel it on close
        job.add_done_callback(self._background.discard)

    @grpclib_handler
    async def EndTask(self, stream) -> None:
        req, wl = await self._caller(stream)
        mine = {e.id for e in self.cache.matching(wl.selectors)}
        found = [t for (eid, tid), t in self.tasks.items() if tid == req.task_id and eid in mine]
        if not found:
            raise NotFound(f"no task {req.task_id!r} of yours is live on this sidecar")
        revoked: list[str] = []
        for t in found:
            revoked += await self._end(t, "task ended by the workload")
        await stream.send_message(task_pb2.EndTaskResponse(revoked_serials=revoked))

    async def _end(self, task: LiveTask, reason: str) -> list[str]:
        try:
            revoked = await self.client.end_task(task.task_id, task.entry_id, reason)
        except grpc.aio.AioRpcError as e:
            raise _issuer_error(e) from None
        self._forget(task.key)
        log.info("task ended", task_id=task.task_id, serial=task.serial, reason=reason)
        return revoked

    # -- process exit ----------------------------------------------------------------------

    def _watch(self, pid: int, pidfd: int) -> None:
        if pid in self._watched:
            os.close(pidfd)
            return
        self._watched[pid] = pidfd
        # A pidfd becomes readable when its process exits (at once if it already has).
        asyncio.get_running_loop().add_reader(pidfd, self._exited, pid)

    def _exited(self, pid: int) -> None:
        fd = self._watched.pop(pid, None)
        if fd is None:
            return
        loop = asyncio.get_running_loop()
        loop.remove_reader(fd)
        os.close(fd)
        tasks = [t for t in self.tasks.values() if t.pid == pid]
        if tasks:
            self._in_background(self._end_for_exit(pid, tasks))

    async def _end_for_exit(self, pid: int, tasks: list[LiveTask]) -> None:
        for t in tasks:
            for attempt in range(END_RETRIES):
                try:
                    await self._end(t, f"process {pid} exited")
                    break
                except TesseraError as e:
                    if e.code == Code.NOT_FOUND or t.expires_at <= time.time():
                        self._forget(t.key)
                        break
                    log.warning("could not end task after process exit; retrying", task_id=t.task_id,
                                error=e.message)
                    await asyncio.sleep(min(5.0, 0.5 * 2 ** attempt))

    def _forget(self, key: tuple[str, str]) -> None:
        """The task is over: out of the table, and its open StartTask stream (if any) ends."""
        self.tasks.pop(key, None)
        queue = self._streams.pop(key, None)
        if queue is not None:
            queue.put_nowait(None)

    def close(self) -> None:
        loop = asyncio.get_running_loop()
        for pid, fd in list(self._watched.items()):
            loop.remove_reader(fd)
            os.close(fd)
        self._watched.clear()
        for job in self._background:
            job.cancel()
