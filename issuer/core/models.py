"""Plain records the issuer stores and passes around."""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field, fields, is_dataclass
from typing import Any

ENTRY_STATES = ("active", "disabled", "revoked")


@dataclass(frozen=True)
class Entry:
    id: str
    spiffe_id: str
    parent_id: str
    selectors: tuple[str, ...]
    owner: str
    purpose: str
    tier: str
    scopes: tuple[str, ...]
    x509_ttl: int
    expires_at: int
    state: str
    created_by: str
    created_at: int
    updated_at: int
    revision: int = 1



@dataclass(frozen=True)
class Sidecar:
    id: str
    name: str
    state: str  # active | banned
    attested_at: int
    last_seen: int
    svid_serial: str
    svid_expires_at: int


@dataclass(frozen=True)
class JoinToken:
    token_hash: str
    sidecar_name: str
    expires_at: int
    created_by: str
    created_at: int
    used_at: int | None = None


@dataclass(frozen=True)
class IssuedSerial:
    """A certificate the issuer signed, recorded before it leaves. Its fields are spelled here only: a
    datastore's row is ISSUED_FIELDS in this order, and each issuance's audit event starts from
    audit_details()."""

    serial: str  # lowercase hex
    spiffe_id: str
    kind: str  # identity | task | sidecar | issuer
    entry_id: str | None
    sidecar_id: str | None
    issued_at: int
    not_after: int
    task_id: str | None = None
    revoked_at: int | None = None
    revocation_reason: str | None = None
    authority: str | None = None  # id of the authority that signed it (None: signed before authorities rotated)

    def audit_details(self) -> dict[str, Any]:
        """What every issuance's audit event says of the certificate; callers add what they know besides."""
        return {"serial": self.serial, "ttl": self.not_after - self.issued_at, "kind": self.kind}


ISSUED_FIELDS: tuple[str, ...] = tuple(f.name for f in fields(IssuedSerial))

AUTHORITY_KINDS = ("root", "x509", "jwt")
# prepared: exists, not yet used to sign (a root is already in the bundle, a JWT key already published);
# active: signs (one per kind); retired: replaced, still published with its CRL until it expires;
# tainted: replaced at once, everything it signed is being re-issued; revoked: nothing under it is accepted.
AUTHORITY_STATES = ("prepared", "active", "retired", "tainted", "revoked")


@dataclass(frozen=True)
class Authority:
    """A root, an X.509 intermediate or a JWT signing key. Its id is the key's subject key identifier (hex),
    which every certificate it signs names as its authority key identifier."""

    id: str
    kind: str  # one of AUTHORITY_KINDS
    state: str  # one of AUTHORITY_STATES
    source: str  # root: created | upstream | offline; x509: signed by the root here, or offline; jwt: created
    parent: str | None  # an intermediate's root
    public_der: bytes  # SubjectPublicKeyInfo
    cert_der: bytes  # empty for a JWT key and for an intermediate waiting for its offline-signed certificate
    sealed_key: bytes  # the private key sealed under the key-encryption key; empty when it is not held here
    kek_id: str  # which key-encryption key sealed it
    not_before: int
    not_after: int  # for a pending intermediate: when it was prepared (no validity yet)
    created_at: int
    activated_at: int | None = None
    retired_at: int | None = None
    tainted_at: int | None = None
    revoked_at: int | None = None


AUTHORITY_FIELDS: tuple[str, ...] = tuple(f.name for f in fields(Authority))


@dataclass(frozen=True)
class Revocation:
    """One operator (or task-end) revocation, as logged: what was named, why, and what it hit."""

    seq: int  # 0 until stored
    ts: int
    kind: str  # serial | task | entry | spiffe_id | sidecar | owner
    target: str
    reason: str
    reason_code: str  # RFC 5280 CRLReason name
    serials: tuple[str, ...]
    entry_ids: tuple[str, ...] = ()


APPROVAL_STATES = ("pending", "approved", "denied", "expired", "cancelled")
APPROVAL_FINAL_OPS = {"approved": "approve", "denied": "deny", "expired": "expire", "cancelled": "cancel"}


@dataclass(frozen=True)
class ApprovalRequest:
    """A task request waiting for a human (issuer/tasks/approvals.py), as stored. Its fields are spelled here only:
    a datastore's row is APPROVAL_FIELDS in this order (JSON text for scopes, context, workload)."""

    id: str
    task_id: str
    entry_id: str
    spiffe_id: str
    owner: str
    tier: str
    scopes: tuple[str, ...]
    ttl: int
    context: dict[str, str]
    sidecar_id: str
    workload: dict[str, Any]
    reason: str  # why a human must decide
    rule: str
    created_at: int
    expires_at: int
    state: str = "pending"  # one of APPROVAL_STATES
    decided_by: str = ""
    decision_reason: str = ""

    @property
    def uid(self) -> int:
        """The workload's uid, which the per-workload cap counts by (policy.workload_key)."""
        return int(self.workload.get("uid") or 0)

    def details(self) -> dict[str, Any]:
        return {"approval_id": self.id, "task_id": self.task_id, "entry_id": self.entry_id,
                "scopes": list(self.scopes), "ttl": self.ttl, "context": dict(self.context),
                "sidecar_id": self.sidecar_id, "rule": self.rule, "expires_at": self.expires_at}


APPROVAL_FIELDS: tuple[str, ...] = tuple(f.name for f in fields(ApprovalRequest))
APPROVAL_JSON_FIELDS = ("scopes", "context", "workload")


@dataclass(frozen=True)
class ApprovalCap:
    """One limit a new pending request counts against: at most `limit` pending, unexpired requests whose columns
    equal `where` (no condition: all of them). `setting` and `who` name it in the refusal."""

    setting: str
    where: tuple[tuple[str, Any], ...]  # (column, value): columns among APPROVAL_CAP_COLUMNS
    limit: int
    who: str


APPROVAL_CAP_COLUMNS = ("sidecar_id", "entry_id", "uid")


@dataclass(frozen=True)
class Actor:
    """Who did something: an operator (uid from the kernel), a sidecar (its SVID), a workload, the issuer."""

    kind: str
    id: str
    details: dict[str, Any] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "id": self.id, **({"details": self.details} if self.details else {})}


ISSUER = Actor("issuer", "tessera-issuer")


@dataclass(frozen=True)
class AuditEvent:
    action: str  # e.g. entry.create, sidecar.attest, svid.issue, svid.deny
    actor: Actor
    decision: str  # allow | deny | pending | done
    reason: str = ""
    subject: str = ""
    details: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class AuditRecord:
    seq: int
    ts: float
    action: str
    actor: dict[str, Any]
    decision: str
    reason: str
    subject: str
    details: dict[str, Any]
    prev_hash: str
    hash: str


# The audit record is spelled once, above: every conversion derives its field list from the dataclass.
AUDIT_FIELDS: tuple[str, ...] = tuple(f.name for f in fields(AuditRecord))
AUDIT_JSON_FIELDS = ("actor", "details")  # stored as JSON text by engines without a JSON type
GENESIS_HASH = "0" * 64
_HASHED_FIELDS = tuple(k for k in AUDIT_FIELDS if k not in ("prev_hash", "hash"))


def audit_hash(r: AuditRecord) -> str:
    """The hash `r` must carry: its content (every field but the two hashes) and its predecessor's hash.

    The hashed JSON is byte-identical to the one the chain has always used: the same keys (`prev` for
    prev_hash), sorted, compact separators, so chains written before still verify."""
    # A shallow dict: asdict's deep copy of actor and details was half the CPU of committing an issuance.
    # The JSON is the same, a dataclass nested in details included (_hash_default gives what asdict gave).
    body = {k: getattr(r, k) for k in _HASHED_FIELDS}
    body["prev"] = r.prev_hash
    return hashlib.sha256(_HASH_JSON.encode(body).encode()).hexdigest()


def _hash_default(v: Any) -> Any:
    if is_dataclass(v) and not isinstance(v, type):
        return asdict(v)
    raise TypeError(f"{type(v).__name__} is not JSON serializable")


# What json.dumps(body, sort_keys=True, separators=(",", ":"), default=_hash_default) would build for every
# record: one encoder kept, not one made per call (a few us of each signing worker's CSR). It keeps no state
# between calls, so threads share it.
_HASH_JSON = json.JSONEncoder(sort_keys=True, separators=(",", ":"), default=_hash_default)


def audit_record_dict(r: AuditRecord) -> dict[str, Any]:
    return {k: getattr(r, k) for k in AUDIT_FIELDS}


def audit_record_from_dict(d: dict[str, Any]) -> AuditRecord:
    return AuditRecord(**{k: d[k] for k in AUDIT_FIELDS})


def audit_record_tuple(r: AuditRecord) -> tuple:
    """In AUDIT_FIELDS order (plain tuples cross the signing workers' pipe cheaply)."""
    return tuple(getattr(r, k) for k in AUDIT_FIELDS)


CHANGE_KINDS = ("entry", "sidecar", "revocation", "authority", "approval")


@dataclass(frozen=True)
class Change:
    """One committed change, as the change feed serves it.

    `position` strictly increases in commit order across every process writing the store; a follower
    that saved position p resumes with the first change after p. `key` names the thing changed (an
    entry id, a sidecar's SPIFFE ID, a revocation's seq, a CA certificate's fingerprint); `payload` is
    its new state (for a deletion, what was deleted)."""

    position: int
    ts: float
    kind: str  # one of CHANGE_KINDS
    op: str  # entry: create | update | delete; sidecar: upsert | ban | unban; revocation: create; authority: add;
    #   approval: create | approve | deny | expire | cancel
    key: str
    payload: dict[str, Any]


@dataclass(frozen=True)
class Heads:
    """How far a database's counters that only ever grow have come: the last change feed position, revocation seq
    and audit seq, and each authority's last CRL number. A database restored from an older backup is behind the
    heads an issuer saw before (issuer/datastore/highwater.py)."""

    change_position: int = 0
    revocation_seq: int = 0
    audit_seq: int = 0
    crl_numbers: dict[str, int] = field(default_factory=dict)  # authority id -> last number taken


@dataclass(frozen=True)
class SignResult:
    """One entry's outcome in a signing batch: a certificate, or the status code and message that refused it."""
    entry_id: str
    spiffe_id: str = ""
    chain_der: bytes = b""  # DER, the leaf then its signer
    serial: str = ""
    expires_at: int = 0
    code: int = 0
    error: str = ""
