"""The composition root: every issuer service built through its constructor, in one place (`build`), and the
runtime that serves them (`IssuerApp`: gRPC listeners, the admin socket, background threads).

`tessera-issuer` runs an IssuerApp; tests that exercise the services in-process call `build` with a real
config, so both run the same wiring.
"""

from __future__ import annotations

import asyncio
import os
import resource
import threading
from concurrent import futures
from dataclasses import dataclass

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1.health import aio as health_aio

from issuer import metrics
from issuer.api.admin import AdminService
from issuer.api.evidence import Evidence
from issuer.api.sidecar import IssuerService
from issuer.audit.records import AuditFile
from issuer.audit.relay import AuditRelay
from issuer.ca.authorities import Authorities, AuthorityConfig
from issuer.ca.keys import KeyEncryptionKey
from issuer.ca.serving import ServingCert
from issuer.config import IssuerConfig
from issuer.core.events import EventHub
from issuer.datastore import open_store, read_heads
from issuer.datastore.highwater import HighWater
from issuer.datastore.interface import Datastore
from issuer.identity.attestation import SidecarAttestor
from issuer.identity.registration import Registry
from issuer.issuance.pool import SigningPool
from issuer.issuance.signer import SvidSigner
from issuer.peers import Peers
from issuer.revocation.service import RevocationService
from issuer.tasks.approvals import Approvals
from issuer.tasks.service import TaskService
from tessera import logs, rpc, safefs
from tessera.connlimit import CappedServer
from tessera.errors import Unavailable
from tessera.fdlimits import connection_caps
from tessera.uds import bind_unix, check_socket_path
from tessera.v1 import issuer_pb2_grpc

log = logs.get("issuer")
_rotation_log = logs.Throttled(log, window=60, level="error")

# Per HTTP/2 connection. A sidecar multiplexes its sync stream, signing batches and task requests (a task
# waiting for approval is an open stream) over one connection; bootstrap serves one AttestSidecar call.
SIDECAR_MAX_STREAMS = 1000
BOOTSTRAP_MAX_STREAMS = 4
# AttestSidecar carries a token and a CSR (about 1 KB); anything far larger is not a join.
BOOTSTRAP_MAX_MESSAGE = 64 * 1024
# A bootstrap connection with no call open this long is closed: a join is one call.
BOOTSTRAP_IDLE_MS = 30_000
ROTATION_CHECK = 1.0  # seconds between checks whether an authority's successor is due


@dataclass(frozen=True)
class Services:
    """Every issuer service, built once by `build`."""

    audit_relay: AuditRelay
    store: Datastore
    audit_file: AuditFile
    authorities: Authorities
    hub: EventHub
    registry: Registry
    attestor: SidecarAttestor
    revocation: RevocationService
    signing_pool: SigningPool | None
    signer: SvidSigner
    approvals: Approvals
    tasks: TaskService
    evidence: Evidence
    sidecar_api: IssuerService
    admin_api: AdminService
    peers: Peers
    high_water: HighWater

    def close(self) -> None:
        """Stop what `build` started, store last (the audit file drains what the store handed it first)."""
        self.peers.stop()
        self.high_water.stop()  # its last read of the heads, before the store closes
        self.approvals.close()
        self.revocation.stop()
        if self.signing_pool is not None:
            self.signing_pool.close()
        self.attestor.denials.flush(everything=True)
        self.audit_file.close()
        self.store.close()


def build(cfg: IssuerConfig, accept_restored_database: bool = False) -> Services:
    """Open the datastore, the audit file and the CA, and wire every service to them through constructors.

    A database behind the issuer's high-water mark is refused before anything is opened for writing, unless
    `accept_restored_database` (issuer/datastore/highwater.py)."""
    safefs.make_dir(cfg.data_dir, "data_dir", 0o700, tighten=True)  # ours alone, before anything is read from it
    source = cfg.datastore.source(cfg.data_dir)
    high_water = HighWater(cfg.data_dir)
    behind = high_water.check(read_heads(source), accept_restored_database)  # read only: refused, nothing changed
    # Every committed audit record reaches the relay's subscribers in seq order, whichever process wrote it.
    audit_relay = AuditRelay()
    store = open_store(source, relay=audit_relay, pool_size=cfg.datastore.pool_size)
    if behind:
        # Before anything signs a CRL or writes the audit file.
        high_water.accept(store, behind, lambda: AuditFile.set_aside(cfg.audit_file, "before-restore"))
    high_water.attach(store)
    # Read before any cache is loaded: what a peer commits while they load is applied again by the follower
    # (harmless: applying is idempotent), never missed (issuer/peers.py).
    feed_start = store.last_change_position()
    # The JSON-lines copy of the trail first catches up with what the database already holds.
    audit_file = AuditFile(cfg.audit_file, store.audit_records)
    audit_file.catch_up()
    audit_file.start()
    audit_relay.subscribe(audit_file)
    audit_relay.subscribe(metrics.observe_audit)
    kek = KeyEncryptionKey.load(cfg.kek_file, cfg.data_dir)
    authorities = Authorities(store, kek, AuthorityConfig(
        trust_domain=cfg.trust_domain, data_dir=cfg.data_dir, ca_cert=cfg.ca_cert, ca_key=cfg.ca_key,
        ca_offline=cfg.ca_offline, ca_ttl=cfg.ca_ttl, root_ttl=cfg.root_ttl))
    hub = EventHub()
    registry = Registry(store, hub, cfg.trust_domain, cfg.default_x509_ttl, tier_names=cfg.policy.tier_names)
    attestor = SidecarAttestor(store, authorities, cfg.sidecar_svid_ttl, cfg.join_token_ttl)
    revocation = RevocationService(store, authorities, registry, attestor, hub, cfg.crl_validity,
                                   on_crl_numbers=high_water.note_crl_numbers)
    signing_pool = (SigningPool(authorities, cfg.signing_workers, store.opener(), audit_relay.publish)
                    if cfg.signing_workers else None)
    signer = SvidSigner(store, authorities, registry, revocation, signing_pool, identity_ttl=cfg.policy.identity_ttl)
    approvals = Approvals(store, cfg.policy.approval_timeout, cfg.policy.limits)
    tasks = TaskService(store, authorities, registry, cfg.policy, approvals, revocation)
    evidence = Evidence(store, registry, attestor, hub, cfg.policy, authorities)
    audit_relay.subscribe(evidence.feed)

    def publish_trust(change: str) -> None:
        # The new CRL set first (an intermediate's CRL is out before it signs), then the roots if they changed.
        revocation.rebuild_crl()
        if change in ("bundle", "signer"):
            hub.broadcast(("bundle", authorities.bundle_der))
        metrics.set_authorities(authorities.list())

    metrics.set_authorities(authorities.list())
    authorities.subscribe(publish_trust)
    peers = Peers(store, registry, attestor, revocation, authorities, hub, approvals, feed_start)
    return Services(
        audit_relay=audit_relay, store=store, audit_file=audit_file, authorities=authorities, hub=hub,
        registry=registry, attestor=attestor,
        revocation=revocation, signing_pool=signing_pool, signer=signer, approvals=approvals, tasks=tasks,
        evidence=evidence,
        sidecar_api=IssuerService(attestor, signer, registry, hub, authorities, revocation, tasks,
                                  cfg.resync_interval),
        admin_api=AdminService(registry, attestor, hub, authorities, approvals, revocation, evidence, cfg.admin_uids),
        peers=peers, high_water=high_water)


class IssuerApp:
    """The running issuer: `build`'s services behind their listeners."""

    def __init__(self, cfg: IssuerConfig, accept_restored_database: bool = False):
        self.cfg = cfg
        check_socket_path(cfg.admin_socket)  # refused now, not after the listeners are up
        self.services = build(cfg, accept_restored_database)
        metrics.watch_connected_sidecars(self.services.hub)
        metrics.watch_audit_file(self.services.audit_file)
        metrics.watch_change_feed(self.services.peers.follower)
        self.health = health_aio.HealthServicer()
        self.metrics_server = None
        # Each listener's connections are capped below the descriptor limit (tessera/fdlimits.py), so a
        # flood of one never takes the descriptors the others, the database and the admin socket need.
        self.caps = connection_caps(resource.getrlimit(resource.RLIMIT_NOFILE)[0])
        self._grpc: list[grpc.aio.Server] = []
        self._flush_stop = threading.Event()
        self._flush_thread: threading.Thread | None = None
        self._rotation_thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._loop_thread: threading.Thread | None = None
        self._blocking: futures.ThreadPoolExecutor | None = None
        self._admin_loop: asyncio.AbstractEventLoop | None = None
        self._admin_thread: threading.Thread | None = None
        self._admin_ready = threading.Event()
        self._admin_error: BaseException | None = None

    def start(self) -> None:
        if self.cfg.metrics_address:
            # First, so a taken port fails the start before any listener is up.
            self.metrics_server = metrics.serve(self.cfg.metrics_address)
        serving = ServingCert(self.services.authorities, self.services.store, self.cfg.server_name)
        # The sidecar-facing gRPC server runs on one event loop in its own thread: a call costs no thread
        # hand-off and a connected sidecar's sync stream no thread at all. Blocking work (commits, CA
        # signatures outside the signing pool) goes to the loop's default executor.
        self._blocking = futures.ThreadPoolExecutor(max_workers=self.cfg.max_workers, thread_name_prefix="blocking")
        self._loop = asyncio.new_event_loop()
        self._loop.set_default_executor(self._blocking)
        self._loop_thread = threading.Thread(target=self._loop.run_forever, name="grpc-loop", daemon=True)
        self._loop_thread.start()
        self.port, self.bootstrap_port = self._on_loop(self._start_grpc(serving))
        self.services.revocation.start()
        self.services.peers.start()
        self.services.high_water.start()
        self._flush_thread = threading.Thread(target=self._flush_denials, name="join-denials", daemon=True)
        self._flush_thread.start()
        self._rotation_thread = threading.Thread(target=self._rotate, name="authorities", daemon=True)
        self._rotation_thread.start()
        self._admin_thread = threading.Thread(target=self._run_admin, name="admin", daemon=True)
        self._admin_thread.start()
        self._admin_ready.wait()
        if self._admin_error is not None:
            raise self._admin_error
        for name in ("", "tessera.v1.Issuer"):
            self._on_loop(self.health.set(name, health_pb2.HealthCheckResponse.SERVING))
        log.info("issuer started", trust_domain=self.cfg.trust_domain, listen=self.cfg.listen_address,
                 bootstrap=self.cfg.bootstrap_address, admin_socket=str(self.cfg.admin_socket),
                 max_connections={"listen": self.caps.sidecar, "bootstrap": self.caps.bootstrap,
                                  "admin": self.caps.admin})

    def _on_loop(self, coro):
        assert self._loop is not None
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result()

    def _grpc_server(self, max_connections: int, max_streams: int, *extra) -> grpc.aio.Server:
        server = grpc.aio.server(options=[
            # Off unless share_port: a second issuer started by mistake on the same port fails to start instead of
            # silently taking half the connections.
            ("grpc.so_reuseport", int(self.cfg.share_port)), ("grpc.keepalive_time_ms", 20000),
            ("grpc.http2.min_ping_interval_without_data_ms", 5000), ("grpc.keepalive_permit_without_calls", 1),
            # Past the cap grpc-core accepts and closes at once; a connection that has not finished TLS and
            # HTTP/2 set-up by the timeout is closed, so idle connections cannot hold the slots for long.
            ("grpc.max_allowed_incoming_connections", max_connections),
            ("grpc.server_handshake_timeout_ms", self.cfg.handshake_timeout * 1000),
            ("grpc.max_concurrent_streams", max_streams), *extra])
        rpc.add_servicer(issuer_pb2_grpc.add_IssuerServicer_to_server, self.services.sidecar_api, server)
        # Standard gRPC health, on both ports: probes can use the bootstrap port without a client cert.
        health_pb2_grpc.add_HealthServicer_to_server(self.health, server)
        self._grpc.append(server)
        return server

    async def _start_grpc(self, serving: ServingCert) -> tuple[int, int]:
        # One grpc server per listener: grpc-core takes its caps per server, and the bootstrap port, open to
        # anyone who can connect, gets a far smaller one than the sidecars' mTLS port.
        main = self._grpc_server(self.caps.sidecar, SIDECAR_MAX_STREAMS)
        bootstrap = self._grpc_server(self.caps.bootstrap, BOOTSTRAP_MAX_STREAMS,
                                      ("grpc.max_receive_message_length", BOOTSTRAP_MAX_MESSAGE),
                                      ("grpc.max_connection_idle_ms", BOOTSTRAP_IDLE_MS))
        mtls = grpc.dynamic_ssl_server_credentials(serving.config(), serving.fetch,
                                                   require_client_authentication=True)
        tls = grpc.dynamic_ssl_server_credentials(serving.config(), serving.fetch,
                                                  require_client_authentication=False)
        try:
            port = main.add_secure_port(self.cfg.listen_address, mtls)
            bootstrap_port = bootstrap.add_secure_port(self.cfg.bootstrap_address, tls)
        except RuntimeError:
            port = bootstrap_port = 0
        if not port or not bootstrap_port:
            raise OSError(f"cannot listen on {self.cfg.listen_address} / {self.cfg.bootstrap_address}")
        for server in self._grpc:
            await server.start()
        return port, bootstrap_port

    async def _stop_grpc(self, grace: float) -> None:
        await asyncio.gather(*(server.stop(grace) for server in self._grpc))

    def _flush_denials(self) -> None:
        # Refused joins counted during a window become one audit record when it ends.
        while not self._flush_stop.wait(self.services.attestor.denials.window / 4):
            self.services.attestor.denials.flush()

    def _rotate(self) -> None:
        # Successors are prepared and activated ahead of need: a signing request never waits for one.
        while not self._flush_stop.wait(ROTATION_CHECK):
            try:
                self.services.authorities.tick()
            except Unavailable as e:  # the database is down: every check fails alike, said once a minute
                _rotation_log.log("unavailable", "authority rotation check failed; retrying", error=e.message)
            except Exception:  # noqa: BLE001 - the active authority keeps signing; try again next time
                log.exception("authority rotation check failed")

    def _run_admin(self) -> None:
        loop = asyncio.new_event_loop()
        asyncio.set_event_loop(loop)
        self._admin_loop = loop
        try:
            server = CappedServer([self.services.admin_api], self.caps.admin, self.caps.admin_per_uid)
            sock = bind_unix(self.cfg.admin_socket, 0o600)
            loop.run_until_complete(server.start(sock=sock))
        except BaseException as e:  # noqa: BLE001 - reported to start()
            self._admin_error = e
            self._admin_ready.set()
            return
        self._admin_ready.set()
        try:
            loop.run_forever()
        finally:
            server.close()
            loop.run_until_complete(server.wait_closed())
            loop.close()

    def stop(self, grace: float = 2.0) -> None:
        if self._loop is not None:
            self._on_loop(self.health.enter_graceful_shutdown())
        if self.metrics_server is not None:
            self.metrics_server.shutdown()
        # Requests waiting for an approval would hold the grace period: end them first.
        self.services.approvals.close()
        self.services.peers.stop()
        self.services.revocation.stop()
        if self._grpc:
            self._on_loop(self._stop_grpc(grace))
        if self._loop is not None:
            self._loop.call_soon_threadsafe(self._loop.stop)
            if self._loop_thread:
                self._loop_thread.join(timeout=5)
            if not self._loop.is_running():
                self._loop.close()  # later hand-offs to it (signing pool, hub) see a closed loop
        if self._blocking is not None:
            # Let running blocking work (a commit, an attestation) finish before the store closes.
            self._blocking.shutdown(wait=True, cancel_futures=True)
        self._flush_stop.set()
        for thread in (self._flush_thread, self._rotation_thread):
            if thread is not None:
                thread.join(timeout=5)
        if self._admin_loop is not None:
            self._admin_loop.call_soon_threadsafe(self._admin_loop.stop)
            if self._admin_thread:
                self._admin_thread.join(timeout=5)
        try:
            os.unlink(self.cfg.admin_socket)
        except OSError:
            pass
        self.services.close()  # the signing pool, the last refused joins, the audit file, then the store
        log.info("issuer stopped")
