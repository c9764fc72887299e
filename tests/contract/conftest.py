"""The engines the datastore contract suite runs against.

An engine is a small class: how to make an empty store's Opener in a test directory,
and how to damage an audit row behind the store's back (the tamper tests). A new
engine (PostgreSQL) adds its class here and its name to ENGINES."""

import sqlite3
from pathlib import Path

import pytest

from issuer.datastore.sqlite import SQLiteOpener


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
        with sqlite3.connect(self.path) as db:
            db.execute(f"UPDATE audit SET {column} = ? WHERE seq = ?", (value, seq))
        db.close()


ENGINES = {"sqlite": SQLiteEngine}


@pytest.fixture(params=sorted(ENGINES))
def engine(request, tmp_path):
    return ENGINES[request.param](tmp_path)


@pytest.fixture
def store(engine):
    s = engine.opener().open()
    yield s
    s.close()
