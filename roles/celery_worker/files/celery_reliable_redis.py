# Managed by Ansible (celery_worker role): do not edit, changes are overwritten.
"""kombu's Redis transport without a loss window, plus fast recovery of a crashed worker's tasks.

1. Atomic delivery. Stock kombu takes a message with BRPOP and records it in its
   ``unacked`` hash afterwards, in a second round trip. A worker killed between the two
   (or a broker that goes away between them, or a Redis at ``maxmemory`` that refuses the
   second write with OOM) loses the message: it is in no queue and in no hash. Here one Lua
   script pops the message *and* records it (``unacked``, ``unacked_index`` and the owner)
   in the same atomic step on the server. The script is flagged ``allow-oom``: a full
   Redis (``noeviction``) still lets consumers drain the backlog, since each step moves a
   message from a list into the hash (the bookkeeping adds about 150 bytes per message in
   flight). Requeues (reject, the visibility sweep, shutdown, fast recovery) are one script
   too: check the entry, remove it from the hash and push it back, atomically.

   Scripts cannot block, so an idle consumer waits on the server with
   ``BLMOVE q q RIGHT RIGHT`` on the first queue of its rotation, which returns as soon as
   a message arrives there and moves nothing (a queue to itself, right to right), or after
   ``reliable_idle_wait`` seconds (default 0.25), then pops with the script again. Messages
   on the other queues and priority levels of the consumer are seen within that wait.

2. Fast recovery. Every unacknowledged message also records which worker process
   (incarnation) received it, in an ``unacked_owner`` hash entry written by the same
   script and removed with the ack. Each incarnation registers itself in the
   ``unacked_incarnations`` set and renews a lease (``unacked_lease:TOKEN``) every 2 s;
   ``reliable_lease_seconds`` after its last renewal the lease expires. An incarnation is
   one consuming connection of one worker process: a worker that reconnects after losing
   the broker starts a new incarnation, and the messages its dropped connection held are
   returned by the new one.

   Every live worker returns the messages of dead incarnations to their queues: those
   whose lease expired (a host that never came back: another host runs its tasks within
   the lease and a tick), and at once those of this machine whose process no longer
   exists (a restarted worker returns what its crashed run held) or that were an earlier
   connection of this very process. Each return is one script that re-checks the owner.

3. Delivery limit. Each return of a message to its queue (a pool process that died under
   it, a worker killed or stopped while it ran) adds one to its ``x-delivery-count``
   header, as RabbitMQ's quorum queues do. A message returned more than
   ``reliable_delivery_limit`` times (a task that kills its worker every time) goes to the
   ``reliable_dead_letter_queue`` list instead, with ``x-first-death-reason`` set to
   ``delivery_limit`` and ``x-first-death-queue`` to its queue, in the same atomic step:
   it is delivered limit + 1 times in all, then waits there for an operator
   (playbooks/dead_letters.yml lists and replays it). 0 turns the limit off.

4. Fencing (celery_reliable_fence.py). A lease is renewed only while it still exists (SET
   XX): once expired it never comes back, and its worker knows it is dead. A worker that
   could not renew its lease for ``reliable_fence_seconds`` (a partition, a frozen main
   process) kills its running tasks and restarts before the lease can expire, so that no
   task runs here while another host runs it again. Both numbers are derived in the celery
   role (celery_broker_redis_lease_seconds, celery_worker_redis_fence_seconds).

Every server error of the periodic work (OOM, a broker restarting) is logged and retried.
Not used with kombu's ``global_keyprefix`` (stock kombu behaviour then). Needs Redis 7.0+
(script flags) or Valkey. The kombu internals this module relies on are fingerprinted in
``KOMBU_TESTED``; ``check_kombu()`` lists what changed (the role's tests call it).
"""

import collections
import hashlib
import inspect
import json
import logging
import math
import os
import signal
import socket
import threading
import time
import uuid

import kombu
from kombu.utils.objects import cached_property
from kombu.transport import redis as kombu_redis
from kombu.transport import virtual
from kombu.utils.encoding import bytes_to_str
from kombu.utils.json import dumps, loads

import celery_reliable_fence

logger = logging.getLogger("celery.reliable.redis")

NODE_ENV = "CELERY_WORKER_NODENAME"
FAST_RECOVERY_ENV = "CELERY_WORKER_FAST_RECOVERY"
OWNER_KEY = "unacked_owner"
INCARNATIONS_KEY = "unacked_incarnations"
LEGACY_INCARNATIONS_KEY = "unacked_incarnations:{node}"  # per node, before the shared set
LEASE_KEY = "unacked_lease:{token}"
TICK_SECONDS = 2
UNROUTABLE_KEY = "celery_reliable.unroutable"  # requeued messages whose queue no longer exists
IDLE_KEY = "_celery_reliable.idle"  # never written: a server-side sleep when Redis is full
# Test-only fault point: when this variable names a file and the file exists, the worker
# removes it and SIGKILLs itself right after Redis answered a pop, before anything else.
FAULT_FILE = os.environ.get("CELERY_RELIABLE_FAULT_AFTER_POP_FILE") or None

# KEYS: unacked hash, unacked index, owner hash, then the queue keys in consumption order.
# ARGV: owner token ('' records no owner). Returns {queue key, payload} or false.
POP_SCRIPT = """#!lua flags=allow-oom
for i = 4, #KEYS do
  local item = redis.call('RPOP', KEYS[i])
  if item then
    local ok, msg = pcall(cjson.decode, item)
    local props = ok and type(msg) == 'table' and msg['properties']
    local tag = type(props) == 'table' and props['delivery_tag']
    if type(tag) ~= 'string' then
      redis.call('RPUSH', KEYS[i], item)  -- not a kombu message: leave it where it was
      return redis.error_reply('celery_reliable: undecodable message in ' .. KEYS[i])
    end
    local info = type(props['delivery_info']) == 'table' and props['delivery_info'] or {}
    local now = redis.call('TIME')
    redis.call('ZADD', KEYS[2], tonumber(now[1]) + tonumber(now[2]) / 1000000, tag)
    redis.call('HSET', KEYS[1], tag, '[' .. item .. ',' .. cjson.encode(info['exchange'] or '')
                                      .. ',' .. cjson.encode(info['routing_key'] or '') .. ']')
    if ARGV[1] ~= '' then
      redis.call('HSET', KEYS[3], tag, ARGV[1])
    end
    return {KEYS[i], item}
  end
end
return false
"""

# KEYS: unacked hash, unacked index, owner hash, then the queue keys to push to.
# ARGV: delivery tag, the unacked entry as read ('' if there was none), the message to
# push, '1' to LPUSH (kombu's "leftmost": behind the waiting messages) or '0' to RPUSH (the
# next to be consumed), the expected owner ('' for any). Returns 1 if pushed back.
RESTORE_SCRIPT = """#!lua flags=allow-oom
local entry = redis.call('HGET', KEYS[1], ARGV[1])
if ARGV[2] == '' then
  if not entry then  -- an index or owner entry left without its message: tidy up
    redis.call('ZREM', KEYS[2], ARGV[1])
    redis.call('HDEL', KEYS[3], ARGV[1])
  end
  return 0
end
if entry ~= ARGV[2] then
  return 0
end
if ARGV[5] ~= '' and redis.call('HGET', KEYS[3], ARGV[1]) ~= ARGV[5] then
  return 0
end
redis.call('ZREM', KEYS[2], ARGV[1])
redis.call('HDEL', KEYS[1], ARGV[1])
redis.call('HDEL', KEYS[3], ARGV[1])
for i = 4, #KEYS do
  if ARGV[4] == '1' then
    redis.call('LPUSH', KEYS[i], ARGV[3])
  else
    redis.call('RPUSH', KEYS[i], ARGV[3])
  end
end
return 1
"""

# KEYS: unacked hash, unacked index, owner hash. ARGV: delivery tag. The ack: allowed on a
# full Redis (a MULTI/EXEC is refused there whatever it holds, so kombu's ack would be).
ACK_SCRIPT = """#!lua flags=allow-oom
redis.call('ZREM', KEYS[2], ARGV[1])
redis.call('HDEL', KEYS[3], ARGV[1])
return redis.call('HDEL', KEYS[1], ARGV[1])
"""

# KEYS: binding set, permanent binding set. ARGV: member. A queue binding (idempotent, a
# few bytes), allowed on a full Redis so that a worker can start and drain it.
BIND_SCRIPT = """#!lua flags=allow-oom
redis.call('SADD', KEYS[1], ARGV[1])
return redis.call('SADD', KEYS[2], ARGV[1])
"""

# KEYS: lease key, incarnations set. ARGV: lease value, TTL, token, 'renew' or 'register'.
# A renewal succeeds only while the lease exists: an expired lease never comes back.
# Allowed on a full Redis, so that a full broker never makes a live worker look dead.
LEASE_SCRIPT = """#!lua flags=allow-oom
if ARGV[4] == 'renew' then
  if not redis.call('SET', KEYS[1], ARGV[1], 'XX', 'EX', tonumber(ARGV[2])) then
    return 0
  end
else
  redis.call('SET', KEYS[1], ARGV[1], 'EX', tonumber(ARGV[2]))
end
redis.call('SADD', KEYS[2], ARGV[3])
return 1
"""

_SRC = {"pop": POP_SCRIPT, "restore": RESTORE_SCRIPT, "ack": ACK_SCRIPT, "bind": BIND_SCRIPT,
        "lease": LEASE_SCRIPT}
_SHA = {name: hashlib.sha1(src.encode()).hexdigest() for name, src in _SRC.items()}

# The incarnation this process consumes through now (set when a connection joins the event
# loop); earlier connections of this process are dead incarnations.
_current = {"token": None, "timer": None, "recovery": None}


def _run_script(client, name, keys, args):
    """EVALSHA, loading the script on NOSCRIPT (a restarted Redis has forgotten it)."""
    try:
        return client.evalsha(_SHA[name], len(keys), *keys, *args)
    except kombu_redis.redis.exceptions.NoScriptError:
        return client.eval(_SRC[name], len(keys), *keys, *args)


def _int(value):
    try:
        return int(value or 0)
    except (TypeError, ValueError):
        return 0


def _read(path):
    try:
        with open(path, encoding="ascii") as fh:
            return fh.read().strip()
    except OSError:
        return ""


def _machine_id():
    """This boot of this machine: machine id, boot id and host name (a clone differs in one)."""
    return "/".join((_read("/etc/machine-id"), _read("/proc/sys/kernel/random/boot_id"), socket.gethostname()))


def _process_start(pid):
    """Start time of PID in clock ticks since boot (None if there is no such process)."""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii") as fh:
            stat = fh.read()
    except (OSError, TypeError):
        return None
    return int(stat.rsplit(")", 1)[1].split()[19])


def _lease_value(token):
    return json.dumps({"machine": _machine_id(), "pid": os.getpid(),
                       "start": _process_start(os.getpid()), "token": token})


def _lease_is_dead(raw):
    """Whether a lease proves its incarnation dead (False when in doubt)."""
    if raw is None:
        return True  # expired: not renewed for reliable_lease_seconds, and never will be
    try:
        lease = json.loads(bytes_to_str(raw))
    except ValueError:
        return False
    if lease.get("machine") != _machine_id() or not lease.get("machine"):
        return False  # another machine: wait for the lease to expire
    if lease.get("pid") == os.getpid() and lease.get("start") == _process_start(os.getpid()):
        return lease.get("token") != _current["token"]  # an earlier connection of this process
    return _process_start(lease.get("pid")) != lease.get("start")


_warned = {}


def _warn_sometimes(what, error, every=60):
    """Log a refused periodic step at most once a minute per kind."""
    now = time.monotonic()
    if now - _warned.get(what, -every) >= every:
        _warned[what] = now
        logger.warning("%s: Redis refused it (%s); retrying", what, error)


def _fault_after_pop():
    if FAULT_FILE and os.path.exists(FAULT_FILE):
        os.unlink(FAULT_FILE)
        logger.error("test fault point: SIGKILL right after a pop")
        os.kill(os.getpid(), signal.SIGKILL)


class QoS(kombu_redis.QoS):
    """kombu's Redis QoS whose bookkeeping is written atomically with the pop (see above)."""

    def append(self, message, delivery_tag):
        recorded = self.channel.connection.reliable_recorded
        if delivery_tag in recorded:
            recorded.discard(delivery_tag)  # written by the pop script already
            virtual.QoS.append(self, message, delivery_tag)
            return
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
        # Reject without requeue and the global_keyprefix fallback come through here.
        return super()._remove_from_indices(delivery_tag, pipe).hdel(OWNER_KEY, delivery_tag)

    def ack(self, delivery_tag):
        if not self.channel.reliable:
            return super().ack(delivery_tag)
        with self.channel.conn_or_acquire() as client:
            _run_script(client, "ack", self.channel._bookkeeping_keys(), [delivery_tag])
        virtual.QoS.ack(self, delivery_tag)

    def reject(self, delivery_tag, requeue=False):
        if requeue or not self.channel.reliable:
            return super().reject(delivery_tag, requeue)
        self.ack(delivery_tag)  # dropped on purpose (requeue=False): the same removal

    def restore_unacked(self, client=None):
        # At channel close kombu returns the unacknowledged messages. When the broker went
        # away, Celery has already closed the connection (the transport has no client left)
        # and kombu's restore would end the worker with an AttributeError. The messages stay
        # in the unacked hash instead, where this worker's reconnection (a new token: the
        # old one is a dead incarnation) or the visibility sweep returns them.
        if client is None and getattr(self.channel.connection, "client", None) is None:
            logger.warning("connection closed before its channel: %d unacknowledged message(s) "
                           "left in the unacked hash, returned on reconnection", len(self._delivered))
            return None
        return super().restore_unacked(client)

    def restore_visible(self, *args, **kwargs):
        # The visibility sweep takes a lock with SET, which a full Redis refuses: skip the
        # sweep until there is room again (nothing is lost meanwhile, it is only later).
        try:
            return super().restore_visible(*args, **kwargs)
        except self.channel.ResponseError as error:
            _warn_sometimes("visibility sweep", error)

    def restore_by_tag(self, tag, client=None, leftmost=False):
        # Reject with requeue, the visibility sweep and the restore at shutdown.
        if not self.channel.reliable:
            return super().restore_by_tag(tag, client, leftmost)
        with self.channel.conn_or_acquire(client) as client:
            self.channel.restore_atomically(client, bytes_to_str(tag), leftmost=leftmost)


class Channel(kombu_redis.Channel):
    QoS = QoS
    reliable_idle_wait = 0.25
    reliable_lease_seconds = 45
    reliable_fence_seconds = 35
    reliable_delivery_limit = 0  # returns after which a message is dead-lettered; 0: never
    reliable_dead_letter_queue = "celery.dlq"
    from_transport_options = kombu_redis.Channel.from_transport_options + (
        "reliable_idle_wait", "reliable_lease_seconds", "reliable_fence_seconds",
        "reliable_delivery_limit", "reliable_dead_letter_queue")
    _reliable_waiting = False  # the pending command is the idle wait, not a pop
    _reliable_full = False     # Redis refused the idle wait with OOM: sleep on IDLE_KEY
    _reliable_command = None
    _reliable_no_ack = frozenset()
    _reliable_get_no_ack = False
    _reliable_answered_at = -math.inf  # monotonic time of the last answer to a pop or wait

    @property
    def reliable(self):
        return not self.global_keyprefix

    @property
    def reliable_consume(self):
        # Consumers without acknowledgement (Celery's remote-control replies) keep kombu's
        # plain BRPOP: there is nothing to record for them.
        return self.reliable and not (self._reliable_no_ack & set(self._active_queues))

    def basic_consume(self, queue, no_ack, *args, **kwargs):
        if no_ack:
            self._reliable_no_ack = self._reliable_no_ack | {queue}
        else:
            self._reliable_no_ack = self._reliable_no_ack - {queue}
        return super().basic_consume(queue, no_ack, *args, **kwargs)

    @property
    def fast_recovery_node(self):
        if self.global_keyprefix or os.environ.get(FAST_RECOVERY_ENV) != "1":
            return None
        return os.environ.get(NODE_ENV) or None

    def _owner_token(self):
        return self.connection.fast_recovery_token if self.fast_recovery_node else ""

    def _bookkeeping_keys(self):
        return [self.unacked_key, self.unacked_index_key, OWNER_KEY]

    # --------------------------------------------------------------- delivery ---
    def _brpop_start(self, timeout=None):
        if not self.reliable_consume:
            self._reliable_command = None
            return super()._brpop_start(timeout)
        queues = self._queue_cycle.consume(len(self.active_queues))
        if not queues:
            return
        keys = [self._q_for_pri(queue, pri) for pri in self.priority_steps for queue in queues]
        if self._reliable_waiting:
            # Nothing was there at the last pop: wait on the server until a message
            # arrives on the first queue (moved onto itself, so nothing leaves the list).
            if self._reliable_full:
                command = ["BRPOP", IDLE_KEY, self.reliable_idle_wait]
            else:
                command = ["BLMOVE", keys[0], keys[0], "RIGHT", "RIGHT", self.reliable_idle_wait]
        else:
            command = ["EVALSHA", _SHA["pop"], len(keys) + 3, *self._bookkeeping_keys(), *keys,
                       self._owner_token()]
        self._in_poll = self.client.connection
        self._brpop_sent_at = time.monotonic()
        self._reliable_command = command[0]
        self.client.connection.send_command(*command)

    def _brpop_read(self, **options):
        self._reliable_answered_at = time.monotonic()  # the server answered a pop or a wait
        command = self._reliable_command
        if command is None:
            return super()._brpop_read(**options)
        try:
            try:
                reply = self.client.parse_response(self.client.connection, command, **options)
            except self.connection_errors:
                self.client.connection.disconnect()
                raise
            except self.ResponseError as error:
                return self._reliable_error(command, error)
            if command != "EVALSHA":
                self._reliable_waiting = False  # woken up or timed out: pop again
                self._reliable_full = False
                raise kombu_redis.Empty()
            if not reply:
                self._reliable_waiting = True
                raise kombu_redis.Empty()
            _fault_after_pop()
            dest, item = bytes_to_str(reply[0]), bytes_to_str(reply[1])
            payload = loads(item)
            self.connection.reliable_recorded.add(payload["properties"]["delivery_tag"])
            dest = dest.rsplit(self.sep, 1)[0]
            self._queue_cycle.rotate(dest)
            self.connection._deliver(payload, dest)
            return True
        finally:
            self._in_poll = None
            self._flush_brpop_reauth()

    def reliable_not_consuming(self, max_age):
        """None while this channel consumes, else why not (celery_reliable_watchdog.py).

        Consuming: a pop or an idle wait was answered within MAX_AGE seconds (an idle
        channel is answered every reliable_idle_wait, a busy one at each message), or the
        channel holds as many messages as its prefetch allows (it pops nothing then).
        """
        if self.closed:
            return "the task channel is closed"
        if not self._active_queues:
            return "this worker consumes no queue"
        if not self.qos.can_consume():
            return None
        age = time.monotonic() - self._reliable_answered_at
        if age == math.inf:
            return "Redis has answered no pop yet"
        if age > max_age:
            return f"Redis has answered no pop for {age:.0f} s"
        return None

    def _reliable_error(self, command, error):
        exceptions = kombu_redis.redis.exceptions
        if isinstance(error, exceptions.NoScriptError) or "NOSCRIPT" in str(error):
            with self.conn_or_acquire() as client:
                client.script_load(POP_SCRIPT)  # a restarted Redis: load it, pop again
        elif command == "BLMOVE" and isinstance(error, exceptions.OutOfMemoryError):
            self._reliable_full = True  # BLMOVE is refused on a full Redis, BRPOP is not
        else:
            _warn_sometimes(f"consuming ({command})", error)
            self._reliable_waiting = True  # wait reliable_idle_wait on IDLE_KEY, then again
            self._reliable_full = True
        raise kombu_redis.Empty()

    def basic_get(self, queue, no_ack=False, **kwargs):
        self._reliable_get_no_ack = no_ack
        try:
            return super().basic_get(queue, no_ack, **kwargs)
        finally:
            self._reliable_get_no_ack = False

    def _get(self, queue):
        # basic_get (synchronous): the same atomic pop over the queue's priority levels.
        if not self.reliable or self._reliable_get_no_ack or queue in self._reliable_no_ack:
            return super()._get(queue)
        keys = [self._q_for_pri(queue, pri) for pri in self.priority_steps]
        with self.conn_or_acquire() as client:
            reply = _run_script(client, "pop", self._bookkeeping_keys() + keys, [self._owner_token()])
        if not reply:
            raise kombu_redis.Empty()
        payload = loads(bytes_to_str(reply[1]))
        self.connection.reliable_recorded.add(payload["properties"]["delivery_tag"])
        return payload

    # ------------------------------------------- what a worker needs on a full Redis ---
    def _queue_bind(self, exchange, routing_key, pattern, queue):
        if not self.reliable or queue in self._expires or self.typeof(exchange).type == "fanout":
            return super()._queue_bind(exchange, routing_key, pattern, queue)
        member = self.sep.join([routing_key or "", pattern or "", queue or ""])
        with self.conn_or_acquire() as client:
            _run_script(client, "bind", [self.keyprefix_queue % (exchange,),
                                         self.keyprefix_binding_permanent % (exchange,)], [member])

    @cached_property
    def _refresh_binding(self):
        # kombu's binding script of expiring queues (the workers' pidbox reply queues),
        # flagged so that it runs on a full Redis too.
        return self._create_client().register_script("#!lua flags=allow-oom\n" + kombu_redis.REFRESH_BINDING)

    def _refresh_bindings(self, queues):
        # kombu sends these scripts in a MULTI/EXEC, which a full Redis refuses whatever it
        # holds: one pipeline without MULTI (each script is atomic on its own).
        with self.conn_or_acquire() as client:
            with client.pipeline(transaction=False) as pipe:
                for queue in queues:
                    for exchange, routing_key, args in self.state.queue_bindings(queue):
                        _, pattern, _ = self.typeof(exchange).prepare_bind(queue, exchange, routing_key, args)
                        self._refresh_binding(
                            keys=[self.keyprefix_queue % (exchange,), self._script_binding_deadlines],
                            args=[self.sep.join([routing_key or "", pattern or "", queue]),
                                  exchange, self._binding_ttl(queue)],
                            client=pipe)
                pipe.execute()

    def _delete(self, queue, exchange, routing_key, pattern, *args, **kwargs):
        # Deleting a queue (Celery's remote-control reply queues): without MULTI.
        if not self.reliable:
            return super()._delete(queue, exchange, routing_key, pattern, *args, **kwargs)
        self.auto_delete_queues.discard(queue)
        member = self.sep.join([routing_key or "", pattern or "", queue or ""])
        with self.conn_or_acquire(client=kwargs.get("client")) as client:
            client.srem(self.keyprefix_queue % (exchange,), member)
            client.srem(self.keyprefix_binding_permanent % (exchange,), member)
            client.delete(*[self._q_for_pri(queue, pri) for pri in self.priority_steps])

    def _size(self, queue):
        # Read-only: without MULTI, which a full Redis refuses.
        with self.conn_or_acquire() as client:
            with client.pipeline(transaction=False) as pipe:
                for pri in self.priority_steps:
                    pipe.llen(self._q_for_pri(queue, pri))
                return sum(size for size in pipe.execute() if isinstance(size, int))

    def _has_queue(self, queue, **kwargs):
        with self.conn_or_acquire() as client:
            with client.pipeline(transaction=False) as pipe:
                for pri in self.priority_steps:
                    pipe.exists(self._q_for_pri(queue, pri))
                return any(pipe.execute())

    # ---------------------------------------------------------------- requeue ---
    def restore_atomically(self, client, tag, leftmost=False, owner=""):
        """Push one unacknowledged message back to its queues in one step. True if pushed.

        With OWNER, only if that incarnation still owns it. Nothing is removed unless it is
        pushed back in the same step; a refused push leaves it in ``unacked``.
        """
        raw = client.hget(self.unacked_key, tag)
        if raw is None:
            if not owner:
                _run_script(client, "restore", self._bookkeeping_keys(), [tag, "", "", "0", ""])
            return False
        message, exchange, routing_key = loads(bytes_to_str(raw))
        returns = 0
        try:
            headers = message["headers"]
            headers["redelivered"] = True
            returns = headers["x-delivery-count"] = _int(headers.get("x-delivery-count")) + 1
            message["properties"]["delivery_info"]["redelivered"] = True
        except (KeyError, TypeError):
            pass
        priority = self._get_message_priority(message, reverse=False)
        names = self._lookup(exchange, routing_key)
        queues = [self._q_for_pri(queue, priority) for queue in names]
        limit = _int(self.reliable_delivery_limit)
        if not queues:
            # No queue is bound any more (deleted): kept, not dropped, on a list of its own.
            logger.warning("No queue is bound for message %s (exchange %r, key %r): moved to %s",
                           tag, exchange, routing_key, UNROUTABLE_KEY)
            queues = [UNROUTABLE_KEY]
        elif limit > 0 and returns > limit:
            message["headers"].update({"x-first-death-reason": "delivery_limit",
                                       "x-first-death-queue": names[0],
                                       "x-first-death-exchange": exchange})
            logger.error("Task %s (%s) came back %d times without finishing (limit %d): moved to "
                         "the dead-letter queue %s", message["headers"].get("id"),
                         message["headers"].get("task"), returns, limit, self.reliable_dead_letter_queue)
            queues = [self.reliable_dead_letter_queue]
            leftmost = True  # behind the earlier dead letters: the list keeps their order
        pushed = _run_script(client, "restore", self._bookkeeping_keys() + queues,
                             [tag, raw, dumps(message), "1" if leftmost else "0", owner])
        return bool(pushed)

    def _restore(self, message, leftmost=False):
        if not self.reliable or not self.ack_emulation:
            return super()._restore(message, leftmost)
        with self.conn_or_acquire() as client:
            self.restore_atomically(client, message.delivery_tag, leftmost=leftmost)

    def recover_tag(self, client, tag, dead_token):
        """Return one message of a dead incarnation to its queue, atomically."""
        return self.restore_atomically(client, tag, owner=dead_token)


class FastRecovery:
    """Lease, fence and recovery of dead incarnations for one worker process.

    The lease is renewed by a thread of its own, so that Celery's blocking reconnect loop
    (after a broker restart) does not let it lapse; a frozen process renews nothing. The
    recovery of dead incarnations runs on the event loop.
    """

    def __init__(self, channel, node, token):
        self.channel = channel
        self.node = node
        self.token = token
        self.registered = False
        self.failures = 0
        self.stopped = threading.Event()

    def renew(self, client):
        """Register or renew the lease; publish the fence deadline. False once it expired."""
        started = time.monotonic()
        renewed = _run_script(
            client, "lease", [LEASE_KEY.format(token=self.token), INCARNATIONS_KEY],
            [_lease_value(self.token), int(self.channel.reliable_lease_seconds), self.token,
             "renew" if self.registered else "register"])
        if not renewed:
            logger.critical("fast recovery: the lease of this worker process expired, so other "
                            "workers may run its tasks: stopping it")
            celery_reliable_fence.set_deadline(time.monotonic() - 1)
            return False
        self.registered = True
        celery_reliable_fence.set_deadline(started + float(self.channel.reliable_fence_seconds))
        return True

    def keep_lease(self):
        """Thread: renew the lease every TICK_SECONDS until stopped (a newer connection took over)."""
        client = self.channel._create_client()
        while not self.stopped.wait(TICK_SECONDS):
            if self._guarded("lease renewal", lambda: self.renew(client)) is False:
                return  # expired: the fence stops this process

    def tick(self):
        """Event loop: return the messages of dead incarnations."""
        def recover():
            with self.channel.conn_or_acquire() as client:
                if not self.registered and not self.renew(client):
                    return False
                self.recover_dead_incarnations(client)
            return True
        self._guarded("fast recovery tick", recover)

    def _guarded(self, what, step):
        try:
            result = step()
            if self.failures:
                logger.warning("fast recovery: Redis answers again after %d failed attempt(s)", self.failures)
            self.failures = 0
            return result
        except self.channel.connection_errors:
            self.failures += 1
            logger.debug("%s: broker unreachable, retrying", what, exc_info=True)
        except kombu_redis.redis.exceptions.RedisError as error:
            # A broker loading its AOF, a script refused, ...: never fatal, retried.
            self.failures += 1
            _warn_sometimes(what, error)
        return None

    def recover_dead_incarnations(self, client):
        tokens = {bytes_to_str(t) for t in client.smembers(INCARNATIONS_KEY)} - {self.token}
        legacy = LEGACY_INCARNATIONS_KEY.format(node=self.node)
        tokens |= {bytes_to_str(t) for t in client.smembers(legacy)} - {self.token}
        if not tokens:
            return
        tokens = sorted(tokens)
        leases = client.mget([LEASE_KEY.format(token=token) for token in tokens])
        dead = [token for token, lease in zip(tokens, leases) if _lease_is_dead(lease)]
        if not dead:
            return
        owned = collections.defaultdict(list)
        for tag, owner in client.hscan_iter(OWNER_KEY):
            owned[bytes_to_str(owner)].append(bytes_to_str(tag))
        for token in dead:
            tags = owned.get(token, [])
            restored = sum(self.channel.recover_tag(client, tag, token) for tag in tags)
            if restored:
                logger.warning("Restored %d message(s) held by a dead worker process or connection "
                               "(incarnation %s)", restored, token)
            owners = [client.hget(OWNER_KEY, tag) for tag in tags]
            if any(owner is not None and bytes_to_str(owner) == token for owner in owners):
                continue  # a push was refused: keep the incarnation and try again next tick
            client.srem(INCARNATIONS_KEY, token)
            client.srem(legacy, token)
            client.delete(LEASE_KEY.format(token=token))


class Transport(kombu_redis.Transport):
    Channel = Channel

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        # Owner of the messages consumed through this connection (see the module docstring).
        self.fast_recovery_token = uuid.uuid4().hex
        # Delivery tags the pop script recorded, not yet seen by QoS.append.
        self.reliable_recorded = set()

    def register_with_event_loop(self, connection, loop):
        super().register_with_event_loop(connection, loop)
        if _current["timer"] is not None:
            _current["timer"].cancel()  # the tick of a connection this one replaces
            _current["timer"] = None
        # A channel of its own (closed with the connection), so no consumer's channel is borrowed.
        channel = self.Channel(self)
        self.channels.append(channel)
        node = channel.fast_recovery_node
        if not node:
            return
        if _current["recovery"] is not None:
            _current["recovery"].stopped.set()  # the lease of a connection this one replaces
        _current["token"] = self.fast_recovery_token
        recovery = _current["recovery"] = FastRecovery(channel, node, self.fast_recovery_token)
        recovery.tick()  # register and recover before the first poll
        threading.Thread(target=recovery.keep_lease, name="celery-reliable-lease", daemon=True).start()
        _current["timer"] = loop.call_repeatedly(TICK_SECONDS, recovery.tick)


# ------------------------------------------------------------ kombu pinning ---
# The kombu code this module overrides or relies on, fingerprinted for the kombu release it
# was written and tested against. A new kombu changes a fingerprint: review this module
# against the new code, then update the table (python -m celery_reliable_redis prints it).
KOMBU_INTERNALS = (
    kombu_redis.QoS.append, kombu_redis.QoS.restore_by_tag, kombu_redis.QoS._remove_from_indices,
    kombu_redis.QoS.restore_visible, kombu_redis.QoS.restore_unacked, kombu_redis.QoS.reject,
    kombu_redis.Channel._brpop_start, kombu_redis.Channel._brpop_read, kombu_redis.Channel._get,
    kombu_redis.Channel._restore, kombu_redis.Channel._do_restore_message,
    kombu_redis.MultiChannelPoller._register_BRPOP, kombu_redis.MultiChannelPoller.on_poll_start,
    kombu_redis.MultiChannelPoller.on_readable, kombu_redis.MultiChannelPoller.maybe_check_brpop_health,
    kombu_redis.Transport.register_with_event_loop, kombu_redis.Channel._queue_bind,
    kombu_redis.Channel._size, kombu_redis.Channel._has_queue, kombu_redis.Channel._delete, kombu_redis.Channel._refresh_bindings,
    virtual.Channel.basic_consume, virtual.Channel.basic_get, virtual.Transport._reject_inbound_message,
)
KOMBU_TESTED = {
    "5.7.0": {
        "redis.QoS.append": "35c655f6ecc62fe6",
        "redis.QoS.restore_by_tag": "58e161d81b6fe18d",
        "redis.QoS._remove_from_indices": "980a109d54ad9136",
        "redis.QoS.restore_visible": "d4a4a40a3eaf9f23",
        "redis.QoS.restore_unacked": "8954efef014d546e",
        "redis.QoS.reject": "747a02434344d1a6",
        "redis.Channel._brpop_start": "06723d707ddf2240",
        "redis.Channel._brpop_read": "c42518699709f2df",
        "redis.Channel._get": "be26a9f1eb4cf8da",
        "redis.Channel._restore": "92e63e38835b6592",
        "redis.Channel._do_restore_message": "8b430df94e45b5b0",
        "redis.MultiChannelPoller._register_BRPOP": "85724582464a615f",
        "redis.MultiChannelPoller.on_poll_start": "414f76caaa675bc0",
        "redis.MultiChannelPoller.on_readable": "c0d99f241607f845",
        "redis.MultiChannelPoller.maybe_check_brpop_health": "0dc592e46353a0fc",
        "redis.Transport.register_with_event_loop": "4b835642e4a99425",
        "redis.Channel._queue_bind": "29b73e023af67e47",
        "redis.Channel._size": "7cc839b42fdc5e3b",
        "redis.Channel._has_queue": "79b4e522f2c0e8ec",
        "redis.Channel._delete": "4e33e7dc5845c8d0",
        "redis.Channel._refresh_bindings": "79b1a05c13ee2fa6",
        "base.Channel.basic_consume": "0fec962694938b61",
        "base.Channel.basic_get": "ba4884c15b6bed6d",
        "base.Transport._reject_inbound_message": "0fd42f24d40a132d",
        "redis.REFRESH_BINDING": "d8306f6702293a5d"
    }
}


def kombu_fingerprints():
    found = {f"{fn.__module__.rsplit('.', 1)[-1]}.{fn.__qualname__}":
             hashlib.sha256(inspect.getsource(fn).encode()).hexdigest()[:16] for fn in KOMBU_INTERNALS}
    found["redis.REFRESH_BINDING"] = hashlib.sha256(kombu_redis.REFRESH_BINDING.encode()).hexdigest()[:16]
    return found


def check_kombu():
    """What differs from the tested kombu: a list of strings, empty when all is as tested."""
    tested = KOMBU_TESTED.get(kombu.__version__)
    if tested is None:
        return [f"kombu {kombu.__version__} is not a tested release ({', '.join(KOMBU_TESTED)})"]
    now = kombu_fingerprints()
    return [f"{name} changed" for name in sorted(set(now) | set(tested)) if now.get(name) != tested.get(name)]


if __name__ == "__main__":
    print(json.dumps({kombu.__version__: kombu_fingerprints()}, indent=4))
