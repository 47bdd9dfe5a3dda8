# Managed by Ansible (celery_worker role): do not edit, changes are overwritten.
"""systemd readiness and watchdog, fed only while the worker consumes.

The worker units are ``Type=notify`` with ``WatchdogSec=`` (celery_worker_watchdog_seconds).
This consumer step tells systemd:

- ``READY=1`` once the worker consumes for the first time, so that ``systemctl start`` and
  ``restart`` (the role's handlers, the rolling restart) return only when the worker takes
  tasks, and fail when it never does;
- ``WATCHDOG=1`` from a timer of the worker's event loop, each time it finds the worker
  consuming: the consumer running, its connection up, the fence deadline not passed
  (celery_reliable_fence.py), and the channel of its task consumer still taking messages
  (RabbitMQ: the channel open with at least one consumer the broker delivers to; Redis: a
  pop or idle wait answered within half the watchdog interval, or as many tasks held as the
  prefetch allows).

A worker that stops consuming (an event loop blocked or a frozen main process, a consumer
that never came back after a connection reset, a channel closed or a consumer cancelled by
the broker) stops feeding the watchdog. systemd then aborts it (SIGABRT: Python's
faulthandler writes every thread's stack to the journal) and restarts it; its tasks, never
acknowledged, come back. No thread feeds the watchdog: a stuck process feeds nothing.
``STATUS=`` says what the worker does (``systemctl status``), and why it stopped feeding.
"""

import logging
import os
import socket
import time

from celery import bootsteps
from celery.bootsteps import RUN

import celery_reliable_fence

logger = logging.getLogger("celery.reliable.watchdog")


def notify(state):
    """Send STATE to systemd's notification socket; False when not run by systemd."""
    address = os.environ.get("NOTIFY_SOCKET")
    if not address:
        return False
    if address.startswith("@"):
        address = "\0" + address[1:]  # abstract namespace
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
        sock.connect(address)
        sock.sendall(state.encode())
    return True


def watchdog_seconds():
    """The unit's WatchdogSec (0: none), as systemd passes it to the main process."""
    usec = os.environ.get("WATCHDOG_USEC")
    pid = os.environ.get("WATCHDOG_PID")
    if not usec or (pid and pid != str(os.getpid())):
        return 0.0
    return int(usec) / 1e6


def not_consuming(consumer, max_age):
    """None while CONSUMER consumes, else why not (in words)."""
    if consumer.blueprint is None or consumer.blueprint.state != RUN:
        return "the consumer is not running"
    connection = consumer.connection
    if connection is None or not connection.connected:
        return "no connection to the broker"
    if celery_reliable_fence.expired():
        return "the fence deadline passed"
    task_consumer = consumer.task_consumer
    channel = getattr(task_consumer, "channel", None)
    if channel is None:
        return "no task consumer"
    reliable_check = getattr(channel, "reliable_not_consuming", None)
    if reliable_check is not None:  # the bundle's Redis transport
        return reliable_check(max_age)
    if not getattr(channel, "is_open", False):
        return "the task channel is closed"
    if not getattr(channel, "callbacks", None):
        return "the broker delivers to no consumer of this worker"
    return None


class Watchdog(bootsteps.StartStopStep):
    """Consumer step: READY=1 once consuming, WATCHDOG=1 while consuming."""

    requires = ("celery.worker.consumer.tasks:Tasks",)

    def __init__(self, parent, **kwargs):
        super().__init__(parent, **kwargs)
        self.seconds = watchdog_seconds()
        self.ready = False
        self.reason = None
        self.tref = None

    def start(self, c):
        if not os.environ.get("NOTIFY_SOCKET"):
            return
        # A quarter of the interval: a late tick or two never trips it.
        every = min(max(self.seconds / 4, 0.5), 5.0) if self.seconds else 1.0
        self.tref = c.timer.call_repeatedly(every, self._tick, (c,))
        self._tick(c)

    def _tick(self, c):
        reason = not_consuming(c, max(self.seconds / 2, 2.0))
        try:
            if reason is None:
                queues = ",".join(sorted(q.name for q in c.task_consumer.queues))
                if not self.ready or self.reason is not None:
                    notify(f"READY=1\nSTATUS=Consuming {queues}")
                    if self.ready:
                        logger.warning("watchdog: consuming again (%s); feeding the watchdog", queues)
                self.ready = True
                if self.seconds:
                    notify("WATCHDOG=1")
            elif reason != self.reason:
                notify(f"STATUS=Not consuming: {reason}")
                if self.ready:  # before the first READY=1, TimeoutStartSec applies instead
                    logger.warning("watchdog: not consuming (%s); systemd restarts this worker if it "
                                   "does not consume again within %.0f s", reason, self.seconds)
        except OSError as error:  # never fatal: systemd restarts a worker that stops feeding
            logger.debug("watchdog: notification not sent: %r", error)
        self.reason = reason

    def stop(self, c):
        if self.tref is not None:
            self.tref.cancel()
            self.tref = None
        if self.ready and os.environ.get("NOTIFY_SOCKET"):
            try:
                notify(f"STATUS=Not consuming: the consumer stopped at {time.strftime('%H:%M:%S')}")
            except OSError:
                pass
        self.reason = "the consumer stopped"

    shutdown = stop
