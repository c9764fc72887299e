"""The authorities: a root that anchors trust, intermediates that sign SVIDs, JWT signing keys, and their lifecycle.

Bundles hold roots only. The active intermediate signs every leaf; each intermediate lives `ca_ttl`, its
successor is prepared at half of that and activated at two thirds, so a rotation never makes a request
wait and no SVID outlives its signer (leaves are capped at the signer's notAfter). JWT keys follow the
same schedule: prepared (published), active, retired. Operators prepare, activate, taint and revoke
authorities through `tessera ca`; every change is one datastore write with its audit record, and
listeners (the revocation service, the sidecar stream) are told after it commits.

Roots come from one of three places: created here (its key sealed in the datastore), `ca_cert`/`ca_key`
(an operator's CA, the key read from its file at start), or `ca_cert` with `ca_offline` (the key never
reaches this host: intermediates are signed elsewhere from a CSR, and activated from the certificate).
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as dt
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat, load_der_public_key

from issuer.ca.authority import SigningAuthority, current, read_cert, read_key
from issuer.ca.keys import KeyEncryptionKey
from issuer.core.models import ISSUER, Actor, AuditEvent, Authority
from issuer.datastore.interface import Datastore
from tessera import logs, pem, x509svid
from tessera.errors import ConfigError, FailedPrecondition, InvalidArgument, NotFound

log = logs.get("authorities")
_warn = logs.Throttled(log, window=3600, level="warning")

PREPARE_AT = 1 / 2  # of the active authority's lifetime: its successor exists (and a JWT key is published)
ACTIVATE_AT = 2 / 3  # the successor signs from here on
WARN_OFFLINE_AT = 1 / 2  # an offline-signed intermediate with no signed successor: warned from here on
CHANGES = ("bundle", "signer", "crl", "taint")  # what listeners are told changed


@dataclass(frozen=True)
class AuthorityConfig:
    trust_domain: str
    data_dir: Path
    ca_cert: Path | None = None
    ca_key: Path | None = None
    ca_offline: bool = False
    ca_ttl: int = 7 * 86400  # an intermediate's and a JWT key's lifetime
    root_ttl: int = 10 * 365 * 86400  # a root created here


def _ts(d: dt.datetime) -> int:
    return int(d.timestamp())


def _now() -> int:
    return int(time.time())


def expired(a: Authority, now: float) -> bool:
    return bool(a.cert_der or a.kind == "jwt") and a.not_after <= now


def usable(a: Authority, now: float) -> bool:
    """Can sign: not tainted or revoked, holds a certificate (X.509) and a key, within its validity."""
    return (a.state in ("prepared", "active") and a.not_after > now and bool(a.sealed_key)
            and (a.kind == "jwt" or bool(a.cert_der)))


def published(a: Authority, now: float) -> bool:
    """In what verifiers are given: a root in the bundle, an intermediate's CRL (with its certificate, to check it
    with), a JWT key in the JWKS. A revoked intermediate still publishes its CRL until it expires: `openssl verify
    -crl_check_all` wants a CRL for the leaf's issuer before it reaches the root's CRL that withdraws the issuer."""
    if expired(a, now):
        return False
    if a.kind == "x509":
        return bool(a.cert_der)
    return a.state != "revoked"


class Authorities:
    def __init__(self, store: Datastore, kek: KeyEncryptionKey, cfg: AuthorityConfig):
        self.store = store
        self.kek = kek
        self.cfg = cfg
        self.trust_domain = cfg.trust_domain
        self._lock = threading.RLock()
        self._listeners: list[Callable[[str], None]] = []
        self._records: dict[str, Authority] = {}
        self._keys: dict[str, ec.EllipticCurvePrivateKey] = {}
        self._certs: dict[str, x509.Certificate] = {}
        self._upstream_key: ec.EllipticCurvePrivateKey | None = None
        self._signer: SigningAuthority | None = None
        self.bundle: tuple[x509.Certificate, ...] = ()
        self.bundle_der = b""
        self.bundle_pem = b""
        self._start()

    # -- reads -------------------------------------------------------------------------------

    def signer(self) -> SigningAuthority:
        """The active intermediate. Never waits: its successor was made ready beforehand."""
        s = self._signer
        if s is None:
            raise FailedPrecondition("no active signing authority")
        return s

    def list(self) -> list[Authority]:
        with self._lock:
            return sorted(self._records.values(), key=lambda a: (a.created_at, a.id))

    def get(self, authority_id: str) -> Authority:
        with self._lock:
            a = self._records.get(authority_id)
            if a is None:
                matches = [r for r in self._records.values() if r.id.startswith(authority_id)] if len(
                    authority_id) >= 8 else []
                if len(matches) != 1:
                    raise NotFound(f"no authority {authority_id!r}")
                a = matches[0]
            return a

    def certificate(self, authority_id: str) -> x509.Certificate | None:
        with self._lock:
            return self._certs.get(authority_id)

    def crl_signers(self, now: float | None = None) -> list[tuple[Authority, x509.Certificate,
                                                                   ec.EllipticCurvePrivateKey]]:
        """Every authority that publishes a CRL now: each unexpired intermediate not revoked, and each root whose
        key is here (its CRL withdraws intermediates). A CRL is signed by the authority it speaks for."""
        now = time.time() if now is None else now
        out = []
        with self._lock:
            for a in self._records.values():
                if a.kind == "jwt" or not published(a, now):
                    continue
                key = self._key(a)
                if key is not None and a.id in self._certs:
                    out.append((a, self._certs[a.id], key))
        return out

    def intermediates(self, now: float | None = None) -> list[x509.Certificate]:
        """The published intermediates' certificates: what a verifier checks their CRLs' signatures with."""
        now = time.time() if now is None else now
        with self._lock:
            return [self._certs[a.id] for a in self._records.values()
                    if a.kind == "x509" and published(a, now) and a.id in self._certs]

    def jwks_keys(self, now: float | None = None) -> list[tuple[str, ec.EllipticCurvePublicKey]]:
        """The JWT keys a verifier must know: prepared (published before use), active and retired, unexpired."""
        now = time.time() if now is None else now
        with self._lock:
            return [(a.id, load_der_public_key(a.public_der)) for a in self._records.values()
                    if a.kind == "jwt" and published(a, now) and a.state != "tainted"]

    def jwt_signer(self) -> tuple[str, ec.EllipticCurvePrivateKey]:
        with self._lock:
            for a in self._records.values():
                if a.kind == "jwt" and a.state == "active":
                    key = self._key(a)
                    if key is not None:
                        return a.id, key
        raise FailedPrecondition("no active JWT signing key")

    def withdrawn(self, now: float | None = None) -> list[str]:
        """Ids of the tainted and revoked authorities that have not expired: a sidecar keeps nothing they signed."""
        now = time.time() if now is None else now
        with self._lock:
            return sorted(a.id for a in self._records.values()
                          if a.state in ("tainted", "revoked") and not expired(a, now))

    def outstanding(self, a: Authority, now: float | None = None) -> int:
        """Unexpired things that depend on `a`: certificates it signed, and for a root its live intermediates."""
        now = int(time.time() if now is None else now)
        n = self.store.count_outstanding(a.id, now) if a.kind == "x509" or a.kind == "root" else 0
        if a.kind == "root":
            n += sum(1 for r in self.list() if r.parent == a.id and r.state != "revoked" and not expired(r, now)
                     and r.cert_der)
        return n

    def subscribe(self, listener: Callable[[str], None]) -> None:
        """`listener(change)` after each committed change, change one of CHANGES. Called on the changer's thread."""
        self._listeners.append(listener)

    # -- start ---------------------------------------------------------------------------------

    def _start(self) -> None:
        # One store transaction: issuers starting at once on one database take its write lock in turn, and each
        # reads what the one before committed, so the root, the intermediate and the JWT key are made once and
        # the others adopt them (two roots, both active, would split the trust domain).
        refused: ConfigError | None = None
        with self._lock, self.store.transaction():
            try:
                self._load()
                root = self._setup_root()
                if root.state == "active" and root.not_after <= _now():
                    raise ConfigError(f"root {root.id} expired at {_iso(root.not_after)}: "
                                      "renew it (ca_cert) or rotate to a new root")
                self._adopt_pending_certificate()
                self._ensure_signer(ISSUER, "start")
                self._ensure_jwt(ISSUER, "start")
                self._refresh()
            except ConfigError as e:
                refused = e  # committed all the same: the next start continues (an offline root's prepared CSR)
        if refused is not None:
            raise refused

    def _load(self) -> None:
        self._records = {a.id: a for a in self.store.list_authorities()}
        for a in self._records.values():
            if a.cert_der:
                self._certs[a.id] = x509.load_der_x509_certificate(a.cert_der)

    def _setup_root(self) -> Authority:
        cfg = self.cfg
        roots = [a for a in self._records.values() if a.kind == "root"]
        if cfg.ca_cert is not None:
            cert = current(read_cert(cfg.ca_cert, "ca_cert"), f"ca_cert: {cfg.ca_cert}")
            if cfg.ca_key is not None:
                self._upstream_key = read_key(cfg.ca_key, "ca_key")
                if cert.public_key().public_numbers() != self._upstream_key.public_key().public_numbers():
                    raise ConfigError("ca_key: does not match ca_cert")
            source = "offline" if cfg.ca_offline else "upstream"
            rid = x509svid.authority_id(cert.public_key())
            existing = self._records.get(rid)
            if existing is None:
                rec = self._new_record(rid, "root", "active", source, None, cert.public_key(), cert, None)
                self._activate_root(rec, ISSUER, f"{source} root from ca_cert")
                return self._records[rid]
            if existing.state not in ("active", "prepared"):
                raise ConfigError(f"ca_cert: root {rid} is {existing.state} here; configure another root")
            if existing.state == "prepared":
                self._activate_root(existing, ISSUER, "configured as ca_cert")
            return self._records[rid]
        active = [a for a in roots if a.state == "active" and a.source == "created"]
        if active:
            return active[0]
        if any(a.state == "active" for a in roots):
            raise ConfigError("this data_dir's root came from ca_cert; configure ca_cert again (and ca_key unless it is "
                              "offline) or rotate the root first")
        legacy_cert, legacy_key = self.cfg.data_dir / "ca.pem", self.cfg.data_dir / "ca-key.pem"
        if legacy_cert.exists() or legacy_key.exists():
            # The single CA of an earlier release becomes the root: the SVIDs it signed stay valid.
            cert = current(read_cert(legacy_cert, "ca_cert"), f"root {legacy_cert}")
            key = read_key(legacy_key, "ca_key")
            rid = x509svid.authority_id(key.public_key())
            rec = self._new_record(rid, "root", "active", "created", None, key.public_key(), cert, key)
            self._activate_root(rec, ISSUER, f"adopted {legacy_cert} as the root")
            self.store.adopt_unattributed(rid)
            log.info("the earlier CA is now the root; intermediates sign from here on", root=rid,
                     files=f"{legacy_cert}, {legacy_key} (no longer read; keep them offline or delete them)")
            return self._records[rid]
        key = x509svid.new_key()
        cert = x509svid.build_ca(key, self.trust_domain, dt.timedelta(seconds=cfg.root_ttl))
        rid = x509svid.authority_id(key.public_key())
        rec = self._new_record(rid, "root", "active", "created", None, key.public_key(), cert, key)
        self._activate_root(rec, ISSUER, "first start: root created")
        return self._records[rid]

    def _activate_root(self, rec: Authority, actor: Actor, reason: str) -> None:
        now = _now()
        with self.store.transaction():
            for other in self._records.values():
                if other.kind == "root" and other.state == "active" and other.id != rec.id:
                    self._put(dataclasses.replace(other, state="retired", retired_at=now), actor,
                              "ca.retire", reason, expect=other.state)
            rec = dataclasses.replace(rec, state="active", activated_at=now)
            if rec.id in self._records:
                self._put(rec, actor, "ca.activate", reason, expect=self._records[rec.id].state)
            else:
                self._put(rec, actor, "ca.create", reason)

    def _adopt_pending_certificate(self) -> None:
        """An offline root's intermediate, signed while the issuer was stopped and left as data_dir/<id>.pem."""
        for a in self.list():
            if a.kind == "x509" and a.state == "prepared" and not a.cert_der:
                path = self.cfg.data_dir / f"intermediate-{a.id}.pem"
                if path.exists():
                    self.activate(a.id, pem.certs_pem(pem.read_certs(path, "intermediate")), ISSUER,
                                  f"certificate found at {path}")

    def _ensure_signer(self, actor: Actor, reason: str) -> None:
        now = _now()
        root = self._root().id  # intermediates under another root (ca_cert was changed) no longer sign
        active = [a for a in self._records.values() if a.kind == "x509" and a.state == "active" and usable(a, now)
                  and a.parent == root]
        if active:
            self._install_signer(active[0])
            return
        ready = [a for a in self._records.values() if a.kind == "x509" and a.state == "prepared" and usable(a, now)
                 and a.parent == root]
        if ready:
            self._activate(ready[0], actor, reason)
            return
        if self._root_key() is None:
            pending = [a for a in self._records.values() if a.kind == "x509" and a.state == "prepared"
                       and not a.cert_der and a.parent == root]
            a = pending[0] if pending else self._prepare_x509(actor, reason)
            csr = self._write_csr(a)
            raise ConfigError(f"offline root: no intermediate can sign; sign {csr} with the root and save the "
                              f"certificate as {self.cfg.data_dir / f'intermediate-{a.id}.pem'}, then start again")
        self._activate(self._prepare_x509(actor, reason), actor, reason)

    def _ensure_jwt(self, actor: Actor, reason: str) -> None:
        now = _now()
        if any(a.kind == "jwt" and a.state == "active" and usable(a, now) for a in self._records.values()):
            return
        ready = [a for a in self._records.values() if a.kind == "jwt" and a.state == "prepared" and usable(a, now)]
        self._activate(ready[0] if ready else self._prepare_jwt(actor, reason), actor, reason)

    # -- operator commands -----------------------------------------------------------------------

    def prepare(self, kind: str, actor: Actor, reason: str) -> tuple[Authority, bytes]:
        """A new authority of `kind` in state prepared, and for an intermediate under an offline root the CSR (PEM)
        the operator signs elsewhere. A prepared root enters the bundle at once and signs only once activated."""
        with self._lock:
            if kind == "x509":
                # Under an offline root one request waits at a time (the schedule may have prepared it already).
                pending = [r for r in self._records.values() if r.kind == "x509" and r.state == "prepared"
                           and not r.cert_der]
                a = pending[0] if pending else self._changing(self._prepare_x509, actor, reason)
                csr = b"" if a.cert_der else self._csr_pem(a)
            elif kind == "jwt":
                a, csr = self._changing(self._prepare_jwt, actor, reason), b""
            elif kind == "root":
                a, csr = self._changing(self._prepare_root, actor, reason), b""
            else:
                raise InvalidArgument(f"kind must be root, x509 or jwt, not {kind!r}")
            self._refresh()
        self._notify("bundle" if kind == "root" else "crl")
        return a, csr

    def activate(self, authority_id: str, cert_pem: bytes, actor: Actor, reason: str) -> Authority:
        """Make a prepared authority the one that signs; `cert_pem` is an offline root's signature of its CSR."""
        with self._lock:
            a = self.get(authority_id)
            if a.state != "prepared":
                raise FailedPrecondition(f"authority {a.id} is {a.state}; only a prepared authority can be activated")
            with self._rollback():
                a = self._activate_prepared(a, cert_pem, actor, reason)
            self._refresh()
            out = self._records[a.id]
        self._notify("signer")
        return out

    def _activate_prepared(self, a: Authority, cert_pem: bytes, actor: Actor, reason: str) -> Authority:
        with self.store.transaction():
            if cert_pem:
                a = self._with_certificate(a, cert_pem, actor)
            elif a.kind == "x509" and not a.cert_der:
                raise InvalidArgument(f"intermediate {a.id} waits for its certificate: give --cert with the offline "
                                      "root's signature of its CSR")
            if a.kind == "root":
                if a.source == "created" and self._root_key() is None:
                    raise FailedPrecondition("the root in force is not ours to replace")
                self._activate_root(a, actor, reason)
                # Intermediates chain to one root: the next one is signed by the new root at once.
                self._activate(self._prepare_x509(actor, reason), actor, reason)
            else:
                self._activate(a, actor, reason)
        return a

    def taint(self, authority_id: str, actor: Actor, reason: str) -> list[str]:
        """Stop trusting the key for new work and replace everything it signed at once, fleet-wide: the ids tainted
        (a root takes its intermediates with it). The active authority is first replaced by a successor."""
        with self._lock:
            a = self.get(authority_id)
            if a.state in ("tainted", "revoked"):
                raise FailedPrecondition(f"authority {a.id} is already {a.state}")
            now = _now()
            if expired(a, now):
                raise FailedPrecondition(f"authority {a.id} expired at {_iso(a.not_after)}; nothing to replace")
            with self._rollback():
                targets = self._taint(a, now, actor, reason)
            self._refresh()
        self._notify("taint")
        return [t.id for t in targets]

    def _taint(self, a: Authority, now: int, actor: Actor, reason: str) -> list[Authority]:
        with self.store.transaction():
            targets = [a]
            if a.kind == "root":
                successor = [r for r in self._records.values() if r.kind == "root" and r.state == "prepared"
                             and r.id != a.id and not expired(r, now)]
                if a.state == "active" and not successor:
                    raise FailedPrecondition(f"root {a.id} is the active root: prepare a new root (tessera ca prepare "
                                             "--kind root) and let it reach the fleet before tainting this one")
                targets += [r for r in self._records.values() if r.parent == a.id and r.kind == "x509"
                            and r.state not in ("tainted", "revoked") and not expired(r, now)]
                if a.state == "active":
                    self._activate_root(successor[0], actor, f"successor of tainted root {a.id}")
            for t in targets:
                t = self._records[t.id]
                self._put(dataclasses.replace(t, state="tainted", tainted_at=now), actor, "ca.taint", reason,
                          expect=t.state)
            self._ensure_signer(actor, f"successor of tainted {a.id}")
            self._ensure_jwt(actor, f"successor of tainted {a.id}")
        return targets

    def revoke(self, authority_id: str, force: bool, actor: Actor, reason: str) -> Authority:
        """Withdraw an authority: a root leaves the bundle, an intermediate goes on its root's CRL, a JWT key leaves
        the JWKS. Refused while it signs, and (unless forced) while unexpired certificates depend on it."""
        with self._lock:
            a = self.get(authority_id)
            if a.state == "revoked":
                raise FailedPrecondition(f"authority {a.id} is already revoked")
            if a.state == "active":
                raise FailedPrecondition(f"authority {a.id} is the active {a.kind}: taint it first, which activates a "
                                         "successor")
            if a.kind == "root" and not any(r.kind == "root" and r.state == "active" and r.id != a.id
                                            for r in self._records.values()):
                raise FailedPrecondition(f"root {a.id} is the only root")
            if a.kind == "x509" and a.cert_der and self._key_of_root(a.parent) is None:
                raise FailedPrecondition(f"intermediate {a.id} was signed by an offline root, whose key is not here to "
                                         "sign the CRL that withdraws it: revoke it at that CA (taint it here first)")
            pending = self.outstanding(a)
            if pending and not force:
                raise FailedPrecondition(f"{pending} unexpired certificates depend on authority {a.id}: taint it and "
                                         "wait for them to be replaced, or give --force")
            now = _now()
            with self._rollback(), self.store.transaction():
                self._put(dataclasses.replace(a, state="revoked", revoked_at=now), actor, "ca.revoke", reason,
                          expect=a.state, details={"forced": force, "outstanding": pending})
                if a.kind == "root":
                    for r in list(self._records.values()):
                        if r.parent == a.id and r.state != "revoked":
                            self._put(dataclasses.replace(r, state="revoked", revoked_at=now), actor, "ca.revoke",
                                      f"its root {a.id} was revoked", expect=r.state)
            self._refresh()
            out = self._records[a.id]
        self._notify("bundle" if a.kind == "root" else "crl")
        return out

    # -- the schedule --------------------------------------------------------------------------

    def tick(self, now: float | None = None) -> None:
        """Prepare and activate successors when due (called about once a second)."""
        now = time.time() if now is None else now
        with self._lock:
            self._reload_if_changed()
            if not self._due(now):
                return
            # Decided again under the store's write lock, on what is committed now: of several issuers on one
            # database, the first prepares or activates the successor and the others adopt it.
            try:
                with self.store.transaction():
                    self._reload_if_changed()
                    changed = self._rotate(now)
            except BaseException:
                self._load()  # rolled back: memory follows the store again (read inside, it saw the undone writes)
                self._refresh()
                raise
        if changed:
            self._notify(changed)

    def _due(self, now: float) -> bool:
        """Whether _rotate would change anything now (read-only: no write lock taken once a second for nothing)."""
        for kind in ("x509", "jwt"):
            active = next((a for a in self._records.values() if a.kind == kind and a.state == "active"), None)
            if active is None or not usable(active, now):
                return True
            start = max(active.not_before, min(active.created_at, active.not_after))
            life = active.not_after - start
            successors = [a for a in self._records.values() if a.kind == kind and a.state == "prepared"
                          and a.created_at >= active.created_at]
            if not successors and now >= start + life * PREPARE_AT:
                return True
            ready = any(usable(a, now) for a in successors)
            if ready and now >= start + life * ACTIVATE_AT:
                return True
            if kind == "x509" and not ready and now >= start + life * WARN_OFFLINE_AT:
                return True  # _rotate warns (throttled) that the offline root must sign the successor
        return False

    def _rotate(self, now: float) -> str:
        """Prepare and activate what is due (under the lock and a store transaction); what changed, or ""."""
        changed = ""
        for kind in ("x509", "jwt"):
            active = next((a for a in self._records.values() if a.kind == kind and a.state == "active"), None)
            if active is None or not usable(active, now):
                try:
                    (self._ensure_signer if kind == "x509" else self._ensure_jwt)(ISSUER, "the active one expired")
                    changed = "signer"
                except ConfigError as e:
                    _warn.log(f"no-signer-{kind}", "no authority can sign", kind=kind, error=str(e))
                continue
            # Counted from when it came to be: a certificate is backdated for clock skew (30 s), which must not
            # shift the schedule (with ca_ttl 60 s it made every intermediate sign for 15 s, not 30 s).
            start = max(active.not_before, min(active.created_at, active.not_after))
            life = active.not_after - start
            successors = [a for a in self._records.values() if a.kind == kind and a.state == "prepared"
                          and a.created_at >= active.created_at]
            if not successors and now >= start + life * PREPARE_AT:
                try:
                    successors = [self._changing(self._prepare_x509 if kind == "x509" else self._prepare_jwt,
                                                 ISSUER, "scheduled rotation")]
                    if kind == "x509" and not successors[0].cert_der:
                        log.warning("offline root: the next intermediate waits for its certificate",
                                    csr=str(self._write_csr(successors[0])), authority=successors[0].id)
                except FailedPrecondition as e:
                    _warn.log(f"no-successor-{kind}", "cannot prepare the next authority", kind=kind, error=str(e))
                changed = changed or "crl"
            ready = [a for a in successors if usable(a, now)]
            if kind == "x509" and not ready and now >= start + life * WARN_OFFLINE_AT:
                _warn.log(f"offline-{active.id}", "the active intermediate was signed offline and has no signed successor: sign the "
                              "prepared CSR and run tessera ca activate before it expires", authority=active.id,
                              expires=_iso(active.not_after))
            if ready and now >= start + life * ACTIVATE_AT:
                with self._rollback():
                    self._activate(ready[0], ISSUER, "scheduled rotation")
                changed = "signer"
        if changed:
            self._refresh()
        return changed

    def _reload_if_changed(self) -> bool:
        stored = {a.id: a for a in self.store.list_authorities()}
        if stored != self._records:  # another issuer (or a CLI on this store) changed them
            self._load()
            self._refresh()
            return True
        return False

    def reload(self) -> list[str]:
        """Another issuer changed the authorities (its change reached this one through the change feed,
        issuer/peers.py): read them again and tell the listeners what changed, as for a change made here. Returns
        the ids newly tainted or revoked: what the sidecars must replace at once (the caller pushes the taint)."""
        now = time.time()
        with self._lock:
            before = dict(self._records)
            signer, bundle = self._signer.id if self._signer else None, self.bundle_der
            if not self._reload_if_changed():
                return []
            withdrawn = sorted(a.id for a in self._records.values() if a.state in ("tainted", "revoked")
                               and before.get(a.id, a).state not in ("tainted", "revoked") and not expired(a, now))
            change = ("bundle" if self.bundle_der != bundle else
                      "signer" if (self._signer.id if self._signer else None) != signer else "crl")
        self._notify(change)
        return withdrawn

    # -- internals -------------------------------------------------------------------------------

    @contextlib.contextmanager
    def _rollback(self) -> Iterator[None]:
        """A change that fails part-way was rolled back in the store: memory follows the store again."""
        try:
            yield
        except BaseException:
            self._load()
            self._refresh()
            raise

    def _changing(self, fn: Callable[..., Authority], *args) -> Authority:
        with self._rollback():
            return fn(*args)

    def _root(self) -> Authority:
        for a in self._records.values():
            if a.kind == "root" and a.state == "active":
                return a
        raise FailedPrecondition("no active root")

    def _root_key(self) -> ec.EllipticCurvePrivateKey | None:
        return self._key(self._root())

    def _key_of_root(self, root_id: str | None) -> ec.EllipticCurvePrivateKey | None:
        a = self._records.get(root_id or "")
        return self._key(a) if a is not None else None

    def _key(self, a: Authority) -> ec.EllipticCurvePrivateKey | None:
        if a.id in self._keys:
            return self._keys[a.id]
        if a.sealed_key:
            key = self.kek.unseal(a.id, a.kek_id, a.sealed_key)
        elif a.kind == "root" and a.source == "upstream" and self._upstream_key is not None and \
                x509svid.authority_id(self._upstream_key.public_key()) == a.id:
            key = self._upstream_key
        else:
            return None
        self._keys[a.id] = key
        return key

    def _load_cert(self, a: Authority) -> None:
        if a.cert_der:
            self._certs[a.id] = x509.load_der_x509_certificate(a.cert_der)

    def _new_record(self, rid: str, kind: str, state: str, source: str, parent: str | None, public_key,
                    cert: x509.Certificate | None, key: ec.EllipticCurvePrivateKey | None,
                    not_after: int | None = None) -> Authority:
        now = _now()
        return Authority(
            id=rid, kind=kind, state=state, source=source, parent=parent,
            public_der=public_key.public_bytes(Encoding.DER, PublicFormat.SubjectPublicKeyInfo),
            cert_der=cert.public_bytes(Encoding.DER) if cert is not None else b"",
            sealed_key=self.kek.seal(rid, key) if key is not None else b"",
            kek_id=self.kek.id if key is not None else "",
            not_before=_ts(cert.not_valid_before_utc) if cert is not None else now,
            not_after=(_ts(cert.not_valid_after_utc) if cert is not None else not_after or now),
            created_at=now)

    def _prepare_x509(self, actor: Actor, reason: str) -> Authority:
        root = self._root()
        root_key = self._key(root)
        key = x509svid.new_key()
        rid = x509svid.authority_id(key.public_key())
        if root_key is None:  # offline: the operator signs its CSR elsewhere
            rec = self._new_record(rid, "x509", "prepared", "offline", root.id, key.public_key(), None, key)
        else:
            root_cert = self._certs[root.id]
            not_after = dt.datetime.now(dt.timezone.utc) + dt.timedelta(seconds=self.cfg.ca_ttl)
            cert = x509svid.build_intermediate(key.public_key(), self.trust_domain, not_after, root_cert, root_key)
            rec = self._new_record(rid, "x509", "prepared", "root", root.id, key.public_key(), cert, key)
        self._put(rec, actor, "ca.prepare", reason)
        self._keys[rid] = key
        self._load_cert(rec)
        return rec

    def _prepare_jwt(self, actor: Actor, reason: str) -> Authority:
        key = x509svid.new_key()
        rid = x509svid.authority_id(key.public_key())
        now = _now()
        rec = self._new_record(rid, "jwt", "prepared", "created", None, key.public_key(), None, key,
                               not_after=now + self.cfg.ca_ttl)
        self._put(rec, actor, "ca.prepare", reason)
        self._keys[rid] = key
        return rec

    def _prepare_root(self, actor: Actor, reason: str) -> Authority:
        if self.cfg.ca_cert is not None:
            raise FailedPrecondition("the root comes from ca_cert: rotate it by configuring the new one (ca_cert)")
        key = x509svid.new_key()
        cert = x509svid.build_ca(key, self.trust_domain, dt.timedelta(seconds=self.cfg.root_ttl))
        rec = self._new_record(x509svid.authority_id(key.public_key()), "root", "prepared", "created", None,
                               key.public_key(), cert, key)
        self._put(rec, actor, "ca.prepare", reason)
        self._load_cert(rec)
        return rec

    def _with_certificate(self, a: Authority, cert_pem: bytes, actor: Actor) -> Authority:
        """A prepared intermediate's certificate, from the offline root: it must be for this key, by the root."""
        if a.kind != "x509" or a.cert_der:
            raise InvalidArgument(f"authority {a.id} already has its certificate; activate it without --cert")
        try:
            certs = x509.load_pem_x509_certificates(cert_pem)
        except ValueError as e:
            raise InvalidArgument(f"--cert is not a PEM certificate: {e}") from None
        cert = certs[0]
        if cert.public_key().public_bytes(Encoding.DER, PublicFormat.SubjectPublicKeyInfo) != a.public_der:
            raise InvalidArgument(f"the certificate is for key {x509svid.authority_id(cert.public_key())}, not for "
                                  f"the prepared intermediate {a.id}")
        root_cert = self._certs.get(a.parent or "")
        try:
            if root_cert is None:
                raise ValueError("unknown root")
            cert.verify_directly_issued_by(root_cert)
        except (ValueError, TypeError, InvalidSignature):
            raise InvalidArgument(f"the certificate is not signed by root {a.parent}") from None
        try:
            bc = cert.extensions.get_extension_for_class(x509.BasicConstraints).value
        except x509.ExtensionNotFound:
            bc = None
        if bc is None or not bc.ca:
            raise InvalidArgument("the certificate is not a CA certificate (basicConstraints cA)")
        current(cert, "the intermediate's certificate")
        rec = dataclasses.replace(a, cert_der=cert.public_bytes(Encoding.DER), not_before=_ts(cert.not_valid_before_utc),
                                  not_after=_ts(cert.not_valid_after_utc))
        self._put(rec, actor, "ca.certify", "offline root's certificate installed", expect="prepared")
        self._load_cert(rec)
        return rec

    def _activate(self, a: Authority, actor: Actor, reason: str) -> None:
        now = _now()
        with self.store.transaction():
            for other in list(self._records.values()):
                if other.kind == a.kind and other.state == "active" and other.id != a.id:
                    self._put(dataclasses.replace(other, state="retired", retired_at=now), actor, "ca.retire",
                              f"replaced by {a.id}", expect="active")
            self._put(dataclasses.replace(self._records[a.id], state="active", activated_at=now), actor,
                      "ca.activate", reason, expect="prepared")
        if a.kind == "x509":
            self._install_signer(self._records[a.id])

    def _install_signer(self, a: Authority) -> None:
        key = self._key(a)
        if key is None:
            raise ConfigError(f"intermediate {a.id} has no key here")
        self._signer = SigningAuthority(self._certs[a.id], key, self.trust_domain)

    def _put(self, a: Authority, actor: Actor, action: str, reason: str, *, expect: str | None = None,
             details: dict | None = None) -> None:
        audit = AuditEvent(action, actor, "allow", reason=reason, subject=a.id,
                           details={"kind": a.kind, "state": a.state, "source": a.source,
                                    "not_after": a.not_after, **(details or {})})
        if not self.store.put_authority(a, audit, expect_state=expect):
            raise FailedPrecondition(f"authority {a.id} changed meanwhile (another issuer?); try again")
        self._records[a.id] = a
        self._load_cert(a)

    def _refresh(self) -> None:
        now = time.time()
        roots = [self._certs[a.id] for a in self.list() if a.kind == "root" and published(a, now) and a.id in self._certs]
        self.bundle = tuple(roots)
        self.bundle_der = pem.der_concat(roots)
        self.bundle_pem = pem.certs_pem(roots)
        active = next((a for a in self._records.values() if a.kind == "x509" and a.state == "active"), None)
        if active is not None and (self._signer is None or self._signer.id != active.id) and usable(active, now):
            self._install_signer(active)

    def _csr_pem(self, a: Authority) -> bytes:
        key = self._key(a)
        assert key is not None
        return x509svid.intermediate_csr(key, self.trust_domain).public_bytes(Encoding.PEM)

    def _write_csr(self, a: Authority) -> Path:
        from tessera import safefs

        path = self.cfg.data_dir / f"intermediate-{a.id}.csr"
        safefs.atomic_write(path, self._csr_pem(a), 0o644, "data_dir")
        return path

    def _notify(self, change: str) -> None:
        for listener in list(self._listeners):
            try:
                listener(change)
            except Exception as e:  # noqa: BLE001 - one listener's failure is not the change's
                log.error("authority listener failed", change=change, error=repr(e))


def _iso(t: int) -> str:
    return dt.datetime.fromtimestamp(t, dt.timezone.utc).isoformat()
