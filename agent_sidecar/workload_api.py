"""The SPIFFE Workload API on the sidecar's Unix socket (grpclib, for the kernel's peer credentials).

Rules from the SPIFFE standard: the `workload.spiffe.io: true` header is
mandatory (INVALID_ARGUMENT otherwise); a caller with no identity gets
PERMISSION_DENIED; streams send the complete state at once and again on every
change; PERMISSION_DENIED mid-stream means "stop using all SVIDs".
"""

from __future__ import annotations

import time

from agent_sidecar.attestation import AttestationError, Workload
from agent_sidecar.cache import CacheManager
from agent_sidecar.socket_server import current_peer
from tessera import logs
from tessera.errors import InvalidArgument, PermissionDenied, Unavailable, Unimplemented
from tessera.rpc import grpclib_handler
from tessera.workload import workload_grpc, workload_pb2

log = logs.get("sidecar.workload_api")
_denials = logs.Throttled(log, level="info")

FIRST_SVID_TIMEOUT = 10.0


def check_security_header(stream) -> None:
    values = stream.metadata.getall("workload.spiffe.io", []) if stream.metadata else []
    if values != ["true"]:
        raise InvalidArgument("security header missing from request")


def current_workload() -> Workload:
    """The caller as attested when it connected, provided the process that connected still runs the
    program it ran then (see attestation.AttestedPeer.check_unchanged)."""
    peer = current_peer()
    try:
        peer.check_unchanged()
    except AttestationError as e:
        _denials.log(f"changed:{peer.workload.uid}", "workload changed since it connected", error=str(e),
                     **peer.workload.describe())
        raise PermissionDenied(f"workload attestation failed: {e}") from None
    return peer.workload


async def caller(stream, cache: CacheManager):
    """Every call on the sidecar's socket starts here: the security header, the request (its size and
    time bounded by the socket server), a synced cache, then the caller attested at connect."""
    check_security_header(stream)
    req = await stream.recv_message()
    if req is None:
        raise InvalidArgument("the call carried no request message")
    if not cache.ready:
        raise Unavailable("sidecar is starting: no entries synced from the issuer yet")
    return req, current_workload()


class WorkloadAPI(workload_grpc.SpiffeWorkloadAPIBase):
    def __init__(self, cache: CacheManager, trust_domain: str, crls=lambda: []):
        self.cache = cache
        self.trust_domain = trust_domain
        self.crls = crls  # callable returning the current DER CRLs

    async def _caller(self, stream) -> Workload:
        return (await caller(stream, self.cache))[1]

    @grpclib_handler
    async def FetchX509SVID(self, stream) -> None:
        wl = await self._caller(stream)
        last = None
        served: set[str] = set()  # entries whose SVIDs this stream handed out
        deadline = time.monotonic() + FIRST_SVID_TIMEOUT
        announced = False
        while True:
            version = self.cache.version
            entries, svids = self.cache.view(wl.selectors)
            revoked = sorted(eid for eid in served if self.cache.entry_revoked(eid))
            if revoked or self.cache.cut:
                # "Stop using all SVIDs": the client must drop the revoked identity's credentials now.
                log.info("identity revoked; ending workload stream", entry_ids=revoked, **wl.describe())
                raise PermissionDenied("identity revoked")
            if not entries:
                _denials.log(f"none:{wl.uid}", "no identity for workload", **wl.describe())
                raise PermissionDenied("no identity issued")
            if not announced:
                log.info("workload attested", **wl.describe())  # once a call; denials are throttled above
                announced = True
            crls = list(self.crls())
            if svids:
                state = (tuple(s.serial for s in svids), self.cache.bundle_der, tuple(crls))
                if state != last:
                    if last is not None:
                        current_workload()  # new SVIDs only to the program that connected
                    await stream.send_message(workload_pb2.X509SVIDResponse(
                        svids=[workload_pb2.X509SVID(spiffe_id=s.spiffe_id, x509_svid=s.cert_der,
                                                     x509_svid_key=s.key_der, bundle=self.cache.bundle_der)
                               for s in svids],
                        crl=crls))
                    last = state
                    served.update(s.entry_id for s in svids)
            timeout = None if last is not None else max(0.0, deadline - time.monotonic())
            if not await self.cache.wait_change(version, timeout):
                raise Unavailable("identity not yet available from the issuer; retry")

    @grpclib_handler
    async def FetchX509Bundles(self, stream) -> None:
        wl = await self._caller(stream)
        last = None
        while True:
            version = self.cache.version
            if not self.cache.matching(wl.selectors):
                raise PermissionDenied("no identity issued")
            crls = list(self.crls())
            state = (self.cache.bundle_der, tuple(crls))
            if state != last:
                if last is not None:
                    current_workload()
                await stream.send_message(workload_pb2.X509BundlesResponse(
                    crl=crls, bundles={self.trust_domain: self.cache.bundle_der}))
                last = state
            await self.cache.wait_change(version)

    @grpclib_handler
    async def FetchJWTSVID(self, stream) -> None:
        check_security_header(stream)
        raise Unimplemented("JWT-SVIDs are not supported by this sidecar")

    @grpclib_handler
    async def FetchJWTBundles(self, stream) -> None:
        check_security_header(stream)
        raise Unimplemented("JWT-SVIDs are not supported by this sidecar")

    @grpclib_handler
    async def ValidateJWTSVID(self, stream) -> None:
        check_security_header(stream)
        raise Unimplemented("JWT-SVIDs are not supported by this sidecar")
