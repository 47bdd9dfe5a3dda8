"""Facts of the redis scenario for the shared fixtures and tests in molecule/shared/tests."""

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "shared" / "tests"))

from stack_fixtures import *  # noqa: E402,F401,F403


@pytest.fixture(scope="session")
def scenario():
    import json
    import testinfra

    worker = testinfra.get_host("docker://celery-redis-worker1")
    settings = json.loads(worker.file("/etc/celery/settings.json").content_string)
    visibility = settings["broker_transport_options"]["visibility_timeout"]
    return {
        "name": "redis",
        "broker": "celery-redis-broker",
        "workers": ["celery-redis-worker1"],
        "broker_unit": "redis-server.service",
        # A task held by a SIGKILLed worker comes back after the visibility timeout, at the
        # next 10 s sweep of a live worker (kombu unacked_restore_interval).
        "worker_crash_bound": visibility + 10 + 20,
    }
