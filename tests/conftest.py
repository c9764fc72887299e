import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

from harness import Deployment  # noqa: E402
from issuer.datastore.sqlite import SQLiteDatastore  # noqa: E402


@pytest.fixture
def deployment(tmp_path):
    d = Deployment(tmp_path)
    yield d
    d.close()


@pytest.fixture
def running(deployment):
    """An issuer and one sidecar, 'host-a', with nothing registered yet."""
    deployment.start_issuer()
    deployment.start_sidecar("host-a")
    return deployment


@pytest.fixture(scope="session")
def pg_cluster():
    """One throwaway PostgreSQL cluster for the session (tests/pgcluster.py), started by the first test that asks,
    stopped at the end even after a failure; `pg_cluster.new_database()` gives each test its own database."""
    from pgcluster import Cluster

    cluster = Cluster.start()
    try:
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture
def store(tmp_path):
    """A real SQLite datastore in the test's directory."""
    s = SQLiteDatastore(tmp_path / "t.db")
    yield s
    s.close()


@pytest.fixture
def authorities(tmp_path):
    """Authorities on a store of their own, so the test's `store` holds only what the test wrote."""
    (tmp_path / "ca").mkdir()
    own = SQLiteDatastore(tmp_path / "ca" / "authorities.db")
    from cautil import make_authorities

    yield make_authorities(own, tmp_path / "ca")
    own.close()
