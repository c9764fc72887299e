"""The operator API on the admin Unix socket (grpclib, so the caller's uid comes from the kernel).

Thin handlers: check the operator, translate, delegate to the services (in a
worker thread, since they touch the database). A taint or revoke answers only once the CRLs are
re-signed with the new set, and a taint only once the sidecars have been told to replace what
the tainted authorities signed: when `tessera ca taint` returns, the replacement is under way.
"""

from __future__ import annotations

import asyncio
import time

from cryptography.hazmat.primitives.serialization import Encoding

from issuer.api.convert import entry_pb, sidecar_pb
from issuer.api.evidence import Evidence, EvidenceHandlers
from issuer.ca.authorities import Authorities, expired
from issuer.core.events import EventHub
from issuer.core.models import Actor, ApprovalRequest, Authority
from issuer.identity.attestation import SidecarAttestor
from issuer.identity.registration import Registry, bounded_ref, optional_text, required_text
from issuer.revocation.service import CrlInfo, RevocationService
from issuer.tasks.approvals import Approvals
from tessera import peercred
from tessera.errors import ConfigError, FailedPrecondition, InvalidArgument, PermissionDenied
from tessera.rpc import grpclib_handler
from tessera.v1 import admin_grpc, admin_pb2, types_pb2


# An offline root's certificate for one intermediate (a PEM chain at most): anything far larger is not one.
MAX_CERT_PEM = 64 * 1024


class AdminService(EvidenceHandlers, admin_grpc.AdminBase):
    def __init__(self, registry: Registry, attestor: SidecarAttestor, hub: EventHub, authorities: Authorities,
                 approvals: Approvals, revocation: RevocationService, evidence: Evidence,
                 allowed_uids: tuple[int, ...]):
        self.registry = registry
        self.attestor = attestor
        self.hub = hub
        self.authorities = authorities
        self.approvals = approvals
        self.revocation = revocation
        self.evidence = evidence
        self.allowed_uids = set(allowed_uids)

    def operator(self, stream) -> Actor:
        cred = peercred.from_grpclib_stream(stream)
        if cred.uid not in self.allowed_uids:
            raise PermissionDenied(f"uid {cred.uid} is not an operator of this issuer")
        return Actor("operator", f"uid:{cred.uid}", {"pid": cred.pid})

    @grpclib_handler
    async def CreateJoinToken(self, stream):
        req = await stream.recv_message()
        actor = self.operator(stream)
        token, sid, exp = await asyncio.to_thread(self.attestor.create_token, req.sidecar_name, req.ttl_seconds, actor)
        await stream.send_message(admin_pb2.CreateJoinTokenResponse(token=token, sidecar_id=sid, expires_at=exp))

    @grpclib_handler
    async def CreateEntry(self, stream):
        req = await stream.recv_message()
        actor = self.operator(stream)
        entry = await asyncio.to_thread(
            self.registry.create, spiffe_id=req.spiffe_id, parent=req.parent_id, selectors=list(req.selectors),
            owner=req.owner, purpose=req.purpose, expires_at=req.expires_at, actor=actor, tier=req.tier,
            scopes=list(req.scopes), x509_ttl=req.x509_ttl_seconds)
        await stream.send_message(entry_pb(entry))

    @grpclib_handler
    async def UpdateEntry(self, stream):
        req = await stream.recv_message()
        actor = self.operator(stream)
        changes = {
            "owner": req.owner if req.HasField("owner") else None,
            "purpose": req.purpose if req.HasField("purpose") else None,
            "tier": req.tier if req.HasField("tier") else None,
            "scopes": list(req.scopes.values) if req.HasField("scopes") else None,
            "selectors": list(req.selectors.values) if req.HasField("selectors") else None,
            "x509_ttl": req.x509_ttl_seconds if req.HasField("x509_ttl_seconds") else None,
            "expires_at": req.expires_at if req.HasField("expires_at") else None,
            "state": req.state if req.HasField("state") else None,
        }
        entry = await asyncio.to_thread(self.registry.update, req.id, actor, reason=req.reason, **changes)
        await stream.send_message(entry_pb(entry))

    @grpclib_handler
    async def DeleteEntry(self, stream):
        req = await stream.recv_message()
        actor = self.operator(stream)
        await asyncio.to_thread(self.registry.delete, req.id, actor)
        await stream.send_message(types_pb2.Empty())

    @grpclib_handler
    async def GetEntry(self, stream):
        req = await stream.recv_message()
        self.operator(stream)
        await stream.send_message(entry_pb(self.registry.require(req.id)))

    @grpclib_handler
    async def ListEntries(self, stream):
        req = await stream.recv_message()
        self.operator(stream)
        now = int(time.time())
        entries = self.registry.list()
        if req.expired_only:
            entries = [e for e in entries if e.expires_at <= now]
        await stream.send_message(admin_pb2.ListEntriesResponse(entries=[entry_pb(e) for e in entries]))

    @grpclib_handler
    async def ListSidecars(self, stream):
        await stream.recv_message()
        self.operator(stream)
        connected = self.hub.connected()
        await stream.send_message(admin_pb2.ListSidecarsResponse(
            sidecars=[sidecar_pb(s, s.id in connected) for s in self.attestor.list()]))

    @grpclib_handler
    async def GetSidecar(self, stream):
        req = await stream.recv_message()
        self.operator(stream)
        s = self.attestor.get(bounded_ref("sidecar", req.id))
        await stream.send_message(sidecar_pb(s, s.id in self.hub.connected()))

    @grpclib_handler
    async def GetBundle(self, stream):
        await stream.recv_message()
        self.operator(stream)
        await stream.send_message(admin_pb2.Bundle(pem=self.authorities.bundle_pem.decode()))

    @grpclib_handler
    async def ListApprovals(self, stream):
        await stream.recv_message()
        self.operator(stream)
        pending = await asyncio.to_thread(self.approvals.list)  # a read of the store: off the event loop
        await stream.send_message(admin_pb2.ListApprovalsResponse(approvals=[approval_pb(a) for a in pending]))

    @grpclib_handler
    async def DecideApproval(self, stream):
        req = await stream.recv_message()
        actor = self.operator(stream)
        reason = optional_text("reason", req.reason)  # bounded here; approvals requires it
        a = await asyncio.to_thread(self.approvals.decide, bounded_ref("id", req.id), req.approve, actor, reason)
        await stream.send_message(approval_pb(a))


    # -- revocation -----------------------------------------------------------------------

    @staticmethod
    def _revoke_response(result) -> admin_pb2.RevokeResponse:
        return admin_pb2.RevokeResponse(count=len(result.serials), serials=list(result.serials),
                                        entry_ids=list(result.entry_ids), seq=result.seq)

    @grpclib_handler
    async def Revoke(self, stream):
        req = await stream.recv_message()
        actor = self.operator(stream)
        which = req.WhichOneof("target")
        if which is None:
            raise InvalidArgument("name exactly one thing to revoke: serial, task, entry, SPIFFE ID, sidecar or owner")
        kind = {"task_id": "task", "entry_id": "entry"}.get(which, which)
        target = bounded_ref(kind.replace("_", " "), getattr(req, which))
        result = await asyncio.to_thread(self.revocation.revoke, kind, target, req.reason, actor, req.reason_code)
        await stream.send_message(self._revoke_response(result))

    @grpclib_handler
    async def BanSidecar(self, stream):
        req = await stream.recv_message()
        actor = self.operator(stream)
        result = await asyncio.to_thread(self.revocation.ban_sidecar, bounded_ref("sidecar", req.sidecar),
                                         req.reason, actor)
        await stream.send_message(self._revoke_response(result))

    @grpclib_handler
    async def GetCRL(self, stream):
        await stream.recv_message()
        self.operator(stream)
        crls = [crl_pb(info) for info in self.revocation.crl_set().crls]
        if not crls:
            raise FailedPrecondition("no CRL is published yet")
        # The top-level fields are the active intermediate's CRL (the set's first), as a single CRL was before.
        out = admin_pb2.CRL()
        out.CopyFrom(crls[0])
        out.all.extend(crls)
        await stream.send_message(out)

    # -- authorities ----------------------------------------------------------------------

    async def _authority_call(self, fn, *args):
        """Run an Authorities operation off the loop. A refusal it reports as ConfigError (a KEK that does not open
        a key, an offline root with no signed successor) is the operator's one clear line, not an internal error."""
        try:
            return await asyncio.to_thread(fn, *args)
        except ConfigError as e:
            raise FailedPrecondition(str(e)) from None

    def _authority_pb(self, a: Authority, now: float) -> admin_pb2.Authority:
        return authority_pb(a, self.authorities.outstanding(a, now), self.authorities.certificate(a.id), now)

    def _authorities_pb(self) -> list[admin_pb2.Authority]:
        now = time.time()
        return [self._authority_pb(a, now) for a in self.authorities.list()]

    @grpclib_handler
    async def ListAuthorities(self, stream):
        await stream.recv_message()
        self.operator(stream)
        listed = await asyncio.to_thread(self._authorities_pb)  # outstanding counts read the database
        await stream.send_message(admin_pb2.ListAuthoritiesResponse(authorities=listed))

    @grpclib_handler
    async def PrepareAuthority(self, stream):
        req = await stream.recv_message()
        actor = self.operator(stream)
        reason = required_text("reason", req.reason)
        a, csr = await self._authority_call(self.authorities.prepare, bounded_ref("kind", req.kind), actor, reason)
        pb = await asyncio.to_thread(self._authority_pb, a, time.time())
        await stream.send_message(admin_pb2.AuthorityResponse(authority=pb, csr_pem=csr.decode()))

    @grpclib_handler
    async def ActivateAuthority(self, stream):
        req = await stream.recv_message()
        actor = self.operator(stream)
        reason = required_text("reason", req.reason)
        if len(req.cert_pem) > MAX_CERT_PEM:
            raise InvalidArgument(f"the certificate is longer than {MAX_CERT_PEM} characters: give the one "
                                  "certificate the offline root signed")
        a = await self._authority_call(self.authorities.activate, bounded_ref("authority id", req.id),
                                       req.cert_pem.encode(), actor, reason)
        pb = await asyncio.to_thread(self._authority_pb, a, time.time())
        await stream.send_message(admin_pb2.AuthorityResponse(authority=pb))

    @grpclib_handler
    async def TaintAuthority(self, stream):
        req = await stream.recv_message()
        actor = self.operator(stream)
        reason = required_text("reason", req.reason)
        ids = await self._authority_call(self.authorities.taint, bounded_ref("authority id", req.id), actor, reason)
        # The successor's CRL was published as taint() committed (the authorities' listener, issuer/app.py), before
        # any sidecar asks for SVIDs it signs; now every sidecar replaces what the tainted authorities signed.
        self.hub.broadcast(("taint", tuple(ids)))
        await stream.send_message(admin_pb2.TaintAuthorityResponse(tainted=ids))

    @grpclib_handler
    async def RevokeAuthority(self, stream):
        req = await stream.recv_message()
        actor = self.operator(stream)
        reason = required_text("reason", req.reason)
        a = await self._authority_call(self.authorities.revoke, bounded_ref("authority id", req.id), req.force,
                                       actor, reason)
        if req.force:
            # What still depends on it is dead now (on a CRL, or under a root no longer trusted): every sidecar
            # replaces it at once, as after a taint, rather than serving it until its renewal. A root's id reaches
            # the chains of the intermediates it took with it (tessera.chain.signers).
            self.hub.broadcast(("taint", (a.id,)))
        pb = await asyncio.to_thread(self._authority_pb, a, time.time())
        await stream.send_message(admin_pb2.AuthorityResponse(authority=pb))


def crl_pb(info: CrlInfo) -> admin_pb2.CRL:
    return admin_pb2.CRL(der=info.der, number=info.number, this_update=info.this_update,
                         next_update=info.next_update, entries=info.entries, authority=info.authority)


def authority_pb(a: Authority, outstanding: int, cert, now: float) -> admin_pb2.Authority:
    """`cert` is the authority's certificate (None for a JWT key, or an intermediate waiting for its offline-signed
    one: then it has no validity yet, and not_before and not_after are 0)."""
    pending = a.kind != "jwt" and not a.cert_der
    return admin_pb2.Authority(
        id=a.id, kind=a.kind, state=a.state, source=a.source, parent=a.parent or "",
        not_before=0 if pending else a.not_before, not_after=0 if pending else a.not_after,
        outstanding=outstanding, created_at=a.created_at, activated_at=a.activated_at or 0,
        tainted_at=a.tainted_at or 0, revoked_at=a.revoked_at or 0,
        cert_pem=cert.public_bytes(Encoding.PEM).decode() if cert is not None else "",
        expired=expired(a, now))


def approval_pb(a: ApprovalRequest) -> admin_pb2.Approval:
    return admin_pb2.Approval(
        id=a.id, task_id=a.task_id, entry_id=a.entry_id, spiffe_id=a.spiffe_id, owner=a.owner, tier=a.tier,
        scopes=list(a.scopes), ttl_seconds=a.ttl, context=a.context, sidecar_id=a.sidecar_id,
        pid=int(a.workload.get("pid") or 0), uid=int(a.workload.get("uid") or 0), gid=int(a.workload.get("gid") or 0),
        exe=a.workload.get("exe") or "",
        reason=a.reason, created_at=a.created_at, expires_at=a.expires_at, state=a.state,
        decided_by=a.decided_by, decision_reason=a.decision_reason)
