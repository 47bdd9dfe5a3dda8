"""Facts and fixtures of the cluster scenario (shared helpers in tests/lib)."""


import pytest

from cluster_stack import ClusterStack
from stack_fixtures import recovery, pytest_terminal_summary  # noqa: F401

NODES = ["celery-cluster-rabbit1", "celery-cluster-rabbit2", "celery-cluster-rabbit3"]
WORKERS = ["celery-cluster-worker1", "celery-cluster-worker2"]


@pytest.fixture(scope="session")
def scenario():
    return {"name": "cluster", "nodes": NODES, "workers": WORKERS, "beat_host": WORKERS[0],
            "beat_interval": 20.0}


@pytest.fixture(scope="session")
def cluster():
    return ClusterStack(NODES, WORKERS)
