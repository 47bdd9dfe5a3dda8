"""A task left in its queue past the message TTL lands in the dead-letter queue (runs last)."""

import time


def queue_depths(stack):
    out = stack.broker.check_output("rabbitmqctl -q list_queues -p celery name messages")
    return {row.split()[0]: int(row.split()[1]) for row in out.splitlines()
            if len(row.split()) == 2 and row.split()[1].isdigit()}


def test_expired_task_is_dead_lettered_not_dropped(stack):
    stack.worker.check_output("systemctl stop celery-worker@extra.service")
    try:
        before = queue_depths(stack).get("celery.dlq", 0)
        (task,) = stack.send(0, queue="extra")
        sent = time.time()
        stack.wait_until(
            "the expired task in celery.dlq",
            lambda: queue_depths(stack).get("celery.dlq", 0) > before,
            timeout=70 + 60,
            interval=2,
        )
        took = time.time() - sent
        assert queue_depths(stack).get("extra", 0) == 0
        assert not stack.runs(task), "the task ran although no worker consumed its queue"
        assert took >= 60, f"dead-lettered after {took:.0f} s, before the 70 s TTL"
    finally:
        stack.worker.check_output("systemctl start celery-worker@extra.service")
