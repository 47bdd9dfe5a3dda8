# Managed by Ansible (celery_worker role): do not edit, changes are overwritten.
"""Fencing: no task keeps running here once the broker may have given it to another worker.

A worker that loses the broker (a partition, a frozen main process, a broker that does not
answer) keeps running its tasks, while the broker side eventually declares the worker dead
and returns its unacknowledged tasks to other workers (on Redis, once this worker process's
lease expired; on RabbitMQ, once its heartbeat timer ran out). What knows that deadline
publishes it here with ``set_deadline()`` each time it renews it (the Redis transport when
it renews its lease, celery_reliable_amqp.py when an echo came back); after the deadline:

- every pool process that runs a task kills itself (a thread checks twice a second, and a
  task that would start after the deadline never starts): the task is not running here
  any more when it starts elsewhere;
- the main process kills itself too (systemd restarts the unit, whose new run starts
  clean: nothing it held in memory runs late).

The deadline lives in one page of memory shared with the pool processes (created when this
module is imported, before the pool forks), so that pool processes enforce it even while
the main process is stopped (SIGSTOP) or its event loop is blocked. Monotonic clock
(CLOCK_MONOTONIC is one clock for every process of the machine). No deadline (infinity)
until a transport sets one.
"""

import logging
import math
import mmap
import os
import signal
import struct
import threading
import time

logger = logging.getLogger("celery.reliable.fence")

CHECK_SECONDS = 0.5
_shared = mmap.mmap(-1, mmap.PAGESIZE)
_shared[:8] = struct.pack("d", math.inf)
_state = {"running": False, "watchdog": None}


def deadline():
    return struct.unpack("d", _shared[:8])[0]


def expired():
    return time.monotonic() > deadline()


def set_deadline(value):
    """Publish a new deadline (monotonic seconds); a passed deadline is never moved."""
    if expired():
        return False
    _shared[:8] = struct.pack("d", value)
    _start_watchdog(main=True)
    return True


def clear():
    """Lift the deadline (no broker holds this worker to one now), unless it already passed."""
    if expired():
        return False
    _shared[:8] = struct.pack("d", math.inf)
    return True


def _kill_self(why):
    logger.critical("fence: %s; killing this process (pid %d)", why, os.getpid())
    logging.shutdown()
    os.kill(os.getpid(), signal.SIGKILL)


def _watch(main):
    while True:
        time.sleep(CHECK_SECONDS)
        if not expired():
            continue
        late = time.monotonic() - deadline()
        if main:
            _kill_self(f"the broker may have handed this worker's tasks to another worker "
                       f"({late:.1f} s past the deadline)")
        elif _state["running"]:
            _kill_self(f"a task still runs {late:.1f} s past the deadline")


def _start_watchdog(main):
    if _state["watchdog"] is None or _state["watchdog"][0] != os.getpid():
        thread = threading.Thread(target=_watch, args=(main,), name="celery-reliable-fence", daemon=True)
        thread.start()
        _state["watchdog"] = (os.getpid(), thread)


def connect(signals):
    """Hook the pool processes into the fence (celery.signals)."""

    @signals.worker_process_init.connect(weak=False)
    def _pool_process_started(**_):
        _state["running"] = False
        _start_watchdog(main=False)

    @signals.task_prerun.connect(weak=False)
    def _task_starts(**_):
        if expired():
            _kill_self("a task would start past the deadline")
        _state["running"] = True

    @signals.task_postrun.connect(weak=False)
    def _task_ended(**_):
        _state["running"] = False
