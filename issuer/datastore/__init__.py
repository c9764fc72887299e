"""The issuer's datastore: the contract (interface.py), its engines (sqlite.py, postgres.py), the change feed
follower (feed.py).

A store is named by one string: a `postgresql://` (or `postgres://`) URI names a PostgreSQL database, anything
else the path of an SQLite file. Only this module and the engines' own know which engine that is.
"""

from __future__ import annotations

from pathlib import Path

DEFAULT_POOL_SIZE = 10  # PostgreSQL connections per store object at most (as postgres.DEFAULT_POOL_SIZE)


def is_postgres(source: str | Path) -> bool:
    return isinstance(source, str) and source.startswith(("postgresql://", "postgres://"))


def check_dsn(dsn: str) -> str:
    """A PostgreSQL URI without a password, or ValueError saying what is wrong (config files, command lines)."""
    from issuer.datastore.postgres import check_dsn as check
    return check(dsn)


def opener(source: str | Path, pool_size: int = DEFAULT_POOL_SIZE):
    """The picklable recipe that opens the store `source` names, here or in a signing worker."""
    if is_postgres(source):
        from issuer.datastore.postgres import PostgresOpener
        return PostgresOpener(source, pool_size)
    from issuer.datastore.sqlite import SQLiteOpener
    return SQLiteOpener(str(source))


def open_store(source: str | Path, relay=None, pool_size: int = DEFAULT_POOL_SIZE):
    """The issuer's store `source` names: an SQLite file's path or a PostgreSQL URI."""
    return opener(source, pool_size).open(relay=relay)  # the one way a store is opened, here or in a worker


def open_reader(source: str | Path):
    """A read-only AuditReader on the store `source` names (for `tessera audit verify --db`)."""
    if is_postgres(source):
        from issuer.datastore.postgres import PostgresReader
        return PostgresReader(source)
    from issuer.datastore.sqlite import SQLiteReader
    return SQLiteReader(source)


def read_heads(source: str | Path):
    """The heads (core.models.Heads) of the store `source` names, read only: nothing is created, migrated or
    written, and a store that does not exist yet (a missing SQLite file, an empty database) has every head at 0."""
    if is_postgres(source):
        from issuer.datastore.postgres import PostgresReader
        reader = PostgresReader(source)
    else:
        from issuer.core.models import Heads
        from issuer.datastore.sqlite import SQLiteReader
        if not Path(source).exists():
            return Heads()
        reader = SQLiteReader(source)
    try:
        return reader.heads()
    finally:
        reader.close()
