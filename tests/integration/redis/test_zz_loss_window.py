"""Redis: no instant at which a delivered task exists nowhere (celery_reliable_redis.py).

Named test_zz_* so that it runs after the other tests: it fills Redis to maxmemory.

- A worker killed right after Redis answered its pop, before it did anything else (a
  test-only fault point in the transport): the task is in the unacked hash with its owner,
  and the restarted worker runs it. With kombu's pop-then-record the task is gone.
- A backlog that fills Redis to maxmemory (noeviction refuses the next publish), then the
  workers start: every accepted task completes exactly once. Stock kombu cannot even start
  a worker against a full Redis (its queue declaration runs in a MULTI/EXEC).
"""

import collections
import json
import time

from celery_stack import VENV

EXTRA = "celery-worker@extra.service"
DROP_IN_DIR = "/etc/systemd/system/celery-worker@extra.service.d"
FAULT_FILE = "/var/lib/celery/fault-after-pop"


def test_the_kombu_code_the_transport_relies_on_is_the_tested_one(stack):
    """The installed kombu matches the fingerprints of KOMBU_TESTED (a new kombu fails here)."""
    script = "import json, celery_reliable_redis as m; print(json.dumps(m.check_kombu()))"
    out = stack.run_as_worker(f"{VENV}/bin/python -c '{script}'")
    assert json.loads(out) == [], f"kombu internals differ from the tested release: {out}"


def test_kill_right_after_the_pop_loses_nothing(stack, recovery):
    worker = stack.worker
    worker.check_output(
        f"mkdir -p {DROP_IN_DIR} && printf '[Service]\\nEnvironment=CELERY_RELIABLE_FAULT_AFTER_POP_FILE={FAULT_FILE}\\n'"
        f" > {DROP_IN_DIR}/zz-fault.conf && systemctl daemon-reload && systemctl restart {EXTRA}")
    try:
        stack.wait_active(EXTRA)
        pid = stack.main_pid(EXTRA)
        worker.check_output(f"install -o celery -g celery /dev/null {FAULT_FILE}")
        fault = time.time()
        (task,) = stack.send(2, queue="extra")
        starts = stack.wait_runs(task, 1, timeout=60)
        stack.wait_runs(task, 1, event="done", timeout=30)
        recovery.record("SIGKILL between pop and record (fault point)", starts[0]["t"] - fault)
        assert not worker.file(FAULT_FILE).exists, "the fault point never fired"
        assert stack.main_pid(EXTRA) != pid, "the worker was not killed by the fault point"
        journal = worker.check_output(f"journalctl -u {EXTRA} --since=-120s --no-pager")
        assert "test fault point: SIGKILL right after a pop" in journal
        assert len(stack.runs(task, "done")) == 1
    finally:
        worker.run(f"rm -f {FAULT_FILE} {DROP_IN_DIR}/zz-fault.conf && systemctl daemon-reload "
                   f"&& systemctl restart {EXTRA}")
    stack.wait_active(EXTRA)


def test_a_backlog_past_maxmemory_drains_exactly_once(stack, recovery):
    worker = stack.worker
    units = "celery-worker@default.service celery-worker@extra.service"
    worker.check_output(f"systemctl stop {units}")
    since = int(time.time())
    try:
        ids, refusal = stack.send_fill("celery", 200_000, 5_000)
    finally:
        started = time.time()
        worker.check_output(f"systemctl start {units}")
    assert refusal and "maxmemory" in refusal, f"Redis never refused a publish: {refusal}"
    assert len(ids) >= 100, f"only {len(ids)} tasks fit before the refusal"

    def all_done():
        done = collections.Counter(e["id"] for e in stack.events() if e["event"] == "done")
        return done if all(done[i] for i in ids) else None

    done = stack.wait_until(f"all {len(ids)} tasks of the full backlog to complete", all_done, timeout=240, interval=3)
    recovery.record(f"backlog of {len(ids)} tasks past maxmemory drained", time.time() - started)
    starts = collections.Counter(e["id"] for e in stack.events() if e["event"] == "start")
    assert [i for i in ids if done[i] != 1] == [], "a task of the backlog completed more than once"
    assert [i for i in ids if starts[i] != 1] == [], "a task of the backlog ran more than once"
    stack.wait_until("the queue and the unacked hash to be empty",
                     lambda: stack.redis_counts("llen celery", "hlen unacked", "hlen unacked_owner") == [0, 0, 0],
                     timeout=60)
    journal = worker.check_output(f"journalctl -u celery-worker@default -u celery-worker@extra --since=@{since} --no-pager")
    fatal = [line for line in journal.splitlines() if "Unrecoverable error" in line or "Traceback" in line]
    assert fatal == [], "a worker failed on the full Redis:\n" + "\n".join(fatal)
