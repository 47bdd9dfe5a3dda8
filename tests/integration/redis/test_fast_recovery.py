"""Redis fast recovery: a restarted worker returns the tasks its crashed run held, at once.

The scenario's visibility timeout is 3600 s, far above every wait here, so kombu's own sweep
cannot pass these tests: without the fast-recovery transport each one times out.
"""

import time

UNIT = "celery-worker@default.service"


def test_whole_unit_sigkill_mid_task(stack, scenario, recovery):
    """systemctl kill -s KILL: main process and pool children die together."""
    (task,) = stack.send(20)
    stack.wait_runs(task, 1, timeout=30)
    fault = time.time()
    stack.worker.check_output(f"systemctl kill --signal=KILL {UNIT}")
    starts = stack.wait_runs(task, 2, timeout=scenario["worker_crash_bound"])
    stack.wait_runs(task, 1, event="done", timeout=40)
    recovery.record("whole worker unit SIGKILL (fast recovery)", starts[1]["t"] - fault)
    assert len(stack.runs(task)) == 2
    assert len(stack.runs(task, "done")) == 1


def test_power_loss_of_the_worker_host_mid_task(stack, scenario, recovery):
    """docker kill + start: no stop sequence ran, nothing was returned on the way down."""
    (task,) = stack.send(20)
    stack.wait_runs(task, 1, timeout=30)
    container = stack._docker.containers.get(scenario["workers"][0])
    fault = time.time()
    container.kill()
    container.start()
    stack.wait_booted(stack.worker)
    stack.wait_active(UNIT)
    starts = stack.wait_runs(task, 2, timeout=scenario["worker_crash_bound"] + 20)
    stack.wait_runs(task, 1, event="done", timeout=40)
    recovery.record("worker host power loss (fast recovery)", starts[1]["t"] - fault)
    assert len(stack.runs(task)) == 2
    assert len(stack.runs(task, "done")) == 1


def test_a_live_workers_tasks_are_never_touched(stack, scenario):
    """While default@ recovers its crashed run's task, extra@'s running task stays with extra@."""
    (other,) = stack.send(20, queue="extra")
    stack.wait_runs(other, 1, timeout=30)
    (task,) = stack.send(15)
    stack.wait_runs(task, 1, timeout=30)
    stack.worker.check_output(f"kill -KILL {stack.main_pid(UNIT)}")
    stack.wait_runs(task, 2, timeout=scenario["worker_crash_bound"])
    stack.wait_runs(other, 1, event="done", timeout=40)
    stack.wait_runs(task, 1, event="done", timeout=40)
    assert len(stack.runs(other)) == 1, "the live worker's task was restored and ran twice"
    assert len(stack.runs(task)) == 2


def test_nothing_is_left_owned_by_dead_runs(stack):
    """After the recoveries no unacked entry or ownership record is left behind."""
    url = stack.broker_url()
    script = (
        "import redis, os; url = os.environ['CELERY_BROKER_URL']; "
        "tls = dict(ssl_ca_certs='/etc/celery/broker-ca.pem') if url.startswith('rediss') else {}; "
        "r = redis.Redis.from_url(url, **tls); "
        "print(r.hlen('unacked'), r.hlen('unacked_owner'))"
    )
    stack.wait_until(
        "the unacked hash and the ownership records to be empty",
        lambda: stack.run_as_worker(f"/opt/celery/venv/bin/python -c \"{script}\"").split() == ["0", "0"],
        timeout=30,
    )
    scheme = url.split("://")[0]  # never the URL itself in an assertion: it holds the password
    assert scheme in ("redis", "rediss")
