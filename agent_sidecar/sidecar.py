"""The sidecar runtime: identity, issuer sync, the cache and the local socket, on one asyncio loop."""

from __future__ import annotations

import asyncio
import dataclasses
import datetime as dt
import os
import time

import grpc
from cryptography import x509

from agent_sidecar import metrics
from agent_sidecar.attestation import WorkloadAttestor
from agent_sidecar.cache import CacheManager, SkewBackoff, clock_skew
from agent_sidecar.config import SidecarConfig
from agent_sidecar.health import HealthService
from agent_sidecar.issuer_client import (UNREACHABLE, Backoff, IdentityStore, IssuerClient, SidecarBanned,
                                         SidecarIdentity)
from agent_sidecar.revocation import CrlOffer, RevocationState
from agent_sidecar.socket_server import Guard, GuardedServer, fit_to_descriptors
from agent_sidecar.task_api import TaskAPI
from agent_sidecar.workload_api import WorkloadAPI
from tessera import chain, logs, pem, safefs, spiffeid
from tessera.errors import ConfigError
from tessera.fdlimits import raise_nofile_limit
from tessera.uds import bind_unix, check_socket_path

log = logs.get("sidecar")

BACKOFF_MIN, BACKOFF_MAX = 0.2, 5.0
# Reconnecting the sync stream: an issuer that died leaves its sidecars on another within a couple of seconds
# (a refused connection costs the issuers nothing, so the cap is low).
SYNC_BACKOFF_MAX = 2.0
STARTUP_SYNC_WAIT = 5.0


def clock_hint(details: str | None) -> dict[str, str]:
    """A log field naming clock skew when a TLS handshake failed on a certificate's dates."""
    if any(s in (details or "") for s in ("not yet valid", "certificate has expired", "certificate expired")):
        return {"hint": "a certificate is outside its validity by this host's clock: "
                        "check the clock skew between this host and the issuer (NTP)"}
    return {}


def load_trust_bundle(path) -> tuple[x509.Certificate, ...]:
    return pem.read_certs(path, "trust_bundle")


class SidecarRuntime:
    def __init__(self, cfg: SidecarConfig):
        self.cfg = cfg
        self.ids = IdentityStore(cfg.data_dir)
        self.client = IssuerClient(cfg.issuer_address, cfg.issuer_bootstrap_address, cfg.server_name)
        self.cache = CacheManager(self.client.sign)
        self.attestor = WorkloadAttestor(cfg.exe_hash_max_bytes)
        self.revocation = RevocationState(lambda: pem.split_der(self.cache.bundle_der), cfg.data_dir, cfg.output_dir)
        self.ident: SidecarIdentity | None = None
        self.task_api = TaskAPI(self.cache, self.client)
        self._renew_now = asyncio.Event()  # set when this sidecar's own SVID must be replaced before half-life
        self._sync_call = None
        self._tasks: list[asyncio.Task] = []
        self._crl_offers: list[tuple[CrlOffer, int | None]] = []  # CRL sets waiting to be taken (set, committed_at)
        self._crl_task: asyncio.Task | None = None
        self._crl_unsaved = None  # a CRL set in force whose files are not written yet (CrlSetTaken)
        self._pushed_unsaved = False  # pushed serials changed since they were last saved
        self._pushed_task: asyncio.Task | None = None
        self._server: GuardedServer | None = None
        self._own_skew = SkewBackoff()
        self._sync_lost_log = logs.Throttled(log, window=30.0)
        self.stopped = asyncio.Event()
        self.metrics_server = None
        metrics.watch_cache(lambda: len(self.cache.svids), lambda: len(self.cache.entries), lambda: self.cache.ready)
        # `tessera-sidecar healthcheck` asks this; see healthy().
        self.health = HealthService(self.healthy)

    async def _obtain_identity(self) -> SidecarIdentity:
        saved = self.ids.load()
        now = dt.datetime.now(dt.timezone.utc)
        if saved is not None and saved.not_after > now:
            log.info("using saved sidecar SVID", sidecar_id=saved.sidecar_id, expires=saved.not_after.isoformat())
            if not saved.bundle:
                saved = SidecarIdentity(saved.sidecar_id, saved.chain, saved.key, load_trust_bundle(self.cfg.trust_bundle))
            return saved
        join_token = self.cfg.read_join_token()
        if not join_token:
            raise ConfigError("join_token: no valid saved sidecar SVID in data_dir, so a join token is required "
                              "(tessera token create --sidecar NAME)")
        bundle = load_trust_bundle(self.cfg.trust_bundle)
        delay = BACKOFF_MIN
        while True:
            try:
                ident = await self.client.attest(join_token, bundle)
                break
            except grpc.aio.AioRpcError as e:
                if e.code() not in UNREACHABLE:
                    raise ConfigError(f"join_token: the issuer refused attestation: {e.details()}") from None
                log.warning("issuer unreachable for attestation; retrying", error=e.details(), **clock_hint(e.details()))
                await asyncio.sleep(delay)
                delay = min(delay * 2, BACKOFF_MAX)
        self.ids.save(ident)
        log.info("attested with join token", sidecar_id=ident.sidecar_id)
        return ident

    async def start(self) -> None:
        safefs.make_dir(self.cfg.data_dir, "data_dir", 0o700, tighten=True)  # ours alone before anything is read
        # Refused at once, before anything is logged, if another user controls them.
        check_socket_path(self.cfg.socket_path)
        if self.cfg.output_dir is not None:
            safefs.make_dir(self.cfg.output_dir, "output_dir", 0o755)
        self.ident = await self._obtain_identity()
        self.cache.bundle_der = pem.der_concat(self.ident.bundle)
        # The last good CRL stays in force from the first moment, issuer reachable or not.
        self.revocation.load_saved()
        self.revocation.write_outputs(self.cache.bundle_der)
        # The first listed issuer that accepts a connection; none: the first, and the sync loop keeps trying.
        if await self.client.failover(self.ident) is None:
            await self.client.connect(self.ident)
        td = spiffeid.parse(self.ident.sidecar_id).trust_domain
        self.workload_api = WorkloadAPI(self.cache, td, crls=self.revocation.crls)
        if self.cfg.metrics_address:
            self.metrics_server = metrics.serve(self.cfg.metrics_address)
        for coro in (self._sync_loop(), self._renew_loop(), self.cache.run(), self._crl_check_loop()):
            self._tasks.append(asyncio.create_task(coro))
        # Bind once the first snapshot is in, so a present socket means "ready"; if the issuer is
        # unreachable, bind anyway after a while and answer UNAVAILABLE until it syncs.
        deadline = asyncio.get_running_loop().time() + STARTUP_SYNC_WAIT
        while not self.cache.ready and asyncio.get_running_loop().time() < deadline:
            await self.cache.wait_change(self.cache.version, timeout=0.5)
        # Callers are attested as they connect, and what any local user can hold is bounded.
        limits = fit_to_descriptors(self.cfg.socket_limits, raise_nofile_limit())
        self._server = GuardedServer(self.services(), Guard(self.attestor, limits))
        sock = bind_unix(self.cfg.socket_path, self.cfg.socket_mode)
        await self._server.start(sock=sock)
        log.info("sidecar started", sidecar_id=self.ident.sidecar_id, socket=str(self.cfg.socket_path))

    def services(self) -> list:
        return [self.workload_api, self.task_api, self.health]

    def healthy(self) -> bool:
        """Synced with the issuer at least once since start, and holding an unexpired sidecar SVID.

        An issuer outage alone does not make the sidecar unhealthy: it keeps serving valid SVIDs
        (the design's promise) until its own SVID expires, and then it is unhealthy.
        """
        return (self.cache.ready and self.ident is not None
                and self.ident.not_after > dt.datetime.now(dt.timezone.utc))

    async def _sync_loop(self) -> None:
        """Keep a sync stream open to one of the issuers. A lost stream is reopened after a jittered backoff at the
        first issuer that accepts a connection (IssuerClient.failover_order); each stream starts with the full
        state (snapshot, CRL set), so one issuer's stream resumes another's without missing a change."""
        backoff = Backoff(BACKOFF_MIN, SYNC_BACKOFF_MAX)
        lost_at: float | None = time.monotonic()  # when the last stream was lost (here: not synced yet)
        while True:
            call = self.client.sync()
            self._sync_call = call
            address = self.client.address
            self.revocation.begin_stream()
            try:
                async for ev in call:
                    backoff.reset()
                    try:
                        self.handle_sync_event(ev)
                    except Exception:  # noqa: BLE001 - e.g. a full disk: resync rather than stop syncing
                        log.exception("could not apply a sync event; resyncing",
                                      event=ev.WhichOneof("event"))
                        call.cancel()
                        break
                    if lost_at is not None and ev.WhichOneof("event") == "snapshot":
                        log.info("synced with issuer", issuer=address,
                                 after_seconds=round(time.monotonic() - lost_at, 3))
                        lost_at = None
            except grpc.aio.AioRpcError as e:
                if e.code() == grpc.StatusCode.CANCELLED and call is not self._sync_call:
                    continue  # replaced after renewal: reconnect at once
                if e.code() == grpc.StatusCode.PERMISSION_DENIED and not self.cache.cut:
                    # Banned, or this sidecar's own SVID revoked: every serial it obtained is revoked too.
                    log.error("the issuer cut this sidecar off; serving nothing more", error=e.details())
                    self.cache.cut_off()
                # Through an outage every retry (each 2 s at most) fails the same way: one line a while says so.
                self._sync_lost_log.log(f"{address} {e.code().name}", "sync stream lost; reconnecting", issuer=address,
                                        code=e.code().name, error=e.details(), **clock_hint(e.details()))
            except asyncio.CancelledError:
                if call is not self._sync_call and asyncio.current_task().cancelling() == 0:
                    continue  # the call was cancelled for renewal, not this loop
                call.cancel()
                raise
            if lost_at is None:
                lost_at = time.monotonic()
            await asyncio.sleep(backoff.next())
            # The current issuer first, then the others; none reachable: the next call on the current channel
            # fails and says why (a TLS error names clock skew), and the backoff grows.
            now = await self.client.failover(self.ident)
            if now is not None and now != address:
                metrics.ISSUER_FAILOVERS.inc()
                log.warning("moved to another issuer", issuer=now, previous=address)

    def handle_sync_event(self, ev) -> None:
        kind = ev.WhichOneof("event")
        if kind == "snapshot":
            self.persist_bundle(ev.snapshot.bundle)
            self.cache.apply_snapshot(ev.snapshot.entries, ev.snapshot.bundle)
        elif kind == "entry_upsert":
            self.cache.apply_upsert(ev.entry_upsert)
        elif kind == "entry_deleted":
            self.cache.apply_delete(ev.entry_deleted)
        elif kind == "bundle":
            self.persist_bundle(ev.bundle)
            self.cache.apply_bundle(ev.bundle)
        elif kind == "revocation":
            self.handle_revocation(ev.revocation)
        elif kind == "crls":
            self.offer_crls(CrlOffer.from_proto(ev.crls), ev.committed_at)  # observed once taken, off this loop
            return
        elif kind == "taint":
            self.handle_taint(ev.taint.authority_ids)
        # After applying: the delay measured is issuer commit -> applied here.
        metrics.observe_sync_event(kind, ev.committed_at)

    def persist_bundle(self, bundle_der: bytes) -> None:
        """Write a trust bundle to data_dir and output_dir, only when it differs from the one held
        (every resync carries the bundle; rewriting unchanged files would churn their readers)."""
        if not bundle_der or bundle_der == self.cache.bundle_der:
            return
        bundle = tuple(pem.split_der(bundle_der))
        self.ids.save_bundle(bundle)
        self.revocation.write_bundle(bundle_der)
        if self.ident is not None:
            self.ident = dataclasses.replace(self.ident, bundle=bundle)  # the next channel to the issuer trusts it

    def handle_revocation(self, rev) -> None:
        if self.revocation.note_revocation(rev.seq, rev.serials):
            log.warning("missed revocations; fetching the CRL", seq=rev.seq)
            self._one_off(self._fetch_crl())
        if rev.serials:
            self._save_pushed()
        # Revoked identities arrive as entry_upsert (state revoked); single serials are replaced here.
        self.cache.drop_revoked(self.revocation.is_revoked)

    def handle_taint(self, authority_ids) -> None:
        """Replace at once everything held that a tainted authority signed: identity SVIDs (re-minted by the
        cache), this sidecar's own SVID (renewed now), and live task credentials (signed again)."""
        ids = {a.lower() for a in authority_ids}
        svids = self.cache.taint(ids)
        own = self.ident is not None and bool(chain.signers(self.ident.chain) & ids)
        if own:
            self._renew_now.set()
        tasks = self.task_api.taint(ids)
        log.info("authorities tainted; replacing what they signed", authorities=sorted(ids), svids=svids,
                 own_svid=own, task_credentials=tasks)

    def _one_off(self, coro) -> asyncio.Task:
        """A task stopped with the sidecar, and forgotten once done (finished tasks do not pile up)."""
        task = asyncio.create_task(coro)
        self._tasks.append(task)
        task.add_done_callback(self._tasks.remove)
        return task

    def offer_crls(self, offer: CrlOffer, committed_at: int | None = None) -> asyncio.Task:
        """Take a CRL set without blocking the loop. Sets offered while one is taken are judged together
        (see RevocationState.accept_sets). Pushed revocations keep being applied on the loop meanwhile."""
        self._crl_offers.append((offer, committed_at))
        if self._crl_task is None or self._crl_task.done():
            self._crl_task = self._one_off(self._take_crls())
        return self._crl_task

    async def _take_crls(self) -> None:
        while self._crl_offers:
            offers, self._crl_offers = self._crl_offers, []
            accepted = await asyncio.to_thread(self.revocation.accept_sets, [offer for offer, _ in offers])
            if accepted is not None:
                self._crl_unsaved = accepted  # the newest: only _take_crls installs, one round at a time
            # Saved before it is in force, so what is served survives a restart. A save that failed (a full
            # disk) does not hold enforcement back: the CRL is installed all the same, and the save is
            # retried with the next CRL offered, which every resync brings, so crl.pem cannot stay behind.
            if self._crl_unsaved is not None:
                try:
                    await asyncio.to_thread(self.revocation.persist, self._crl_unsaved)
                except (OSError, ConfigError) as e:  # ConfigError: a path made unsafe while running
                    log.error("could not save the CRLs; retrying with the next set offered",
                              path=str(self.revocation.saved), error=str(e))
                else:
                    self._crl_unsaved = None
            if accepted is not None:
                pushed = len(self.revocation.pushed)
                if self.revocation.install(accepted):
                    self.cache.drop_revoked(self.revocation.is_revoked)
                    self.cache.bump()  # streams resend with the new `crl` fields
                if len(self.revocation.pushed) != pushed:
                    self._save_pushed()  # those the CRL now lists need not be kept apart
            for _, committed_at in offers:
                if committed_at is not None:
                    metrics.observe_sync_event("crls", committed_at)

    def _save_pushed(self) -> asyncio.Task:
        """Save the pushed serials off the loop; changes made while a save runs are saved after it."""
        self._pushed_unsaved = True
        if self._pushed_task is None or self._pushed_task.done():
            self._pushed_task = self._one_off(self._write_pushed())
        return self._pushed_task

    async def _write_pushed(self) -> None:
        while self._pushed_unsaved:
            self._pushed_unsaved = False
            try:
                await asyncio.to_thread(self.revocation.save_pushed, dict(self.revocation.pushed))
            except (OSError, ConfigError) as e:  # enforced in memory all the same; the next push saves again
                log.error("could not save pushed revocations", path=str(self.revocation.saved_pushed),
                          error=str(e))
                return

    async def _fetch_crl(self) -> None:
        try:
            await asyncio.shield(self.offer_crls(CrlOffer.from_proto(await self.client.fetch_crls())))
        except grpc.aio.AioRpcError as e:
            log.warning("CRL fetch failed; keeping the last good CRL", code=e.code().name, error=e.details())

    async def _crl_check_loop(self) -> None:
        """Anti-entropy: fetch the full CRL now and then, whatever the stream said."""
        while True:
            await asyncio.sleep(self.cfg.crl_check_interval)
            if not self.cache.cut:
                await self._fetch_crl()

    def _own_svid_skew_wait(self) -> float | None:
        """None if this sidecar's own SVID is valid by this host's clock; else logs the skew and returns how
        long to wait before renewing (an SVID expired by our clock would otherwise be renewed at once,
        again and again, each a certificate signed and recorded)."""
        now = time.time()
        skew = clock_skew(self.ident.not_before.timestamp(), self.ident.not_after.timestamp(), now)
        if skew is None:
            self._own_skew.valid()
            return None
        wait = self._own_skew.skewed()
        log.error("this sidecar's own SVID is outside its validity by this host's clock: clock skew between "
                  "this host and the issuer; fix the clocks (NTP). Health is NOT_SERVING until then",
                  skew_seconds=round(skew), not_before=self.ident.not_before.isoformat(),
                  not_after=self.ident.not_after.isoformat(), renew_in=wait)
        return wait

    async def _renew_loop(self) -> None:
        delay = BACKOFF_MIN
        while True:
            wait = self._own_svid_skew_wait()
            if wait is None:
                wait = self.ident.renew_delay(dt.datetime.now(dt.timezone.utc))
            if wait > 0 and not self._renew_now.is_set():
                try:
                    await asyncio.wait_for(self._renew_now.wait(), wait)
                except asyncio.TimeoutError:
                    pass
            forced = self._renew_now.is_set()  # its signer was tainted: retried until it succeeds, not at half-life
            self._renew_now.clear()
            try:
                new = await self.client.renew(self.ident)
            except SidecarBanned as e:
                log.error("issuer refused to renew this sidecar's SVID", error=str(e))
                await asyncio.sleep(BACKOFF_MAX)
                if forced:
                    self._renew_now.set()
                continue
            except grpc.aio.AioRpcError as e:
                log.warning("sidecar SVID renewal failed; retrying", error=e.details(), **clock_hint(e.details()))
                await asyncio.sleep(delay)
                delay = min(delay * 2, BACKOFF_MAX)
                if forced:
                    self._renew_now.set()
                continue
            delay = BACKOFF_MIN
            try:
                self.ids.save(new)
            except OSError as e:
                # Keep going on the new SVID; only a restart would need the saved copy.
                log.error("could not save the renewed sidecar SVID", error=str(e))
            self.ident = new
            old_call = self._sync_call
            await self.client.connect(new)
            if old_call is not None:
                self._sync_call = None
                old_call.cancel()
            log.info("sidecar SVID renewed", expires=new.not_after.isoformat())

    async def stop(self) -> None:
        for t in self._tasks:
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
        self.task_api.close()
        if self.metrics_server is not None:
            self.metrics_server.shutdown()
        try:
            os.unlink(self.cfg.socket_path)
        except OSError:
            pass
        await self.client.close()
