"""Signing and recording in worker processes: the same certificate profile, invalid CSRs refused,
nothing leaves unrecorded, one audit chain across processes."""

import asyncio
import os
import pickle
import select
import signal
import socket
import sqlite3
import struct
import threading
import time
from pathlib import Path

import pytest
from cryptography import x509

from harness import wait_for, wait_for_async
from issuer.audit.records import verify_chain
from issuer.core.models import Actor, AuditEvent
from issuer.datastore.sqlite import SQLiteOpener
from issuer.issuance import pool as signing_pool
from issuer.issuance.pool import SigningPool, SignJob, _Request, _WorkerPipe, astuple_job, sign_jobs
from tessera import pem, x509svid

SID = "spiffe://example.org/agent/a"


@pytest.fixture
def ca(authorities):
    return authorities


@pytest.fixture
def pool(ca, store):
    """Two workers committing to the test's real datastore; `pool.heard` is what they told the main process."""
    heard: list = []
    p = SigningPool(ca, 2, store.opener(), heard.extend)
    p.heard = heard
    yield p
    p.close()


def job(csr_der: bytes, ttl: int = 600, entry_id: str = "e1") -> SignJob:
    return SignJob(csr_der, SID, ttl, int(time.time()) + 3600, entry_id, "sidecar-1", int(time.time()))


def csr() -> bytes:
    """A fresh key's CSR."""
    return x509svid.make_csr(x509svid.new_key())


async def test_worker_signs_with_the_one_profile_and_chains_to_the_ca(pool, ca):
    key = x509svid.new_key()
    (signed,) = await pool.sign_and_record([job(x509svid.make_csr(key))])
    cert = pem.split_der(signed.chain_der)[0]
    assert str(x509svid.spiffe_id_of(cert)) == SID
    assert cert.public_key().public_numbers() == key.public_key().public_numbers()
    assert cert.serial_number == signed.serial
    cert.verify_directly_issued_by(ca.signer().cert)
    # Identical extensions to a certificate signed in-process by the same builder.
    (here,) = sign_jobs(ca.signer(), [job(x509svid.make_csr(key))])
    local = pem.split_der(here.chain_der)[0]
    assert [e.oid for e in cert.extensions] == [e.oid for e in local.extensions]
    assert cert.not_valid_after_utc - cert.not_valid_before_utc == local.not_valid_after_utc - local.not_valid_before_utc


async def test_invalid_csr_is_refused_and_nothing_is_signed_or_recorded_for_it(pool, store):
    good = csr()
    tampered = bytearray(good)
    tampered[-5] ^= 0xFF  # breaks the self-signature
    results = await pool.sign_and_record([job(b"not a csr"), job(bytes(tampered)), job(good)])
    assert results[0].error and results[1].error and not results[2].error
    assert results[0].chain_der == b"" and results[1].chain_der == b""
    assert [s.serial for s in store.find_issued(entry_id="e1")] == [results[2].serial_hex]
    assert [r.details["serial"] for r in store.audit_records() if r.action == "svid.issue"] == [results[2].serial_hex]


async def test_concurrent_callers_each_get_their_own_certificates_all_recorded_before_return(pool, store):
    csrs = [csr() for _ in range(8)]
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
        keys = [pem.split_der(r.chain_der)[0].public_key().public_numbers() for r in res]
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
    csrs = [csr() for _ in range(4)]
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
    with sqlite3.connect(store.path) as db:
        db.execute("CREATE TRIGGER refuse BEFORE INSERT ON issued BEGIN SELECT RAISE(ABORT, 'disk full'); END")
    db.close()
    p = SigningPool(ca, 1, store.opener(), lambda records: None)
    try:
        with pytest.raises(RuntimeError, match="disk full"):
            await p.sign_and_record([job(csr())])
    finally:
        p.close()
    assert store.find_issued(entry_id="e1") == [] and store.audit_records() == []


async def test_closed_pool_refuses_work_and_its_workers_exit(ca, store):
    p = SigningPool(ca, 2, store.opener(), lambda records: None)
    procs = [w.proc for w in p._workers]
    p.close()
    assert all(not proc.is_alive() for proc in procs)
    with pytest.raises(RuntimeError, match="closed"):
        await p.sign_and_record([job(csr())])


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

    p = SigningPool(ca, 1, store.opener(), committed)
    try:
        with pytest.raises(RuntimeError, match="listener relay failed"):
            await asyncio.wait_for(p.sign_and_record([job(csr())]), 30)
        (signed,) = await asyncio.wait_for(p.sign_and_record([job(csr())]), 30)
        assert not signed.error and store.get_issued(signed.serial_hex) is not None
    finally:
        p.close()


@pytest.fixture
def one_worker(ca, store):
    p = SigningPool(ca, 1, store.opener(), lambda records: None)
    yield p
    p.close()


async def started(pool) -> list[int]:
    """Bind the pool to this loop and wait until every worker has started; their pids."""
    await pool.sign_and_record([job(csr())])
    await wait_for_async(lambda: all(w.ready for w in pool._workers), what="the workers to start")
    return [w.proc.pid for w in pool._workers]


async def replaced(pool, pids: list[int]) -> None:
    """Wait until none of these workers is in the pool any more, and their replacements have started."""
    await wait_for_async(lambda: not set(pids) & {w.proc.pid for w in pool._workers}
                         and all(w.ready and not w.closed for w in pool._workers), timeout=15,
                         what="the workers' replacements")


def kill(pid: int) -> None:
    os.kill(pid, signal.SIGKILL)


async def test_callers_of_a_chunk_whose_worker_dies_mid_chunk_get_an_error_and_the_worker_is_replaced(pool):
    await started(pool)
    big = [job(csr(), entry_id=f"e{i}") for i in range(256)]  # ~40 ms of signing
    call = asyncio.create_task(pool.sign_and_record(big))
    await asyncio.sleep(0)  # the chunk is at an idle, started worker
    (busy,) = [w for w in pool._workers if w.batch]
    kill(busy.proc.pid)
    with pytest.raises(RuntimeError, match="died"):
        await asyncio.wait_for(call, 30)
    await replaced(pool, [busy.proc.pid])
    (signed,) = await asyncio.wait_for(pool.sign_and_record([job(csr())]), 30)
    assert not signed.error


async def test_messages_larger_than_the_socket_buffer_cross_both_ways(pool, store, monkeypatch):
    await started(pool)
    rest_written = []
    real_writable = _WorkerPipe._writable

    def writable(self):  # the real callback, counted: it writes what did not fit at once
        rest_written.append(1)
        real_writable(self)

    monkeypatch.setattr(_WorkerPipe, "_writable", writable)
    large = [job(csr(), entry_id=f"e{i}") for i in range(1024)]
    with socket.socket(fileno=os.dup(pool._workers[0].fd)) as sock:
        buffer = sock.getsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF)
    assert len(pickle.dumps([astuple_job(j) for j in large])) > buffer
    signed = await asyncio.wait_for(pool.sign_and_record(large), 60)
    assert rest_written
    # The answer carried more than one read takes: it was put together from several.
    assert sum(len(s.chain_der) for s in signed) > signing_pool._READ_SIZE
    assert [pem.split_der(s.chain_der)[0].public_key().public_numbers() for s in signed] == \
        [x509.load_der_x509_csr(j.csr_der).public_key().public_numbers() for j in large]
    assert all(store.get_issued(s.serial_hex) is not None for s in signed)


async def test_a_worker_that_dies_while_idle_is_replaced_before_the_next_call(pool):
    pids = await started(pool)
    for pid in pids:
        kill(pid)
    await replaced(pool, pids)


async def test_a_call_right_after_a_worker_died_unnoticed_goes_to_its_replacement(one_worker):
    (pid,) = await started(one_worker)
    kill(pid)
    os.waitpid(pid, 0)  # dead, and its end of the pipe closed, before the loop has read the EOF
    (signed,) = await asyncio.wait_for(one_worker.sign_and_record([job(csr())]), 30)
    assert not signed.error and one_worker._workers[0].proc.pid != pid


async def test_an_answer_that_arrives_with_the_workers_death_still_reaches_its_callers(one_worker):
    (pid,) = await started(one_worker)
    first = asyncio.create_task(one_worker.sign_and_record([job(csr())]))
    await asyncio.sleep(0)  # at the worker
    pipe = one_worker._workers[0]
    assert select.select([pipe.fd], [], [], 30)[0]  # its answer is in the pipe, not yet read
    second = asyncio.create_task(one_worker.sign_and_record([job(csr())]))  # queued behind it
    kill(pid)
    os.waitpid(pid, 0)
    (a,), (b,) = await asyncio.wait_for(asyncio.gather(first, second), 30)
    assert not a.error and not b.error


async def test_workers_that_cannot_start_fail_callers_and_are_not_restarted_in_a_loop(ca, tmp_path, monkeypatch):
    spawned = []
    real_spawn = SigningPool._spawn
    monkeypatch.setattr(SigningPool, "_spawn", lambda self, i: (spawned.append(i), real_spawn(self, i))[1])
    p = SigningPool(ca, 2, SQLiteOpener(str(tmp_path / "missing" / "tessera.db")), lambda records: None)  # cannot be opened
    try:
        with pytest.raises(RuntimeError, match="no signing worker could be started"):
            await asyncio.wait_for(p.sign_and_record([job(csr())]), 30)
        assert len(spawned) <= 2 + signing_pool.MAX_START_FAILURES
        after = len(spawned)
        await asyncio.sleep(1.0)  # no caller: nothing is restarted
        assert len(spawned) == after
        # A later caller gets the workers restarted once (the database may be back), then the error.
        with pytest.raises(RuntimeError, match="no signing worker could be started"):
            await asyncio.wait_for(p.sign_and_record([job(csr())]), 30)
        assert len(spawned) <= after + 2
    finally:
        p.close()


async def test_close_waits_for_a_chunk_at_a_worker_and_relays_its_records(ca, store):
    heard: list = []
    p = SigningPool(ca, 1, store.opener(), heard.extend)
    await started(p)
    call = asyncio.create_task(p.sign_and_record([job(csr(), entry_id=f"e{i}") for i in range(256)]))
    await asyncio.sleep(0)
    assert p._workers[0].batch
    proc = p._workers[0].proc
    p.close()
    signed = await call
    assert len(signed) == 256 and not any(s.error for s in signed)
    assert sorted(r.seq for r in heard) == [r.seq for r in store.audit_records()]
    assert proc.exitcode == 0  # it finished its chunk and stopped, without a broken-pipe traceback


async def test_close_from_another_thread_is_done_on_the_pools_loop(pool, monkeypatch):
    await started(pool)
    procs = [w.proc for w in pool._workers]
    closed_on = []
    real_close = SigningPool._close

    def close_here(self):  # the real _close, noting the thread it runs on
        closed_on.append(threading.current_thread())
        real_close(self)

    monkeypatch.setattr(SigningPool, "_close", close_here)
    await asyncio.to_thread(pool.close)
    assert closed_on == [threading.current_thread()]  # this thread runs the pool's loop
    assert all(not proc.is_alive() for proc in procs)
    with pytest.raises(RuntimeError, match="closed"):
        await pool.sign_and_record([job(csr())])


async def test_an_unreadable_answer_fails_its_callers_and_the_worker_is_replaced(pool):
    pids = await started(pool)
    pipe = pool._workers[0]
    waiting = _Request([job(b"csr")], [], asyncio.get_running_loop().create_future())
    pipe.batch = [waiting]
    pipe._in += struct.pack("!i", 16) + b"\x00" * 16  # a frame whose body is no pickle
    pipe._readable()
    with pytest.raises(RuntimeError, match="unreadable answer"):
        await asyncio.wait_for(waiting.future, 5)
    await replaced(pool, pids[:1])


async def test_a_chunk_at_a_failed_and_replaced_worker_is_answered_when_close_comes_first(one_worker):
    await started(one_worker)
    failed = one_worker._workers[0]
    waiting = _Request([job(b"csr")], [], asyncio.get_running_loop().create_future())
    failed.batch = [waiting]
    failed._failed(EOFError("gone"))  # reported to the pool on the loop's next turn
    one_worker._dispatch()  # as a new caller would: the failed worker is replaced at once
    assert one_worker._workers[0] is not failed
    one_worker.close()
    with pytest.raises(RuntimeError, match="closed"):
        await asyncio.wait_for(waiting.future, 5)
