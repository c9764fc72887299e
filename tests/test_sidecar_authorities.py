"""The sidecar under a hierarchy of authorities, served on its real socket in this process: SVIDs served with their
chain (leaf, intermediate), a new bundle (a root rotation) reaching every open stream and file at once, and a
taint replacing at once every SVID, the sidecar's own SVID and every task credential the tainted authority signed.

The issuer's side of the calls is `SigningIssuer`: it signs with real SigningAuthority objects (the one active can
be switched, as a rotation or a taint does), so every certificate the sidecar handles is real. Sync events are
handed to the runtime's own handler, as its sync loop does with what the issuer streams.
"""

from __future__ import annotations

import asyncio
import os
import queue
import subprocess
import threading
import time

import grpc
import pytest
from cryptography.hazmat.primitives import serialization

from agent_sidecar import workload_client
from agent_sidecar.issuer_client import SidecarIdentity
from agent_sidecar.socket_server import Guard, GuardedServer, SocketLimits
from agent_sidecar.task_api import TaskAPI
from agent_sidecar.cache import CacheManager
from agent_sidecar.workload_api import WorkloadAPI
from hierarchy import TD, Authority, Hierarchy, der
from tessera import chain, pem, spiffeid, taskext, x509svid
from tessera.uds import bind_unix, socket_target
from tessera.v1 import issuer_pb2, task_pb2, task_pb2_grpc, types_pb2
from tessera.workload import workload_pb2, workload_pb2_grpc

HEADER = workload_client.HEADER
SIDECAR_ID = f"spiffe://{TD}/tessera/sidecar/h"


class _TaskCall:
    """RequestTaskSVID's answer: the credential at once (no approval)."""

    def __init__(self, svid: issuer_pb2.SignedTaskSVID):
        self.svid = svid

    def __aiter__(self):
        return self._updates()

    async def _updates(self):
        yield issuer_pb2.TaskSVIDUpdate(svid=self.svid)

    def cancel(self) -> None:
        pass


class SigningIssuer:
    """The issuer's answers to the sidecar's calls, signed by `active` (a real intermediate)."""

    address = "in-process"  # one issuer: a lost call has nowhere else to go (IssuerClient.leave answers None)

    def __init__(self, active: Authority):
        self.active = active
        self.entries: dict[str, types_pb2.Entry] = {}
        self.tasks: dict[str, issuer_pb2.SignedTaskSVID] = {}  # serial -> task credential
        self.reissued: list[str] = []  # serials replaced

    async def sign(self, items):
        out = []
        for entry_id, csr in items:
            e = self.entries[entry_id]
            s = self.active.signer.sign(x509svid.verified_key(csr), spiffeid.parse(e.spiffe_id), 600)
            out.append(issuer_pb2.SignedSVID(entry_id=entry_id, spiffe_id=e.spiffe_id, cert_chain=s.chain_der,
                                             serial=s.serial_hex, expires_at=int(s.not_after.timestamp())))
        return out

    def _task(self, entry_id: str, task_id: str, scopes, csr: bytes) -> issuer_pb2.SignedTaskSVID:
        e = self.entries[entry_id]
        binding = taskext.TaskBinding(task_id, tuple(scopes), entry_id, "alice")
        s = self.active.signer.sign(x509svid.verified_key(csr), spiffeid.parse(e.spiffe_id), 600,
                                    extra_extensions=[taskext.encode(binding)])
        svid = issuer_pb2.SignedTaskSVID(entry_id=entry_id, spiffe_id=e.spiffe_id, cert_chain=s.chain_der,
                                         serial=s.serial_hex, expires_at=int(s.not_after.timestamp()),
                                         scopes=list(scopes), task_id=task_id)
        self.tasks[svid.serial] = svid
        return svid

    async def leave(self, address: str) -> str | None:
        return None

    def request_task(self, req: issuer_pb2.TaskSVIDRequest) -> _TaskCall:
        return _TaskCall(self._task(req.entry_id, req.task_id, req.scopes, req.csr))

    async def reissue_task(self, cert_chain: bytes, csr: bytes) -> issuer_pb2.SignedTaskSVID:
        old = self.tasks[x509svid.serial_hex(pem.split_der(cert_chain)[0].serial_number)]
        self.reissued.append(old.serial)
        return self._task(old.entry_id, old.task_id, old.scopes, csr)

    async def end_task(self, task_id: str, entry_id: str, reason: str) -> list[str]:
        return [s for s, t in self.tasks.items() if t.task_id == task_id]

    def identity(self, bundle) -> SidecarIdentity:
        key = x509svid.new_key()
        s = self.active.signer.sign(key.public_key(), spiffeid.parse(SIDECAR_ID), 600)
        return SidecarIdentity(SIDECAR_ID, s.chain, key, tuple(bundle))

    async def renew(self, ident: SidecarIdentity) -> SidecarIdentity:
        return self.identity(ident.bundle)

    async def connect(self, ident: SidecarIdentity) -> None:
        self.trusted = ident.bundle

    async def close(self) -> None:
        pass


class Streamed:
    """A gRPC server stream read on a thread: each message lands in a queue the test awaits."""

    def __init__(self, call):
        self.call = call
        self.messages: queue.Queue = queue.Queue()
        self.ended: queue.Queue = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        try:
            for m in self.call:
                self.messages.put(m)
            self.ended.put(None)
        except grpc.RpcError as e:
            self.ended.put(e)

    async def next(self, timeout: float = 5.0):
        return await asyncio.to_thread(self.messages.get, True, timeout)

    async def end(self, timeout: float = 5.0):
        return await asyncio.to_thread(self.ended.get, True, timeout)


class ServedSidecar:
    """SidecarRuntime's handlers and loops on its real socket, talking to a SigningIssuer."""

    def __init__(self, tmp_path, h: Hierarchy, issuer: SigningIssuer):
        from agent_sidecar.config import SidecarConfig
        from agent_sidecar.sidecar import SidecarRuntime

        cfg = SidecarConfig(("127.0.0.1:1",), ("127.0.0.1:2",), tmp_path / "bundle.pem", None, tmp_path / "data",
                            tmp_path / "s.sock", 0o600, "tessera-issuer", 0, "info", output_dir=tmp_path / "out")
        for d in (cfg.data_dir, cfg.output_dir):
            d.mkdir()
        rt = SidecarRuntime(cfg)
        rt.client = issuer
        rt.cache = CacheManager(issuer.sign)
        rt.task_api = TaskAPI(rt.cache, issuer)
        rt.workload_api = WorkloadAPI(rt.cache, TD, crls=rt.revocation.crls)
        rt.ident = issuer.identity([h.root.cert])
        self.rt, self.issuer, self.socket = rt, issuer, str(cfg.socket_path)
        self.channel = None

    async def start(self, entries) -> None:
        for e in entries:
            self.issuer.entries[e.id] = e
        self.rt.handle_sync_event(issuer_pb2.SyncEvent(snapshot=issuer_pb2.EntrySnapshot(
            entries=entries, bundle=pem.der_concat(self.rt.ident.bundle))))
        self.loops = [asyncio.create_task(c) for c in (self.rt.cache.run(), self.rt._renew_loop())]
        self.server = GuardedServer(self.rt.services(), Guard(self.rt.attestor, SocketLimits()))
        await self.server.start(sock=bind_unix(self.socket, 0o600))
        self.channel = grpc.insecure_channel(socket_target(self.socket))

    async def stop(self) -> None:
        if self.channel is not None:
            self.channel.close()
        for t in self.loops + list(self.rt._tasks):
            t.cancel()
        await asyncio.gather(*self.loops, *self.rt._tasks, return_exceptions=True)
        self.server.close()
        await self.server.wait_closed()
        self.rt.task_api.close()

    def x509_svids(self) -> Streamed:
        return Streamed(workload_pb2_grpc.SpiffeWorkloadAPIStub(self.channel).FetchX509SVID(
            workload_pb2.X509SVIDRequest(), metadata=HEADER))

    def bundles(self) -> Streamed:
        return Streamed(workload_pb2_grpc.SpiffeWorkloadAPIStub(self.channel).FetchX509Bundles(
            workload_pb2.X509BundlesRequest(), metadata=HEADER))

    def start_task(self, task_id: str) -> Streamed:
        return Streamed(task_pb2_grpc.TasksStub(self.channel).StartTask(
            task_pb2.StartTaskRequest(task_id=task_id, scopes=["repo:read"], ttl_seconds=300), metadata=HEADER))


def _entry(eid: str) -> types_pb2.Entry:
    now = int(time.time())
    return types_pb2.Entry(id=eid, spiffe_id=f"spiffe://{TD}/agent/{eid}", selectors=[f"unix:uid:{os.getuid()}"],
                           state="active", expires_at=now + 3600, created_at=now, revision=1)


@pytest.fixture
async def served(tmp_path):
    h = Hierarchy()
    a = h.intermediate()
    s = ServedSidecar(tmp_path, h, SigningIssuer(a))
    s.h, s.a = h, a
    await s.start([_entry("one"), _entry("two")])
    yield s
    await s.stop()


def _signer_of(chain_der: bytes) -> str:
    return chain.authority_key_id(pem.split_der(chain_der)[0])


async def test_svids_are_served_with_their_intermediate_and_openssl_verifies_them_against_the_bundle(served,
                                                                                                    tmp_path):
    first = await served.x509_svids().next()
    assert len(first.svids) == 2
    for svid in first.svids:
        leaf, intermediate = pem.split_der(svid.x509_svid)
        assert intermediate == served.a.cert and chain.path(leaf, [served.h.root.cert], [intermediate])
        (tmp_path / "leaf.pem").write_bytes(pem.certs_pem([leaf]))
        (tmp_path / "untrusted.pem").write_bytes(pem.certs_pem([intermediate]))
        r = subprocess.run(["openssl", "verify", "-CAfile", str(tmp_path / "out" / "bundle.pem"), "-untrusted",
                            str(tmp_path / "untrusted.pem"), str(tmp_path / "leaf.pem")], capture_output=True,
                           text=True)
        assert r.returncode == 0, r.stdout + r.stderr
        key = serialization.load_der_private_key(svid.x509_svid_key, None)
        assert key.public_key().public_numbers() == leaf.public_key().public_numbers()


async def test_a_new_bundle_reaches_every_open_stream_and_file_at_once(served, tmp_path):
    svids, bundles = served.x509_svids(), served.bundles()
    assert (await svids.next()).svids[0].bundle == served.h.bundle_der
    assert (await bundles.next()).bundles[TD] == served.h.bundle_der
    # A root rotation: the next root enters the bundle beside the current one before it signs anything.
    rotated = served.h.bundle_der + der(Hierarchy().root.cert)
    served.rt.handle_sync_event(issuer_pb2.SyncEvent(bundle=rotated, committed_at=time.time()))
    assert (await svids.next(2)).svids[0].bundle == rotated
    assert (await bundles.next(2)).bundles[TD] == rotated
    for path in (tmp_path / "out" / "bundle.pem", tmp_path / "data" / "bundle.pem"):
        assert pem.der_concat(pem.read_certs(path, "bundle")) == rotated
    assert pem.der_concat(served.rt.ident.bundle) == rotated  # the next channel to the issuer trusts both


async def test_a_taint_replaces_every_svid_the_authority_signed_at_once(served):
    svids = served.x509_svids()
    first = await svids.next()
    assert {_signer_of(s.x509_svid) for s in first.svids} == {served.a.id}
    assert _signer_of(pem.der_concat(served.rt.ident.chain)) == served.a.id
    open_task = served.start_task("held-open")
    before = (await open_task.next()).credential
    # A client that takes its credential and leaves, as every client in this repository does.
    left = await asyncio.to_thread(workload_client.start_task, served.socket, "taken-and-gone", ["repo:read"],
                                   300, {}, 10)
    assert _signer_of(before.cert_chain) == _signer_of(left.cert_chain) == served.a.id

    b = served.h.intermediate()
    served.issuer.active = b  # the issuer moved on to b before it sent the taint
    t0 = time.monotonic()
    served.rt.handle_sync_event(issuer_pb2.SyncEvent(taint=issuer_pb2.Taint(authority_ids=[served.a.id])))
    replaced = await svids.next(2)
    while {_signer_of(s.x509_svid) for s in replaced.svids} != {b.id}:  # the cache mints in one batch
        replaced = await svids.next(2)
    assert time.monotonic() - t0 < 2  # at once, not at half-life (the SVIDs live ten minutes)
    assert {s.spiffe_id for s in replaced.svids} == {s.spiffe_id for s in first.svids}

    renewed = await svids_of_own(served, b.id)
    assert served.rt.ids.load().chain == renewed.chain  # saved, so a restart keeps the replacement

    after = (await open_task.next(2)).credential  # the open StartTask stream receives the replacement
    assert _signer_of(after.cert_chain) == b.id and after.task_id == before.task_id and after.serial != before.serial
    key = serialization.load_der_private_key(after.key, None)
    assert key.public_key().public_numbers() == pem.split_der(after.cert_chain)[0].public_key().public_numbers()
    gone = served.rt.task_api.tasks[(left.entry_id, left.task_id)]
    assert gone.authorities == {b.id, served.h.root.id} and gone.serial != left.serial  # though nobody holds its stream
    assert sorted(served.issuer.reissued) == sorted([before.serial, left.serial])


async def svids_of_own(served, authority: str):
    """This sidecar's own SVID once `authority` signed it (its renewal runs on the renew loop)."""
    deadline = time.monotonic() + 2
    while chain.authority_key_id(served.rt.ident.chain[0]) != authority:
        assert time.monotonic() < deadline, "the sidecar's own SVID was not renewed"
        await asyncio.sleep(0.02)
    return served.rt.ident


async def test_a_taint_naming_other_authorities_replaces_nothing(served):
    svids = served.x509_svids()
    first = await svids.next()
    own = served.rt.ident
    served.rt.handle_sync_event(issuer_pb2.SyncEvent(taint=issuer_pb2.Taint(authority_ids=["ab" * 20])))
    with pytest.raises(queue.Empty):
        await svids.next(0.5)
    assert served.rt.ident is own and [s.x509_svid for s in first.svids] == [
        served.rt.cache.svids[e].cert_der for e in ("one", "two")]


async def test_a_task_stream_stays_open_for_replacements_and_ends_with_its_task(served):
    stream = served.start_task("ended")
    cred = (await stream.next()).credential
    with pytest.raises(queue.Empty):
        await stream.end(0.3)  # open while the task lives
    revoked = await asyncio.to_thread(workload_client.end_task, served.socket, "ended")
    assert revoked == [cred.serial]
    assert await stream.end(2) is None  # ended cleanly with the task


async def test_a_crl_set_reaches_open_streams_and_a_verifier_fed_by_the_workload_api_enforces_it(served):
    from agent_sidecar.verifier import PeerPolicy, Rejected, Verifier

    svids, bundles = served.x509_svids(), served.bundles()
    await svids.next()
    await bundles.next()
    a = served.a
    peer, revoked = a.leaf("/agent/peer"), a.leaf("/agent/revoked")
    crls = [served.h.root.crl(), a.crl(revoked.cert)]
    served.rt.handle_sync_event(issuer_pb2.SyncEvent(crls=issuer_pb2.CrlSet(crls=crls, intermediates=[der(a.cert)])))
    await served.rt._crl_task
    assert sorted((await svids.next(2)).crl) == sorted(crls)
    assert sorted((await bundles.next(2)).crl) == sorted(crls)
    v = await asyncio.to_thread(Verifier.from_sidecar, served.socket, PeerPolicy.trust_domain(TD))
    try:
        await asyncio.to_thread(v.wait_ready, 5, True)
        # Peers presenting their leaf alone: the verifier places them under the intermediate of its own SVID.
        assert await asyncio.to_thread(v.check, peer.cert) == "spiffe://example.org/agent/peer"
        with pytest.raises(Rejected, match="is revoked"):
            await asyncio.to_thread(v.check, revoked.cert)
    finally:
        await asyncio.to_thread(v.close)


async def test_a_taint_naming_a_root_reaches_the_svids_under_its_intermediates(served):
    svids = served.x509_svids()
    await svids.next()
    successor = Hierarchy().intermediate()  # a new root's intermediate signs from now on
    served.issuer.active = successor
    served.rt.handle_sync_event(issuer_pb2.SyncEvent(taint=issuer_pb2.Taint(authority_ids=[served.h.root.id])))
    replaced = await svids.next(2)
    while {_signer_of(s.x509_svid) for s in replaced.svids} != {successor.id}:
        replaced = await svids.next(2)
    await svids_of_own(served, successor.id)
