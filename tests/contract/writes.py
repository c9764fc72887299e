"""Acknowledged writes, one per datastore write method, for the durability tests.

Run as a program (`writes.py <opener, pickled and hex-encoded> <name>`) it makes the write
through the store the opener opens, prints "acked" once the call has returned, and
waits to be killed; `CHECKS[name]` says what a reopened store must then hold."""

import pickle
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from issuer.core.models import (Actor, ApprovalRequest, AuditEvent, Authority, Entry, IssuedSerial,  # noqa: E402
                                JoinToken, Revocation, Sidecar)

OP = Actor("operator", "uid:0")
NOW = 1_900_000_000
SID = "spiffe://example.org/tessera/sidecar/h"


def event(action: str, subject: str = "") -> AuditEvent:
    return AuditEvent(action, OP, "done", subject=subject)


def entry(entry_id: str = "e1", **kw) -> Entry:
    base = dict(id=entry_id, spiffe_id=f"spiffe://example.org/{entry_id}", parent_id=SID, selectors=("unix:uid:1",),
                owner="bob", purpose="p", tier="standard", scopes=("read",), x509_ttl=300, expires_at=NOW + 3600,
                state="active", created_by="uid:0", created_at=NOW, updated_at=NOW)
    base.update(kw)
    return Entry(**base)


def issued(n: int, **kw) -> IssuedSerial:
    base = dict(serial=f"{n:x}", spiffe_id="spiffe://example.org/e1", kind="identity", entry_id="e1",
                sidecar_id=SID, issued_at=NOW, not_after=NOW + 60)
    base.update(kw)
    return IssuedSerial(**base)


SIDECAR = Sidecar(SID, "h", "active", NOW, NOW, "aa", NOW + 60)
A1 = "ab" * 20  # an authority id (a key identifier)


def authority(authority_id: str = A1, **kw) -> Authority:
    base = dict(id=authority_id, kind="x509", state="prepared", source="root", parent="cd" * 20,
                public_der=b"\x30\x59 public", cert_der=b"\x30\x82 cert", sealed_key=b"\x01sealed", kek_id="k1",
                not_before=NOW, not_after=NOW + 86400, created_at=NOW)
    base.update(kw)
    return Authority(**base)


def approval(approval_id: str = "ap1", **kw) -> ApprovalRequest:
    base = dict(id=approval_id, task_id=f"task-{approval_id}", entry_id="e1", spiffe_id="spiffe://example.org/e1",
                owner="bob", tier="high", scopes=("repo:read",), ttl=60, context={"ticket": "OPS-1"}, sidecar_id=SID,
                workload={"pid": 7, "uid": 1000, "gid": 1000, "exe": "/bin/agent"}, reason="tier high requires approval",
                rule="tier:high", created_at=NOW, expires_at=NOW + 60)
    base.update(kw)
    return ApprovalRequest(**base)


def _revoke(s):
    s.record_issued([issued(1)], [])
    with s.transaction():
        newly = s.revoke_serials(["1"], "keyCompromise", NOW, None)
        s.record_revocation(Revocation(0, NOW, "serial", "1", "stolen", "keyCompromise", tuple(newly)))
        s.append_audit([event("revoke", "serial:1")])
        s.next_crl_number(A1)


WRITES = {
    "create_entry": lambda s: s.create_entry(entry(), event("entry.create", "e1")),
    "update_entry": lambda s: (s.create_entry(entry(), event("entry.create")),
                               s.update_entry(entry(state="disabled", revision=2), event("entry.update"))),
    "delete_entry": lambda s: (s.create_entry(entry(), event("entry.create")), s.delete_entry("e1", event("entry.delete"))),
    "create_join_token": lambda s: s.create_join_token(JoinToken("th", "h", NOW + 60, "uid:0", NOW), event("token")),
    "consume_join_token": lambda s: (s.create_join_token(JoinToken("th", "h", NOW + 60, "uid:0", NOW), event("token")),
                                     s.consume_join_token("th", NOW + 1)),
    "upsert_sidecar": lambda s: s.upsert_sidecar(SIDECAR, event("sidecar.attest", SID)),
    "touch_sidecar": lambda s: (s.upsert_sidecar(SIDECAR, None), s.touch_sidecar(SID, NOW + 30)),
    "record_issued": lambda s: s.record_issued([issued(1), issued(2)], [event("svid.issue")]),
    "record_task_issued": lambda s: s.record_task_issued(issued(1, kind="task", task_id="t1"), event("task.issue")),
    "revoke_serials": lambda s: (s.record_issued([issued(1)], []), s.revoke_serials(["1"], "test", NOW + 5, None)),
    "revocation_in_one_transaction": _revoke,
    "next_crl_number": lambda s: (s.next_crl_number(A1), s.next_crl_number(A1)),
    "append_audit": lambda s: s.append_audit([event("a"), event("b")]),
    "create_approval": lambda s: s.create_approval(approval(), [], event("task.approval_request")),
    "finish_approvals": lambda s: (s.create_approval(approval(), [], event("task.approval_request")),
                                   s.finish_approvals([approval(state="approved", decided_by="uid:0")],
                                                      [event("task.approve")], NOW + 1)),
    "put_authority": lambda s: (s.put_authority(authority(), event("ca.prepare")),
                                s.put_authority(authority(state="active", activated_at=NOW + 1), event("ca.activate"),
                                                expect_state="prepared")),
}

CHECKS = {
    "create_entry": lambda s: [e.id for e in s.list_entries()] == ["e1"],
    "update_entry": lambda s: [(e.state, e.revision) for e in s.list_entries()] == [("disabled", 2)],
    "delete_entry": lambda s: s.list_entries() == [] and len(s.audit_records()) == 2,
    "create_join_token": lambda s: s.consume_join_token("th", NOW) == JoinToken("th", "h", NOW + 60, "uid:0", NOW),
    "consume_join_token": lambda s: s.consume_join_token("th", NOW + 2).used_at == NOW + 1,
    "upsert_sidecar": lambda s: s.list_sidecars() == [SIDECAR],
    "touch_sidecar": lambda s: [x.last_seen for x in s.list_sidecars()] == [NOW + 30],
    "record_issued": lambda s: {x.serial for x in s.find_issued()} == {"1", "2"} and len(s.audit_records()) == 1,
    "record_task_issued": lambda s: ([x.task_id for x in s.find_issued()] == ["t1"]
                                     and [r.action for r in s.audit_records()] == ["task.issue"]),
    "revoke_serials": lambda s: s.get_issued("1").revoked_at == NOW + 5,
    "revocation_in_one_transaction": lambda s: (s.get_issued("1").revoked_at == NOW and s.last_revocation_seq() == 1
                                                and [r.action for r in s.audit_records()] == ["revoke"]
                                                and s.next_crl_number(A1) == 2),
    "next_crl_number": lambda s: s.next_crl_number(A1) == 3,
    "append_audit": lambda s: [r.action for r in s.audit_records()] == ["a", "b"],
    "create_approval": lambda s: s.list_approvals(NOW) == [approval()],
    "finish_approvals": lambda s: (s.get_approval("ap1") == approval(state="approved", decided_by="uid:0")
                                   and [r.action for r in s.audit_records()] == ["task.approval_request", "task.approve"]),
    "put_authority": lambda s: (s.list_authorities() == [authority(state="active", activated_at=NOW + 1)]
                                and [r.action for r in s.audit_records()] == ["ca.prepare", "ca.activate"]),
}


if __name__ == "__main__":
    opener, name = pickle.loads(bytes.fromhex(sys.argv[1])), sys.argv[2]
    store = opener.open()
    WRITES[name](store)
    print("acked", flush=True)
    time.sleep(60)  # killed with SIGKILL long before: no close(), no clean shutdown
