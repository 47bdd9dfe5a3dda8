"""The Celery exporter's bookkeeping (roles/celery_worker/files/celery_reliable_exporter.py)
on hand-made events: what it serves for this host's workers, and only for them. The
Molecule scenarios check it against real workers (tests/lib/worker_config.py)."""


import pytest

from celery_reliable_exporter import Metrics


@pytest.fixture()
def clock():
    return [100.0]


@pytest.fixture()
def metrics(clock):
    return Metrics("w1", clock=lambda: clock[0])


def samples(metrics):
    return [line for line in metrics.render().splitlines() if not line.startswith("#")]


def test_a_worker_is_up_while_its_heartbeats_arrive_and_down_after_three_missed(metrics, clock):
    metrics.on_event({"type": "worker-online", "hostname": "default@w1", "freq": 2.0})
    assert 'celery_worker_up{worker="default@w1"} 1' in samples(metrics)
    clock[0] += 6.0
    assert 'celery_worker_up{worker="default@w1"} 1' in samples(metrics)
    clock[0] += 0.5
    assert 'celery_worker_up{worker="default@w1"} 0' in samples(metrics)
    metrics.on_event({"type": "worker-heartbeat", "hostname": "default@w1", "freq": 2.0, "active": 3, "processed": 42})
    assert {'celery_worker_up{worker="default@w1"} 1', 'celery_worker_tasks_active{worker="default@w1"} 3',
            'celery_worker_processed_tasks_total{worker="default@w1"} 42'} <= set(samples(metrics))


def test_a_clean_stop_drops_the_worker_and_a_silent_one_is_forgotten_after_an_hour(metrics, clock):
    metrics.on_event({"type": "worker-online", "hostname": "stopped@w1", "freq": 2.0})
    metrics.on_event({"type": "worker-online", "hostname": "silent@w1", "freq": 2.0})
    metrics.on_event({"type": "worker-offline", "hostname": "stopped@w1"})
    up = [line for line in samples(metrics) if line.startswith("celery_worker_up")]
    assert up == ['celery_worker_up{worker="silent@w1"} 1']
    clock[0] += 3599
    assert 'celery_worker_up{worker="silent@w1"} 0' in samples(metrics)
    clock[0] += 2
    assert not [line for line in samples(metrics) if line.startswith("celery_worker_up")]


def test_only_this_hosts_workers_are_counted(metrics):
    for hostname in ("default@w10", "default@w2", "w1@other", "default@w1"):
        metrics.on_event({"type": "worker-heartbeat", "hostname": hostname, "freq": 2.0})
        metrics.on_event({"type": "task-received", "hostname": hostname, "uuid": hostname, "name": "t"})
    lines = samples(metrics)
    assert [line for line in lines if line.startswith("celery_worker_up")] == ['celery_worker_up{worker="default@w1"} 1']
    assert 'celery_exporter_events_total 2' in lines


def test_tasks_are_counted_by_name_and_state_and_names_outlive_a_retry(metrics):
    events = [
        ("task-received", "a", {"name": "app.flaky"}), ("task-started", "a", {}), ("task-failed", "a", {}),
        ("task-received", "b", {"name": "app.slow"}), ("task-started", "b", {}),
        ("task-retried", "b", {}), ("task-received", "b", {"name": "app.slow"}),
        ("task-succeeded", "b", {"runtime": 1.5}),
        ("task-failed", "never-received", {}),
    ]
    for kind, task_id, fields in events:
        metrics.on_event({"type": kind, "hostname": "default@w1", "uuid": task_id, **fields})
    lines = set(samples(metrics))
    assert {
        'celery_tasks_total{worker="default@w1",name="app.flaky",state="failed"} 1',
        'celery_tasks_total{worker="default@w1",name="app.slow",state="received"} 2',
        'celery_tasks_total{worker="default@w1",name="app.slow",state="retried"} 1',
        'celery_tasks_total{worker="default@w1",name="app.slow",state="succeeded"} 1',
        'celery_tasks_total{worker="default@w1",name="unknown",state="failed"} 1',
        'celery_task_runtime_seconds_sum{worker="default@w1",name="app.slow"} 1.500000',
        'celery_task_runtime_seconds_count{worker="default@w1",name="app.slow"} 1',
    } <= lines
    assert not metrics.names, "finished tasks' names are not kept"


def test_label_values_are_escaped(metrics):
    metrics.on_event({"type": "task-received", "hostname": "default@w1", "uuid": "x", "name": 'a"b\\c\nd'})
    assert 'celery_tasks_total{worker="default@w1",name="a\\"b\\\\c\\nd",state="received"} 1' in samples(metrics)
