"""Signing and recording in worker processes: the same certificate profile, invalid CSRs refused,
nothing leaves unrecorded, one audit chain across processes."""

import asyncio
import os
import pickle
import signal
import socket
import struct
import threading
import time
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec

from harness import wait_for
from issuer.audit import verify_chain
from issuer.ca import CertificateAuthority
from issuer.models import Actor, AuditEvent
from issuer.signing_pool import SigningPool, SignJob, _Request, astuple_job, sign_jobs
from tessera import x509svid

SID = "spiffe://example.org/agent/a"


@pytest.fixture(scope="module")
def ca(tmp_path_factory):
    return CertificateAuthority.load_or_create("example.org", tmp_path_factory.mktemp("ca"))


@pytest.fixture
def pool(ca, store):
    """Two workers committing to the test's real datastore; `pool.heard` is what they told the main process."""
    heard: list = []
    p = SigningPool(ca, 2, store.path, heard.extend)
    p.heard = heard
    yield p
    p.close()


def job(csr: bytes, ttl: int = 600, entry_id: str = "e1") -> SignJob:
    return SignJob(csr, SID, ttl, int(time.time()) + 3600, entry_id, "sidecar-1", int(time.time()))


async def test_worker_signs_with_the_one_profile_and_chains_to_the_ca(pool, ca):
    key = x509svid.new_key()
    (signed,) = await pool.sign_and_record([job(x509svid.make_csr(key))])
    cert = x509.load_der_x509_certificate(signed.cert_der)
    assert str(x509svid.spiffe_id_of(cert)) == SID
    assert cert.public_key().public_numbers() == key.public_key().public_numbers()
    assert cert.serial_number == signed.serial
    cert.verify_directly_issued_by(ca.cert)
    # Identical extensions to a certificate signed in-process by the same builder.
    (here,) = sign_jobs(ca, [job(x509svid.make_csr(key))])
    local = x509.load_der_x509_certificate(here.cert_der)
    assert [e.oid for e in cert.extensions] == [e.oid for e in local.extensions]
    assert cert.not_valid_after_utc - cert.not_valid_before_utc == local.not_valid_after_utc - local.not_valid_before_utc


async def test_invalid_csr_is_refused_and_nothing_is_signed_or_recorded_for_it(pool, store):
    good = x509svid.make_csr(x509svid.new_key())
    tampered = bytearray(good)
    tampered[-5] ^= 0xFF  # breaks the self-signature
    results = await pool.sign_and_record([job(b"not a csr"), job(bytes(tampered)), job(good)])
    assert results[0].error and results[1].error and not results[2].error
    assert results[0].cert_der == b"" and results[1].cert_der == b""
    assert [s.serial for s in store.find_issued(entry_id="e1")] == [results[2].serial_hex]
    assert [r.details["serial"] for r in store.audit_records() if r.action == "svid.issue"] == [results[2].serial_hex]


async def test_concurrent_callers_each_get_their_own_certificates_all_recorded_before_return(pool, store):
    csrs = [x509svid.make_csr(x509svid.new_key()) for _ in range(8)]
    out: dict[int, list] = {}
    seen_recorded: dict[int, bool] = {}

    async def call(i):
        res = await pool.sign_and_record([job(csrs[i % 8]), job(csrs[(i + 1) % 8])])
        # Read over the test's own connection: the worker's commit is in the database file already.
        seen_recorded[i] = all(store.get_issued(r.serial_hex) is not None for r in res)
        out[i] = res

    await asyncio.gather(*(call(i) for i in range(40)))
    assert all(seen_recorded.values()) and len(seen_recorded) == 40
    for i, res in out.items():
        keys = [x509.load_der_x509_certificate(r.cert_der).public_key().public_numbers() for r in res]
        want = [x509.load_der_x509_csr(c).public_key().public_numbers() for c in (csrs[i % 8], csrs[(i + 1) % 8])]
        assert keys == want
    assert len({r.serial for res in out.values() for r in res}) == 80
    # The main process heard of every record the workers committed, before its callers returned.
    assert sorted(r.seq for r in pool.heard) == [r.seq for r in store.audit_records()]


async def test_denials_commit_with_the_call_even_without_anything_to_sign(pool, store):
    deny = AuditEvent("svid.deny", Actor("sidecar", "sidecar-1"), "deny", reason="not yours", subject="e9")
    assert await pool.sign_and_record([], [deny]) == []
    assert [(r.action, r.subject) for r in store.audit_records()] == [("svid.deny", "e9")]


async def test_worker_and_main_process_commits_form_one_audit_chain(pool, store):
    csrs = [x509svid.make_csr(x509svid.new_key()) for _ in range(4)]
    stop = threading.Event()

    def main_process_writes():
        while not stop.is_set():
            store.append_audit([AuditEvent("entry.update", Actor("operator", "op"), "done", subject="e1")])

    writer = threading.Thread(target=main_process_writes)
    writer.start()
    try:
        await asyncio.gather(*(pool.sign_and_record([job(csrs[i % 4])]) for i in range(120)))
    finally:
        stop.set()
        writer.join()
    records = store.audit_records()
    actions = [r.action for r in records]
    assert set(actions) == {"svid.issue", "entry.update"}
    # The two kinds of writer interleaved (the case where a per-process head would fork the chain).
    assert sum(a != b for a, b in zip(actions, actions[1:])) >= 2
    assert [r.seq for r in records] == list(range(1, len(records) + 1))
    assert verify_chain(records).ok


async def test_failed_commit_means_no_certificate_is_returned(ca, store):
    # A real failure inside the worker's transaction: the database refuses the serial row.
    with store.transaction() as db:
        db.execute("CREATE TRIGGER refuse BEFORE INSERT ON issued BEGIN SELECT RAISE(ABORT, 'disk full'); END")
    p = SigningPool(ca, 1, store.path, lambda records: None)
    try:
        with pytest.raises(RuntimeError, match="disk full"):
            await p.sign_and_record([job(x509svid.make_csr(x509svid.new_key()))])
    finally:
        p.close()
    assert store.find_issued(entry_id="e1") == [] and store.audit_records() == []


async def test_closed_pool_refuses_work_and_its_workers_exit(ca, store):
    p = SigningPool(ca, 2, store.path, lambda records: None)
    procs = list(p._procs)
    p.close()
    assert all(not proc.is_alive() for proc in procs)
    with pytest.raises(RuntimeError, match="closed"):
        await p.sign_and_record([job(x509svid.make_csr(ec.generate_private_key(ec.SECP256R1())))])


def _workers(pid: int) -> set[int]:
    """Child processes started by multiprocessing's spawn (the signers, not its resource tracker)."""
    out: set[int] = set()
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            kids = [int(c) for c in (task / "children").read_text().split()]
        except OSError:
            continue
        for k in kids:
            try:
                if b"spawn_main" in Path(f"/proc/{k}/cmdline").read_bytes():
                    out.add(k)
            except OSError:
                pass
    return out


def test_signing_workers_die_with_a_killed_issuer(deployment):
    """Workers hold the CA key: kill -9 of the issuer must not leave them running."""
    issuer = deployment.start_issuer(signing_workers=2)
    workers = wait_for(lambda: w if len(w := _workers(issuer.proc.pid)) == 2 else None, what="two signing workers")
    issuer.kill9()
    wait_for(lambda: not any(Path(f"/proc/{w}").exists() and "Z" not in _state(w) for w in workers),
             timeout=5, what="signing workers to exit")


def _state(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return "Z"


def test_issuer_without_signing_workers_signs_in_process_and_records_the_serial(deployment):
    d = deployment
    d.start_issuer(signing_workers=0)
    assert _workers(d.issuer.proc.pid) == set()
    d.start_sidecar("host-a")
    d.entry("/agent/a", "host-a")
    svid = wait_for(lambda: (d.fetch("host-a").get("svids") or [None])[0], what="an SVID signed in-process")
    assert svid["spiffe_id"] == "spiffe://example.org/agent/a"
    row = d.issued(svid["serial"])
    assert row is not None and row["kind"] == "identity"


async def test_a_failed_relay_of_committed_records_fails_its_callers_and_the_pool_goes_on(ca, store):
    told: list = []

    def committed(records):  # the relay to listeners fails once, after the worker committed
        told.append(records)
        if len(told) == 1:
            raise RuntimeError("listener relay failed")

    p = SigningPool(ca, 1, store.path, committed)
    try:
        with pytest.raises(RuntimeError, match="listener relay failed"):
            await asyncio.wait_for(p.sign_and_record([job(x509svid.make_csr(x509svid.new_key()))]), 30)
        (signed,) = await asyncio.wait_for(p.sign_and_record([job(x509svid.make_csr(x509svid.new_key()))]), 30)
        assert not signed.error and store.get_issued(signed.serial_hex) is not None
    finally:
        p.close()


async def _until(condition, timeout: float = 15.0, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while not (value := condition()):
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.02)
    return value


async def test_callers_of_a_chunk_whose_worker_dies_get_an_error_and_the_worker_is_replaced(pool, store):
    csrs = [x509svid.make_csr(x509svid.new_key()) for _ in range(8)]
    big = [job(csrs[i % 8], entry_id=f"e{i}") for i in range(256)]  # ~30 ms of signing: time to kill it
    call = asyncio.create_task(pool.sign_and_record(big))
    await asyncio.sleep(0)  # the request is queued and sent to an idle worker
    (busy,) = [w for w in pool._workers if w.batch]
    dead_pid = busy.proc.pid
    os.kill(dead_pid, signal.SIGKILL)
    with pytest.raises(RuntimeError, match="died"):
        await asyncio.wait_for(call, 30)
    await _until(lambda: dead_pid not in [p.pid for p in pool._procs] and all(p.is_alive() for p in pool._procs),
                 what="the dead worker's replacement")
    # The replacement signs a chunk larger than the socket's buffer each way (written and read in parts).
    large = [job(x509svid.make_csr(x509svid.new_key()), entry_id=f"e{i}") for i in range(1024)]
    with socket.socket(fileno=os.dup(pool._workers[0].fd)) as sock:
        buffer = sock.getsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF)
    assert len(pickle.dumps([astuple_job(j) for j in large])) > buffer
    signed = await asyncio.wait_for(pool.sign_and_record(large), 60)
    assert len(signed) == 1024 and not any(s.error for s in signed)
    assert [x509.load_der_x509_certificate(s.cert_der).public_key().public_numbers() for s in signed] == \
        [x509.load_der_x509_csr(j.csr_der).public_key().public_numbers() for j in large]
    assert all(store.get_issued(s.serial_hex) is not None for s in signed)


async def test_a_worker_that_dies_while_idle_is_replaced_before_the_next_call(pool):
    (first,) = await pool.sign_and_record([job(x509svid.make_csr(x509svid.new_key()))])
    old = [p.pid for p in pool._procs]
    for pid in old:
        os.kill(pid, signal.SIGKILL)
    await _until(lambda: not set(old) & {p.pid for p in pool._procs} and all(p.is_alive() for p in pool._procs),
                 what="both workers replaced")
    (second,) = await asyncio.wait_for(pool.sign_and_record([job(x509svid.make_csr(x509svid.new_key()))]), 30)
    assert not second.error and second.serial != first.serial


async def test_an_unreadable_answer_fails_its_callers_and_the_worker_is_replaced(pool):
    await pool.sign_and_record([job(x509svid.make_csr(x509svid.new_key()))])  # binds the pool to this loop
    pipe = pool._workers[0]
    waiting = _Request([job(b"csr")], [], asyncio.get_running_loop().create_future())
    pipe.batch = [waiting]
    # A frame whose body is not a pickle, as if the pipe had carried something else.
    pipe._in += struct.pack("!i", 16) + b"\x00" * 16
    pipe._readable()
    with pytest.raises(RuntimeError, match="unreadable answer"):
        await asyncio.wait_for(waiting.future, 5)
    old_pid = pipe.proc.pid
    await _until(lambda: old_pid not in [p.pid for p in pool._procs] and all(p.is_alive() for p in pool._procs),
                 what="the worker's replacement")
    (signed,) = await asyncio.wait_for(pool.sign_and_record([job(x509svid.make_csr(x509svid.new_key()))]), 30)
    assert not signed.error
