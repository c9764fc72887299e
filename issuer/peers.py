"""Equal peers: several issuer processes on one database, each applying what the others commit.

Each issuer follows the store's change feed (issuer/datastore/feed.py) from the position read at its start,
before its caches were loaded from the store: they hold every earlier change, and one committed while they
loaded is applied again (harmless). No position file is needed: a restarted issuer loads its caches again.
A change this process committed is skipped (`store.own_changes`: the positions noted just before each
COMMIT): its writer updated the caches and pushed to the sidecars already. Every other change is applied as
the writer applied it, and pushed to this issuer's own sidecars as a local change would be:

- entry: the Registry's cache, and entry_upsert / entry_deleted to the entry's parent sidecar;
- sidecar: the SidecarAttestor's cache (so authentication sees a ban at once), and a ban closes the banned
  sidecar's sync streams here;
- revocation: the revoked serials, blocked identities and seq in the RevocationService, the revocation event
  to every sidecar, and a CRL set covering it re-signed here;
- authority: the Authorities read again from the store, their listeners told (bundle, CRL set), and a taint
  pushed for authorities newly tainted or revoked;
- approval: a request decided, expired or withdrawn at another issuer is handed to its caller if that caller
  waits on this one (Approvals.settle; a new pending request needs nothing: lists read the store).

Wake-up: PostgreSQL NOTIFYs each commit that appends to the feed (in the same transaction), and the follower
reads the feed at once; it also reads every poll_interval (1 s) so nothing is missed across a reconnect of
the listening connection. SQLite only polls (every 0.25 s).
"""

from __future__ import annotations

from issuer.ca.authorities import Authorities
from issuer.core.events import CLOSE, EventHub
from issuer.core.models import Change, Entry, Revocation, Sidecar
from issuer.datastore.feed import ChangeFollower
from issuer.datastore.interface import Datastore
from issuer.datastore.rows import approval_from
from issuer.identity.attestation import SidecarAttestor
from issuer.identity.registration import Registry
from issuer.revocation.service import RevocationService
from issuer.tasks.approvals import Approvals
from tessera import logs

log = logs.get("issuer.peers")


def _entry(payload: dict) -> Entry:
    return Entry(**{**payload, "selectors": tuple(payload["selectors"]), "scopes": tuple(payload["scopes"])})


def _revocation(payload: dict) -> Revocation:
    return Revocation(**{**payload, "serials": tuple(payload["serials"]),
                         "entry_ids": tuple(payload["entry_ids"])})


class Peers:
    """Applies the other issuers' changes to this one's services (see the module's docstring)."""

    def __init__(self, store: Datastore, registry: Registry, attestor: SidecarAttestor,
                 revocation: RevocationService, authorities: Authorities, hub: EventHub, approvals: Approvals,
                 start: int):
        """`start`: the feed position read before the services loaded their caches from the store."""
        self.store = store
        self.registry = registry
        self.attestor = attestor
        self.revocation = revocation
        self.authorities = authorities
        self.hub = hub
        self.approvals = approvals
        self.follower = ChangeFollower(store, None, self.apply, start=start)
        self.applied = 0  # changes from other processes applied (for logs and tests)

    def start(self) -> None:
        self.follower.start()

    def stop(self) -> None:
        self.follower.stop()

    def apply(self, changes: list[Change]) -> None:
        """One batch, in feed order. A failure part-way raises: the follower reads the batch again (each apply is
        idempotent: a replayed entry has a revision not newer, a sidecar a ban already held, a revocation serials
        already revoked)."""
        own = self.store.own_changes
        authorities_changed = False  # consecutive authority changes: one reload for all of them
        for c in changes:
            if own.mine(c.position):
                continue
            if c.kind == "authority":
                authorities_changed = True
                continue
            if authorities_changed:
                self._reload_authorities()  # before what follows it (a CRL re-signed for a revocation)
                authorities_changed = False
            payload = c.payload
            if c.kind == "entry":
                self.registry.apply_peer(_entry(payload), deleted=c.op == "delete")
            elif c.kind == "sidecar":
                sidecar = Sidecar(**payload)
                if self.attestor.apply_peer(sidecar, c.op) or (c.op == "ban" and sidecar.state == "banned"):
                    self.hub.publish(sidecar.id, CLOSE)  # authentication refuses it from here on
            elif c.kind == "revocation":
                self.revocation.apply_peer(_revocation(payload))
            elif c.kind == "approval":
                self.approvals.settle(approval_from(payload))  # a replay finds the outcome already there
            else:
                log.warning("unknown change kind in the feed; skipped", kind=c.kind, position=c.position)
                continue
            self.applied += 1
        if authorities_changed:
            self._reload_authorities()
        own.forget_through(changes[-1].position)

    def _reload_authorities(self) -> None:
        withdrawn = self.authorities.reload()  # its listeners re-sign the CRL set and push the bundle (issuer/app.py)
        if withdrawn:
            # As TaintAuthority does after its commit: every sidecar replaces what these signed, now.
            self.hub.broadcast(("taint", tuple(withdrawn)))
        self.applied += 1
