"""Revocation on the issuer: commit durably, push to every sidecar, keep a signed CRL current.

When `revoke` returns, three things hold: the revocation is on disk (the entries revoked as
a whole, the serials marked, a row in the revocation log and the audit record, one
transaction: they commit together or not at all); it was pushed to every connected sidecar
with its sequence number; and the signed CRL set listing it was pushed too (one CRL per
publishing authority: each intermediate lists what it signed, a root the intermediates it
withdrew), so a sidecar that got
the push enforces it in its crl.pem and Workload API `crl` fields even if the issuer dies a
moment later.

CRL builds are group-committed: a revocation waits for the first build that started after
its own commit, and one build covers every revocation committed before it started, so a
burst signs a few CRLs, not one each (at 100,000 revoked serials a build is tens of
milliseconds). CRL numbers come from a durable counter per authority, so a restarted issuer only ever
signs higher numbers; the CRL itself is not stored, since it derives from the revoked
serials: at start the issuer signs a fresh one. The revoked set is held in memory (loaded
at start), so checking a serial is a dict lookup and a build reads no rows.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from typing import Callable

from cryptography.hazmat.primitives.serialization import Encoding

from issuer import metrics
from issuer.ca.authorities import Authorities
from issuer.core.events import CLOSE, EventHub
from issuer.core.models import ISSUER, Actor, AuditEvent, Entry, IssuedSerial, Revocation, SignResult
from issuer.datastore.interface import Datastore
from issuer.identity.attestation import SidecarAttestor
from issuer.identity.registration import Registry, required_text
from tessera import crl, logs, spiffeid, x509svid
from tessera.errors import Code, InvalidArgument, NotFound, PermissionDenied, Unavailable

log = logs.get("issuer.revocation.service")

KINDS = ("serial", "task", "entry", "spiffe_id", "sidecar", "owner")
# What a revocation means when the operator gives no RFC 5280 reason code.
DEFAULT_CODES = {"serial": "unspecified", "task": "cessationOfOperation", "entry": "privilegeWithdrawn",
                 "spiffe_id": "privilegeWithdrawn", "owner": "privilegeWithdrawn", "sidecar": "keyCompromise"}
# Identities revoked as a whole stay refused for new issuance, even for entries created later.
BLOCKING_KINDS = ("spiffe_id", "owner")


@dataclass(frozen=True)
class RevokeResult:
    seq: int
    serials: tuple[str, ...]
    entry_ids: tuple[str, ...] = ()


@dataclass(frozen=True)
class RevocationEvent:
    seq: int
    serials: tuple[str, ...]
    entry_ids: tuple[str, ...]
    spiffe_ids: tuple[str, ...]
    reason: str


@dataclass(frozen=True)
class CrlInfo:
    der: bytes
    number: int
    this_update: int
    next_update: int
    entries: int
    authority: str  # the signer's id


@dataclass(frozen=True)
class CrlSet:
    """Every CRL published now, the active signer's first, and the intermediates' certificates to check them with."""

    crls: tuple[CrlInfo, ...]
    intermediates: tuple[bytes, ...]


def normalize_serial(value: str) -> str:
    """Lowercase hex without leading zeros; accepts 0x and colon-separated forms."""
    v = (value or "").strip().lower().replace(":", "")
    v = v[2:] if v.startswith("0x") else v
    try:
        n = int(v, 16)
    except ValueError:
        raise InvalidArgument(f"invalid serial {value!r}: expected hexadecimal") from None
    return x509svid.serial_hex(n)


class RevocationService:
    def __init__(self, store: Datastore, authorities: Authorities, registry: Registry, attestor: SidecarAttestor,
                 hub: EventHub, crl_validity: int, on_crl_numbers: Callable[[dict[str, int]], None] | None = None):
        """`on_crl_numbers` is told the numbers of each CRL set before it goes out (the issuer's high-water mark)."""
        self.store = store
        self.on_crl_numbers = on_crl_numbers
        self.authorities = authorities
        self.registry = registry
        self.attestor = attestor
        self.hub = hub
        self.crl_validity = crl_validity
        self._write_lock = threading.Lock()  # one revocation at a time: seq order is push order
        self._lock = threading.Lock()
        now = int(time.time())
        unexpired = store.find_issued(revoked=True, unexpired_at=now)
        self._revoked: dict[str, crl.Revoked] = {
            s.serial: crl.Revoked(s.serial, s.revoked_at or now, s.revocation_reason or "unspecified") for s in unexpired}
        # Kept apart so a build copies the records in one C call and scans expiries only when one is due.
        self._not_after: dict[str, int] = {s.serial: s.not_after for s in unexpired}
        self._signer: dict[str, str] = {s.serial: s.authority or "" for s in unexpired}  # which CRL lists it
        self._next_expiry = min(self._not_after.values(), default=0)
        blocked = store.revocations(BLOCKING_KINDS)
        self._blocked_ids = {r.target for r in blocked if r.kind == "spiffe_id"}
        self._blocked_owners = {r.target for r in blocked if r.kind == "owner"}
        self.seq = store.last_revocation_seq()
        self._crls: CrlSet | None = None
        # Group commit of CRL builds: `_gen` counts changes to the revoked set (under _lock), the CRL in
        # force covers `_crl_gen` of them, and at most one build runs (`_building`, under _crl_done).
        self._gen = 0
        self._crl_gen = -1
        self._building = False
        self._crl_done = threading.Condition()
        self._dirty = threading.Event()  # a build failed: the CRL thread retries
        self._stop = threading.Event()
        self._refresh_at = 0.0
        self._thread: threading.Thread | None = None
        self.rebuild_crl()  # at start, from what is on disk: nothing acknowledged is missing

    # -- lifecycle ------------------------------------------------------------------

    def start(self) -> None:
        self._thread = threading.Thread(target=self._crl_loop, name="crl", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._dirty.set()
        if self._thread is not None:
            self._thread.join(timeout=5)

    # -- checks used by the other services (memory only) ------------------------------------

    def is_revoked(self, serial_hex: str) -> bool:
        return serial_hex in self._revoked

    def check_entry(self, entry: Entry) -> None:
        """Refuse issuance for an identity or owner revoked as a whole."""
        if entry.spiffe_id in self._blocked_ids:
            raise PermissionDenied(f"identity {entry.spiffe_id} is revoked")
        if entry.owner in self._blocked_owners:
            raise PermissionDenied(f"identities of owner {entry.owner!r} are revoked")

    def recheck_issued(self, results: list, sidecar_id: str) -> list:
        """After an issuing path recorded its serials: those whose entry or sidecar was revoked or
        banned meanwhile are revoked and withheld. Every issuing path (identity, task) calls this,
        directly or as its two halves (`withhold_late`, then `revoke_late` off the event loop).

        Issuing checks, signs, then records; a revocation sets the entry's or sidecar's state, then
        looks up its serials. Checking again after the record closes the gap: either this check sees
        the new state, or the revocation's lookup sees the recorded serial.
        """
        out, late = self.withhold_late(results, sidecar_id)
        self.revoke_late(late)
        return out

    def withhold_late(self, results: list, sidecar_id: str) -> tuple[list, list[str]]:
        """In memory, no I/O: the answers with late ones replaced by PERMISSION_DENIED, and their serials."""
        late: list[str] = []
        out = []
        try:
            banned = self.attestor.get(sidecar_id).state == "banned"
        except NotFound:
            banned = True
        for r in results:
            entry = self.registry.get(r.entry_id) if r.serial else None
            refused = None
            if r.serial and banned:
                refused = f"sidecar {sidecar_id} is banned"
            elif entry is not None:
                try:
                    if entry.state != "active":
                        raise PermissionDenied(f"entry {entry.id} is {entry.state}")
                    self.check_entry(entry)
                except PermissionDenied as e:
                    refused = e.message
            if refused is None:
                out.append(r)
            else:
                late.append(r.serial)
                out.append(SignResult(r.entry_id, code=int(Code.PERMISSION_DENIED), error=refused))
        return out, late

    def revoke_late(self, late: list[str]) -> None:
        """Revoke what `withhold_late` withheld (a durable write)."""
        if late:
            self.revoke_serials(late, "revoked while its certificate was being signed", ISSUER,
                                reason_code="privilegeWithdrawn", kind="serial", target=",".join(late))

    def crl_set(self) -> CrlSet:
        assert self._crls is not None
        return self._crls

    def crl_info(self) -> CrlInfo:
        """The active signer's CRL."""
        return self.crl_set().crls[0]

    def crl_der(self) -> bytes:
        return self.crl_info().der

    # -- revoking ---------------------------------------------------------------------

    def revoke(self, kind: str, target: str, reason: str, actor: Actor, reason_code: str = "") -> RevokeResult:
        """Revoke by one selector; returns once the revocation is durable."""
        if kind not in KINDS:
            raise InvalidArgument(f"unknown revocation target {kind!r}: use one of {', '.join(KINDS)}")
        reason = required_text("reason", reason)
        code = reason_code or DEFAULT_CODES[kind]
        if code not in crl.REASON_CODES:
            raise InvalidArgument(f"unknown reason code {code!r}: use one of {', '.join(crl.REASON_CODES)}")
        target = (target or "").strip()
        if not target:
            raise InvalidArgument(f"a {kind.replace('_', ' ')} to revoke is required")
        return getattr(self, f"_revoke_{kind}")(target, reason, code, actor)

    def revoke_serials(self, serials, reason: str, actor: Actor, reason_code: str = "cessationOfOperation",
                       kind: str = "task", target: str = "") -> RevokeResult:
        """Revoke known serials (e.g. when a task ends); unknown ones are skipped."""
        found = [s for s in (self.store.get_issued(normalize_serial(x)) for x in serials) if s is not None]
        target = target or next((s.task_id for s in found if s.task_id), "") or "serials"
        return self._commit(kind, target, required_text("reason", reason), reason_code, found, (), actor)

    def end_task(self, issued: list[IssuedSerial], reason: str, actor: Actor, task_id: str) -> list[str]:
        """Ending a task is a revocation like any other: durable, in the CRL, pushed to every sidecar."""
        return list(self._commit("task", task_id, required_text("reason", reason), "cessationOfOperation",
                                 issued, (), actor).serials)

    def _revoke_serial(self, target, reason, code, actor) -> RevokeResult:
        serial = normalize_serial(target)
        issued = self.store.get_issued(serial)
        if issued is None:
            raise NotFound(f"no certificate with serial {serial} was issued by this issuer")
        return self._commit("serial", serial, reason, code, [issued], (), actor)

    def _revoke_task(self, target, reason, code, actor) -> RevokeResult:
        issued = self.store.find_issued(task_id=target)
        if not issued:
            raise NotFound(f"no credential was issued for task {target!r}")
        return self._commit("task", target, reason, code, issued, (), actor)

    def _revoke_entry(self, target, reason, code, actor) -> RevokeResult:
        entry = self.registry.require(target)
        issued = self.store.find_issued(entry_id=entry.id)
        return self._commit("entry", entry.id, reason, code, issued, (entry.id,), actor)

    def _revoke_spiffe_id(self, target, reason, code, actor) -> RevokeResult:
        sid = str(spiffeid.parse(target, require_path=True))
        entries = [e for e in self.registry.list() if e.spiffe_id == sid]
        issued = self.store.find_issued(spiffe_id=sid)
        if not entries and not issued:
            raise NotFound(f"no entry or certificate has SPIFFE ID {sid}")
        return self._commit("spiffe_id", sid, reason, code, issued, tuple(e.id for e in entries), actor,
                            spiffe_ids=(sid,))

    def _revoke_owner(self, target, reason, code, actor) -> RevokeResult:
        entries = [e for e in self.registry.list() if e.owner == target]
        if not entries:
            raise NotFound(f"no entry is owned by {target!r}")
        issued = [s for e in entries for s in self.store.find_issued(entry_id=e.id)]
        return self._commit("owner", target, reason, code, issued, tuple(e.id for e in entries), actor,
                            spiffe_ids=tuple(sorted({e.spiffe_id for e in entries})))

    def _revoke_sidecar(self, target, reason, code, actor) -> RevokeResult:
        return self.ban_sidecar(target, reason, actor, code)

    def ban_sidecar(self, ref: str, reason: str, actor: Actor, reason_code: str = "keyCompromise") -> RevokeResult:
        """Ban a sidecar (no renewal, no re-attestation, streams closed) and revoke every serial it obtained."""
        reason = required_text("reason", reason)
        if not (ref or "").strip():
            raise InvalidArgument("a sidecar name or SPIFFE ID is required")
        sidecar = self.attestor.get(ref.strip())
        if sidecar.state != "banned":
            self.attestor.set_banned(sidecar, AuditEvent("sidecar.ban", actor, "done", reason=reason,
                                                         subject=sidecar.id))
        # Close its sync streams now; authentication refuses it from here on.
        self.hub.publish(sidecar.id, CLOSE)
        issued = self.store.find_issued(sidecar_id=sidecar.id)
        return self._commit("sidecar", sidecar.id, reason, reason_code, issued, (), actor)

    def _commit(self, kind: str, target: str, reason: str, code: str, issued: list[IssuedSerial],
                entry_ids: tuple[str, ...], actor: Actor, spiffe_ids: tuple[str, ...] = ()) -> RevokeResult:
        """Commit (one transaction), push the event, then have a CRL covering it signed and pushed; returns after
        all of that."""
        now = int(time.time())
        # Expired certificates are no threat and need no CRL entry.
        candidates = {s.serial: s for s in issued if s.revoked_at is None and s.not_after > now}
        with self._write_lock:  # one revocation at a time: seq order is push order
            # The entries revoked as a whole are marked in the same transaction (an entry revocation commits once).
            with self.registry.revoking(entry_ids, actor, reason):
                newly = self.store.revoke_serials(list(candidates), code, now, None)
                seq = self.store.record_revocation(Revocation(0, now, kind, target, reason, code, tuple(newly),
                                                              entry_ids))
                self.store.append_audit([AuditEvent(
                    "revoke", actor, "done", reason=reason, subject=f"{kind}:{target}",
                    details={"seq": seq, "count": len(newly), "serials": newly[:1000], "entry_ids": list(entry_ids),
                             "reason_code": code})])
            self.seq = max(self.seq, seq)  # a peer's later revocation may have been applied meanwhile
            with self._lock:
                for s in newly:
                    self._revoked[s] = crl.Revoked(s, now, code)
                    self._not_after[s] = candidates[s].not_after
                    self._signer[s] = candidates[s].authority or ""
                    self._next_expiry = min(self._next_expiry or candidates[s].not_after, candidates[s].not_after)
                if kind == "spiffe_id":
                    self._blocked_ids.add(target)
                elif kind == "owner":
                    self._blocked_owners.add(target)
                self._gen += bool(newly)
                gen = self._gen  # also covers what was revoked before, e.g. the same serial by a racing call
            self.hub.broadcast(("revocation", RevocationEvent(seq, tuple(newly), entry_ids, spiffe_ids, reason)))
        self._close_sidecars_with_revoked_svid([candidates[s] for s in newly if candidates[s].kind == "sidecar"])
        metrics.count_revocations(kind, len(newly))
        log.info("revoked", kind=kind, target=target, seq=seq, count=len(newly), reason_code=code)
        try:
            self._publish_crl(gen)
        except Exception as e:  # noqa: BLE001 - committed and pushed; only the signed CRL is late
            self._dirty.set()
            log.exception("CRL for a revocation failed; retrying", seq=seq)
            raise Unavailable(f"revocation {seq} is recorded and pushed to sidecars, but signing the CRL "
                              f"failed ({e}); the issuer keeps retrying") from None
        return RevokeResult(seq, tuple(newly), entry_ids)

    def apply_peer(self, rec: Revocation) -> None:
        """A revocation another issuer committed (issuer/peers.py): what `_commit` does after its commit, here: the
        revoked set and blocked identities in memory, the event pushed to every sidecar with the peer's seq, the
        sidecars whose own SVID it hit closed, and a CRL set covering it signed (numbers come from the shared
        per-authority counter, so this issuer's CRLs only ever number higher than any before) and pushed."""
        # Expired ones are no threat and need no CRL entry (as in _commit); one query however many serials.
        issued = self.store.find_issued(serials=rec.serials, unexpired_at=int(time.time())) if rec.serials else []
        spiffe_ids: tuple[str, ...] = ()
        if rec.kind == "spiffe_id":
            spiffe_ids = (rec.target,)
        elif rec.kind == "owner":
            spiffe_ids = tuple(sorted({e.spiffe_id for e in self.registry.list() if e.owner == rec.target}))
        with self._write_lock:  # pushed in turn with this issuer's own revocations
            self.seq = max(self.seq, rec.seq)
            with self._lock:
                for s in issued:
                    self._revoked[s.serial] = crl.Revoked(s.serial, s.revoked_at or rec.ts, s.revocation_reason
                                                          or rec.reason_code)
                    self._not_after[s.serial] = s.not_after
                    self._signer[s.serial] = s.authority or ""
                    self._next_expiry = min(self._next_expiry or s.not_after, s.not_after)
                if rec.kind == "spiffe_id":
                    self._blocked_ids.add(rec.target)
                elif rec.kind == "owner":
                    self._blocked_owners.add(rec.target)
                self._gen += 1
                gen = self._gen
            self.hub.broadcast(("revocation", RevocationEvent(rec.seq, tuple(rec.serials), tuple(rec.entry_ids),
                                                              spiffe_ids, rec.reason)))
        self._close_sidecars_with_revoked_svid([s for s in issued if s.kind == "sidecar"])
        log.info("revocation from a peer applied", kind=rec.kind, target=rec.target, seq=rec.seq,
                 count=len(rec.serials))
        try:
            self._publish_crl(gen)
        except Exception:  # noqa: BLE001 - in memory and pushed; the CRL thread retries the signature
            self._dirty.set()
            log.exception("CRL for a peer's revocation failed; retrying", seq=rec.seq)

    def _close_sidecars_with_revoked_svid(self, revoked: list[IssuedSerial]) -> None:
        # A sidecar whose current SVID is revoked cannot renew: end its stream now, as for a ban.
        for s in revoked:
            try:
                current = self.attestor.get(s.sidecar_id or s.spiffe_id)
            except NotFound:
                continue
            if current.svid_serial == s.serial:
                self.hub.publish(current.id, CLOSE)

    # -- the CRL ---------------------------------------------------------------------------

    def rebuild_crl(self) -> CrlSet:
        """Sign, commit (its number) and push a CRL of everything revoked now (at start, on refresh, after a failure)."""
        return self._publish_crl(None)

    def _publish_crl(self, gen: int | None) -> CrlSet:
        """A CRL covering change `gen` (None: a new one in any case), built by this thread or a concurrent one.

        Leader-based like the datastore's group commit: a caller that finds a build under way waits for
        it; if that build started too early to cover `gen`, one of the waiters builds for all of them.
        """
        with self._crl_done:
            while True:
                if gen is not None and self._crl_gen >= gen:
                    assert self._crls is not None
                    return self._crls
                if not self._building:
                    break
                self._crl_done.wait()
            self._building = True
        built = -1
        try:
            info, built = self._build_crl()
            return info
        finally:
            with self._crl_done:
                self._building = False
                self._crl_gen = max(self._crl_gen, built)
                self._crl_done.notify_all()

    def _build_crl(self) -> tuple[CrlSet, int]:
        """Sign and push the CRL set, each CRL's number committed first; returns it and the change count it covers.
        One at a time."""
        now = time.time()
        with self._lock:
            gen = self._gen
            if self._next_expiry and self._next_expiry <= now:  # expired certificates need no CRL entry
                for s in [s for s, not_after in self._not_after.items() if not_after <= now]:
                    del self._revoked[s], self._not_after[s], self._signer[s]
                self._next_expiry = min(self._not_after.values(), default=0)
            by_signer: dict[str, list[crl.Revoked]] = {}
            for s, r in self._revoked.items():
                by_signer.setdefault(self._signer[s], []).append(r)
        signers = self.authorities.crl_signers(now)
        active = self.authorities.signer().id
        signers.sort(key=lambda t: (t[0].id != active, t[0].kind == "root", t[0].created_at))
        withdrawn = self._withdrawn_intermediates(now)
        infos = []
        for authority, cert, key in signers:
            items = by_signer.get(authority.id, []) + withdrawn.get(authority.id, [])
            number = self.store.next_crl_number(authority.id)
            der = crl.build(cert, key, items, number, now, now + self.crl_validity)
            infos.append(CrlInfo(der, number, int(now), int(now + self.crl_validity), len(items), authority.id))
        if self.on_crl_numbers is not None:
            self.on_crl_numbers({i.authority: i.number for i in infos})
        published = CrlSet(tuple(infos), tuple(c.public_bytes(Encoding.DER)
                                               for c in self.authorities.intermediates(now)))
        self._crls = published
        self._refresh_at = now + self.crl_validity / 2
        self.hub.broadcast(("crls", published))
        metrics.set_crls({i.authority: i.number for i in infos}, sum(len(i.der) for i in infos),
                         sum(i.entries for i in infos))
        log.info("CRLs published", numbers={i.authority[:16]: i.number for i in infos},
                 entries=sum(i.entries for i in infos), ms=round((time.time() - now) * 1000, 1))
        return published, gen

    def _withdrawn_intermediates(self, now: float) -> dict[str, list[crl.Revoked]]:
        """Per root: the revoked intermediates it signed that have not expired (its CRL withdraws them)."""
        out: dict[str, list[crl.Revoked]] = {}
        for a in self.authorities.list():
            if a.kind == "x509" and a.state == "revoked" and a.cert_der and a.not_after > now and a.parent:
                cert = self.authorities.certificate(a.id)
                if cert is not None:
                    out.setdefault(a.parent, []).append(
                        crl.Revoked(x509svid.serial_hex(cert.serial_number), a.revoked_at or int(now), "keyCompromise"))
        return out

    def _crl_loop(self) -> None:
        """Re-sign at half of the CRL's validity, and retry a build that failed."""
        while not self._stop.is_set():
            failed = self._dirty.wait(timeout=max(0.0, self._refresh_at - time.time()))
            if self._stop.is_set():
                return
            if not failed and time.time() < self._refresh_at:
                continue  # a revocation re-signed it meanwhile
            self._dirty.clear()
            try:
                self.rebuild_crl()
            except Exception:  # noqa: BLE001 - keep the last CRL; try again shortly
                log.exception("CRL rebuild failed; retrying")
                time.sleep(1.0)
                self._dirty.set()
