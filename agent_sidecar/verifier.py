"""Verifying mTLS peers for services, with the trust bundle and CRL the local sidecar keeps current.

A service gets its bundle (roots), the signed CRLs and its own SVID from the sidecar
(over the Workload API stream, or from the sidecar's bundle.pem and crl.pem) and
checks each peer: a path leaf <- intermediate <- bundle root (or leaf <- root, for SVIDs
signed before intermediates existed; tessera.chain), every certificate on it within its
validity and not revoked, an allowed SPIFFE ID, and (optionally) a task credential whose
scopes cover the call. Revocation: the roots' CRLs (which withdraw intermediates, and list
leaves a root signed directly) are verified as they arrive; the Workload API carries no
intermediates, so an intermediate's CRL is verified the first time a peer's path holds that
intermediate, once per CRL. The intermediate comes from the peer's handshake (the verified
chain ssl built; getpeercert gives the leaf only) or, failing that, from the intermediates this
verifier has seen: its own SVID's chain and peers' chains it validated. A check is set lookups,
never a call to the sidecar or issuer per handshake.

    v = Verifier.from_sidecar("/run/tessera/workload.sock", PeerPolicy.trust_domain("example.org"))
    v.wait_ready(10)
    ctx = v.server_context()           # chain to the bundle, client certificate required
    conn, _ = ctx.wrap_socket(listener, server_side=True).accept()
    peer_id = v.check_peer(conn)       # CRL, SPIFFE ID, scope; raises Rejected
"""

from __future__ import annotations

import _ssl
import datetime as dt
import os
import ssl
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Mapping, Sequence

import grpc
from cryptography import x509

from tessera import chain, crl, logs, pem, safefs, spiffeid, taskext, x509svid

log = logs.get("verifier")



CHAINED_MAX = 10_000


class Rejected(Exception):
    """The peer must not be trusted; the message says why."""


def read_task_scopes(cert: x509.Certificate) -> frozenset[str] | None:
    """Scopes granted by a task credential's extension (tessera.taskext); None for an identity SVID.

    A malformed extension grants nothing, so a check that requires scopes fails closed.
    """
    try:
        binding = taskext.read(cert)
    except ValueError:
        return None
    return frozenset(binding.scopes) if binding is not None else None


@dataclass(frozen=True)
class PeerPolicy:
    """Which peers to accept: exact SPIFFE IDs and/or members of trust domains, and required task scopes."""

    spiffe_ids: frozenset[str] = frozenset()
    trust_domains: frozenset[str] = frozenset()
    required_scopes: frozenset[str] = field(default_factory=frozenset)

    @classmethod
    def exact(cls, *ids: str, required_scopes: Iterable[str] = ()) -> "PeerPolicy":
        return cls(frozenset(str(spiffeid.parse(i)) for i in ids), frozenset(), frozenset(required_scopes))

    @classmethod
    def trust_domain(cls, *tds: str, required_scopes: Iterable[str] = ()) -> "PeerPolicy":
        return cls(frozenset(), frozenset(spiffeid.validate_trust_domain(t) for t in tds), frozenset(required_scopes))

    def allows(self, sid: spiffeid.SpiffeId) -> bool:
        if str(sid) in self.spiffe_ids:
            return True
        return any(sid.member_of(td) for td in self.trust_domains)


@dataclass(frozen=True)
class TrustState:
    """One consistent view, swapped whole: readers never see a bundle from one update and CRLs from another."""

    bundle: tuple[x509.Certificate, ...] = ()
    crls: Mapping[str, crl.Accepted] = field(default_factory=dict)  # the roots' CRLs, verified, by authority id
    revoked: frozenset[int] = frozenset()  # the roots' CRLs' serials as numbers: a check needs no hex formatting
    # CRLs no bundle root signed, by the authority they name (unverified): an intermediate's, checked against
    # it when a peer's path holds it.
    pending: Mapping[str, tuple[bytes, ...]] = field(default_factory=dict)


@dataclass(frozen=True)
class OwnSVID:
    spiffe_id: str
    chain: tuple[x509.Certificate, ...]
    key_der: bytes


def serial_numbers(crl_: x509.CertificateRevocationList) -> frozenset[int]:
    """A CRL's revoked serials as integers: a check then needs no hex formatting."""
    return frozenset(r.serial_number for r in crl_)


def revoked_serial(state: TrustState, cert: x509.Certificate) -> str | None:
    """The certificate's hex serial if the CRL held in `state` lists it: a set lookup, never a CRL scan."""
    serial = cert.serial_number
    return x509svid.serial_hex(serial) if serial in state.revoked else None


def _is_ca(cert: x509.Certificate) -> bool:
    try:
        return cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    except x509.ExtensionNotFound:
        return False


def _nothing_revoked(ca: x509.Certificate) -> frozenset[int]:
    return frozenset()


def check_certificate(state: TrustState, cert: x509.Certificate, policy: PeerPolicy,
                      task_scopes: Callable[[x509.Certificate], frozenset[str] | None] = read_task_scopes,
                      now: dt.datetime | None = None, intermediates: Iterable[x509.Certificate] = (),
                      path: Sequence[x509.Certificate] | None = None,
                      revoked_under: Callable[[x509.Certificate], frozenset[int]] = _nothing_revoked) -> str:
    """The peer's SPIFFE ID if `cert` passes every rule; Rejected otherwise. Pure: all input is given.

    The path to the bundle is built from `intermediates`, or given as `path` (leaf, [intermediate,]
    root) when the caller already saw it lead to this very `state.bundle` (Verifier's cache); validity
    and revocation of every certificate on it, SPIFFE ID and scope are checked all the same.
    `revoked_under(ca)`: serial numbers the CRL of the intermediate `ca` lists (the roots' CRLs are in
    `state`).
    """
    if not state.bundle:
        raise Rejected("no trust bundle yet")
    now = now or dt.datetime.now(dt.timezone.utc)
    if path is None:
        try:
            path = chain.path(cert, state.bundle, intermediates, now)
        except chain.ChainError as e:
            raise Rejected(str(e)) from None
    if not cert.not_valid_before_utc <= now <= cert.not_valid_after_utc:
        raise Rejected("certificate is expired or not yet valid")
    if _is_ca(cert):
        raise Rejected("a CA certificate is not an X.509-SVID")
    for ca in path[1:-1]:
        if not ca.not_valid_before_utc <= now <= ca.not_valid_after_utc:
            raise Rejected("certificate's issuer is expired or not yet valid")
    for c, issuer in zip(path, path[1:]):
        if c.serial_number in state.revoked or c.serial_number in revoked_under(issuer):
            what = "certificate" if c is cert else "certificate's issuer"
            raise Rejected(f"{what} {x509svid.serial_hex(c.serial_number)} is revoked")
    try:
        sid = x509svid.spiffe_id_of(cert)
    except ValueError as e:
        raise Rejected(f"not an X.509-SVID: {e}") from None
    if not policy.allows(sid):
        raise Rejected(f"SPIFFE ID {sid} is not allowed")
    if policy.required_scopes:
        scopes = task_scopes(cert)
        if scopes is None:
            raise Rejected("a task credential is required")
        missing = policy.required_scopes - scopes
        if missing:
            raise Rejected(f"task scope does not cover {', '.join(sorted(missing))}")
    return str(sid)


class Verifier:
    def __init__(self, policy: PeerPolicy):
        self.policy = policy
        self.state = TrustState()
        self.svid: OwnSVID | None = None
        self._changed = threading.Condition()
        self._source = None
        # Presented chain bytes -> (leaf, its path, the bundle it was seen to lead to). A peer presents the same
        # chain on every call: the parse and the signature checks (~100 us each) are done once per bundle.
        self._chained: dict[bytes, tuple[x509.Certificate, tuple[x509.Certificate, ...],
                                         tuple[x509.Certificate, ...]]] = {}
        # Intermediates seen (own SVID chain, peers' validated paths), DER -> certificate: where a path is looked
        # for when a peer's handshake gave its leaf only. Each is validated again whenever it is used. Replaced
        # whole on change (see _remember).
        self._known: dict[bytes, x509.Certificate] = {}
        # Intermediates' CRLs, verified lazily: CRL DER -> accepted (None: refused); authority id -> newest.
        self._lazy_lock = threading.Lock()
        self._lazy: dict[bytes, crl.Accepted | None] = {}
        self._newest: dict[str, crl.Accepted] = {}

    # -- sources ------------------------------------------------------------------------

    @classmethod
    def from_sidecar(cls, socket_path: str, policy: PeerPolicy) -> "Verifier":
        """Kept current by a Workload API stream to the local sidecar (also gives this service its SVID)."""
        v = cls(policy)
        v._source = _WorkloadSource(v, socket_path)
        return v

    @classmethod
    def from_files(cls, bundle_path: str | Path, crl_path: str | Path, policy: PeerPolicy,
                   poll: float = 0.2) -> "Verifier":
        """Kept current from the sidecar's bundle.pem and crl.pem (re-read when they are replaced)."""
        v = cls(policy)
        v._source = _FileSource(v, Path(bundle_path), Path(crl_path), poll)
        return v

    def close(self) -> None:
        if self._source is not None:
            self._source.stop()

    def update(self, bundle: Iterable[x509.Certificate] | None = None, crls: Iterable[bytes] = (),
               svid: OwnSVID | None = None) -> None:
        """Apply what the sidecar sent: the bundle, every CRL in force, this service's SVID. A root's CRL that
        fails to verify or goes backwards is ignored; any other CRL waits for a peer path holding its signer."""
        st = self.state
        new_bundle = tuple(bundle) if bundle else st.bundle
        if new_bundle == st.bundle:
            new_bundle = st.bundle  # the same CAs resent (every update carries them): keep the checks made against them
        roots = {x509svid.authority_id(r.public_key()) for r in new_bundle}
        held = {k: a for k, a in st.crls.items() if k in roots}  # a root that left the bundle takes its CRL along
        was_pending = {d: k for k, ds in st.pending.items() for d in ds}
        pending: dict[str, list[bytes]] = {}
        for data in crls:
            if any(a.der == data for a in held.values()):
                continue  # held already (every update resends it)
            claimed = was_pending.get(data)
            if claimed is None:
                try:
                    claimed = chain.authority_key_id(crl.load(data))
                except crl.CrlError as e:
                    log.warning("ignoring a CRL", error=str(e))
                    continue
            if claimed is not None and claimed not in roots:
                pending.setdefault(claimed, []).append(data)
                continue
            try:
                accepted = crl.accept(data, new_bundle, held, serial_numbers)
            except crl.CrlError as e:
                log.warning("ignoring a CRL", error=str(e))
                continue
            held[accepted.authority] = accepted
        revoked = frozenset().union(*(a.serials for a in held.values()))
        with self._changed:
            self.state = TrustState(new_bundle, held, revoked, {k: tuple(v) for k, v in pending.items()})
            if svid is not None:
                self.svid = svid
                for ca in svid.chain[1:]:
                    self._remember(ca)
            self._changed.notify_all()

    def wait_ready(self, timeout: float = 10.0, need_svid: bool = False) -> None:
        deadline = time.monotonic() + timeout
        with self._changed:
            while not self.state.bundle or (need_svid and self.svid is None):
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError("no trust bundle from the sidecar yet")
                self._changed.wait(left)

    # -- checks --------------------------------------------------------------------------

    def check(self, peer: x509.Certificate | Sequence[x509.Certificate] | bytes,
              policy: PeerPolicy | None = None) -> str:
        """The peer's SPIFFE ID; Rejected if it must not be trusted.

        `peer`: its certificate, or its chain (leaf first) as certificates or as bytes (DER or PEM, one
        certificate or several). Intermediates it does not present are looked for among those seen before.
        """
        state, policy = self.state, policy or self.policy
        if not state.bundle:
            raise Rejected("no trust bundle yet")
        key = peer if isinstance(peer, bytes) else None
        known = self._chained.get(key) if key is not None else None
        if known is not None and known[2] is state.bundle:
            leaf, path = known[0], known[1]
        else:
            if isinstance(peer, bytes):
                certs = _parse_chain(peer)
            elif isinstance(peer, x509.Certificate):
                certs = [peer]
            else:
                certs = list(peer)
            if not certs:
                raise Rejected("the peer presented no certificate")
            leaf = certs[0]
            try:
                path = chain.path(leaf, state.bundle, [*certs[1:], *self._known.values()])
            except chain.ChainError as e:
                raise Rejected(str(e)) from None
            for ca in path[1:-1]:
                self._remember(ca)
            if key is not None:
                if len(self._chained) >= CHAINED_MAX:  # bounded: peers rotate their SVIDs
                    self._chained.clear()
                self._chained[key] = (leaf, path, state.bundle)
        return check_certificate(state, leaf, policy, path=path, revoked_under=lambda ca: self._revoked_under(state, ca))

    def _remember(self, ca: x509.Certificate) -> None:
        der = pem.der_concat([ca])
        if der not in self._known:
            # Replaced whole, never changed in place: checks on other threads iterate the one they read.
            known = {} if len(self._known) >= CHAINED_MAX else dict(self._known)
            known[der] = ca
            self._known = known

    def _revoked_under(self, state: TrustState, ca: x509.Certificate) -> frozenset[int]:
        """What the CRL of intermediate `ca` lists (nothing for a root: its CRL is in state.revoked). Each CRL
        naming `ca` is verified against it once; the highest number verified for `ca` is the one in force."""
        if ca in state.bundle:
            return frozenset()
        authority = x509svid.authority_id(ca.public_key())
        offered = state.pending.get(authority, ())
        with self._lazy_lock:
            for data in offered:
                if data in self._lazy:
                    continue
                if len(self._lazy) >= CHAINED_MAX:
                    self._lazy.clear()
                newest = self._newest.get(authority)
                try:
                    accepted = crl.accept(data, [ca], {authority: newest} if newest else {}, serial_numbers)
                except crl.CrlError as e:
                    log.warning("ignoring an intermediate's CRL", authority=authority, error=str(e))
                    self._lazy[data] = None
                    continue
                self._lazy[data] = accepted
                if newest is None or accepted.number > newest.number:
                    self._newest[authority] = accepted
            newest = self._newest.get(authority)
        return newest.serials if newest is not None else frozenset()

    def check_peer(self, conn: ssl.SSLSocket | ssl.SSLObject, policy: PeerPolicy | None = None) -> str:
        """After the handshake: the peer's SPIFFE ID, or Rejected."""
        return self.check(peer_chain(conn), policy)

    # -- TLS contexts -----------------------------------------------------------------------

    def _base(self, protocol: int) -> ssl.SSLContext:
        st = self.state
        if not st.bundle:
            raise Rejected("no trust bundle yet")
        ctx = ssl.SSLContext(protocol)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        ctx.verify_mode = ssl.CERT_REQUIRED
        ctx.load_verify_locations(cadata=pem.certs_pem(st.bundle).decode())
        if self.svid is not None:
            _load_chain(ctx, self.svid)
        return ctx

    def server_context(self) -> ssl.SSLContext:
        """Requires a client certificate chaining to the bundle; call check_peer after the handshake."""
        return self._base(ssl.PROTOCOL_TLS_SERVER)

    def client_context(self) -> ssl.SSLContext:
        """Verifies the server's chain (SPIFFE IDs are not host names: check_peer does the naming)."""
        ctx = self._base(ssl.PROTOCOL_TLS_CLIENT)
        ctx.check_hostname = False
        return ctx

    def grpc_server_credentials(self) -> grpc.ServerCredentials:
        """mTLS credentials for a grpcio server, following SVID rotation; pair with `interceptor()`."""
        def config():
            svid, st = self.svid, self.state
            if svid is None:
                raise Rejected("no SVID from the sidecar yet")
            return grpc.ssl_server_certificate_configuration(
                [(pem.key_pem_from_der(svid.key_der), pem.certs_pem(svid.chain))], root_certificates=pem.certs_pem(st.bundle))

        current = {"svid": self.svid}

        def fetch():
            if self.svid is current["svid"]:
                return None
            current["svid"] = self.svid
            return config()

        return grpc.dynamic_ssl_server_credentials(config(), fetch, require_client_authentication=True)

    def interceptor(self, policy: PeerPolicy | None = None) -> "VerifyingInterceptor":
        return VerifyingInterceptor(self, policy)


class VerifyingInterceptor(grpc.ServerInterceptor):
    """Checks the caller's client certificate (CRL, SPIFFE ID, scope) before any grpcio handler runs."""

    def __init__(self, verifier: Verifier, policy: PeerPolicy | None = None):
        self.verifier = verifier
        self.policy = policy

    def _check(self, context: grpc.ServicerContext) -> None:
        auth = context.auth_context()
        leaf = auth.get("x509_pem_cert")
        if not leaf:
            context.abort(grpc.StatusCode.UNAUTHENTICATED, "a client certificate is required")
        # A server's view of the client's chain leaves the leaf out (OpenSSL's SSL_get_peer_cert_chain): leaf first.
        presented = leaf[0] + b"".join(auth.get("x509_pem_cert_chain", ()))
        try:
            self.verifier.check(presented, self.policy)
        except Rejected as e:
            context.abort(grpc.StatusCode.PERMISSION_DENIED, str(e))

    def intercept_service(self, continuation, handler_call_details):
        handler = continuation(handler_call_details)
        if handler is None:
            return None
        check = self._check

        def guard(behavior):
            def guarded(request, context):
                check(context)
                return behavior(request, context)
            return guarded

        kinds = (("unary_unary", grpc.unary_unary_rpc_method_handler),
                 ("unary_stream", grpc.unary_stream_rpc_method_handler),
                 ("stream_unary", grpc.stream_unary_rpc_method_handler),
                 ("stream_stream", grpc.stream_stream_rpc_method_handler))
        for attr, make in kinds:
            behavior = getattr(handler, attr)
            if behavior is not None:
                return make(guard(behavior), request_deserializer=handler.request_deserializer,
                            response_serializer=handler.response_serializer)
        return handler


def peer_chain(conn: ssl.SSLSocket | ssl.SSLObject) -> bytes:
    """The chain the peer's handshake was verified with, leaf first, DER (the root included; it is matched against
    the bundle again). Python 3.13 has get_verified_chain; 3.10 to 3.12 have it on the private _sslobj only.
    Without either, the leaf alone (intermediates are then looked for among those the verifier has seen)."""
    getter = getattr(conn, "get_verified_chain", None) or getattr(getattr(conn, "_sslobj", None),
                                                                  "get_verified_chain", None)
    if getter is not None:
        try:
            certs = getter() or []
        except (ssl.SSLError, ValueError):
            certs = []
        ders = [c if isinstance(c, bytes) else c.public_bytes(_ssl.ENCODING_DER) for c in certs]
        if ders:
            return b"".join(ders)
    return conn.getpeercert(binary_form=True) or b""


def _parse_chain(data: bytes) -> list[x509.Certificate]:
    try:
        if data.lstrip().startswith(b"-----"):
            return x509.load_pem_x509_certificates(data)
        return pem.split_der(data)
    except ValueError as e:
        raise Rejected(f"unreadable certificate: {e}") from None


def _load_chain(ctx: ssl.SSLContext, svid: OwnSVID) -> None:
    # ssl loads keys only from files: a private 0700 directory, removed at once.
    with tempfile.TemporaryDirectory(prefix="tessera-svid-") as d:
        cert_path, key_path = Path(d) / "svid.pem", Path(d) / "key.pem"
        safefs.atomic_write(cert_path, pem.certs_pem(svid.chain), 0o600)
        safefs.atomic_write(key_path, pem.key_pem_from_der(svid.key_der), 0o600)
        ctx.load_cert_chain(str(cert_path), str(key_path))


class _WorkloadSource:
    """A background Workload API stream (FetchX509SVID): SVID, bundle and CRL as the sidecar changes them."""

    def __init__(self, verifier: Verifier, socket_path: str):
        from tessera.uds import socket_target

        self.verifier = verifier
        self.target = socket_target(socket_path)
        self._stop = threading.Event()
        self._call = None
        self._thread = threading.Thread(target=self._run, name="verifier-source", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        from agent_sidecar.workload_client import HEADER
        from tessera.workload import workload_pb2, workload_pb2_grpc

        delay = 0.1
        while not self._stop.is_set():
            try:
                with grpc.insecure_channel(self.target) as ch:
                    call = workload_pb2_grpc.SpiffeWorkloadAPIStub(ch).FetchX509SVID(
                        workload_pb2.X509SVIDRequest(), metadata=HEADER)
                    self._call = call
                    for resp in call:
                        delay = 0.1
                        s = resp.svids[0]
                        chain = tuple(pem.split_der(s.x509_svid))
                        self.verifier.update(pem.split_der(s.bundle), list(resp.crl),
                                             OwnSVID(s.spiffe_id, chain, s.x509_svid_key))
            except grpc.RpcError as e:
                if self._stop.is_set():
                    return
                if e.code() == grpc.StatusCode.PERMISSION_DENIED:
                    self.verifier.svid = None  # "stop using all SVIDs"
                log.warning("workload API stream ended; reconnecting", code=e.code().name, error=e.details())
            except Exception as e:  # noqa: BLE001 - a bad message must not end updates (and revocations) for good
                if self._stop.is_set():
                    return
                log.exception("could not apply a workload API update; reconnecting", error=repr(e))
            self._stop.wait(delay)
            delay = min(delay * 2, 2.0)

    def stop(self) -> None:
        self._stop.set()
        if self._call is not None:
            self._call.cancel()
        self._thread.join(timeout=5)


class _FileSource:
    """Re-reads bundle.pem and crl.pem (every CRL in it) when the sidecar replaces them (atomic renames: new inode)."""

    def __init__(self, verifier: Verifier, bundle: Path, crl_path: Path, poll: float):
        self.verifier, self.bundle, self.crl, self.poll = verifier, bundle, crl_path, poll
        self._seen: tuple = ()
        self._stop = threading.Event()
        self._load()
        self._thread = threading.Thread(target=self._run, name="verifier-files", daemon=True)
        self._thread.start()

    def _stamp(self) -> tuple:
        out = []
        for p in (self.bundle, self.crl):
            try:
                st = os.stat(p)
                out.append((st.st_ino, st.st_mtime_ns, st.st_size))
            except OSError:
                out.append(None)
        return tuple(out)

    def _load(self) -> None:
        stamp = self._stamp()
        if stamp == self._seen:
            return
        self._seen = stamp
        try:
            bundle = x509.load_pem_x509_certificates(self.bundle.read_bytes())
        except (OSError, ValueError):
            return
        crls = []
        try:
            crls = [crl.der(c) for c in crl.load_all(self.crl.read_bytes())]
        except (OSError, crl.CrlError):
            pass
        self.verifier.update(bundle, crls)

    def _run(self) -> None:
        while not self._stop.wait(self.poll):
            self._load()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
