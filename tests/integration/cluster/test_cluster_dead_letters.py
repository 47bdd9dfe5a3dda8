"""Quorum queues: a task that kills its worker each time is dead-lettered at the delivery
limit, and playbooks/dead_letters.yml replays it once (its AMQP transaction on a quorum
queue).

The scenario sets celery_task_delivery_limit: 3 (the policy's delivery-limit). The demo task
SIGKILLs its pool process while a flag file exists on the worker host that runs it.
"""

DLQ = "celery.dlq"


def test_a_task_that_kills_its_worker_each_time_is_dead_lettered_then_replayed_once(cluster, tmp_path):
    before = cluster.queue_depths().get(DLQ, 0)
    task = cluster.send_poison("extra", lambda: cluster.queue_depths().get(DLQ, 0))
    runs = len(cluster.runs(task))
    assert runs == 3 + 1, f"ran {runs} times: delivered limit + 1 times, then dead-lettered"
    assert not cluster.runs(task, "done")

    report, changed = cluster.dead_letters(tmp_path, ids=[task])
    assert {"task": "demo_app.crash", "reason": "delivery_limit", "queue": "extra", "count": 1} in report["groups"]
    assert report["replayed"] == [task] and report["not_found"] == [] and changed == 1
    cluster.wait_runs(task, 1, event="done", timeout=60)

    # The second replay reads the dead-letter queue itself (rabbitmqctl's counts of a quorum
    # queue lag behind): the task is no longer there, nothing is replayed or changed.
    report, changed = cluster.dead_letters(tmp_path, ids=[task])
    assert report["replayed"] == [] and report["not_found"] == [task] and changed == 0
    assert report["total"] == before, "the replay left a copy in the dead-letter queue"
    assert len(cluster.runs(task, "done")) == 1, "the replayed task ran once"
    assert len(cluster.runs(task)) == runs + 1
