"""A worker host that never comes back, one that restarts, one cut off the network (imported by each scenario).

Both worker hosts run the instance ``handover`` on the queue ``handover``. The scenario's
``celery_worker_lost_timeout`` (``lost_timeout`` in the scenario facts) bounds how long the
tasks of a lost host may wait before another host runs them:

- Redis: the lost process's lease expires (celery_broker_redis_lease_seconds) and any live
  worker returns its messages; a worker cut off for longer than its fence
  (celery_worker_redis_fence_seconds) kills its running task first. A restarted host's new
  worker returns its predecessor's messages when it starts.
- RabbitMQ: the broker closes the lost host's connection 2 to 3 heartbeats
  (celery_broker_heartbeat) after it last heard from it and requeues its deliveries; a
  worker whose echo through the broker has not come back for its fence
  (celery_worker_rabbitmq_fence_seconds, below 2 heartbeats) kills its running task first.
  A restarted host answers the broker's retransmission of an echo still in flight to the
  dead connection with a reset, and the broker drops that connection at once.
The demo task records an "alive" event every 0.5 s, so overlapping runs show.
Each test fails with its mechanism removed: without leases the Redis task waits for the
visibility timeout (an hour here); without the fence the runs overlap; with RabbitMQ's
former 60 s heartbeat the takeover exceeds the bound; without the echo in flight a restarted
RabbitMQ host's task waits for the heartbeat timers.
"""

import subprocess
import time

HANDOVER = "celery-worker@handover.service"


def _host_running(stack, task):
    run = stack.wait_until(f"task {task} to start", lambda: stack.runs_of(task), timeout=30)[0]
    name = run["node"].split("@", 1)[1]
    assert name in stack.worker_names, run
    return name


def _address(container, scenario):
    container.reload()
    return container.attrs["NetworkSettings"]["Networks"][scenario["network"]]["IPAddress"]


def _journals_since(stack, since, names):
    text = ""
    for name in names:
        host = stack.workers[stack.worker_names.index(name)]
        text += host.run(f"journalctl -u {HANDOVER} --since=@{int(since)} --no-pager").stdout
    return text


def test_a_lost_worker_host_hands_its_task_over(stack, scenario, recovery):
    """c. The host running a task vanishes (cut off the network, then killed: its connections
    are never closed, as with a deleted VM) and is not started again during the test."""
    task = stack.send_beat(20, "handover")
    lost = _host_running(stack, task)
    other = next(name for name in stack.worker_names if name != lost)
    container = stack._docker.containers.get(lost)
    network = stack._docker.networks.get(scenario["network"])
    stack.wait_until("the task to run a second", lambda: stack.runs_of(task)[0]["last"] > stack.runs_of(task)[0]["start"] + 1, 15)
    fault = time.time()
    network.disconnect(container)
    container.kill()
    try:
        bound = scenario["lost_timeout"]
        second = stack.wait_until(
            f"the task to start on {other}",
            lambda: [r for r in stack.runs_of(task) if r["node"].endswith("@" + other)], timeout=bound + 30)[0]
        seconds = second["start"] - fault
        recovery.record(f"worker host lost for good ({scenario['name']})", seconds, bound=bound)
        assert seconds <= bound, f"the lost host's task ran elsewhere after {seconds:.1f} s (bound {bound} s)"
        stack.wait_until("the task to finish", lambda: any(r["done"] for r in stack.runs_of(task)), timeout=40)
    finally:
        network.connect(container)
        container.start()
        host = stack.workers[stack.worker_names.index(lost)]
        stack.wait_booted(host)
        stack.wait_active(HANDOVER, host)


def test_a_restarted_worker_host_gives_its_task_back_at_once(stack, scenario, recovery):
    """A worker host killed mid-task and started again at once (its connections are never
    closed, as with a power cycle): the task runs again, on either host, and completes once."""
    task = stack.send_beat(12, "handover")
    restarted = _host_running(stack, task)
    container = stack._docker.containers.get(restarted)
    stack.wait_until("the task to run a second", lambda: stack.runs_of(task)[0]["last"] > stack.runs_of(task)[0]["start"] + 1, 15)
    address = _address(container, scenario)
    fault = time.time()
    # Power loss: nothing leaves the host any more (the kernel would otherwise close the
    # connections of the killed processes), then the host is off and boots again.
    subprocess.run(["nsenter", "-t", str(container.attrs["State"]["Pid"]), "-n",
                    "iptables", "-I", "OUTPUT", "-j", "DROP"], check=True)
    container.kill()
    container.start()
    host = stack.workers[stack.worker_names.index(restarted)]
    try:
        assert _address(container, scenario) == address, "the host came back with another address"
        second = stack.wait_until("the task to run again", lambda: stack.runs_of(task)[1:], timeout=scenario["lost_timeout"] + 30)[0]
        seconds = second["start"] - fault
        recovery.record(f"worker host power-cycled ({scenario['name']})", seconds,
                        on=second["node"].split("@", 1)[1])
        assert seconds <= scenario["lost_timeout"], f"the task ran again after {seconds:.1f} s"
        stack.wait_until("the task to finish", lambda: any(r["done"] for r in stack.runs_of(task)), timeout=40)
        assert len([r for r in stack.runs_of(task) if r["done"]]) == 1
    finally:
        stack.wait_booted(host)
        stack.wait_active(HANDOVER, host)


def test_a_partitioned_worker_never_runs_a_task_beside_its_replacement(stack, scenario, recovery):
    """d. The host running a task is cut off the network longer than the lease, then reconnected.

    The task (28 s, under the 30 s soft limit) outlasts the lease, so without the fence its
    first run would still be going when another host starts it, and both would complete.
    """
    since = time.time() - 1
    seconds = 28
    task = stack.send_beat(seconds, "handover")
    cut = _host_running(stack, task)
    network = stack._docker.networks.get(scenario["network"])
    container = stack._docker.containers.get(cut)
    stack.wait_until("the task to run a second", lambda: stack.runs_of(task)[0]["last"] > stack.runs_of(task)[0]["start"] + 1, 15)
    fault = time.time()
    network.disconnect(container)
    try:
        time.sleep(scenario["lost_timeout"] + 5)
    finally:
        network.connect(container)
    stack.wait_until("the task to finish", lambda: [r for r in stack.runs_of(task) if r["done"]], timeout=90)
    # Long enough for any other run to have finished too: lease expiry + a whole run.
    time.sleep(max(0.0, fault + scenario["lost_timeout"] + seconds + 5 - time.time()))
    runs = stack.runs_of(task)
    recovery.record(f"worker host cut off {scenario['lost_timeout'] + 5} s ({scenario['name']})",
                    runs[-1]["start"] - fault, runs=len(runs))
    for earlier, later in zip(runs, runs[1:]):
        assert earlier["last"] < later["start"], f"two runs of {task} overlapped: {runs}"
    done = [r for r in runs if r["done"]]
    assert len(done) == 1, f"the task completed {len(done)} times: {runs}"
    host = stack.workers[stack.worker_names.index(cut)]
    stack.wait_active(HANDOVER, host, timeout=120)
    journals = _journals_since(stack, since, stack.worker_names)
    assert "TimeLimitExceeded" not in journals, "a time limit fired on a task that did not exceed it"
