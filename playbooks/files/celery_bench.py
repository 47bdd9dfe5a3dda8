# Managed by Ansible (playbooks/bench_throughput.yml): installed for a benchmark, removed after it.
"""No-op (or short, sleeping) tasks for the throughput benchmark.

As a worker application: the benchmark starts instances of the bundle's own worker unit,
``celery-worker@bench-reliable`` (the bundle's settings) and ``celery-worker@bench-defaults``
(the settings file replaced by ``{}``: Celery's defaults, early acknowledgement, prefetch 4),
whose environment names this module as the application. Each no-op task appends one byte
to ``CELERY_BENCH_COUNT_FILE``, so the benchmark counts completions without the broker.

As a command, run by the benchmark as root on a worker host:

    celery_bench.py CONFIG_DIR LIB_DIR APP_DIR INSTANCE drain COUNT TIMEOUT [TASK_SECONDS]

stops ``celery-worker@INSTANCE``, queues COUNT tasks on its queue (each sleeps TASK_SECONDS,
default 0: no-op), starts it and prints (JSON) how fast it drained them: from the first
completion to the last, and from the start of the unit to the last.
"""

import json
import os
import subprocess
import sys
import time

from celery import Celery

COUNT_FILE = os.environ.get("CELERY_BENCH_COUNT_FILE", "/var/lib/celery/bench/count")
TASK_NAME = "celery_bench.noop"

app = Celery("celery_bench")
_fd = []


@app.task(name=TASK_NAME)
def noop(seconds=0):
    """Sleep that long, then count one completion (one byte, O_APPEND: atomic across the pool's processes)."""
    if seconds:
        time.sleep(seconds)
    if not _fd:
        _fd.append(os.open(COUNT_FILE, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o640))
    os.write(_fd[0], b".")


def _count():
    try:
        return os.path.getsize(os.environ["CELERY_BENCH_COUNT_FILE"])
    except FileNotFoundError:
        return 0


def drain(ctx, instance, count, timeout, task_seconds=0):
    import celery_reliable_tools  # noqa: E402  (the worker role's helpers, on sys.path in main)

    count, timeout, task_seconds = int(count), float(timeout), float(task_seconds)
    unit = f"celery-worker@{instance}.service"
    queue = os.environ["CELERY_WORKER_QUEUES"]
    subprocess.run(["systemctl", "stop", unit], check=True)
    try:  # the worker's pool processes create it afresh (as the worker user)
        os.unlink(os.environ["CELERY_BENCH_COUNT_FILE"])
    except FileNotFoundError:
        pass
    published = time.time()
    celery_reliable_tools.send(ctx, TASK_NAME, count, queue, args=[task_seconds] if task_seconds else [])
    published = time.time() - published
    started = time.time()
    # --no-block: the unit is Type=notify, and its worker may drain the whole queue before
    # it reports ready; the counting must run meanwhile.
    subprocess.run(["systemctl", "start", "--no-block", unit], check=True)
    first = None
    deadline = started + timeout
    while time.time() < deadline:
        done = _count()
        if done and first is None:
            first = (time.time(), done)
        if done >= count:
            break
        time.sleep(0.02)
    last = time.time()
    done = _count()
    subprocess.run(["systemctl", "stop", unit], check=True)
    steady = (done - first[1]) / (last - first[0]) if first and last > first[0] else 0.0
    return {"instance": instance, "count": count, "task_seconds": task_seconds, "completed": done,
            "publish_seconds": round(published, 2), "seconds": round(last - started, 2),
            "tasks_per_second": round(steady, 1),
            "tasks_per_second_with_startup": round(done / (last - started), 1)}


def main(argv):
    config_dir, lib_dir, app_dir, instance, command, *args = argv
    sys.path[:0] = [lib_dir, app_dir]
    import celery_reliable_tools  # noqa: E402  (the worker role's helpers)

    # The workers' environment and loader: same URL, same settings.
    celery_reliable_tools.load_worker_env(config_dir, instance)
    if command != "drain":
        sys.exit(f"unknown command {command!r}")
    print(json.dumps(drain(celery_reliable_tools.worker_app(), instance, *args)))


if __name__ == "__main__":
    main(sys.argv[1:])
