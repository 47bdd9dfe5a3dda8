# Managed by Ansible (celery_worker role): do not edit, changes are overwritten.
"""kombu's Redis transport, plus: a restarted worker returns its crashed predecessor's tasks at once.

Stock kombu keeps every delivered, unacknowledged message in the ``unacked`` hash until it
is acknowledged, or until the visibility timeout passes and some worker's sweep restores
it. A worker that is SIGKILLed, OOM-killed or loses power therefore holds its tasks for
the whole visibility timeout (an hour by default), although it is back in seconds.

This transport records, for every unacknowledged message, which worker process
(incarnation) received it: an ``unacked_owner`` hash entry written in the same
MULTI/EXEC pipeline as kombu's own ``unacked`` entry and removed in the same pipeline as
kombu's ack, so it costs no extra round trip. Each incarnation registers itself under its
node name (``CELERY_WORKER_NODENAME``, e.g. ``default@host``) and keeps a lease alive.

An incarnation is one consuming connection of one worker process: a worker that reconnects
after losing the broker (a broker restart) starts a new incarnation, and the messages its
dropped connection held (which kombu could not put back while the broker was down) are
returned by the new one, not after the visibility timeout.

When an incarnation of a node starts, it looks for earlier incarnations of the *same* node
that are dead: their lease expired, or the lease names a process on this machine that no
longer exists, or an earlier connection of this very process. For each message still owned by a dead incarnation it runs one WATCHed
transaction that re-checks the owner, removes the unacked entries and pushes the message
back to its queue, exactly as kombu's own restore does. Messages of live workers (other
owners) are never touched; when in doubt (a lease from another machine that has not
expired) nothing is restored and the visibility timeout stays the safety net.

Enabled when the worker unit sets CELERY_WORKER_NODENAME; not used with global_keyprefix.
"""

import json
import logging
import os
import time
import uuid

from kombu.transport import redis as kombu_redis
from kombu.transport import virtual
from kombu.utils.encoding import bytes_to_str
from kombu.utils.json import dumps, loads

logger = logging.getLogger("celery.reliable.redis")

NODE_ENV = "CELERY_WORKER_NODENAME"
OWNER_KEY = "unacked_owner"
INCARNATIONS_KEY = "unacked_incarnations:{node}"
LEASE_KEY = "unacked_lease:{token}"
LEASE_TTL = 30
TICK_SECONDS = 2

# The incarnation this process consumes through now (set when a connection joins the event
# loop); earlier connections of this process are dead incarnations.
_current = {"token": None, "timer": None}


def _machine_id():
    try:
        with open("/etc/machine-id", encoding="ascii") as fh:
            return fh.read().strip()
    except OSError:
        return ""


def _process_start(pid):
    """Start time of PID in clock ticks since boot (None if there is no such process)."""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii") as fh:
            stat = fh.read()
    except OSError:
        return None
    return int(stat.rsplit(")", 1)[1].split()[19])


def _lease_value(token):
    return json.dumps({"machine": _machine_id(), "pid": os.getpid(),
                       "start": _process_start(os.getpid()), "token": token})


def _lease_is_dead(raw):
    """Whether a lease proves its incarnation dead (False when in doubt)."""
    if raw is None:
        return True  # expired: no refresh for LEASE_TTL seconds
    try:
        lease = json.loads(bytes_to_str(raw))
    except ValueError:
        return False
    if lease.get("machine") != _machine_id() or not lease.get("machine"):
        return False  # another machine: wait for the lease to expire
    if lease.get("pid") == os.getpid() and lease.get("start") == _process_start(os.getpid()):
        return lease.get("token") != _current["token"]  # an earlier connection of this process
    return _process_start(lease.get("pid")) != lease.get("start")


class QoS(kombu_redis.QoS):
    """kombu's Redis QoS that also records the owning incarnation of each unacked message."""

    def append(self, message, delivery_tag):
        delivery = message.delivery_info
        exchange, routing_key = delivery["exchange"], delivery["routing_key"]
        with self.pipe_or_acquire() as pipe:
            pipe.zadd(self.unacked_index_key, {delivery_tag: time.time()})
            pipe.hset(self.unacked_key, delivery_tag, dumps([message._raw, exchange, routing_key]))
            if self.channel.fast_recovery_node:
                pipe.hset(OWNER_KEY, delivery_tag, self.channel.connection.fast_recovery_token)
            pipe.execute()
        virtual.QoS.append(self, message, delivery_tag)

    def _remove_from_indices(self, delivery_tag, pipe=None):
        # Ack, reject, restore and the visibility sweep all come through here.
        return super()._remove_from_indices(delivery_tag, pipe).hdel(OWNER_KEY, delivery_tag)


class Channel(kombu_redis.Channel):
    QoS = QoS

    @property
    def fast_recovery_node(self):
        if self.global_keyprefix:
            return None
        return os.environ.get(NODE_ENV) or None

    def recover_tag(self, client, tag, dead_token):
        """Return one message of a dead incarnation to its queue, atomically. True if pushed back."""
        pushed = []

        def transaction(pipe):
            owner = pipe.hget(OWNER_KEY, tag)
            if owner is None or bytes_to_str(owner) != dead_token:
                pipe.multi()  # delivered again, acked or restored meanwhile: leave it
                return
            payload = pipe.hget(self.unacked_key, tag)
            pipe.multi()
            pipe.zrem(self.unacked_index_key, tag)
            pipe.hdel(self.unacked_key, tag)
            pipe.hdel(OWNER_KEY, tag)
            if payload:
                message, exchange, routing_key = loads(bytes_to_str(payload))
                self._do_restore_message(message, exchange, routing_key, pipe)
                pushed.append(tag)

        client.transaction(transaction, OWNER_KEY, self.unacked_key)
        return bool(pushed)


class FastRecovery:
    """Lease and predecessor recovery of one worker process, driven by the event loop."""

    def __init__(self, channel, node, token):
        self.channel = channel
        self.node = node
        self.token = token
        self.incarnations_key = INCARNATIONS_KEY.format(node=node)
        self.registered = False

    def tick(self):
        try:
            with self.channel.conn_or_acquire() as client:
                client.set(LEASE_KEY.format(token=self.token), _lease_value(self.token), ex=LEASE_TTL)
                if not self.registered:
                    client.sadd(self.incarnations_key, self.token)
                    self.registered = True
                self.recover_dead_predecessors(client)
        except self.channel.connection_errors:
            logger.debug("fast recovery: broker unreachable, retrying", exc_info=True)

    def recover_dead_predecessors(self, client):
        for raw_token in client.smembers(self.incarnations_key):
            token = bytes_to_str(raw_token)
            if token == self.token or not _lease_is_dead(client.get(LEASE_KEY.format(token=token))):
                continue
            tags = [bytes_to_str(tag) for tag, owner in client.hscan_iter(OWNER_KEY)
                    if bytes_to_str(owner) == token]
            restored = sum(self.channel.recover_tag(client, tag, token) for tag in tags)
            if restored:
                logger.warning("Restored %d message(s) held by a dead earlier run or connection of %s",
                               restored, self.node)
            client.srem(self.incarnations_key, token)
            client.delete(LEASE_KEY.format(token=token))


class Transport(kombu_redis.Transport):
    Channel = Channel

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        # Owner of the messages consumed through this connection (see the module docstring).
        self.fast_recovery_token = uuid.uuid4().hex

    def register_with_event_loop(self, connection, loop):
        super().register_with_event_loop(connection, loop)
        if _current["timer"] is not None:
            _current["timer"].cancel()  # the tick of a connection this one replaces
            _current["timer"] = None
        if not os.environ.get(NODE_ENV):
            return
        # A channel of its own (closed with the connection), so no consumer's channel is borrowed.
        channel = self.Channel(self)
        self.channels.append(channel)
        node = channel.fast_recovery_node
        if not node:
            return
        _current["token"] = self.fast_recovery_token
        recovery = FastRecovery(channel, node, self.fast_recovery_token)
        recovery.tick()  # register and recover before the first poll
        _current["timer"] = loop.call_repeatedly(TICK_SECONDS, recovery.tick)
