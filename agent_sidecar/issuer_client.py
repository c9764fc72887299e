"""The sidecar's connection to the issuer: attestation, its own SVID, signing and the sync stream.

The sidecar's key and SVID live in data_dir (key 0600), so a restart comes back
without a new join token while the saved SVID is still valid.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import grpc
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from tessera import pem, safefs, x509svid
from tessera.errors import ConfigError
from tessera.v1 import issuer_pb2, issuer_pb2_grpc


class SidecarBanned(Exception):
    pass


@dataclass(frozen=True)
class SidecarIdentity:
    sidecar_id: str
    chain: tuple[x509.Certificate, ...]
    key: object
    bundle: tuple[x509.Certificate, ...]

    @property
    def not_before(self) -> dt.datetime:
        return self.chain[0].not_valid_before_utc

    @property
    def not_after(self) -> dt.datetime:
        return self.chain[0].not_valid_after_utc

    def renew_delay(self, now: dt.datetime) -> float:
        """Seconds until renewal: half of the lifetime still ahead, at least a second from now."""
        start = max(self.not_before, min(now, self.not_after))
        return max(1.0, ((start + (self.not_after - start) / 2) - now).total_seconds()) if self.not_after > now else 0.0


class IdentityStore:
    """The sidecar's key and SVID (one file, 0600) and the last trust bundle, on disk.

    Key and certificate chain live in one file replaced atomically, so a crash during renewal
    leaves the old pair or the new pair, never a new key beside an old certificate. Files are
    read and written by tessera.safefs's rules: no link followed, nothing another user owns.
    """

    def __init__(self, data_dir: Path):
        self.identity = data_dir / "sidecar-identity.pem"
        self.bundle = data_dir / "bundle.pem"

    def load(self) -> SidecarIdentity | None:
        """The saved identity; None if there is none; ConfigError if it is unreadable or inconsistent."""
        try:
            data = _read_if_present(self.identity, key=True)
            if data is None:
                return None
            key = serialization.load_pem_private_key(data, password=None)
            chain = tuple(x509.load_pem_x509_certificates(data))
            saved_bundle = _read_if_present(self.bundle)
            bundle = tuple(x509.load_pem_x509_certificates(saved_bundle)) if saved_bundle is not None else ()
            sid = str(x509svid.spiffe_id_of(chain[0]))
        except (OSError, ValueError, TypeError) as e:
            raise ConfigError(f"data_dir: the saved sidecar identity {self.identity} is unreadable ({e}); "
                              "remove it and start with a new join token") from None
        if chain[0].public_key().public_numbers() != key.public_key().public_numbers():
            raise ConfigError(f"data_dir: the saved sidecar key and SVID in {self.identity} do not match; "
                              "remove it and start with a new join token")
        return SidecarIdentity(sid, chain, key, bundle)

    def save(self, ident: SidecarIdentity) -> None:
        safefs.atomic_write(self.identity, pem.key_pem(ident.key) + pem.certs_pem(ident.chain), 0o600, "data_dir")
        self.save_bundle(ident.bundle)

    def save_bundle(self, bundle) -> None:
        if bundle:
            safefs.atomic_write(self.bundle, pem.certs_pem(bundle), 0o644, "data_dir")


def _read_if_present(path: Path, key: bool = False) -> bytes | None:
    try:
        return safefs.read_regular(path, "data_dir", key=key)
    except FileNotFoundError:
        return None


# How long one issuer address may take to accept a connection (TCP and TLS) before the next is tried: an
# address that refuses fails at once, a host that vanished (no answer at all) costs this much.
PROBE_TIMEOUT = 2.0


def _options(server_name: str) -> list[tuple[str, object]]:
    return [
        ("grpc.ssl_target_name_override", server_name),
        ("grpc.keepalive_time_ms", 10000),
        ("grpc.keepalive_timeout_ms", 5000),
        ("grpc.keepalive_permit_without_calls", 1),
        # A hung issuer, or a host cut off, sends no RST: only a keepalive ping left unanswered ends the stream, so
        # the sidecar can leave for another issuer. grpc 1.85 times a ping out by this (its default is a minute;
        # keepalive_timeout_ms alone did not end the stream), and would stop pinging a quiet stream after two.
        ("grpc.http2.ping_timeout_ms", 5000),
        ("grpc.http2.max_pings_without_data", 0),
        ("grpc.initial_reconnect_backoff_ms", 200),
        ("grpc.max_reconnect_backoff_ms", 2000),
        # grpc's connect timeout (20 s by default): a call on a channel to a frozen issuer (TCP accepted by the
        # kernel, TLS never answered) fails after this instead, and the sidecar tries another.
        ("grpc.min_reconnect_backoff_ms", int(PROBE_TIMEOUT * 1000)),
        # A CRL of 100k serials is 4-5 MB; the default 4 MB cap would cut sidecars off near 80k.
        ("grpc.max_receive_message_length", 64 * 1024 * 1024),
    ]


# An issuer that did not answer (refused, gone, or silent until the deadline): another may.
UNREACHABLE = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)

class Backoff:
    """Delays between reconnection attempts: doubling from `first` up to `cap`, each drawn at random from its upper
    half ("equal jitter"), so sidecars that lost the same issuer at the same moment do not come back in step."""

    def __init__(self, first: float, cap: float, rng: random.Random | None = None):
        self.first, self.cap = first, cap
        self._rng = rng or random.Random()
        self._next = first

    def next(self) -> float:
        d = self._next
        self._next = min(self._next * 2, self.cap)
        return self._rng.uniform(d / 2, d)

    def reset(self) -> None:
        self._next = self.first


SETTLE = 0.25  # seconds a channel still READY after a failed call is given to notice a lost connection


async def _settle(channel: grpc.aio.Channel) -> None:
    """A call on `channel` just failed as unreachable: a call's error can arrive before the channel leaves READY
    (the connection reset reaches the stream first), so give its state a moment to catch up. A channel that stays
    READY is connected: its issuer answered UNAVAILABLE itself."""
    state = channel.get_state()
    if state == grpc.ChannelConnectivity.READY:
        try:
            await asyncio.wait_for(channel.wait_for_state_change(state), SETTLE)
        except asyncio.TimeoutError:
            pass


async def reachable(channel: grpc.aio.Channel, timeout: float) -> bool:
    """True once `channel` is connected (TLS done); False when it failed to connect or `timeout` passed.

    Unlike channel_ready(), a refused connection answers at once instead of waiting out grpc's own retries.
    """
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    state = channel.get_state(try_to_connect=True)
    while state != grpc.ChannelConnectivity.READY:
        left = deadline - loop.time()
        if state in (grpc.ChannelConnectivity.TRANSIENT_FAILURE, grpc.ChannelConnectivity.SHUTDOWN) or left <= 0:
            return False
        try:
            await asyncio.wait_for(channel.wait_for_state_change(state), left)
        except asyncio.TimeoutError:
            return False
        state = channel.get_state(try_to_connect=True)
    return True


class IssuerClient:
    """Calls to whichever of the configured issuers is current.

    The issuers are equal peers on one database, so any of them will do. All calls share one channel
    to the current address; `failover` moves it to another that accepts a connection. A name that
    resolves to several addresses is one address here: grpc's resolver tries each of them
    (pick_first), and every channel built afresh resolves the name again.
    """

    def __init__(self, addresses: Sequence[str], bootstrap_addresses: Sequence[str], server_name: str):
        if not addresses or not bootstrap_addresses:
            raise ValueError("IssuerClient needs at least one issuer address and one bootstrap address")
        self.addresses = tuple(addresses)
        self.bootstrap_addresses = tuple(bootstrap_addresses)
        self.address = self.addresses[0]  # the current issuer
        self.server_name = server_name
        self.channel: grpc.aio.Channel | None = None
        self.stub: issuer_pb2_grpc.IssuerStub | None = None
        self._switch = asyncio.Lock()  # one channel change at a time (renewal and failover may overlap)
        self._ident: SidecarIdentity | None = None  # the SVID the channel was last built with
        self._closing: set[asyncio.Task] = set()

    async def attest(self, join_token: str, trust_bundle: tuple[x509.Certificate, ...]) -> SidecarIdentity:
        """Attest at the first bootstrap address that answers (they are tried in a random order, so sidecars
        started together spread over them); the last UNAVAILABLE error if none does. Any other error is the
        issuers' answer (they share one database) and is raised at once."""
        key = x509svid.new_key()
        creds = grpc.ssl_channel_credentials(root_certificates=pem.certs_pem(trust_bundle))
        req = issuer_pb2.AttestSidecarRequest(join_token=join_token, csr=x509svid.make_csr(key))
        last: grpc.aio.AioRpcError | None = None
        for address in random.sample(self.bootstrap_addresses, len(self.bootstrap_addresses)):
            async with grpc.aio.secure_channel(address, creds, options=_options(self.server_name)) as ch:
                try:
                    resp = await issuer_pb2_grpc.IssuerStub(ch).AttestSidecar(req, timeout=15)
                except grpc.aio.AioRpcError as e:
                    if e.code() not in UNREACHABLE:
                        raise
                    last = e
                    continue
            return _identity(resp, key)
        assert last is not None
        raise last

    def _channel(self, address: str, ident: SidecarIdentity) -> grpc.aio.Channel:
        self._ident = ident
        creds = grpc.ssl_channel_credentials(
            root_certificates=pem.certs_pem(ident.bundle), private_key=pem.key_pem(ident.key),
            certificate_chain=pem.certs_pem(ident.chain))
        return grpc.aio.secure_channel(address, creds, options=_options(self.server_name))

    def _install(self, address: str, channel: grpc.aio.Channel) -> None:
        old = self.channel
        self.address, self.channel = address, channel
        self.stub = issuer_pb2_grpc.IssuerStub(channel)
        if old is not None:
            # Closed in the background: calls still open on it (a task waiting for approval) get their grace,
            # and a failover does not wait for them.
            task = asyncio.create_task(old.close(grace=1.0))
            self._closing.add(task)
            task.add_done_callback(self._closing.discard)

    async def connect(self, ident: SidecarIdentity) -> None:
        """(Re)build the mTLS channel to the current issuer with the current sidecar SVID."""
        async with self._switch:
            self._install(self.address, self._channel(self.address, ident))

    def failover_order(self) -> list[str]:
        """The addresses to try after a lost stream: the current one first (it may only have restarted), then
        the others in a random order, so the sidecars of an issuer that died spread over the rest."""
        others = [a for a in self.addresses if a != self.address]
        return [self.address, *random.sample(others, len(others))]

    async def failover(self, ident: SidecarIdentity, timeout: float = PROBE_TIMEOUT) -> str | None:
        """Point the channel at the first issuer in failover_order() that accepts a connection; its address, or
        None (the channel left as it was) when none does within `timeout` each."""
        async with self._switch:
            return await self._failover(ident, timeout)

    async def _failover(self, ident: SidecarIdentity, timeout: float) -> str | None:
        for address in self.failover_order():
            channel = self._channel(address, ident)
            if await reachable(channel, timeout):
                self._install(address, channel)
                return address
            await channel.close(grace=None)
        return None

    async def leave(self, address: str, timeout: float = PROBE_TIMEOUT) -> str | None:
        """After a call to `address` failed as unreachable: the issuer to call instead, or None if none answers.
        If the channel was moved meanwhile (the sync loop noticed first), the new one; if `address` accepts
        connections again, it is kept, with the streams open on it; otherwise as failover()."""
        async with self._switch:
            if self.address != address:
                return self.address
            if self.channel is not None:
                await _settle(self.channel)
                if await reachable(self.channel, timeout):
                    return address
            return await self._failover(self._ident, timeout)

    async def renew(self, ident: SidecarIdentity) -> SidecarIdentity:
        key = x509svid.new_key()
        try:
            resp = await self.stub.RenewSidecar(issuer_pb2.RenewSidecarRequest(csr=x509svid.make_csr(key)), timeout=15)
        except grpc.aio.AioRpcError as e:
            if e.code() == grpc.StatusCode.PERMISSION_DENIED:
                raise SidecarBanned(e.details()) from None
            raise
        return _identity(resp, key)

    async def sign(self, items: list[tuple[str, bytes]]) -> list[issuer_pb2.SignedSVID]:
        req = issuer_pb2.SignX509SVIDsRequest(items=[issuer_pb2.CSRItem(entry_id=e, csr=c) for e, c in items])
        resp = await self.stub.SignX509SVIDs(req, timeout=30)
        return list(resp.items)

    def request_task(self, req: issuer_pb2.TaskSVIDRequest):
        """A server stream of TaskSVIDUpdate; no deadline, since a human may be deciding."""
        return self.stub.RequestTaskSVID(req)

    async def reissue_task(self, cert_chain: bytes, csr: bytes) -> issuer_pb2.SignedTaskSVID:
        """A task credential signed by a tainted authority, signed again for a new key."""
        return await self.stub.ReissueTaskSVID(issuer_pb2.ReissueTaskSVIDRequest(cert_chain=cert_chain, csr=csr),
                                               timeout=30)

    async def end_task(self, task_id: str, entry_id: str, reason: str) -> list[str]:
        resp = await self.stub.EndTask(issuer_pb2.EndTaskSVIDRequest(task_id=task_id, entry_id=entry_id,
                                                                     reason=reason), timeout=30)
        return list(resp.revoked_serials)

    async def fetch_crls(self) -> issuer_pb2.CrlSet:
        """Every CRL the issuer publishes, with the intermediates that sign them."""
        resp = await self.stub.FetchCRL(issuer_pb2.FetchCRLRequest(), timeout=15)
        return resp.crls

    def sync(self):
        return self.stub.Sync(issuer_pb2.SyncRequest())

    async def close(self) -> None:
        if self.channel is not None:
            await self.channel.close(grace=0.5)
        await asyncio.gather(*self._closing, return_exceptions=True)


def _identity(resp: issuer_pb2.SidecarSVIDResponse, key) -> SidecarIdentity:
    chain = tuple(pem.split_der(resp.svid_chain))
    bundle = tuple(pem.split_der(resp.bundle))
    return SidecarIdentity(resp.sidecar_id, chain, key, bundle)
