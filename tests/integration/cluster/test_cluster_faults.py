"""Faults of a scaled-out deployment under a steady stream of tasks; none may lose a task.

Each test streams 1 s tasks from the second worker host (through celery_reliable, with the
failover URL list and publisher confirms), injects its fault, stops the stream, and then
accounts for every task the broker confirmed: sent, completed, lost (never completed),
re-run (started more than once) and duplicated (completed more than once). The figures go
to the recovery report with the longest pause between two completions after the fault.
"""

import json
import time

UNIT = "rabbitmq-server.service"


def longest_pause(cluster, ids, since):
    """Longest time without any streamed task completing, from SINCE on."""
    wanted = set(ids)
    times = sorted(e["t"] for e in cluster.events()
                   if e["event"] == "done" and e["id"] in wanted and e["t"] >= since)
    times = [since] + times
    return max(b - a for a, b in zip(times, times[1:])) if len(times) > 1 else float("inf")


def run_stream_through(cluster, fault, after=20, seconds=1, interval=0.3):
    """Stream tasks, call FAULT() after 8 s, keep streaming AFTER s; return ids and timings."""
    cluster.wait_cluster_whole()
    stream = cluster.stream(seconds=seconds, interval=interval)
    time.sleep(8)
    t_fault = time.time()
    fault()
    time.sleep(after)
    ids, _ = stream.stop()
    return ids, t_fault


def test_node_sigkill_mid_stream_loses_no_task(cluster, recovery):
    """SIGKILL of the first node (every worker's and the producer's first URL), which then
    stays down, as a lost host would, until every streamed task is accounted for: the
    quorum queues carry on with two of three nodes (a classic queue on that node would
    hold its tasks until the node came back)."""
    node = cluster.nodes[0]

    def kill_and_keep_down():
        node.check_output(f"systemctl kill --signal=SIGKILL {UNIT}")
        node.run(f"systemctl stop {UNIT}")  # cancels systemd's automatic restart

    try:
        ids, t_fault = run_stream_through(cluster, kill_and_keep_down)
        counts = cluster.account(ids, timeout=240)
        pause = longest_pause(cluster, ids, t_fault)
        assert node.run(f"systemctl is-active {UNIT}").stdout.strip() != "active", \
            "the node came back during the test"
    finally:
        node.run(f"systemctl start {UNIT}")
    cluster.wait_cluster_whole()
    recovery.record("cluster node SIGKILL, kept down, under a stream", pause,
                    back_in_cluster=round(time.time() - t_fault, 1), **counts)

    assert counts["sent"] >= 30, counts
    assert counts["lost"] == 0, counts


def test_node_stop_mid_stream_loses_no_task(cluster, recovery):
    """systemctl stop of a node for 15 s, then start again."""
    node = cluster.nodes[1]

    def stop_then_start_later():
        node.check_output(f"systemctl stop {UNIT}")
        time.sleep(15)
        node.check_output(f"systemctl start {UNIT}")

    ids, t_fault = run_stream_through(cluster, stop_then_start_later, after=10)
    counts = cluster.account(ids, timeout=240)
    pause = longest_pause(cluster, ids, t_fault)
    cluster.wait_cluster_whole()
    recovery.record("cluster node stopped 15 s under a stream", pause, **counts)

    assert counts["sent"] >= 30, counts
    assert counts["lost"] == 0, counts


def test_rolling_restart_under_stream_loses_no_task(cluster, recovery):
    """playbooks/rolling_restart.yml (three nodes, then two worker hosts) under a stream."""
    outcome = {}

    def rolling_restart():
        started = time.time()
        outcome["rc"], outcome["output"] = cluster.playbook("playbooks/rolling_restart.yml")
        outcome["seconds"] = time.time() - started

    ids, t_fault = run_stream_through(cluster, rolling_restart, after=5, interval=0.5)
    assert outcome["rc"] == 0, outcome["output"][-12000:]
    counts = cluster.account(ids, timeout=300)
    pause = longest_pause(cluster, ids, t_fault)
    recovery.record("rolling restart (3 nodes, 2 worker hosts) under a stream", pause,
                    playbook_seconds=round(outcome["seconds"], 1), **counts)

    assert counts["sent"] >= 30, counts
    assert counts["lost"] == 0, counts
    # Every node left maintenance mode again.
    for node in cluster.nodes:
        status = json.loads(node.check_output("rabbitmq-diagnostics status --formatter json"))
        assert status["is_under_maintenance"] is False


def test_beat_fires_on_schedule_after_its_host_reboots(cluster, scenario, recovery):
    """Reboot of the beat host halfway between two ticks: the next tick comes on schedule
    (due INTERVAL after the last one, or at once if beat came back later), never twice."""
    interval = scenario["beat_interval"]
    host = cluster.workers[cluster.worker_names.index(scenario["beat_host"])]

    def ticks():
        return sorted(e["t"] for e in cluster.events() if e["event"] == "tick")

    begin = time.time()
    cluster.wait_until("a tick", lambda: [t for t in ticks() if t > begin], timeout=2 * interval + 30)
    last = ticks()[-1]
    time.sleep(max(0.0, last + interval / 2 - time.time()))
    t_fault = time.time()
    cluster.reboot(scenario["beat_host"], stop_timeout=cluster.stop_timeout() + 30)
    cluster.wait_booted(host)
    cluster.wait_active("celery-beat.service", host)
    t_active = time.time()
    cluster.wait_until("two ticks after the reboot",
                       lambda: len([t for t in ticks() if t > t_fault]) >= 2, timeout=3 * interval + 60)
    times = [t for t in ticks() if t >= last]
    gaps = [round(b - a, 1) for a, b in zip(times, times[1:])]
    due = max(last + interval, t_active)
    recovery.record("beat host reboot: gap between the ticks around it", gaps[0],
                    interval=interval, gaps=gaps, beat_back_after_last_tick=round(t_active - last, 1),
                    next_tick_after_due=round(times[1] - due, 1))

    # On schedule: the persisted schedule knows the last run, so the next tick is due
    # INTERVAL after it (or at once if beat came back later), not INTERVAL after beat came
    # back, as it would be with a schedule file that did not survive the reboot.
    assert times[1] <= due + 5, (gaps, round(t_active - last, 1))
    # Never twice: no two ticks closer than the interval (minus the jitter of the queue).
    assert min(gaps) > interval - 4, gaps
