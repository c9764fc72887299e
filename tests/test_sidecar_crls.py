"""The sidecar's CRL set: one signed CRL per signing authority (each intermediate's, and the root's that withdraws
intermediates), checked against the bundle and the intermediates sent with the set, kept per authority, saved
across restarts and published as one crl.pem that openssl -crl_check_all takes."""

from __future__ import annotations

import asyncio
import subprocess
import threading
import time

import pytest

from agent_sidecar.revocation import CrlOffer, RevocationState
from hierarchy import Hierarchy, der
from tessera import crl as crl_mod
from tessera import pem, x509svid
from tessera.v1 import issuer_pb2


@pytest.fixture
def h():
    return Hierarchy()


def _state(tmp_path, h) -> RevocationState:
    for d in ("data", "out"):
        (tmp_path / d).mkdir(exist_ok=True)
    return RevocationState(lambda: [h.root.cert], tmp_path / "data", tmp_path / "out")


def serial(signed) -> str:
    return signed.serial_hex


def test_sidecar_holds_one_crl_per_authority_and_enforces_all_of_them(h, tmp_path):
    a, b = h.intermediate(), h.intermediate()
    under_a, under_b, withdrawn = a.leaf(), b.leaf(), h.intermediate()
    state = _state(tmp_path, h)
    offer = CrlOffer((h.root.crl(withdrawn.cert), a.crl(under_a.cert), b.crl(under_b.cert)),
                     (der(a.cert), der(b.cert)))
    assert state.apply(offer)
    assert state.is_revoked(serial(under_a)) and state.is_revoked(serial(under_b))
    assert state.is_revoked(x509svid.serial_hex(withdrawn.cert.serial_number))
    assert not state.is_revoked(serial(a.leaf()))
    assert {state.number(x.id) for x in (h.root, a, b)} == {1}
    assert sorted(state.crls()) == sorted(offer.crls)
    published = crl_mod.load_all((tmp_path / "out" / "crl.pem").read_bytes())
    assert sorted(crl_mod.der(c) for c in published) == sorted(offer.crls)
    assert not state.apply(offer)  # the same set again (every resync resends it): nothing to do


def test_a_crl_whose_intermediate_does_not_chain_to_the_bundle_is_refused(h, tmp_path):
    stranger = Hierarchy().intermediate()  # a well-formed intermediate under another root
    a = h.intermediate()
    state = _state(tmp_path, h)
    state.apply(CrlOffer((a.crl(),), (der(a.cert),)))
    revoked = stranger.leaf()
    assert not state.apply(CrlOffer((a.crl(number=1), stranger.crl(revoked.cert)), (der(a.cert), der(stranger.cert))))
    assert state.refused == 1 and not state.is_revoked(serial(revoked))
    # An intermediate of the bundle's root whose certificate was not sent cannot vouch for its CRL either.
    unsent = h.intermediate()
    assert not state.apply(CrlOffer((a.crl(number=1), unsent.crl(unsent.leaf().cert)), (der(a.cert),)))
    assert state.refused == 2 and state.number(unsent.id) is None


def test_an_older_or_rewritten_crl_is_refused_per_authority_and_its_last_good_one_stays(h, tmp_path):
    a = h.intermediate()
    first, second = a.leaf(), a.leaf()
    state = _state(tmp_path, h)
    good = a.crl(first.cert, number=5)
    root_crl = h.root.crl(number=1)
    assert state.apply(CrlOffer((root_crl, good), (der(a.cert),)))
    on_disk = (tmp_path / "out" / "crl.pem").read_bytes()
    older = a.crl(number=4)
    rewritten = a.crl(second.cert, number=5)
    forged = Hierarchy().root.crl(number=9)  # another key: names no authority this sidecar trusts
    for bad in (older, rewritten, forged):
        assert not state.apply(CrlOffer((root_crl, bad), (der(a.cert),)))
        assert state.number(a.id) == 5 and state.is_revoked(serial(first)) and not state.is_revoked(serial(second))
        assert (tmp_path / "out" / "crl.pem").read_bytes() == on_disk
    assert state.refused == 3
    # Numbers are per authority: the root's CRL #2 is newer than its #1, whatever the intermediate's number.
    assert state.apply(CrlOffer((h.root.crl(number=2), good), (der(a.cert),)))
    assert state.number(h.root.id) == 2 and state.number(a.id) == 5


def test_a_set_drops_the_authorities_it_no_longer_lists(h, tmp_path):
    old, new = h.intermediate(), h.intermediate()
    revoked = old.leaf()
    state = _state(tmp_path, h)
    root_crl = h.root.crl()
    state.apply(CrlOffer((root_crl, old.crl(revoked.cert), new.crl()), (der(old.cert), der(new.cert))))
    assert state.is_revoked(serial(revoked))
    # The old intermediate expired: the issuer publishes its CRL no more.
    assert state.apply(CrlOffer((root_crl, new.crl(number=1)), (der(new.cert),)))
    assert state.number(old.id) is None and not state.is_revoked(serial(revoked))
    assert len(crl_mod.load_all((tmp_path / "out" / "crl.pem").read_bytes())) == 2


def test_a_set_holding_a_refused_crl_drops_nothing(h, tmp_path):
    a, b = h.intermediate(), h.intermediate()
    revoked = b.leaf()
    state = _state(tmp_path, h)
    state.apply(CrlOffer((a.crl(), b.crl(revoked.cert)), (der(a.cert), der(b.cert))))
    # b's CRL arrives mangled: it may have been b's, so b's last good CRL stays in force.
    assert not state.apply(CrlOffer((a.crl(number=1), b"\x30\x03garbage"), (der(a.cert), der(b.cert))))
    assert state.refused == 1 and state.is_revoked(serial(revoked))


def test_sets_offered_together_keep_the_newest_crl_of_each_authority_and_every_authority_listed(h, tmp_path):
    a, b = h.intermediate(), h.intermediate()
    state = _state(tmp_path, h)
    revoked = a.leaf()
    state.apply(CrlOffer((a.crl(),), (der(a.cert),)))
    pushed = CrlOffer((a.crl(revoked.cert), b.crl()), (der(a.cert), der(b.cert)))  # #2 of a, and a new b
    stale_fetch = CrlOffer((a.crl(number=1),), (der(a.cert),))  # answered after the push: a's #1, no b
    taken = state.accept_sets([pushed, stale_fetch])
    assert state.refused == 0  # a's #1 is the one in force: passed over, not refused
    assert state.install(taken)
    assert state.number(a.id) == 2 and state.number(b.id) == 1 and state.is_revoked(serial(revoked))


def test_crls_and_their_intermediates_survive_a_restart_and_crl_pem_is_rewritten(h, tmp_path):
    a = h.intermediate()
    revoked = a.leaf()
    state = _state(tmp_path, h)
    state.apply(CrlOffer((h.root.crl(), a.crl(revoked.cert)), (der(a.cert),)))
    assert pem.read_certs(tmp_path / "data" / "intermediates.pem", "data_dir") == (a.cert,)
    (tmp_path / "out" / "crl.pem").unlink()
    restarted = _state(tmp_path, h)
    restarted.load_saved()
    restarted.write_outputs(h.bundle_der)
    assert restarted.is_revoked(serial(revoked)) and sorted(restarted.crls()) == sorted(state.crls())
    assert len(crl_mod.load_all((tmp_path / "out" / "crl.pem").read_bytes())) == 2


def test_a_crl_pem_saved_by_the_previous_release_is_still_enforced(h, tmp_path):
    # One root signed everything then; data_dir held its one CRL and no intermediates.pem.
    revoked = h.root.leaf()
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "crl.pem").write_bytes(crl_mod.pem(crl_mod.load(h.root.crl(revoked.cert))))
    state = _state(tmp_path, h)
    state.load_saved()
    assert state.is_revoked(serial(revoked)) and state.number(h.root.id) == 1


def _openssl_verify(tmp_path, h, leaf, intermediate, crl_pem) -> subprocess.CompletedProcess:
    files = {"bundle.pem": h.bundle_pem(), "leaf.pem": pem.certs_pem([leaf]),
             "untrusted.pem": pem.certs_pem([intermediate])}
    for name, data in files.items():
        (tmp_path / name).write_bytes(data)
    return subprocess.run(["openssl", "verify", "-crl_check_all", "-CAfile", str(tmp_path / "bundle.pem"),
                           "-CRLfile", str(crl_pem), "-untrusted", str(tmp_path / "untrusted.pem"),
                           str(tmp_path / "leaf.pem")], capture_output=True, text=True)


def test_openssl_crl_check_all_with_the_sidecars_crl_pem_refuses_revoked_leaves_and_withdrawn_intermediates(
        h, tmp_path):
    active, withdrawn = h.intermediate(), h.intermediate()
    good, revoked, under_withdrawn = active.leaf(), active.leaf(), withdrawn.leaf()
    state = _state(tmp_path, h)
    state.apply(CrlOffer((h.root.crl(withdrawn.cert), active.crl(revoked.cert), withdrawn.crl()),
                         (der(active.cert), der(withdrawn.cert))))
    crl_pem = tmp_path / "out" / "crl.pem"
    ok = _openssl_verify(tmp_path, h, good.cert, active.cert, crl_pem)
    assert ok.returncode == 0, ok.stdout + ok.stderr
    for leaf, intermediate, depth in ((revoked.cert, active.cert, 0), (under_withdrawn.cert, withdrawn.cert, 1)):
        r = _openssl_verify(tmp_path, h, leaf, intermediate, crl_pem)
        assert r.returncode != 0 and "certificate revoked" in r.stdout + r.stderr, r.stdout + r.stderr
        assert f"at {depth} depth lookup" in r.stdout + r.stderr  # the leaf itself, or the intermediate above it


# -- the runtime takes sets off its loop ------------------------------------------------------------------

def _runtime(tmp_path, h):
    from agent_sidecar.config import SidecarConfig
    from agent_sidecar.sidecar import SidecarRuntime

    cfg = SidecarConfig(("127.0.0.1:1",), ("127.0.0.1:2",), tmp_path / "bundle.pem", None, tmp_path / "data",
                        tmp_path / "s.sock", 0o600, "tessera-issuer", 0, "info", output_dir=tmp_path / "out")
    for d in (cfg.data_dir, cfg.output_dir):
        d.mkdir()
    runtime = SidecarRuntime(cfg)
    runtime.cache.bundle_der = h.bundle_der
    return runtime


def _crls_event(*crls, intermediates=()) -> issuer_pb2.SyncEvent:
    return issuer_pb2.SyncEvent(crls=issuer_pb2.CrlSet(crls=list(crls), intermediates=[der(c) for c in intermediates]),
                                committed_at=time.time())


async def test_a_crl_set_sync_event_puts_every_crl_in_force_and_in_the_workload_api_fields(h, tmp_path):
    runtime = _runtime(tmp_path, h)
    a = h.intermediate()
    revoked = a.leaf()
    event = _crls_event(h.root.crl(), a.crl(revoked.cert), intermediates=[a.cert])
    version = runtime.cache.version
    runtime.handle_sync_event(event)
    await runtime._crl_task
    assert runtime.revocation.is_revoked(serial(revoked))
    assert sorted(runtime.revocation.crls()) == sorted(event.crls.crls)
    assert runtime.cache.version > version  # open Workload API streams resend with every CRL


async def test_sidecar_puts_crls_in_force_even_if_saving_them_fails_and_saves_them_with_the_next_offer(h, tmp_path):
    runtime = _runtime(tmp_path, h)
    a = h.intermediate()
    revoked = a.leaf()
    offer = CrlOffer((a.crl(revoked.cert),), (der(a.cert),))
    crl_pem = tmp_path / "out" / "crl.pem"
    crl_pem.mkdir()  # the save fails (as on a full disk): the CRLs are in force all the same
    await runtime.offer_crls(offer)
    assert runtime.revocation.is_revoked(serial(revoked)) and runtime.revocation.crls() == list(offer.crls)
    assert crl_pem.is_dir()
    crl_pem.rmdir()
    await runtime.offer_crls(offer)  # the same set again, as every resync resends it: now it is saved
    assert crl_mod.serials(crl_mod.load(crl_pem.read_bytes())) == {serial(revoked)}


async def test_sidecar_parses_crl_sets_off_its_loop_and_of_those_offered_meanwhile_keeps_the_newest(h, tmp_path):
    runtime = _runtime(tmp_path, h)
    offers = {n: CrlOffer((h.root.crl(number=n),)) for n in (1, 2, 3)}
    loop = asyncio.get_running_loop()
    parsed: list[tuple[int, int]] = []  # (CRL number, thread) in the order judged
    accept = runtime.revocation.accept

    def accept_and_watch(data, signers):
        if not parsed:  # while #1 is judged on its thread, #3 is pushed, then an older #2 arrives from a fetch
            loop.call_soon_threadsafe(runtime.offer_crls, offers[3])
            loop.call_soon_threadsafe(runtime.offer_crls, offers[2])
        parsed.append((crl_mod.number_of(crl_mod.load(data)), threading.get_ident()))
        return accept(data, signers)

    runtime.revocation.accept = accept_and_watch
    await runtime.offer_crls(offers[1])  # the task takes what is offered meanwhile before it ends
    assert [n for n, _ in parsed] == [1, 3, 2]  # two rounds: #1 alone, then #3 and #2 judged together
    assert runtime.revocation.number(h.root.id) == 3
    assert runtime.revocation.refused == 0  # #2 was passed over, not refused: it is newer than #1
    assert threading.get_ident() not in {t for _, t in parsed}
    # Offered after #3 is in force, an older CRL is refused as before.
    await runtime.offer_crls(offers[2])
    assert runtime.revocation.number(h.root.id) == 3 and runtime.revocation.refused == 1


async def test_sidecar_saves_crls_to_data_dir_before_putting_them_in_force(h, tmp_path):
    runtime = _runtime(tmp_path, h)
    a = h.intermediate()
    revoked = a.leaf()
    on_disk_at_install: list[set[str]] = []
    install = runtime.revocation.install

    def install_and_look(taken):
        saved = tmp_path / "data" / "crl.pem"
        on_disk_at_install.append({s for c in crl_mod.load_all(saved.read_bytes()) for s in crl_mod.serials(c)}
                                  if saved.exists() else set())
        return install(taken)

    runtime.revocation.install = install_and_look
    await runtime.offer_crls(CrlOffer((a.crl(revoked.cert),), (der(a.cert),)))
    assert on_disk_at_install == [{serial(revoked)}] and runtime.revocation.is_revoked(serial(revoked))


async def test_sidecar_keeps_serials_pushed_without_a_crl_across_a_restart(h, tmp_path):
    runtime = _runtime(tmp_path, h)
    a = h.intermediate()
    pushed, listed = a.leaf(), a.leaf()
    runtime.handle_revocation(issuer_pb2.Revocation(seq=1, serials=[serial(pushed), serial(listed)]))
    await runtime._pushed_task

    def restarted():
        state = RevocationState(lambda: [h.root.cert], tmp_path / "data", tmp_path / "out")
        state.load_saved()
        return state

    assert restarted().is_revoked(serial(pushed)) and restarted().is_revoked(serial(listed))
    # Once a CRL lists one of them, only the other is kept apart; both stay revoked after a restart.
    await runtime.offer_crls(CrlOffer((a.crl(listed.cert),), (der(a.cert),)))
    await runtime._pushed_task
    assert set(restarted().pushed) == {serial(pushed)}
    assert restarted().is_revoked(serial(pushed)) and restarted().is_revoked(serial(listed))


def test_a_serial_pushed_while_a_set_is_being_accepted_stays_revoked_after_it_is_installed(h, tmp_path):
    state = _state(tmp_path, h)
    a = h.intermediate()
    listed, pushed = a.leaf(), a.leaf()
    taken = state.accept_sets([CrlOffer((a.crl(listed.cert),), (der(a.cert),))])  # on a thread in the sidecar
    state.note_revocation(1, [serial(pushed)])  # the loop handles a push meanwhile
    assert state.install(taken)
    assert state.is_revoked(serial(listed)) and state.is_revoked(serial(pushed))


def test_an_empty_set_is_ignored_not_taken_as_every_authority_gone(h, tmp_path):
    a = h.intermediate()
    revoked = a.leaf()
    state = _state(tmp_path, h)
    state.apply(CrlOffer((a.crl(revoked.cert),), (der(a.cert),)))
    assert not state.apply(CrlOffer(()))  # e.g. FetchCRL answered by an issuer that has not published yet
    assert state.is_revoked(serial(revoked)) and state.number(a.id) == 1


def test_an_accepted_set_is_not_installed_over_a_newer_crl_of_the_same_authority(h, tmp_path):
    state = _state(tmp_path, h)
    older = state.accept_sets([CrlOffer((h.root.crl(number=8),))])
    assert state.install(state.accept_sets([CrlOffer((h.root.crl(number=9),))]))
    assert not state.install(older)
    assert state.number(h.root.id) == 9


def test_a_new_intermediates_crl_is_taken_even_by_a_sidecar_whose_clock_lags_the_issuers(h, tmp_path):
    import datetime as dt

    early = h.intermediate(starts_in=dt.timedelta(hours=1))  # not yet valid by this host's clock
    revoked = early.leaf()
    state = _state(tmp_path, h)
    assert state.apply(CrlOffer((early.crl(revoked.cert),), (der(early.cert),)))
    assert state.is_revoked(serial(revoked)) and state.refused == 0
