"""A task left in its queue past the message TTL lands in the dead-letter queue (runs last).

The task went to "ttl-probe", a task queue no worker consumes, when the tests started
(conftest.py, ttl_probe): by now its 70 s TTL has passed.
"""

import json
import shlex
import time

from celery_stack import VENV

# Lists the dead-letter queue from a worker host, with the workers' connection settings:
# each message's task id and its first x-death entry. Nothing is acknowledged, so closing
# the channel puts every message back.
LIST_DEAD_LETTERS = """
import json, celery_reliable
found = []
with celery_reliable.app.connection_for_write() as connection:
    channel = connection.channel()
    while True:
        message = channel.basic_get("celery.dlq", no_ack=False)
        if message is None:
            break
        headers = message.headers or {}
        death = (headers.get("x-death") or [{}])[0]
        found.append({"id": headers.get("id"), "reason": str(death.get("reason")), "queue": str(death.get("queue"))})
    channel.close()
print(json.dumps(found))
"""


def wait_for_the_expired_probe(stack, ttl_probe):
    """Until the probe's task is in celery.dlq: its 70 s TTL, plus a minute."""
    stack.wait_until(
        "the expired task in celery.dlq",
        lambda: stack.queue_depths().get("celery.dlq", 0) > ttl_probe["dead_letters_before"],
        timeout=max(0, ttl_probe["sent"] + 70 + 60 - time.time()) + 1,
        interval=2,
    )


def test_expired_task_is_dead_lettered_not_dropped(stack, ttl_probe):
    wait_for_the_expired_probe(stack, ttl_probe)
    assert stack.queue_depths().get("ttl-probe", 0) == 0, "the expired task is still in its queue"
    assert not stack.runs(ttl_probe["task"]), "the task ran although no worker consumed its queue"
    dead = json.loads(stack.run_as_worker(f"{VENV}/bin/python -c {shlex.quote(LIST_DEAD_LETTERS)}"))
    assert {"id": ttl_probe["task"], "reason": "expired", "queue": "ttl-probe"} in dead, dead
    assert stack.queue_depths().get("celery.dlq", 0) == len(dead), "listing the dead letters consumed some"


def test_the_dead_letter_playbook_lists_and_replays_a_task_once(stack, ttl_probe, tmp_path):
    """playbooks/dead_letters.yml: counts by task and reason, then one replay, then none."""
    task = ttl_probe["task"]
    wait_for_the_expired_probe(stack, ttl_probe)
    dead_before = stack.queue_depths()["celery.dlq"]

    report, changed = stack.dead_letters(tmp_path, ids=[task])
    assert report["total"] == dead_before
    assert {"task": "demo_app.work", "reason": "expired", "queue": "ttl-probe", "count": 1} in report["groups"]
    assert [m["reason"] for m in report["messages"] if m["id"] == task] == ["expired"]
    assert report["replayed"] == [task] and report["not_found"] == [] and changed == 1
    depths = stack.queue_depths()
    assert depths["celery.dlq"] == dead_before - 1, "the replayed task is still in the dead-letter queue"
    assert depths["ttl-probe"] == 1, "the replayed task is not back in its queue"

    # Idempotent: the same replay again finds nothing, publishes nothing, changes nothing.
    report, changed = stack.dead_letters(tmp_path, ids=[task])
    assert report["replayed"] == [] and report["not_found"] == [task] and changed == 0
    depths = stack.queue_depths()
    assert (depths["celery.dlq"], depths["ttl-probe"]) == (dead_before - 1, 1)
    assert not stack.runs(task), "no worker consumes ttl-probe: the task must not have run"
