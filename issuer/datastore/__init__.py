"""The issuer's datastore: the contract (interface.py), its engines (sqlite.py), the change feed follower (feed.py)."""

from __future__ import annotations

from pathlib import Path


def open_store(path: str | Path, relay=None):
    """The issuer's store at `path` (SQLite is the one engine today)."""
    from issuer.datastore.sqlite import SQLiteOpener
    return SQLiteOpener(str(path)).open(relay=relay)  # the one way a store is opened, here or in a worker


def open_reader(path: str | Path):
    """A read-only AuditReader on the database at `path` (for `tessera audit verify --db`)."""
    from issuer.datastore.sqlite import SQLiteReader
    return SQLiteReader(path)
