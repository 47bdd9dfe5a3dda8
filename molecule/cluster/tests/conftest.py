"""Facts and fixtures of the cluster scenario (shared helpers in molecule/shared/tests)."""

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "shared" / "tests"))

from cluster_stack import ClusterStack  # noqa: E402
from stack_fixtures import recovery, pytest_terminal_summary  # noqa: E402,F401

NODES = ["celery-cluster-rabbit1", "celery-cluster-rabbit2", "celery-cluster-rabbit3"]
WORKERS = ["celery-cluster-worker1", "celery-cluster-worker2"]


@pytest.fixture(scope="session")
def scenario():
    return {"name": "cluster", "nodes": NODES, "workers": WORKERS, "beat_host": WORKERS[0],
            "beat_interval": 20.0}


@pytest.fixture(scope="session")
def cluster():
    return ClusterStack(NODES, WORKERS)
