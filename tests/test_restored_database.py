"""The issuer refuses to go backwards (issue 16): a database restored from an older backup is behind the high-water
mark the issuer keeps in its data_dir. Without the operator's override the issuer refuses in one line and changes
nothing; with `--accept-restored-database` it starts, audits what was behind, and numbers its CRLs above every one
the mark saw, so a sidecar that holds a later CRL than the backup accepts the new ones.

Real daemons, on both engines: an SQLite file replaced by an older copy (SQLite's online backup, as
docs/operations.md says to take one), and a PostgreSQL database dropped and restored from `pg_dump`.
"""

from __future__ import annotations

import hashlib
import json
import sqlite3
import subprocess
from pathlib import Path

import pytest
from cryptography import x509

import harness
from harness import Deployment, wait_for
from tessera import chain
from tessera import crl as crl_mod

OVERRIDE = "--accept-restored-database"


class SQLiteBackup:
    """An older copy of the issuer's SQLite file, put back in its place."""

    def __init__(self, d: Deployment):
        self.d, self.copy = d, d.root / "backup.db"

    def take(self) -> None:
        with sqlite3.connect(self.d.issuer_dir / "tessera.db") as src, sqlite3.connect(self.copy) as dst:
            src.backup(dst)  # a consistent copy while the issuer runs

    def restore(self) -> None:
        db = self.d.issuer_dir / "tessera.db"
        for stale in (Path(f"{db}-wal"), Path(f"{db}-shm")):
            stale.unlink(missing_ok=True)
        db.write_bytes(self.copy.read_bytes())

    def fingerprint(self) -> str:
        return hashlib.sha256((self.d.issuer_dir / "tessera.db").read_bytes()).hexdigest()


class PostgresBackup:
    """`pg_dump` of the issuer's database, restored by dropping the database and loading the dump into a new one of
    the same name."""

    def __init__(self, d: Deployment, cluster, dsn: str):
        self.d, self.cluster, self.dsn = d, cluster, dsn
        from psycopg.conninfo import conninfo_to_dict

        self.name = conninfo_to_dict(dsn)["dbname"]
        self.dump = d.root / "backup.sql"

    def _tool(self, tool: str, *args: str) -> None:
        subprocess.run([str(self.cluster.bindir / tool), *args], check=True, capture_output=True, timeout=60)

    def take(self) -> None:
        self._tool("pg_dump", "--dbname", self.dsn, "--file", str(self.dump))

    def restore(self) -> None:
        import psycopg

        with psycopg.connect(self.cluster.dsn(), autocommit=True) as db:
            db.execute(f'DROP DATABASE "{self.name}"')
            db.execute(f'CREATE DATABASE "{self.name}"')
        self._tool("psql", "--dbname", self.dsn, "--quiet", "-v", "ON_ERROR_STOP=1", "--file", str(self.dump))

    def fingerprint(self) -> str:
        import psycopg

        # Every row of every table, in a fixed order: equal before and after the refused start if nothing changed.
        with psycopg.connect(self.dsn) as db:
            tables = [r[0] for r in db.execute("SELECT tablename FROM pg_tables WHERE schemaname = current_schema()"
                                               " ORDER BY tablename")]
            rows = [(t, sorted(map(repr, db.execute(f'SELECT * FROM "{t}"').fetchall()))) for t in tables]
        return hashlib.sha256(repr(rows).encode()).hexdigest()


@pytest.fixture(params=["sqlite", "postgres"])
def engine(request, tmp_path):
    """A Deployment (not started) on the engine, and the way to back its database up and restore it."""
    if request.param == "sqlite":
        d = Deployment(tmp_path)
        backup = SQLiteBackup(d)
    else:
        cluster = request.getfixturevalue("pg_cluster")
        dsn = cluster.new_database("restore")
        (d,) = harness.peer_deployments(tmp_path, 1, dsn)
        backup = PostgresBackup(d, cluster, dsn)
    try:
        yield d, backup
    finally:
        d.close()


def out_dir(d: Deployment) -> Path:
    return d.root / "out-host-a"


def crl_pem_numbers(d: Deployment) -> dict[str, int]:
    """The number of each authority's CRL in the sidecar's crl.pem (what openssl and file readers enforce)."""
    path = out_dir(d) / "crl.pem"
    if not path.exists():
        return {}
    return {chain.authority_key_id(c): crl_mod.number_of(c) for c in crl_mod.load_all(path.read_bytes())}


def crl_pem_serials(d: Deployment) -> set[str]:
    path = out_dir(d) / "crl.pem"
    return {s for c in crl_mod.load_all(path.read_bytes()) for s in crl_mod.serials(c)} if path.exists() else set()


def issuer_crl_numbers(d: Deployment) -> dict[str, int]:
    return {c["authority"]: c["number"] for c in json.loads(d.cli("crl", "show", "--output", "json").stdout)}


def audit(d: Deployment, action: str) -> list[dict]:
    out = d.cli("audit", "export", "--filter", f"action={action}").stdout
    return [json.loads(line) for line in out.splitlines() if line.strip()]


def files(d: Deployment) -> dict[str, bytes]:
    """The issuer's own files that a refused start must leave alone (the mark, the audit file and its position)."""
    return {p.name: p.read_bytes() for p in sorted(d.issuer_dir.iterdir())
            if p.is_file() and (p.name in ("high-water.json", "audit.jsonl") or p.name.endswith(".seq"))}


def test_a_database_restored_from_an_older_backup_is_refused_and_with_the_override_crls_continue_above_the_old_numbers(
        engine):
    d, backup = engine
    d.start_issuer()
    d.start_sidecar("host-a", output_dir=str(out_dir(d)))
    d.entry("/agent/a", "host-a")
    svid = d.fetch("host-a")["svids"][0]
    signer = chain.authority_key_id(x509.load_pem_x509_certificates(svid["svid_pem"].encode())[0])
    backup.take()

    # After the backup: revocations, each re-signing the CRLs; the sidecar holds the last.
    for i in range(3):
        d.cli("revoke", "--entry", d.entry(f"/agent/later-{i}", "host-a"), "--reason", "test: made after the backup")
    d.cli("revoke", "--serial", svid["serial"], "--reason", "test: made after the backup")
    wait_for(lambda: svid["serial"] in crl_pem_serials(d), 10, what="the revoked serial in the sidecar's crl.pem")
    highest_seen = crl_pem_numbers(d)[signer]
    # The gap is wider than the one CRL a restart signs and the one a revocation signs: without the override moving
    # the numbers on, the sidecar would refuse the CRLs signed after the restore.
    assert highest_seen >= 5
    d.issuer.stop()

    backup.restore()
    before, before_files = backup.fingerprint(), files(d)
    r = subprocess.run(d.issuer_argv(), capture_output=True, text=True, timeout=60)
    line = harness.one_line_error(r, "behind", "revocation seq 0 < 4 (4 behind)", f"CRL number of authority "
                                  f"{signer[:16]}", OVERRIDE)
    assert "audit seq" in line and "Nothing was changed" in line
    assert backup.fingerprint() == before and files(d) == before_files  # refused before anything was written

    d.start_issuer(OVERRIDE)
    # The new CRLs are numbered above every number the mark saw, so the sidecar, which holds the later CRL from
    # before the restore, accepts them; the lost revocation, made again, is in its crl.pem.
    assert issuer_crl_numbers(d)[signer] > highest_seen
    d.cli("revoke", "--serial", svid["serial"], "--reason", "test: repeated after the restore")
    wait_for(lambda: crl_pem_numbers(d).get(signer, 0) > highest_seen and svid["serial"] in crl_pem_serials(d), 15,
             what="the sidecar accepting the CRL signed after the restore")

    (accepted,) = audit(d, "datastore.restore_accepted")
    assert accepted["details"]["lost_revocation_seqs"] == [1, 4]
    assert accepted["details"]["crl_numbers_raised_to"][signer] >= highest_seen
    assert "audit seq" in accepted["details"]["behind"]
    assert d.cli("audit", "verify").returncode == 0
    # The old audit file holds the records the database lost: set aside; the new one is the database's chain.
    (set_aside,) = [p for p in d.issuer_dir.iterdir() if p.name.startswith("audit.jsonl.before-restore-")]
    assert "revoke" in [json.loads(line)["action"] for line in set_aside.read_text().splitlines()]
    wait_for(lambda: d.cli("audit", "verify", "--file", str(d.issuer_dir / "audit.jsonl"), check=False).returncode
             == 0, 10, what="the new audit file verifying")

    # The mark now follows the restored database: a plain restart starts.
    d.restart_issuer()
    assert d.cli("audit", "verify").returncode == 0


def test_a_high_water_mark_that_is_not_one_refuses_the_start_in_one_line(tmp_path):
    d = Deployment(tmp_path)
    d.issuer_dir.mkdir(mode=0o700)
    harness.write_private(d.issuer_dir / "high-water.json", '{"audit_seq": "many"}')
    harness.one_line_error(d.run_issuer_once(d.issuer_config()), "high-water.json is not a high-water mark")
    assert not (d.issuer_dir / "tessera.db").exists()
