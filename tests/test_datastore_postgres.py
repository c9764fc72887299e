"""What only the PostgreSQL engine has: a server that can be away, its DSN in the config, `audit verify --db URI`.

The contract every engine meets is tests/contract/; here a cluster of this module's own
is stopped (as a crash: pg_ctl -m immediate) and started again under a live store."""

import time

import pytest
import yaml

from issuer import cli, config
from issuer.audit.records import verify_chain
from issuer.core.models import Actor, AuditEvent, Entry
from issuer.datastore import open_reader, open_store
from pgcluster import Cluster
from tessera.errors import ConfigError, Unavailable

NOW = 1_900_000_000
OP = Actor("operator", "uid:0")


def entry(entry_id: str) -> Entry:
    return Entry(id=entry_id, spiffe_id=f"spiffe://example.org/{entry_id}", parent_id="spiffe://example.org/p",
                 selectors=("unix:uid:1",), owner="bob", purpose="p", tier="standard", scopes=(), x509_ttl=300,
                 expires_at=NOW + 3600, state="active", created_by="uid:0", created_at=NOW, updated_at=NOW)


def create(store, entry_id: str) -> None:
    store.create_entry(entry(entry_id), AuditEvent("entry.create", OP, "done", subject=entry_id))


@pytest.fixture(scope="module")
def cluster():  # its own: these tests stop the server
    c = Cluster.start()
    try:
        yield c
    finally:
        c.stop()


@pytest.fixture
def server(cluster):
    """This module's cluster, started again after a test that stopped it (even a failing one)."""
    yield cluster
    if not (cluster.data / "postmaster.pid").exists():
        cluster.resume()


def test_an_unreachable_database_is_unavailable_within_seconds_with_a_clear_message(tmp_path):
    dsn = f"postgresql://tessera@/tessera?host={tmp_path}"  # no server listens there
    for open_it in (open_store, open_reader):
        t0 = time.monotonic()
        with pytest.raises(Unavailable, match=rf"cannot connect to the PostgreSQL database tessera on {tmp_path}"):
            open_it(dsn)
        assert time.monotonic() - t0 < 5


def test_calls_fail_fast_while_the_server_is_down_and_the_store_recovers_by_itself(server):
    store = open_store(server.new_database())
    try:
        create(store, "before")
        server.halt()
        t0 = time.monotonic()
        with pytest.raises(Unavailable, match="the issuer cannot"):
            create(store, "during")
        with pytest.raises(Unavailable):
            store.list_entries()
        assert time.monotonic() - t0 < 10  # each call: at most the pool's wait (3 s), not the write lock's 30 s
        server.resume()
        deadline = time.monotonic() + 30
        while True:  # the same store object: its pool reconnects, nobody restarts the issuer
            try:
                create(store, "after")
                break
            except Unavailable:
                assert time.monotonic() < deadline, "the store did not recover after the server came back"
                time.sleep(0.2)
        assert {e.id for e in store.list_entries()} == {"before", "after"}  # "during" was never written
        assert verify_chain(store.audit_since()).ok and store.newest_audit_seq() == 2
    finally:
        store.close()


def test_a_transaction_cut_off_by_the_server_is_not_acknowledged_and_leaves_nothing(server):
    dsn = server.new_database()
    store = open_store(dsn)
    try:
        create(store, "kept")
        with pytest.raises(Unavailable):
            with store.transaction():
                create(store, "cut")
                store.append_audit([AuditEvent("more", OP, "done")])
                server.halt()  # the COMMIT has nowhere to go
    finally:
        store.close()
    server.resume()
    again = open_store(dsn)
    try:
        assert [e.id for e in again.list_entries()] == ["kept"] and again.newest_audit_seq() == 1
        assert [c.key for c in again.changes_after(0)] == ["kept"]
    finally:
        again.close()


def test_audit_verify_reads_a_postgresql_database_by_uri(server, capsys):
    dsn = server.new_database()
    store = open_store(dsn)
    create(store, "e1")
    store.close()
    assert cli.main(["audit", "verify", "--db", dsn]) == 0
    assert "audit trail intact: 1 records" in capsys.readouterr().out
    with pytest.raises(SystemExit):  # a password on a command line: refused before anything connects
        cli.main(["audit", "verify", "--db", dsn.replace("tessera@", "tessera:secret@")])
    assert "must not carry a password" in capsys.readouterr().err


def _load(tmp_path, **datastore):
    doc = {"trust_domain": "example.org", "data_dir": str(tmp_path / "d"), "listen_address": "127.0.0.1:0"}
    if datastore:
        doc["datastore"] = datastore
    path = tmp_path / "issuer.yaml"
    path.write_text(yaml.safe_dump(doc))
    return config.load(path)


def test_the_config_chooses_the_engine_sqlite_by_default(tmp_path):
    assert _load(tmp_path).datastore.source(tmp_path / "d") == tmp_path / "d" / "tessera.db"
    dsn = "postgresql://tessera@/tessera?host=/run/postgresql&passfile=/etc/tessera/pgpass"
    cfg = _load(tmp_path, engine="postgres", dsn=dsn, pool_size=4).datastore
    assert (cfg.source(tmp_path / "d"), cfg.pool_size) == (dsn, 4)


@pytest.mark.parametrize("datastore, problem", [
    ({"engine": "mysql"}, "datastore.engine: must be one of sqlite, postgres"),
    ({"engine": "postgres"}, "datastore.dsn: is required"),
    ({"engine": "postgres", "dsn": "postgresql://tessera:hunter2@db/tessera"}, "must not carry a password"),
    ({"engine": "postgres", "dsn": "postgresql://tessera@db/tessera?password=hunter2"}, "must not carry a password"),
    ({"engine": "postgres", "dsn": "host=db dbname=tessera"}, "datastore.dsn: must be a postgresql:// URI"),
    ({"engine": "postgres", "dsn": "postgresql://db/tessera?nosuchoption=1"}, "not a valid PostgreSQL URI"),
    ({"engine": "postgres", "dsn": "postgresql://db/t", "pool_size": 1}, "datastore.pool_size: must be between"),
    ({"dsn": "postgresql://db/tessera"}, "datastore.dsn: is for engine: postgres"),
    ({"engine": "postgres", "dsn": "postgresql://db/t", "pool": 3}, "datastore.pool: unknown key"),
])
def test_a_bad_datastore_config_is_a_clear_error(tmp_path, datastore, problem):
    with pytest.raises(ConfigError, match=problem):
        _load(tmp_path, **datastore)
