"""A task that kills its worker each time is dead-lettered after the delivery limit, and
playbooks/dead_letters.yml lists it and replays it exactly once.

The scenario sets celery_task_delivery_limit: 3, so the task runs 4 times, then waits in the
dead-letter list. The demo task SIGKILLs its pool process while a flag file exists on the
worker host (worker1 alone consumes "extra").
"""

DLQ = "celery.dlq"


def test_a_task_that_kills_its_worker_each_time_is_dead_lettered_then_replayed_once(stack, tmp_path):
    limit = int(stack.settings()["broker_transport_options"]["reliable_delivery_limit"])
    assert limit == 3, "the scenario's celery_task_delivery_limit"
    assert stack.settings()["broker_transport_options"]["reliable_dead_letter_queue"] == DLQ
    before = stack.redis_counts(f"llen {DLQ}")[0]
    task = stack.send_poison("extra", lambda: stack.redis_counts(f"llen {DLQ}")[0])
    assert len(stack.runs(task)) == limit + 1, "delivered limit + 1 times, then dead-lettered"
    assert not stack.runs(task, "done")
    assert stack.redis_counts("llen extra", "hlen unacked") == [0, 0]

    # The replay lists the dead letters (grouped, and one by one), then replays the task.
    report, changed = stack.dead_letters(tmp_path, ids=[task])
    assert {"task": "demo_app.crash", "reason": "delivery_limit", "queue": "extra", "count": 1} in report["groups"]
    assert [m for m in report["messages"] if m["id"] == task] == [
        {"id": task, "task": "demo_app.crash", "reason": "delivery_limit", "queue": "extra", "deliveries": limit + 1}]
    assert report["replayed"] == [task] and report["not_found"] == [] and changed == 1
    stack.wait_runs(task, 1, event="done", timeout=60)
    assert stack.redis_counts(f"llen {DLQ}")[0] == before

    # Idempotent: a second replay of the same task finds nothing and changes nothing.
    report, changed = stack.dead_letters(tmp_path, ids=[task])
    assert report["replayed"] == [] and report["not_found"] == [task] and changed == 0
    assert stack.redis_counts("llen extra", "hlen unacked") == [0, 0]
    assert len(stack.runs(task, "done")) == 1, "the replayed task ran once"
    assert len(stack.runs(task)) == limit + 2
