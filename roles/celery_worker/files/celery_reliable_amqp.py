# Managed by Ansible (celery_worker role): do not edit, changes are overwritten.
"""RabbitMQ: a worker stops its tasks before the broker can hand them to another worker.

RabbitMQ closes a worker's connection, and requeues its unacknowledged tasks for other
workers, between 2 and 3 heartbeat timeouts after the last bytes it received from it (its
heartbeat receiver checks once per timeout and gives up after two silent checks).
py-amqp gives up later, after 2.5 timeouts without data, and a worker cut off the network
keeps running its tasks until then: the same task could run on two hosts.

This consumer step closes that window. Once a second, from the worker's event loop, it
publishes a small message to a queue of its own on the consumer connection and consumes it
back. Each echo that comes back proves a round trip through the broker on that
connection; the fence deadline (celery_reliable_fence.py) then moves to the echo's send
time + ``CELERY_WORKER_AMQP_FENCE_SECONDS`` (derived in the celery role, below twice the
heartbeat). A worker cut off the network, a frozen main process and an event loop blocked
on the broker renew nothing, so their tasks stop before the broker's timer runs out.
The echo messages also count as traffic for the broker, so it never gives up on a
connection whose worker is alive and reachable.

The queue is ``celery.reliable.echo.<node name>.<random>``, exclusive (it goes with the
connection) and new for every connection: a queue of the node name alone would stay locked
by the previous connection until the broker has cleaned that connection up (a moment after a
node's shutdown or maintenance, up to the heartbeat timeout after a power cycle), and every
declaration in between would fail and restart the consumer. The echo also keeps data in flight from the broker to every worker: when a
worker host is power-cycled (its connections never closed), the broker's next
retransmission reaches the host once it is back, the host answers with a reset, and the
broker requeues the dead connection's tasks at once rather than after 2 to 3 heartbeats.

Publishes go out without publisher confirms (``_basic_publish``), so an echo never waits
for the broker: the event loop never blocks on it.
"""

import logging
import os
import time
import uuid

import amqp
from celery import bootsteps

import celery_reliable_fence

logger = logging.getLogger("celery.reliable.amqp")

ECHO_SECONDS = 1.0
QUEUE_PREFIX = "celery.reliable.echo."


def _publish(channel, queue, body):
    # The unconfirmed publish of py-amqp (the confirmed one waits for the broker's ack).
    amqp.Channel._basic_publish(channel, amqp.Message(body), exchange="", routing_key=queue)


class Echo(bootsteps.StartStopStep):
    """Consumer step: echo through the broker every second and renew the fence."""

    requires = ("celery.worker.consumer:Connection",)

    def __init__(self, parent, **kwargs):
        super().__init__(parent, **kwargs)
        self.fence_seconds = float(os.environ.get("CELERY_WORKER_AMQP_FENCE_SECONDS") or 0)
        self.channel = None
        self.queue = None
        self.tref = None

    def start(self, c):
        if self.fence_seconds <= 0 or c.connection.transport.driver_type != "amqp":
            return
        self.queue = f"{QUEUE_PREFIX}{c.hostname}.{uuid.uuid4().hex[:12]}"
        self.channel = c.connection.channel()
        self.channel.queue_declare(queue=self.queue, durable=False, exclusive=True, auto_delete=True)
        self.channel.basic_consume(queue=self.queue, no_ack=True, callback=self._on_echo)
        self.tref = c.timer.call_repeatedly(ECHO_SECONDS, self._send)

    def _send(self):
        try:
            _publish(self.channel, self.queue, repr(time.monotonic()).encode())
        except Exception as exc:  # the event loop sees the connection error itself
            logger.debug("fence: echo not sent: %r", exc)

    def _on_echo(self, message):
        try:
            sent = float(bytes(message.body).decode())
        except (TypeError, ValueError, UnicodeDecodeError):
            return  # not a round trip of ours
        celery_reliable_fence.set_deadline(sent + self.fence_seconds)

    def stop(self, c):
        if self.tref is not None:
            self.tref.cancel()
            self.tref = None
        if self.channel is not None:
            # The connection was lost (Celery has cancelled the running tasks itself:
            # worker_cancel_long_running_tasks_on_connection_loss) or the worker drains
            # before it stops (its tasks must be allowed to finish): lift the deadline,
            # unless it already passed. The channel goes with the connection.
            celery_reliable_fence.clear()
            self.channel = None

    shutdown = stop
