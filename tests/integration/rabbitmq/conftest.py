"""Facts of the rabbitmq scenario for the shared fixtures and tests in tests/lib."""

import time

import pytest

from stack_fixtures import *  # noqa: F401,F403


@pytest.fixture(scope="session")
def scenario():
    return {
        "name": "rabbitmq",
        "broker": "celery-rabbitmq-broker",
        "workers": ["celery-rabbitmq-worker1", "celery-rabbitmq-worker2"],
        "network": "celery-rabbitmq",
        "lost_timeout": 30,
        "watchdog": 15,
        "broker_unit": "rabbitmq-server.service",
        # RabbitMQ requeues a SIGKILLed worker's deliveries when its connection closes: the
        # task runs again as soon as systemd has restarted the worker (RestartSec 2 s).
        "worker_crash_bound": 30,
        # TLS (celery_broker_tls) on 5671, no plain-text listener; a plain AMQP client gets
        # no connection.start frame (which begins 01 00 00).
        "broker_port": 5671,
        "tls_dir": "/etc/rabbitmq/tls",
        "broker_group": "rabbitmq",
        "plain_hello": b"AMQP\x00\x00\x09\x01",
        "plain_answer": b"\x01\x00\x00",
    }


@pytest.fixture(scope="session", autouse=True)
def ttl_probe(stack):
    """One task published, when the tests start, to "ttl-probe": a task queue under the
    dead-letter policy that no worker consumes. test_zz_dead_letter.py, which runs last,
    expects it in the dead-letter queue once the TTL (70 s) has passed, instead of waiting
    for a TTL of its own."""
    before = stack.queue_depths().get("celery.dlq", 0)
    (task,) = stack.send(0, queue="ttl-probe")
    return {"task": task, "sent": time.time(), "dead_letters_before": before}
