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


@pytest.fixture
def store(tmp_path):
    """A real SQLite datastore in the test's directory."""
    s = SQLiteDatastore(tmp_path / "t.db")
    yield s
    s.close()
