"""Behaviour tests shared by the broker scenarios (imported by each test_behaviour.py).

Each test injects one fault while a demo task runs and proves the task still completes.
Each fails when its mechanism is removed:
  - early ack (task_acks_late off): the interrupted task is never run again;
  - KillMode=control-group: a restart aborts the running task (two starts, not one);
  - no cold-shutdown escalation in ExecStop: a restart waits for the whole task;
  - no SIGKILL in ExecStop: a hung worker takes twice TimeoutStopSec to stop;
  - the unit not enabled: it is not back after a reboot;
  - broker persistence off: queued tasks vanish with a broker crash;
  - no watchdog (WatchdogSec=0): a frozen worker is never restarted; a watchdog fed by a
    timer alone: a worker that consumes nothing is never restarted;
  - broker timers not derived from the prefetch multiplier (or shorter than a reserved
    task's wait): a task reserved behind a running one is handed out again and runs twice.
The seconds from each fault to the task running again go to the recovery report.
"""

import time

from celery_stack import VENV

UNIT = "celery-worker@default.service"


def test_worker_sigkill_mid_task_reruns_the_task(stack, scenario, recovery):
    """a. SIGKILL of the worker's main process mid-task: the task runs again and completes."""
    (task,) = stack.send(10)
    first = stack.wait_runs(task, 1, timeout=30)[0]
    pid = stack.main_pid(UNIT)
    fault = time.time()
    stack.worker.check_output(f"kill -KILL {pid}")

    starts = stack.wait_runs(task, 2, timeout=scenario["worker_crash_bound"])
    stack.wait_runs(task, 1, event="done", timeout=40)
    seconds = starts[1]["t"] - fault
    recovery.record("worker main process SIGKILL", seconds, task_started_before_fault=round(fault - first["t"], 1))

    assert stack.main_pid(UNIT) != pid, "systemd did not restart the worker"
    assert len(stack.runs(task)) == 2, "the task ran more often than the one interrupted run + 1"
    assert len(stack.runs(task, "done")) == 1


def test_restart_lets_a_short_task_finish(stack, recovery):
    """b1. systemctl restart mid-task: a task shorter than the drain finishes, uninterrupted."""
    (task,) = stack.send(max(1, stack.drain_timeout() - 3))
    stack.wait_runs(task, 1, timeout=30)
    fault = time.time()
    stack.worker.check_output(f"systemctl restart {UNIT}")
    done = stack.wait_runs(task, 1, event="done", timeout=30)[0]
    recovery.record("systemctl restart, task shorter than drain (finished)", done["t"] - fault)

    assert len(stack.runs(task)) == 1, "the restart interrupted the task (KillMode must be mixed)"
    assert done["t"] > fault


def test_restart_returns_a_long_task_at_once(stack, scenario, recovery):
    """b2. systemctl restart mid-task: a task longer than the drain is returned at once and re-run."""
    stop = stack.stop_seconds()
    # Longer than the drain and the soft shutdown (8 s in the scenarios) with room to spare.
    (task,) = stack.send(stop + 7)
    stack.wait_runs(task, 1, timeout=30)
    fault = time.time()
    stack.worker.check_output(f"systemctl restart {UNIT}")
    restart_took = time.time() - fault
    starts = stack.wait_runs(task, 2, timeout=30)
    stack.wait_runs(task, 1, event="done", timeout=40)
    recovery.record("systemctl restart, task longer than drain (re-run)", starts[1]["t"] - fault,
                    restart_took=round(restart_took, 1))

    # The stop waited for the drain and the soft shutdown, not for the whole task nor any
    # broker timeout, and the task came back without the visibility timeout.
    assert restart_took < stop + 8, f"restart took {restart_took:.1f} s"
    assert starts[1]["t"] - fault < stop + 15
    assert len(stack.runs(task)) == 2
    assert len(stack.runs(task, "done")) == 1


def test_reboot_mid_task_brings_the_worker_back(stack, scenario, recovery):
    """c. Reboot of the worker host mid-task: the unit is back after boot, the task completes."""
    (task,) = stack.send(stack.stop_seconds() + 7)
    stack.wait_runs(task, 1, timeout=30)
    fault = time.time()
    stack.reboot(scenario["workers"][0], stop_timeout=stack.stop_timeout() + 30)
    stack.wait_booted(stack.worker)
    stack.wait_active(UNIT)
    starts = stack.wait_runs(task, 2, timeout=60)
    stack.wait_runs(task, 1, event="done", timeout=40)
    recovery.record("worker host reboot", starts[1]["t"] - fault)

    assert len(stack.runs(task)) == 2
    assert len(stack.runs(task, "done")) == 1
    # The state DB lives under the StateDirectory, which survives the reboot.
    assert stack.worker.run("ls /var/lib/celery/ | grep -q '^default.state'").rc == 0


def test_a_frozen_worker_is_restarted_by_its_watchdog(stack, scenario, recovery):
    """e. The worker's main process frozen mid-task (SIGSTOP: its event loop consumes nothing,
    as a zombie worker): systemd's watchdog, no longer fed, aborts it and restarts it within
    WatchdogSec + TimeoutAbortSec, and the task runs again and completes once. The pool
    process running it was stopped by its fence meanwhile (the task outlasts the fence)."""
    watchdog = int(stack.unit_file_value("WatchdogSec"))
    abort = int(stack.unit_file_value("TimeoutAbortSec"))
    restart_sec = int(stack.unit_file_value("RestartSec"))
    assert watchdog > 0, "the worker unit has no watchdog"
    (task,) = stack.send(15)
    stack.wait_runs(task, 1, timeout=30)
    pid = stack.main_pid(UNIT)
    fault = time.time()
    stack.worker.check_output(f"kill -STOP {pid}")
    try:
        stack.wait_until("systemd to restart the frozen worker",
                         lambda: stack.main_pid(UNIT) not in (0, pid), timeout=watchdog + abort + 30)
        restarted = time.time() - fault
    finally:
        stack.worker.run(f"kill -CONT {pid}")  # no such process once restarted
    stack.wait_active(UNIT)
    starts = stack.wait_runs(task, 2, timeout=60)
    stack.wait_runs(task, 1, event="done", timeout=40)
    recovery.record("worker frozen (SIGSTOP), restarted by its watchdog", restarted,
                    task_running_again=round(starts[1]["t"] - fault, 1), watchdog=watchdog)

    assert restarted <= watchdog + abort + restart_sec + 5, f"restarted after {restarted:.1f} s"
    journal = stack.worker.check_output(f"journalctl -u {UNIT} --since=@{int(fault)} --no-pager")
    assert "Watchdog timeout" in journal, journal[-2000:]
    assert len(stack.runs(task, "done")) == 1


def test_a_worker_that_stops_consuming_is_restarted_by_its_watchdog(stack, recovery):
    """f. The worker's consumer cancelled while its process, event loop and broker connection
    stay healthy (a zombie worker: alive, consuming nothing): the watchdog, fed only while the
    worker consumes, restarts it within WatchdogSec + TimeoutAbortSec, and it consumes again."""
    watchdog = int(stack.unit_file_value("WatchdogSec"))
    abort = int(stack.unit_file_value("TimeoutAbortSec"))
    restart_sec = int(stack.unit_file_value("RestartSec"))
    node = f"default@{stack.worker.check_output('hostname')}"
    pid = stack.main_pid(UNIT)
    fault = time.time()
    out = stack.run_as_worker(
        f"{VENV}/bin/celery --app=celery_reliable control cancel_consumer celery --destination={node}")
    assert "no longer consuming" in out, out
    stack.wait_until("the worker to report that it consumes nothing",
                     lambda: stack.unit_property(UNIT, "StatusText").startswith("Not consuming"), 10)
    assert stack.main_pid(UNIT) == pid
    stack.wait_until("systemd to restart the worker that consumes nothing",
                     lambda: stack.main_pid(UNIT) not in (0, pid), timeout=watchdog + abort + 30)
    restarted = time.time() - fault
    stack.wait_active(UNIT)
    (task,) = stack.send(0)
    stack.wait_runs(task, 1, event="done", timeout=30)
    recovery.record("worker consuming nothing (consumer cancelled), restarted by its watchdog",
                    restarted, watchdog=watchdog)

    assert restarted <= watchdog + abort + restart_sec + 5, f"restarted after {restarted:.1f} s"
    assert stack.unit_property(UNIT, "StatusText") == "Consuming celery"


def test_a_reserved_task_waits_on_its_worker_and_runs_once(stack, scenario):
    """g. celery_worker_prefetch_multiplier 2: a task reserved behind a running one waits on
    the worker, unacknowledged, and runs there once, after it. The broker's timer (Redis:
    the visibility timeout; RabbitMQ: consumer_timeout) covers the longest such wait plus the
    run, so it never hands the waiting message out again."""
    settings = stack.settings()
    multiplier, hard = settings["worker_prefetch_multiplier"], settings["task_time_limit"]
    assert multiplier >= 2, "the scenarios reserve one task beyond the running one"
    if scenario.get("server") in ("redis", "valkey"):
        timer = settings["broker_transport_options"]["visibility_timeout"]
    else:
        out = stack.broker.check_output("rabbitmqctl -q eval 'application:get_env(rabbit, consumer_timeout).'")
        timer = int(out.strip().removeprefix("{ok,").removesuffix("}")) / 1000
    assert timer > multiplier * hard, f"the broker's timer ({timer} s) is shorter than {multiplier} x hard limit {hard} s"

    node = f"extra@{stack.worker.check_output('hostname')}"  # concurrency 1: one runs, one waits
    (running,) = stack.send(8, queue="extra")
    stack.wait_runs(running, 1, timeout=30)
    (waiting,) = stack.send(0, queue="extra")
    reserved = stack.wait_until(
        "the second task reserved by the busy worker",
        lambda: waiting in stack.run_as_worker(
            f"{VENV}/bin/celery --app=celery_reliable inspect reserved --json --destination={node}"),
        timeout=10, interval=1)
    assert reserved
    done = stack.wait_runs(waiting, 1, event="done", timeout=60)[0]
    # A message the broker's timer handed out again while it waited is back on the worker
    # by now (reserved or running): Celery's workers know neither task any more.
    time.sleep(1)
    known = stack.run_as_worker(
        f"{VENV}/bin/celery --app=celery_reliable inspect query_task {running} {waiting} --json --destination={node}")
    assert running not in known and waiting not in known, f"a task is held again after it ran: {known}"

    runs = stack.runs(waiting)
    assert len(runs) == 1, f"the reserved task ran {len(runs)} times"
    assert not runs[0]["redelivered"], "the reserved task was handed out again"
    assert runs[0]["node"] == node
    assert runs[0]["t"] >= stack.runs(running, "done")[0]["t"], "it did not wait for the running task"
    assert done["t"] >= runs[0]["t"]


def test_broker_restart_and_sigkill_keep_queued_tasks(stack, scenario, recovery):
    """d. Broker restart, then SIGKILL, with tasks queued and one running: all of them complete."""
    broker_unit = scenario["broker_unit"]
    stack.worker.check_output("systemctl stop celery-worker@extra.service")
    queued = stack.send(0, queue="extra", count=5)
    (running,) = stack.send(12)
    stack.wait_runs(running, 1, timeout=30)

    stack.broker.check_output(f"systemctl restart {broker_unit}")
    stack.wait_active(broker_unit, host=stack.broker)
    queued += stack.send(0, queue="extra", count=5)
    time.sleep(2)  # one fsync interval of the broker's persistence
    pid = stack.main_pid(broker_unit, host=stack.broker)
    fault = time.time()
    stack.broker.check_output(f"systemctl kill --signal=KILL {broker_unit}")
    stack.wait_until("the broker to be restarted",
                     lambda: stack.main_pid(broker_unit, host=stack.broker) not in (0, pid), 60)
    stack.wait_active(broker_unit, host=stack.broker)
    stack.worker.check_output("systemctl start celery-worker@extra.service")

    for task in queued:
        stack.wait_runs(task, 1, event="done", timeout=90)
    first_start = min(stack.runs(task)[0]["t"] for task in queued)
    recovery.record("broker SIGKILL with 10 tasks queued (first queued task running)", first_start - fault)
    stack.wait_runs(running, 1, event="done", timeout=90)

    for task in queued:
        assert len(stack.runs(task, "done")) == 1, f"queued task {task} ran more than once"
    assert len(stack.runs(running, "done")) >= 1


def test_broker_restart_returns_the_running_task_at_once(stack, scenario, recovery):
    """d2. Broker restart while a task runs: the task runs again as soon as the broker is back.

    The worker loses its connection and cancels the running task (it could no longer
    acknowledge it). RabbitMQ requeues the message when the connection closes. Redis is down
    when kombu tries to put the message back, so it stays in the unacked hash: without the
    fast-recovery transport (which treats the dropped connection as a dead incarnation) it
    would wait for the visibility timeout, an hour in this scenario.
    """
    broker_unit = scenario["broker_unit"]
    (task,) = stack.send(10)
    stack.wait_runs(task, 1, timeout=30)
    pid = stack.main_pid(UNIT)
    fault = time.time()
    stack.broker.check_output(f"systemctl restart {broker_unit}")
    starts = stack.wait_runs(task, 2, timeout=scenario["worker_crash_bound"] + 30)
    stack.wait_runs(task, 1, event="done", timeout=60)
    recovery.record("broker restart mid-task (running task again)", starts[1]["t"] - fault)
    assert len(stack.runs(task, "done")) == 1
    if scenario.get("server") in ("redis", "valkey"):
        # The worker reconnected; it did not die on the way (kombu's restore at channel
        # close after the connection was closed: celery_reliable_redis.QoS.restore_unacked).
        assert stack.main_pid(UNIT) == pid, "the worker's main process died during the broker restart"


def test_a_hung_worker_stops_within_the_stop_timeout(stack, recovery):
    """A worker that handles neither SIGTERM nor SIGQUIT (its main process stopped) is
    SIGKILLed by ExecStop before TimeoutStopSec, not after ExecStop's wait and then systemd's."""
    pid = stack.main_pid(UNIT)
    stack.worker.check_output(f"kill -STOP {pid}")
    started = time.time()
    try:
        stack.worker.check_output(f"systemctl stop {UNIT}")
        seconds = time.time() - started
    finally:
        stack.worker.run(f"kill -CONT {pid}")
        stack.worker.check_output(f"systemctl start {UNIT}")
        stack.wait_active(UNIT)
    recovery.record("hung worker stopped", seconds, stop_timeout=stack.stop_timeout())
    assert seconds <= stack.stop_timeout(), f"the stop took {seconds:.1f} s (TimeoutStopSec {stack.stop_timeout()} s)"
    journal = stack.worker.check_output(f"journalctl -u {UNIT} --since=@{int(started)} --no-pager")
    assert "timed out" not in journal, journal[-2000:]
