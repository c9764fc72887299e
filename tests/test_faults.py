"""Faults with real daemons: the issuer killed with SIGKILL under mixed load, and a full disk.

Whatever a client was told succeeded must survive: every serial a client received is in the
`issued` table, every revocation the CLI acknowledged is in the database, in its audit record and
in the next CRL, every entry the CLI created is there with its audit record, and the audit chain
verifies. A few kill points run in the suite; `scripts/faults --iterations N` runs many
(TESSERA_FAULT_ITERATIONS). The full-disk test mounts a small tmpfs as the issuer's data_dir.
"""

from __future__ import annotations

import os
import random
import subprocess
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import pytest
from cryptography import x509

from harness import Deployment
from issuer_client import sidecar_stub, sign
from taskutil import policy, start_task
from tessera import crl, pem, x509svid

ITERATIONS = int(os.environ.get("TESSERA_FAULT_ITERATIONS", "2"))


@dataclass
class Acked:
    """What clients were told succeeded, by kind; appended from the load threads."""

    serials: list[str] = field(default_factory=list)      # signed SVIDs and task credentials received
    revoked: list[str] = field(default_factory=list)      # serials `tessera revoke` acknowledged
    entries: list[str] = field(default_factory=list)      # entry ids `tessera entry create` printed
    tasks: list[str] = field(default_factory=list)        # task ids whose credential was received
    lock: threading.Lock = field(default_factory=threading.Lock)

    def add(self, kind: str, value: str) -> None:
        with self.lock:
            getattr(self, kind).append(value)


def create_entry(d: Deployment, path: str) -> subprocess.CompletedProcess:
    """`tessera entry create` of an entry no process here matches; the caller judges the outcome."""
    return d.cli("entry", "create", "--spiffe-id", f"spiffe://{d.td}{path}", "--parent", d.sidecar_id("host-a"),
                 "--owner", "bob", "--purpose", "faults", "--expires-in", "1d", "--selector", "unix:uid:4242",
                 check=False)


class Load:
    """Signing, revocations, entry creates and task credentials, each on its own thread until stopped."""

    def __init__(self, d: Deployment, acked: Acked, tag: str):
        self.d, self.acked, self.tag = d, acked, tag
        self.stop = threading.Event()
        self.errors: list[str] = []
        self.threads = [threading.Thread(target=self._guard, args=(fn,), daemon=True)
                        for fn in (self._sign, self._sign, self._revoke, self._create, self._task)]

    def __enter__(self):
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *exc):
        self.stop.set()
        for t in self.threads:
            t.join(90)
        assert not [t for t in self.threads if t.is_alive()], "a load thread did not stop"

    def _guard(self, fn):
        try:
            fn()
        except Exception as e:  # noqa: BLE001 - a broken load generator must fail the test, not vanish
            self.errors.append(f"{fn.__name__}: {e!r}")

    def _sign(self):
        stub = sidecar_stub(self.d, "host-a")  # its channel reconnects by itself after a restart
        while not self.stop.is_set():
            try:
                item = sign(stub, self.d.entry_id)
            except grpc.RpcError:
                time.sleep(0.05)
                continue
            if item.cert_chain:
                self.acked.add("serials", _serial(item.cert_chain))

    def _revoke(self):
        done: set[str] = set()
        while not self.stop.is_set():
            with self.acked.lock:
                todo = [s for s in self.acked.serials if s not in done]
            if not todo:
                time.sleep(0.05)
                continue
            serial = todo[-1]
            done.add(serial)
            r = self.d.cli("revoke", "--serial", serial, "--reason", "fault test", check=False)
            if r.returncode == 0:
                self.acked.add("revoked", serial)

    def _create(self):
        n = 0
        while not self.stop.is_set():
            n += 1
            r = create_entry(self.d, f"/fault/{self.tag}/{n}")
            if r.returncode == 0 and r.stdout.strip():
                self.acked.add("entries", r.stdout.strip())

    def _task(self):
        n = 0
        while not self.stop.is_set():
            n += 1
            out = self.d.root / f"task-{self.tag}-{n}"
            r = start_task(self.d, f"fault-{self.tag}-{n}", out, "repo:read", wait="5s")
            if r.returncode == 0 and (out / "svid.pem").exists():
                leaf = x509.load_pem_x509_certificates((out / "svid.pem").read_bytes())[0]
                self.acked.add("serials", x509svid.serial_hex(leaf.serial_number))
                self.acked.add("tasks", f"fault-{self.tag}-{n}")


def _serial(chain: bytes) -> str:
    """The leaf's serial in a DER chain as SignX509SVIDs returns it."""
    return x509svid.serial_hex(pem.split_der(chain)[0].serial_number)


def check_nothing_acknowledged_was_lost(d: Deployment, acked: Acked) -> None:
    with d.db() as db:
        issued = {r["serial"]: r for r in db.execute("SELECT serial, revoked_at FROM issued")}
        entries = {r["id"] for r in db.execute("SELECT id FROM entries")}
        audit = [dict(r) for r in db.execute("SELECT action, subject, details FROM audit")]
    lost = [s for s in acked.serials if s not in issued]
    assert not lost, f"{len(lost)} of {len(acked.serials)} serials a client received are not in `issued`: {lost[:5]}"
    not_revoked = [s for s in acked.revoked if issued[s]["revoked_at"] is None]
    assert not not_revoked, f"acknowledged revocations not in the database: {not_revoked[:5]}"
    revoke_subjects = {a["subject"] for a in audit if a["action"] == "revoke"}
    unaudited = [s for s in acked.revoked if f"serial:{s}" not in revoke_subjects]
    assert not unaudited, f"acknowledged revocations without their audit record: {unaudited[:5]}"
    missing = [e for e in acked.entries if e not in entries]
    assert not missing, f"acknowledged entries missing: {missing[:5]}"
    created = " ".join(a["subject"] + a["details"] for a in audit if a["action"] == "entry.create")
    assert all(e in created for e in acked.entries), "an acknowledged entry has no audit record"
    in_crl = crl.serials(crl.load(d.cli_bytes("crl", "show", "--der")))
    absent = [s for s in acked.revoked if s not in in_crl]
    assert not absent, f"acknowledged revocations missing from the CRL after restart: {absent[:5]}"
    r = d.cli("audit", "verify", check=False)
    assert r.returncode == 0, (r.stdout, r.stderr)


@pytest.fixture
def loaded(deployment):
    deployment.start_issuer(policy=policy())
    deployment.start_sidecar("host-a")
    deployment.entry_id = deployment.entry("/agent", "host-a", scope=["repo:read"], tier="low")
    return deployment


def test_issuer_killed_under_load_loses_nothing_acknowledged(loaded):
    d, acked, rng = loaded, Acked(), random.Random()
    seed = rng.randrange(2**32)
    rng.seed(seed)
    for i in range(ITERATIONS):
        before = (len(acked.revoked), len(acked.entries))
        with Load(d, acked, str(i)) as load:
            # Once every kind of write has gone through in this round (the CLI takes a second or two to
            # start on a loaded machine), at a random point while more are in flight.
            deadline = time.monotonic() + 20
            while (len(acked.revoked) <= before[0] or len(acked.entries) <= before[1]) and \
                    time.monotonic() < deadline:
                time.sleep(0.05)
            time.sleep(rng.uniform(0, 1.5))
            d.issuer.kill9()
        assert not load.errors, load.errors
        d.issuer.start()
        check_nothing_acknowledged_was_lost(d, acked)
    # The load reached every kind of write, so the checks above checked something (seed for a replay).
    counts = {k: len(getattr(acked, k)) for k in ("serials", "revoked", "entries", "tasks")}
    assert counts["serials"] and counts["revoked"] and counts["entries"], (seed, counts)
    print(f"faults: {ITERATIONS} kills, seed {seed}, acknowledged and none lost: {counts}")


# -- a full disk ------------------------------------------------------------------------------------

def _mount_small_tmpfs(path: Path, size: str) -> None:
    path.mkdir(parents=True, exist_ok=True)
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size},mode=0700", "tmpfs", str(path)],
                       capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here (needs root and CAP_SYS_ADMIN): {r.stderr.strip()}")


def _fill(directory: Path) -> Path:
    """A file that takes every free byte of `directory`'s filesystem."""
    filler = directory / "filler"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        for size in (1 << 16, 512):  # big blocks, then the last crumbs
            try:
                while True:
                    os.write(fd, b"\0" * size)
            except OSError:
                pass
    finally:
        os.close(fd)
    return filler


def _status(fn) -> grpc.StatusCode | None:
    try:
        fn()
        return None
    except grpc.RpcError as e:
        assert e.details(), e
        return e.code()


def test_full_disk_fails_calls_as_unavailable_logs_boundedly_and_recovers_without_restart(deployment):
    d = deployment
    _mount_small_tmpfs(d.issuer_dir, "4m")
    try:
        d.start_issuer()
        d.start_sidecar("host-a")
        d.entry_id = d.entry("/agent", "host-a")
        stub = sidecar_stub(d, "host-a")
        acked = Acked()
        for _ in range(3):
            acked.add("serials", _serial(sign(stub, d.entry_id).cert_chain))
        acked.add("revoked", acked.serials[0])
        d.cli("revoke", "--serial", acked.serials[0], "--reason", "before the disk filled")
        pid = d.issuer.proc.pid

        filler = _fill(d.issuer_dir)
        log_before = d.issuer.log_path.read_text(errors="replace")
        codes = []
        for i in range(4):  # every kind of write, again and again
            codes.append(_status(lambda: sign(stub, d.entry_id)))
            r = create_entry(d, f"/full/{i}")
            assert r.returncode != 0 and "Traceback" not in r.stderr, (r.returncode, r.stderr)
            assert "UNAVAILABLE" in r.stderr or "cannot reach" in r.stderr or "disk" in r.stderr, r.stderr
            assert r.returncode == 1, r.stderr  # EXIT_UNAVAILABLE: try again later, not bad input
            r = d.cli("revoke", "--serial", acked.serials[1], "--reason", "while the disk is full", check=False)
            assert (r.returncode, "Traceback" in r.stderr) == (1, False), (r.returncode, r.stderr)
        assert set(codes) == {grpc.StatusCode.UNAVAILABLE}, codes
        new_log = d.issuer.log_path.read_text(errors="replace")[len(log_before):]
        # Bounded: the failure is logged, its repeats are counted, not written out one by one.
        assert new_log.count("Traceback") == 0, new_log[-3000:]
        assert len(new_log.splitlines()) <= 12, new_log[-3000:]

        filler.unlink()
        # Recovers without a restart: the same process signs, creates and revokes again.
        time.sleep(0.5)
        acked.add("serials", _serial(sign(stub, d.entry_id).cert_chain))
        r = create_entry(d, "/after")
        assert r.returncode == 0, r.stderr
        acked.add("entries", r.stdout.strip())
        d.cli("revoke", "--serial", acked.serials[2], "--reason", "after the disk was freed")
        acked.add("revoked", acked.serials[2])
        assert d.issuer.proc.pid == pid and d.issuer.proc.poll() is None
        check_nothing_acknowledged_was_lost(d, acked)
    finally:
        d.close()
        subprocess.run(["umount", "-l", str(d.issuer_dir)], capture_output=True)
