"""A task request as the sidecar forwards it to the issuer: its one definition.

The sidecar builds one from the workload's StartTask call and its attested process, and sends
`to_proto()`; the issuer reads it back with `from_proto()`, records `audit_details()` with each decision,
and binds the issued certificate to it with `binding()` (tessera.taskext). No other place spells
its fields.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from tessera import taskext
from tessera.v1 import issuer_pb2

# The process details the sidecar attested for the caller, as the issuer's policy sees them.
WORKLOAD_FIELDS = ("pid", "uid", "gid", "exe")


@dataclass(frozen=True)
class TaskSpec:
    """A task request as the sidecar forwards it."""

    entry_id: str
    task_id: str
    scopes: tuple[str, ...]
    ttl: int
    context: dict[str, str]
    csr: bytes
    selectors: frozenset[str]
    workload: dict[str, Any] = field(default_factory=dict)

    def to_proto(self) -> issuer_pb2.TaskSVIDRequest:
        return issuer_pb2.TaskSVIDRequest(
            entry_id=self.entry_id, task_id=self.task_id, scopes=list(self.scopes), ttl_seconds=self.ttl,
            context=dict(self.context), csr=self.csr, selectors=sorted(self.selectors),
            workload=issuer_pb2.WorkloadInfo(**{k: self.workload[k] for k in WORKLOAD_FIELDS if k in self.workload}))

    @classmethod
    def from_proto(cls, msg: issuer_pb2.TaskSVIDRequest) -> TaskSpec:
        return cls(entry_id=msg.entry_id, task_id=msg.task_id, scopes=tuple(msg.scopes), ttl=msg.ttl_seconds,
                   context=dict(msg.context), csr=msg.csr, selectors=frozenset(msg.selectors),
                   workload={k: getattr(msg.workload, k) for k in WORKLOAD_FIELDS})

    def audit_details(self) -> dict[str, Any]:
        """What each audit event of this request's decision records of it (callers add the deciding rule)."""
        return {"task_id": self.task_id, "entry_id": self.entry_id, "scopes": list(self.scopes),
                "requested_ttl": self.ttl, "context": dict(self.context)}

    def binding(self, owner: str) -> taskext.TaskBinding:
        """The task extension of a certificate issued for this request to an entry of `owner`."""
        return taskext.TaskBinding(self.task_id, tuple(self.scopes), self.entry_id, owner)
