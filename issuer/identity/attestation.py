"""Sidecar attestation: join tokens, sidecar SVIDs, and authenticating callers by their SVID.

A join token is shown once, stored only as its SHA-256, usable once and expiring.
After attestation a sidecar proves itself with its SVID over mTLS; the issuer
checks on every call that the SVID names a known, unbanned sidecar.
"""

from __future__ import annotations

import hashlib
import math
import secrets
import threading
import time
from dataclasses import dataclass, field, replace
from typing import Callable, Protocol

from cryptography import x509

from issuer.ca.authorities import Authorities
from issuer.core.models import Actor, AuditEvent, IssuedSerial, JoinToken, Sidecar
from issuer.datastore.interface import Datastore
from tessera import logs, spiffeid, x509svid
from tessera.errors import InvalidArgument, NotFound, PermissionDenied, Unauthenticated, Unavailable
from tessera.ratelimit import KeyedTokenBuckets, peer_host

log = logs.get("attestation")

# Refused join attempts per peer address (an IPv6 peer's /64): a burst, then a steady rate; past it the
# address gets UNAVAILABLE for any join until a token is back. Only refusals spend: a fleet rolled out
# from behind one NAT, each host with its valid token, is never slowed down; a token guesser is.
JOIN_BURST = 10
JOIN_RATE = 1 / 3  # per second: 20 a minute
# Refused joins: the first per peer address per window is one durable audit record, the rest in that
# window one record with their count; past DENIAL_RECORDS_PER_WINDOW first records in a window (many
# addresses), further addresses are counted together under "*".
DENIAL_WINDOW = 60.0
DENIAL_RECORDS_PER_WINDOW = 100
_MAX_REASONS = 8


def token_hash(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


@dataclass
class _Refused:
    since: float
    count: int = 0  # refusals since the first, not yet recorded
    reasons: dict[str, int] = field(default_factory=dict)


class JoinDenials:
    """Refused join attempts become audit records at a bounded rate, with nothing left out of the count.

    Per peer address and window: the first refusal is recorded at once (as every refusal was before), the
    later ones are counted and recorded as one aggregate when the window has ended (`flush`, which the
    issuer calls periodically and at shutdown). So a flood of bad tokens writes at most
    2 * DENIAL_RECORDS_PER_WINDOW + 1 records a window, whatever its rate or number of addresses.
    """

    def __init__(self, append_audit: Callable[[list[AuditEvent]], None], window: float = DENIAL_WINDOW,
                 records_per_window: int = DENIAL_RECORDS_PER_WINDOW, clock=time.monotonic):
        self._append = append_audit
        self.window = window
        self._records_per_window = records_per_window
        self._clock = clock
        self._lock = threading.Lock()
        self._peers: dict[str, _Refused] = {}
        self._window_start = float("-inf")
        self._recorded = 0  # first records written in the current window
        self._log = logs.Throttled(log, window=window)

    def deny(self, host: str, peer: str, reason: str) -> None:
        now = self._clock()
        first = None
        with self._lock:
            due = self._take_due(now, everything=False)
            state = self._peers.get(host)
            if state is None:
                if now - self._window_start >= self.window:
                    self._window_start, self._recorded = now, 0
                if self._recorded < self._records_per_window:
                    self._recorded += 1
                    self._peers[host] = _Refused(now)
                    first = AuditEvent("sidecar.attest", Actor("sidecar", "unknown", {"peer": peer}), "deny",
                                       reason=reason, details={"peer_address": host})
                else:
                    state = self._peers.setdefault("*", _Refused(now))
            if first is None:
                state.count += 1
                key = reason if reason in state.reasons or len(state.reasons) < _MAX_REASONS else "other"
                state.reasons[key] = state.reasons.get(key, 0) + 1
        self._log.log("join-refused", "join refused", peer=host, reason=reason)  # one key: many addresses, few lines
        self._write(due + ([first] if first else []))

    def flush(self, everything: bool = False) -> None:
        """Record the counts of windows that have ended (all of them with `everything`, at shutdown)."""
        with self._lock:
            due = self._take_due(self._clock(), everything)
        self._write(due)

    def _take_due(self, now: float, everything: bool) -> list[AuditEvent]:
        ended = [h for h, s in self._peers.items() if everything or now - s.since >= self.window]
        events = []
        for host in ended:
            s = self._peers.pop(host)
            if s.count:
                source = "other addresses" if host == "*" else host
                events.append(AuditEvent(
                    "sidecar.attest", Actor("sidecar", "unknown", {"peer": host}), "deny",
                    reason=f"{s.count} more refused join attempts from {source} within {self.window:g}s",
                    details={"count": s.count, "window": self.window, "reasons": s.reasons}))
        return events

    def _write(self, events: list[AuditEvent]) -> None:
        if not events:
            return
        try:
            self._append(events)
        except Exception as e:  # noqa: BLE001 - a full disk must not turn each refusal into a traceback
            self._log.log("write-failed", "could not record refused join attempts", error=repr(e))


@dataclass(frozen=True)
class SidecarSVID:
    sidecar_id: str
    chain: tuple[x509.Certificate, ...]


class RevokedSerials(Protocol):
    def is_revoked(self, serial_hex: str) -> bool: ...


class SidecarAttestor:
    def __init__(self, store: Datastore, authorities: Authorities, svid_ttl: int, token_ttl: int):
        self.store = store
        self.authorities = authorities
        self.trust_domain = authorities.trust_domain
        self.svid_ttl = svid_ttl
        self.token_ttl = token_ttl
        self._lock = threading.Lock()
        self._touching: set[str] = set()
        # Client certificate (PEM, as TLS verified it) -> (SPIFFE ID, serial): every call of a sidecar
        # presents the same certificate, so it is parsed once, not per call.
        self._peer_ids: dict[bytes, tuple[spiffeid.SpiffeId, str]] = {}
        self._sidecars: dict[str, Sidecar] = {s.id: s for s in store.list_sidecars()}
        self.join_limit = KeyedTokenBuckets(JOIN_RATE, JOIN_BURST)
        self.denials = JoinDenials(store.append_audit)

    # -- operator side -----------------------------------------------------------------

    def create_token(self, sidecar_name: str, ttl: int, actor: Actor) -> tuple[str, str, int]:
        sid = str(spiffeid.sidecar_id(self.trust_domain, sidecar_name))
        existing = self._sidecars.get(sid)
        if existing is not None and existing.state == "banned":
            raise PermissionDenied(f"sidecar {sid} is banned; pick a new name")
        ttl = ttl or self.token_ttl
        if ttl < 1 or ttl > 7 * 86400:
            raise InvalidArgument("join token ttl must be between 1s and 7d")
        # Hex, so a token never begins with "-" and is safe to pass as a command-line value.
        token = secrets.token_hex(32)
        now = int(time.time())
        self.store.create_join_token(
            JoinToken(token_hash(token), sidecar_name, now + ttl, actor.id, now),
            AuditEvent("join_token.create", actor, "done", subject=sid, details={"ttl": ttl}),
        )
        return token, sid, now + ttl

    def get(self, sidecar_ref: str) -> Sidecar:
        sid = sidecar_ref if sidecar_ref.startswith("spiffe://") else str(
            spiffeid.sidecar_id(self.trust_domain, sidecar_ref))
        s = self._sidecars.get(sid)
        if s is None:
            raise NotFound(f"no sidecar {sid}")
        return s

    def list(self) -> list[Sidecar]:
        return sorted(self._sidecars.values(), key=lambda s: s.id)

    # -- sidecar side --------------------------------------------------------------------

    def attest(self, join_token: str, csr_der: bytes, peer: str) -> SidecarSVID:
        """First contact: trade a join token and a CSR for a sidecar SVID. `peer` is the grpcio peer string."""
        host = peer_host(peer)
        # Charged before the attempt, so attempts sent at once cannot all pass one check; a join that
        # succeeds gets its token back, so only refused attempts count against the peer.
        wait = self.join_limit.take(host)
        if wait:
            self.denials.deny(host, peer, "rate limited")
            raise Unavailable(f"too many refused join attempts from {host}: retry in {math.ceil(wait)}s")
        try:
            svid = self._attest(join_token, csr_der, peer)
        except PermissionDenied as e:
            # A refused attempt is evidence too; it commits on its own, aggregated per peer under a flood.
            self.denials.deny(host, peer, e.message)
            raise
        self.join_limit.refund(host)
        return svid

    def _attest(self, join_token: str, csr_der: bytes, peer: str) -> SidecarSVID:
        if not join_token:
            raise InvalidArgument("join_token is required")
        public_key = x509svid.csr_public_key(csr_der)
        now = int(time.time())
        h = token_hash(join_token)
        with self.store.transaction():
            # The store marks the token used; refusing here rolls that back. Unknown, used and expired
            # tokens are refused alike to the caller.
            tok = self.store.consume_join_token(h, now)
            if tok is None:
                raise PermissionDenied("join token is not valid")
            if tok.used_at is not None:
                raise PermissionDenied("join token was already used")
            if tok.expires_at <= now:
                raise PermissionDenied("join token has expired")
            sid = str(spiffeid.sidecar_id(self.trust_domain, tok.sidecar_name))
            existing = self._sidecars.get(sid)
            return self._issue(sid, tok.sidecar_name, public_key, now, existing,
                               AuditEvent("sidecar.attest", Actor("sidecar", sid, {"peer": peer}), "allow",
                                          reason="join token", subject=sid))

    def renew(self, caller: Sidecar, csr_der: bytes) -> SidecarSVID:
        public_key = x509svid.csr_public_key(csr_der)
        now = int(time.time())
        with self.store.transaction():
            return self._issue(caller.id, caller.name, public_key, now, caller,
                               AuditEvent("sidecar.renew", Actor("sidecar", caller.id), "allow", subject=caller.id))

    def _issue(self, sid: str, name: str, public_key, now: int, existing: Sidecar | None,
               audit: AuditEvent) -> SidecarSVID:
        # Callers hold the store transaction; the lock makes "not banned" and the write one step, so a
        # ban either comes first (and this refuses) or after (and its lookup finds this serial).
        with self._lock:
            current = self._sidecars.get(sid)
            if current is not None and current.state == "banned":
                raise PermissionDenied(f"sidecar {sid} is banned")
            signed = self.authorities.signer().sign(public_key, spiffeid.parse(sid), self.svid_ttl)
            not_after = int(signed.not_after.timestamp())
            renewing = existing is not None and audit.action == "sidecar.renew"
            attested_at = existing.attested_at if renewing else now
            sidecar = Sidecar(sid, name, "active", attested_at, now, signed.serial_hex, not_after)
            record = IssuedSerial(signed.serial_hex, sid, "sidecar", None, sid, now, not_after,
                                  authority=signed.authority)
            self.store.record_issued([record])
            # The ttl asked for, as this event has always said (the CA may cap not_after below it).
            self.store.upsert_sidecar(sidecar, replace(audit, details={**record.audit_details(),
                                                                       "ttl": self.svid_ttl}))
            self._sidecars[sid] = sidecar
        return SidecarSVID(sid, signed.chain)

    def set_banned(self, sidecar: Sidecar, audit: AuditEvent) -> Sidecar:
        with self.store.transaction(), self._lock:
            banned = replace(self._sidecars.get(sidecar.id, sidecar), state="banned")
            self.store.upsert_sidecar(banned, audit)
            self._sidecars[sidecar.id] = banned
        return banned

    def apply_peer(self, sidecar: Sidecar, op: str) -> bool:
        """A sidecar record another issuer committed (issuer/peers.py): into the cache. A ban sticks (only an
        explicit unban lifts it) and an older SVID does not replace a newer one, so a change read late cannot undo
        one this issuer made meanwhile. True when it newly bans the sidecar (the caller closes its streams)."""
        with self._lock:
            current = self._sidecars.get(sidecar.id)
            if current is not None:
                if current.state == "banned" and sidecar.state != "banned" and op != "unban":
                    return False
                if current.state == sidecar.state and current.svid_expires_at > sidecar.svid_expires_at:
                    return False
            self._sidecars[sidecar.id] = sidecar
            return sidecar.state == "banned" and (current is None or current.state != "banned")

    def touch_due(self, sidecar_id: str) -> bool:
        """True at most once a minute per sidecar (and not while a touch is under way): then call touch()."""
        s = self._sidecars.get(sidecar_id)
        if s is None or int(time.time()) - s.last_seen < 60 or sidecar_id in self._touching:
            return False
        self._touching.add(sidecar_id)
        return True

    def touch(self, sidecar_id: str) -> None:
        """Record that the sidecar was seen (a write; callers on an event loop run it on its executor)."""
        now = int(time.time())
        try:
            if self._sidecars.get(sidecar_id) is not None:  # touch_due decided it is time
                self.store.touch_sidecar(sidecar_id, now)
                with self._lock:
                    # Update whatever is current: a ban that landed meanwhile must not be overwritten.
                    current = self._sidecars.get(sidecar_id)
                    if current is not None:
                        self._sidecars[sidecar_id] = replace(current, last_seen=now)
        finally:
            self._touching.discard(sidecar_id)

    def authenticate(self, peer_cert_pem: bytes | None, revoked: RevokedSerials) -> Sidecar:
        """The sidecar behind an mTLS call. The TLS layer already verified the chain and expiry; `revoked`
        (the revocation service, which itself needs this service) answers for the SVID's serial."""
        if not peer_cert_pem:
            raise Unauthenticated("a sidecar SVID (client certificate) is required")
        sid, serial = self._peer_ids.get(peer_cert_pem) or self._parse_peer(peer_cert_pem)
        if not sid.member_of(self.trust_domain) or spiffeid.sidecar_name(sid) is None:
            raise PermissionDenied(f"{sid} is not a sidecar identity")
        s = self._sidecars.get(str(sid))
        if s is None:
            raise PermissionDenied(f"sidecar {sid} is not attested")
        if s.state == "banned":
            raise PermissionDenied(f"sidecar {sid} is banned")
        if revoked.is_revoked(serial):
            raise PermissionDenied(f"the SVID of sidecar {sid} is revoked")
        return s

    def _parse_peer(self, peer_cert_pem: bytes) -> tuple[spiffeid.SpiffeId, str]:
        try:
            cert = x509.load_pem_x509_certificate(peer_cert_pem)
            parsed = (x509svid.spiffe_id_of(cert), x509svid.serial_hex(cert.serial_number))
        except ValueError as e:
            raise Unauthenticated(f"client certificate is not a sidecar SVID: {e}") from None
        if len(self._peer_ids) >= 10_000:  # bounded: sidecar SVIDs rotate, old ones need not stay
            self._peer_ids.clear()
        self._peer_ids[peer_cert_pem] = parsed
        return parsed
