"""The grpc.aio servicer sidecars call. Thin: authenticate, translate, delegate.

Handlers run on the issuer's event loop. What blocks (a commit, a CA signature) runs on
the loop's executor; identity signing goes through the signing pool, whose worker
processes sign and commit. Sync streams and waits for an approval are coroutines, so
they cost no thread.
"""

from __future__ import annotations

import asyncio
import contextlib
import time

import grpc

from issuer import metrics
from issuer.api.convert import crl_set_pb, entry_pb
from issuer.ca.authorities import Authorities
from issuer.core.events import CLOSE, EventHub
from issuer.core.models import Actor, Sidecar
from issuer.identity.attestation import SidecarAttestor
from issuer.identity.registration import Registry
from issuer.issuance.signer import SvidSigner
from issuer.revocation.service import RevocationService
from issuer.tasks.service import TaskService
from tessera import logs, pem
from tessera.errors import PermissionDenied
from tessera.rpc import grpcio_handler
from tessera.taskspec import TaskSpec
from tessera.v1 import issuer_pb2, issuer_pb2_grpc, task_pb2

log = logs.get("sidecar-api")


def peer_cert_pem(context: grpc.ServicerContext) -> bytes | None:
    values = context.auth_context().get("x509_pem_cert")
    return values[0] if values else None


def _log_touch_failure(done: asyncio.Future) -> None:
    if not done.cancelled() and done.exception() is not None:
        log.error("could not record that a sidecar was seen", error=repr(done.exception()))


class IssuerService(issuer_pb2_grpc.IssuerServicer):
    def __init__(self, attestor: SidecarAttestor, signer: SvidSigner, registry: Registry, hub: EventHub,
                 authorities: Authorities, revocation: RevocationService, tasks: TaskService, resync_interval: int):
        self.attestor = attestor
        self.signer = signer
        self.registry = registry
        self.hub = hub
        self.authorities = authorities
        self.revocation = revocation
        self.tasks = tasks
        self.resync_interval = resync_interval

    def _caller(self, context) -> Sidecar:
        sidecar = self.attestor.authenticate(peer_cert_pem(context), self.revocation)
        if self.attestor.touch_due(sidecar.id):
            # A write, at most once a minute per sidecar: off the loop, and nobody waits for it.
            done = asyncio.get_running_loop().run_in_executor(None, self.attestor.touch, sidecar.id)
            done.add_done_callback(_log_touch_failure)
        return sidecar

    def _svid_response(self, svid) -> issuer_pb2.SidecarSVIDResponse:
        return issuer_pb2.SidecarSVIDResponse(
            sidecar_id=svid.sidecar_id, svid_chain=pem.der_concat(svid.chain), bundle=self.authorities.bundle_der)

    @grpcio_handler
    async def AttestSidecar(self, request, context):
        t0 = time.monotonic()
        svid = await asyncio.to_thread(self.attestor.attest, request.join_token, request.csr, context.peer())
        metrics.observe_issuance_latency("sidecar", time.monotonic() - t0)
        return self._svid_response(svid)

    @grpcio_handler
    async def RenewSidecar(self, request, context):
        t0 = time.monotonic()
        svid = await asyncio.to_thread(self.attestor.renew, self._caller(context), request.csr)
        metrics.observe_issuance_latency("sidecar", time.monotonic() - t0)
        return self._svid_response(svid)

    @grpcio_handler
    async def SignX509SVIDs(self, request, context):
        t0 = time.monotonic()
        sidecar = self._caller(context)
        results = await self.signer.sign_batch(sidecar, [(i.entry_id, i.csr) for i in request.items])
        metrics.observe_issuance_latency("identity", time.monotonic() - t0, sum(1 for r in results if not r.code))
        return issuer_pb2.SignX509SVIDsResponse(items=[
            issuer_pb2.SignedSVID(entry_id=r.entry_id, spiffe_id=r.spiffe_id, cert_chain=r.chain_der,
                                  serial=r.serial, expires_at=r.expires_at, status_code=r.code, error=r.error)
            for r in results
        ])

    def snapshot(self, sidecar_id: str) -> issuer_pb2.SyncEvent:
        return issuer_pb2.SyncEvent(snapshot=issuer_pb2.EntrySnapshot(
            entries=[entry_pb(e) for e in self.registry.list(parent_id=sidecar_id)],
            bundle=self.authorities.bundle_der))

    def event_message(self, event) -> issuer_pb2.SyncEvent | None:
        kind, payload, committed_at = event
        if kind == "entry_upsert":
            return issuer_pb2.SyncEvent(entry_upsert=entry_pb(payload), committed_at=committed_at)
        if kind == "entry_deleted":
            return issuer_pb2.SyncEvent(entry_deleted=payload, committed_at=committed_at)
        if kind == "revocation":
            return issuer_pb2.SyncEvent(revocation=issuer_pb2.Revocation(
                seq=payload.seq, serials=payload.serials, entry_ids=payload.entry_ids,
                spiffe_ids=payload.spiffe_ids, reason=payload.reason), committed_at=committed_at)
        if kind == "crls":
            return issuer_pb2.SyncEvent(crls=crl_set_pb(payload), committed_at=committed_at)
        if kind == "bundle":
            return issuer_pb2.SyncEvent(bundle=payload, committed_at=committed_at)
        if kind == "taint":
            return issuer_pb2.SyncEvent(taint=issuer_pb2.Taint(authority_ids=payload), committed_at=committed_at)
        return None

    def full_state(self, sidecar_id: str) -> list[issuer_pb2.SyncEvent]:
        """The snapshot, the CRL set, and the authorities tainted or revoked now: how a sidecar that was offline (or
        drifted) catches up, a taint it missed included (it replaces what they signed; one holding none does nothing)."""
        state = [self.snapshot(sidecar_id), issuer_pb2.SyncEvent(crls=crl_set_pb(self.revocation.crl_set()))]
        withdrawn = self.authorities.withdrawn()
        if withdrawn:
            state.append(issuer_pb2.SyncEvent(taint=issuer_pb2.Taint(authority_ids=withdrawn)))
        return state

    @grpcio_handler
    async def FetchCRL(self, request, context):
        self._caller(context)
        return issuer_pb2.FetchCRLResponse(crls=crl_set_pb(self.revocation.crl_set()))

    @grpcio_handler
    async def Sync(self, request, context):
        sidecar = self._caller(context)
        # Subscribe before the snapshot so nothing committed in between is missed. A caller that goes
        # away cancels this coroutine, and the finally clause drops the subscription.
        sub = self.hub.subscribe(sidecar.id)
        try:
            for msg in self.full_state(sidecar.id):
                yield msg
            next_resync = time.monotonic() + self.resync_interval
            while True:
                event = await sub.get(timeout=max(0.0, next_resync - time.monotonic()))
                if event is CLOSE:
                    raise PermissionDenied(f"sidecar {sidecar.id} is banned")
                if event is None:
                    # Anti-entropy only: changes already arrive pushed.
                    for msg in self.full_state(sidecar.id):
                        yield msg
                    next_resync = time.monotonic() + self.resync_interval
                    continue
                msg = self.event_message(event)
                if msg is not None:
                    yield msg
        finally:
            sub.close()

    @grpcio_handler
    async def RequestTaskSVID(self, request, context):
        sidecar = self._caller(context)
        spec = TaskSpec.from_proto(request)
        # A caller that goes away cancels this coroutine; closing the steps withdraws an approval request at once.
        async with contextlib.aclosing(self.tasks.request(sidecar, spec)) as steps:
            async for kind, value in steps:
                if kind == "pending":
                    yield issuer_pb2.TaskSVIDUpdate(pending=task_pb2.TaskPending(
                        approval_id=value.id, reason=value.reason, expires_at=value.expires_at))
                else:
                    yield issuer_pb2.TaskSVIDUpdate(svid=issuer_pb2.SignedTaskSVID(
                        entry_id=value.entry_id, spiffe_id=value.spiffe_id, cert_chain=value.chain_der,
                        serial=value.serial, expires_at=value.expires_at, scopes=list(value.scopes),
                        task_id=value.task_id))
                    return

    @grpcio_handler
    async def ReissueTaskSVID(self, request, context):
        sidecar = self._caller(context)
        svid = await asyncio.to_thread(self.tasks.reissue, sidecar, request.cert_chain, request.csr)
        return issuer_pb2.SignedTaskSVID(entry_id=svid.entry_id, spiffe_id=svid.spiffe_id, cert_chain=svid.chain_der,
                                         serial=svid.serial, expires_at=svid.expires_at, scopes=list(svid.scopes),
                                         task_id=svid.task_id)

    @grpcio_handler
    async def EndTask(self, request, context):
        sidecar = self._caller(context)
        revoked = await asyncio.to_thread(self.tasks.end, sidecar, request.task_id, request.entry_id, request.reason,
                                       Actor("sidecar", sidecar.id))
        return task_pb2.EndTaskResponse(revoked_serials=revoked)
