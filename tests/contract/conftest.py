"""The engines the datastore contract suite runs against.

An engine is a small class: how to make an empty store's Opener in a test directory,
and how to damage an audit row behind the store's back (the tamper tests). A new
engine adds its class here and its name to ENGINES.

PostgreSQL runs in the session's throwaway cluster (tests/conftest.py's pg_cluster,
started only when a PostgreSQL test runs, stopped at the end even on failure); each test
gets a database of its own."""

import sqlite3
from pathlib import Path

import pytest

from issuer.datastore.postgres import PostgresOpener
from issuer.datastore.sqlite import SQLiteOpener
from pgcluster import Cluster


class SQLiteEngine:
    name = "sqlite"

    def __init__(self, tmp_path: Path):
        self.path = tmp_path / "t.db"

    def opener(self) -> SQLiteOpener:
        return SQLiteOpener(str(self.path))

    def reader_source(self) -> str:
        """What `datastore.open_reader` / `tessera audit verify --db` is given for this store."""
        return str(self.path)

    def shorten_lock_timeout(self, monkeypatch, seconds: float) -> None:
        """How long a writer waits for another writer before Unavailable (30 s in production)."""
        from issuer.datastore import sqlite as sqlite_store
        monkeypatch.setattr(sqlite_store, "WRITE_LOCK_TIMEOUT", seconds)

    def tamper_audit(self, seq: int, column: str, value) -> None:
        self.sql(f"UPDATE audit SET {column} = ? WHERE seq = ?", (value, seq))

    def sql(self, statement: str, args=()) -> None:
        """Run one statement on the store's data behind its back (placeholders: ?)."""
        with sqlite3.connect(self.path) as db:
            db.execute(statement, args)
        db.close()


class PostgresEngine:
    name = "postgres"

    def __init__(self, tmp_path: Path, cluster: Cluster):
        self.dsn = cluster.new_database()

    def opener(self) -> PostgresOpener:
        return PostgresOpener(self.dsn)

    def reader_source(self) -> str:
        return self.dsn

    def shorten_lock_timeout(self, monkeypatch, seconds: float) -> None:
        from issuer.datastore import postgres
        monkeypatch.setattr(postgres, "WRITE_LOCK_TIMEOUT", seconds)

    def tamper_audit(self, seq: int, column: str, value) -> None:
        self.sql(f"UPDATE audit SET {column} = ? WHERE seq = ?", (value, seq))

    def sql(self, statement: str, args=()) -> None:
        import psycopg
        with psycopg.connect(self.dsn, autocommit=True) as db:
            db.execute(statement.replace("?", "%s"), args)


ENGINES = {"sqlite": SQLiteEngine, "postgres": PostgresEngine}


@pytest.fixture(params=sorted(ENGINES))
def engine(request, tmp_path):
    if request.param == "postgres":
        return PostgresEngine(tmp_path, request.getfixturevalue("pg_cluster"))
    return ENGINES[request.param](tmp_path)


@pytest.fixture
def store(engine):
    s = engine.opener().open()
    yield s
    s.close()
