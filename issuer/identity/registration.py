"""Registration entries: validation rules, storage, and push to the parent sidecar.

Entries are cached in memory (loaded at start, updated on every write this
issuer commits) so the signing path never reads the database.
"""

from __future__ import annotations

import contextlib
import re
import threading
import time
import uuid
from dataclasses import replace
from typing import Callable, Iterable, Iterator, Sequence

from issuer.core.events import EventHub
from issuer.core.models import ENTRY_STATES, Actor, AuditEvent, Entry
from issuer.datastore.interface import Datastore
from issuer.tasks.policy import TIER_NAME
from tessera import selectors as sel
from tessera import spiffeid
from tessera.durations import DAY, MAX_DURATION, check_seconds, format_duration
from tessera.errors import InvalidArgument, NotFound, PermissionDenied

_SCOPE = re.compile(r"[A-Za-z0-9][A-Za-z0-9:._/*-]{0,127}", re.ASCII)
MIN_TTL, MAX_X509_TTL = 10, 30 * DAY  # an identity SVID's lifetime (x509_ttl)
MAX_ENTRY_LIFETIME = MAX_DURATION  # expires_at at most this far from now: ten years
MAX_SCOPES = 64
MAX_SELECTORS = 32
MAX_SELECTOR_LEN = 4200  # unix:path:/… holds a PATH_MAX path
MAX_TEXT = 1024  # owner, purpose, reason
MAX_ID = 128  # an entry id is a UUID (36); anything much longer is not one of ours
MAX_REF = 2048  # a SPIFFE ID's limit, and so of anything that names one
DEFAULT_TIER = "low"


def validate_scopes(scopes: Iterable[str], per: str = "entry") -> tuple[str, ...]:
    scopes = list(scopes)
    if len(scopes) > MAX_SCOPES:
        raise InvalidArgument(f"at most {MAX_SCOPES} scopes per {per}, got {len(scopes)}")
    out = []
    for s in scopes:
        if not _SCOPE.fullmatch(s or ""):
            raise InvalidArgument(f"invalid scope {s[:200]!r}: 1-128 of letters, digits and : . _ / * -")
        out.append(s)
    return tuple(sorted(set(out)))


def validate_selectors(selectors: Iterable[str]) -> tuple[str, ...]:
    selectors = list(selectors)
    if len(selectors) > MAX_SELECTORS:
        raise InvalidArgument(f"at most {MAX_SELECTORS} selectors per entry, got {len(selectors)}")
    for s in selectors:
        if len(s) > MAX_SELECTOR_LEN:
            raise InvalidArgument(f"selector {s[:80]!r}... is longer than {MAX_SELECTOR_LEN} characters")
    return sel.parse_selectors(selectors)


def required_text(name: str, value: str) -> str:
    """A required free-text field (owner, purpose, reason): present, not blank, bounded, no control characters."""
    if not value or not value.strip():
        raise InvalidArgument(f"{name} is required")
    return optional_text(name, value)


def optional_text(name: str, value: str) -> str:
    """A free-text field that may be empty: bounded, printable (a newline or NUL would forge log lines)."""
    if len(value) > MAX_TEXT:
        raise InvalidArgument(f"{name} is longer than {MAX_TEXT} characters")
    if not value.isprintable():
        raise InvalidArgument(f"{name} must not contain control characters")
    return value.strip()


def bounded_ref(name: str, value: str) -> str:
    """What names something to look up (a revocation target, a sidecar, an audit filter): at most MAX_REF long,
    so an error that repeats it stays small."""
    if len(value) > MAX_REF:
        raise InvalidArgument(f"{name} is longer than {MAX_REF} characters")
    return value


def expiry(value: int, now: int) -> int:
    """An entry's expires_at (unix seconds): in the future, at most MAX_ENTRY_LIFETIME away."""
    if value <= now:
        raise InvalidArgument("expiry must be in the future")
    if value > now + MAX_ENTRY_LIFETIME:
        raise InvalidArgument(f"expiry must be at most {format_duration(MAX_ENTRY_LIFETIME)} from now, "
                              f"got {value}")
    return int(value)


class Registry:
    def __init__(self, store: Datastore, hub: EventHub, trust_domain: str, default_x509_ttl: int,
                 tier_names: Callable[[], Iterable[str]] | None = None):
        self.store = store
        self.hub = hub
        self.trust_domain = trust_domain
        self.default_x509_ttl = default_x509_ttl
        self._tier_names = tier_names
        self._lock = threading.Lock()
        self._entries: dict[str, Entry] = {e.id: e for e in store.list_entries()}

    # -- reads (memory) -----------------------------------------------------------

    def get(self, entry_id: str) -> Entry | None:
        return self._entries.get(entry_id)

    def require(self, entry_id: str) -> Entry:
        e = self._entries.get(entry_id)
        if e is None:
            raise NotFound(f"no entry with id {entry_id[:MAX_ID]!r}")
        return e

    def servable_for(self, entry_id: str, sidecar_id: str, now: float) -> Entry:
        """The entry a sidecar may obtain credentials for: its own, active and unexpired.

        "No such entry" and "not yours" get the same answer, so a sidecar learns nothing of
        other sidecars' entries.
        """
        entry = self._entries.get(entry_id)
        if entry is None or entry.parent_id != sidecar_id:
            raise PermissionDenied(f"entry {entry_id!r} is not registered to {sidecar_id}")
        if entry.state != "active":
            raise PermissionDenied(f"entry {entry_id} is {entry.state}")
        if entry.expires_at <= now:
            raise PermissionDenied(f"entry {entry_id} expired")
        return entry

    def list(self, parent_id: str | None = None) -> list[Entry]:
        entries = list(self._entries.values())
        if parent_id is not None:
            entries = [e for e in entries if e.parent_id == parent_id]
        return sorted(entries, key=lambda e: (e.created_at, e.id))

    # -- validation ----------------------------------------------------------------

    def _spiffe_id(self, value: str) -> str:
        sid = spiffeid.parse(value, require_path=True)
        if not sid.member_of(self.trust_domain):
            raise InvalidArgument(f"SPIFFE ID {value!r} is not in trust domain {self.trust_domain}")
        if sid.path.startswith("/tessera/"):
            raise InvalidArgument(f"SPIFFE ID {value!r}: the /tessera/ path is reserved for Tessera's own components")
        return str(sid)

    def parent_id(self, value: str) -> str:
        """A sidecar SPIFFE ID, or a bare sidecar name."""
        if not value:
            raise InvalidArgument("parent is required: the sidecar SPIFFE ID that may serve this entry")
        if not value.startswith("spiffe://"):
            return str(spiffeid.sidecar_id(self.trust_domain, value))
        sid = spiffeid.parse(value)
        if not sid.member_of(self.trust_domain) or spiffeid.sidecar_name(sid) is None:
            raise InvalidArgument(
                f"invalid parent {value!r}: must be a sidecar ID, spiffe://{self.trust_domain}/tessera/sidecar/<name>"
            )
        return str(sid)

    def _tier(self, tier: str) -> str:
        tier = tier or DEFAULT_TIER
        if not TIER_NAME.match(tier):
            raise InvalidArgument(f"invalid tier {tier!r}")
        if self._tier_names is not None:
            names = set(self._tier_names())
            if names and tier not in names:
                raise InvalidArgument(f"unknown tier {tier!r}: configured tiers are {', '.join(sorted(names))}")
        return tier

    def _ttl(self, ttl: int) -> int:
        if ttl == 0:
            return self.default_x509_ttl
        return check_seconds("x509_ttl", ttl, MIN_TTL, MAX_X509_TTL)


    # -- writes ----------------------------------------------------------------------

    def create(self, *, spiffe_id: str, parent: str, selectors: Iterable[str], owner: str, purpose: str,
               expires_at: int, actor: Actor, tier: str = "", scopes: Iterable[str] = (),
               x509_ttl: int = 0) -> Entry:
        now = int(time.time())
        if not expires_at:
            raise InvalidArgument("expiry is required: no identity lives forever (e.g. --expires-in 30d)")
        entry = Entry(
            id=str(uuid.uuid4()),
            spiffe_id=self._spiffe_id(spiffe_id),
            parent_id=self.parent_id(parent),
            selectors=validate_selectors(selectors),
            owner=required_text("owner", owner),
            purpose=required_text("purpose", purpose),
            tier=self._tier(tier),
            scopes=validate_scopes(scopes),
            x509_ttl=self._ttl(x509_ttl),
            expires_at=expiry(expires_at, now),
            state="active",
            created_by=actor.id,
            created_at=now,
            updated_at=now,
        )
        with self._lock:
            self.store.create_entry(entry, AuditEvent("entry.create", actor, "done", subject=entry.id,
                                                      details=_entry_details(entry)))
            self._entries[entry.id] = entry
        self.hub.publish(entry.parent_id, ("entry_upsert", entry))
        return entry

    def update(self, entry_id: str, actor: Actor, *, reason: str = "", **changes) -> Entry:
        """Apply the given fields. Extending the expiry needs a reason, which is audited."""
        reason = optional_text("reason", reason)
        with self._lock:
            old = self.require(entry_id)
            fields: dict = {}
            for key, value in changes.items():
                if value is None:
                    continue
                if key == "owner" or key == "purpose":
                    fields[key] = required_text(key, value)
                elif key == "tier":
                    fields[key] = self._tier(value)
                elif key == "scopes":
                    fields[key] = validate_scopes(value)
                elif key == "selectors":
                    fields[key] = validate_selectors(value)
                elif key == "x509_ttl":
                    fields[key] = self._ttl(value)
                elif key == "expires_at":
                    fields[key] = expiry(value, int(time.time()))
                    if value > old.expires_at and not reason.strip():
                        raise InvalidArgument("extending an entry's expiry needs a reason (--reason)")
                elif key == "state":
                    if value not in ENTRY_STATES:
                        raise InvalidArgument(f"invalid state {value!r}: use one of {', '.join(ENTRY_STATES)}")
                    if old.state == "revoked" and value != "revoked":
                        raise InvalidArgument("a revoked entry cannot be re-activated; create a new entry")
                    fields[key] = value
                else:
                    raise InvalidArgument(f"unknown entry field {key!r}")
            new = replace(old, **fields, updated_at=int(time.time()), revision=old.revision + 1)
            changed = {k: _jsonable(v) for k, v in fields.items() if getattr(old, k) != v}
            self.store.update_entry(new, AuditEvent("entry.update", actor, "done", reason=reason.strip(),
                                                    subject=entry_id, details={"changed": changed}))
            self._entries[entry_id] = new
        self.hub.publish(new.parent_id, ("entry_upsert", new))
        return new

    def set_state(self, entry_id: str, state: str, actor: Actor, reason: str) -> Entry:
        return self.update(entry_id, actor, reason=reason, state=state)

    @contextlib.contextmanager
    def revoking(self, entry_ids: Sequence[str], actor: Actor, reason: str) -> Iterator[None]:
        """One store transaction, opened here, that marks these entries revoked; the caller's store writes inside
        the block join it, so an entry's revocation and everything revoked with it commit once, or not at all.

        The registry's lock is taken before the store's, the order of every registry write. The cache and the
        sidecars (an entry_upsert push, so they stop serving at once) see the entries revoked only after the
        commit."""
        if not entry_ids:
            with self.store.transaction():
                yield
            return
        with self._lock:
            now = int(time.time())
            marked = [replace(old, state="revoked", updated_at=now, revision=old.revision + 1)
                      for old in map(self.require, entry_ids) if old.state != "revoked"]
            with self.store.transaction():
                for new in marked:
                    self.store.update_entry(new, AuditEvent("entry.update", actor, "done", reason=reason,
                                                            subject=new.id, details={"changed": {"state": "revoked"}}))
                yield
            for new in marked:
                self._entries[new.id] = new
        for new in marked:
            self.hub.publish(new.parent_id, ("entry_upsert", new))

    def apply_peer(self, entry: Entry, deleted: bool) -> None:
        """An entry another issuer committed (issuer/peers.py): into the cache, and pushed to its sidecar as a local
        write would be. A revision older than the cached one is a late replay and changes nothing."""
        with self._lock:
            old = self._entries.get(entry.id)
            if deleted:
                if old is None:
                    return
                del self._entries[entry.id]
            else:
                if old is not None and old.revision > entry.revision:
                    return
                self._entries[entry.id] = entry
        if deleted:
            self.hub.publish(old.parent_id, ("entry_deleted", entry.id))
            return
        if old is not None and old.parent_id != entry.parent_id:
            self.hub.publish(old.parent_id, ("entry_deleted", entry.id))
        self.hub.publish(entry.parent_id, ("entry_upsert", entry))

    def delete(self, entry_id: str, actor: Actor, reason: str = "") -> None:
        with self._lock:
            old = self.require(entry_id)
            self.store.delete_entry(entry_id, AuditEvent("entry.delete", actor, "done", reason=reason,
                                                         subject=entry_id, details=_entry_details(old)))
            del self._entries[entry_id]
        self.hub.publish(old.parent_id, ("entry_deleted", entry_id))


def _jsonable(v):
    return list(v) if isinstance(v, tuple) else v


def _entry_details(e: Entry) -> dict:
    return {"spiffe_id": e.spiffe_id, "parent_id": e.parent_id, "selectors": list(e.selectors),
            "owner": e.owner, "purpose": e.purpose, "tier": e.tier, "scopes": list(e.scopes),
            "x509_ttl": e.x509_ttl, "expires_at": e.expires_at}
