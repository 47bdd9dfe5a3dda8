"""Facts of the redis scenario for the shared fixtures and tests in tests/lib.

The scenario deploys Redis, or Valkey with CELERY_BUNDLE_BROKER_TYPE=valkey (its paths and
unit carry the server's name: /etc/valkey/valkey.conf, valkey-server.service, valkey-cli).
"""

import os

import pytest

from stack_fixtures import *  # noqa: F401,F403


# The server the scenario deploys: redis or valkey.
SERVER = os.environ.get("CELERY_BUNDLE_BROKER_TYPE", "redis")

# CELERY_BUNDLE_SERVER_TESTS=1 (scripts/test.sh's valkey run, to keep CI within its hour):
# leave out the tests whose mechanism does not depend on the server, which the redis run
# makes: the lost-host and fast-recovery tests (the lease, the fence and the incarnations
# are the transport's own scripts and timers; behaviour test a still needs fast recovery
# on Valkey), the delivery limit and the dead-letter replay (the transport's restore
# script, the helper's Lua), the watchdog restarts (kombu's channel state) and the hung
# stop (systemd).
SERVER_INDEPENDENT_FILES = ("test_lost_host.py", "test_fast_recovery.py", "test_dead_letters.py")
SERVER_INDEPENDENT_TESTS = ("restarted_by_its_watchdog", "test_a_hung_worker_stops_within_the_stop_timeout")


def pytest_collection_modifyitems(config, items):
    if os.environ.get("CELERY_BUNDLE_SERVER_TESTS") != "1":
        return
    left_out = [item for item in items
                if item.path.name in SERVER_INDEPENDENT_FILES
                or any(name in item.name for name in SERVER_INDEPENDENT_TESTS)]
    if left_out:
        config.hook.pytest_deselected(items=left_out)
        items[:] = [item for item in items if item not in left_out]


@pytest.fixture(scope="session")
def scenario():
    return {
        # Its reports (recovery-NAME.json, the recovery labels) name the server run.
        "name": "redis" if SERVER == "redis" else SERVER,
        "server": SERVER,
        "broker": "celery-redis-broker",
        "workers": ["celery-redis-worker1", "celery-redis-worker2"],
        "network": "celery-redis",
        "lost_timeout": 30,
        "watchdog": 15,
        "broker_unit": f"{SERVER}-server.service",
        # A task held by a SIGKILLed worker comes back when systemd has restarted the worker
        # (RestartSec 2 s): the fast-recovery transport returns it at once. Without that
        # transport it would wait for the one-hour visibility timeout.
        "worker_crash_bound": 2 + 15 + 10,
        # TLS (celery_broker_tls) on the Redis port; plain text gets no PONG/NOAUTH answer.
        "broker_port": 6379,
        "tls_dir": f"/etc/{SERVER}/tls",
        "broker_group": SERVER,
        "plain_hello": b"PING\r\n",
        "plain_answer": b"-",
    }
