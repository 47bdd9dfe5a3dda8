#!/usr/bin/env python3
# Managed by Ansible (playbooks/dead_letters.yml): copied to a worker host for one run.
"""List the dead-letter queue, and replay chosen dead letters to the queue they died in.

    celery_dead_letters.py CONFIG_DIR LIB_DIR APP_DIR QUEUE list [MAX]
    celery_dead_letters.py CONFIG_DIR LIB_DIR APP_DIR QUEUE replay SELECTION_JSON [MAX]

It connects as the workers do (their environment file and settings, TLS included) and
prints one JSON document: the total, the dead letters grouped by task name, reason and
queue, the first MAX (default 1000) of them one by one, and for a replay the ids replayed.
SELECTION_JSON: {"ids": [...], "tasks": [...], "all": false}; a dead letter is replayed when
its task id is in ids, its task name in tasks, or all is true.

A replay never duplicates a task:
- Redis and Valkey: one Lua script removes that exact message from the dead-letter list
  and pushes it to its queue; a message already replayed is no longer there to remove.
- RabbitMQ: each message is published to its queue and acknowledged in the dead-letter
  queue inside one AMQP transaction (tx.select, tx.commit): a run that dies before the
  commit publishes nothing and leaves the message where it was. Messages not chosen are
  never acknowledged: closing the channel returns them.
The replayed copy loses the dead-lettering headers (x-death, x-first-death-*, x-last-death-*,
x-delivery-count), so it gets a full delivery limit again, and carries x-replayed (how
many times it was replayed).
"""

import json
import sys
from collections import Counter

DEATH_HEADERS = ("x-death", "x-first-death-reason", "x-first-death-queue", "x-first-death-exchange",
                 "x-last-death-reason", "x-last-death-queue", "x-last-death-exchange", "x-delivery-count")

# KEYS: dead-letter list, target queue key. ARGV: the message as listed, the message to push.
REPLAY_SCRIPT = """
if redis.call('LREM', KEYS[1], 1, ARGV[1]) == 1 then
  redis.call('LPUSH', KEYS[2], ARGV[2])
  return 1
end
return 0
"""


def _text(value):
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    return None if value is None else str(value)


def describe(headers):
    """Task id, task name, reason, queue and returns of a dead letter, from its headers."""
    headers = headers or {}
    death = (headers.get("x-death") or [{}])[0] or {}
    return {
        "id": _text(headers.get("id")),
        "task": _text(headers.get("task")),
        "reason": _text(headers.get("x-first-death-reason") or death.get("reason")),
        "queue": _text(headers.get("x-first-death-queue") or death.get("queue")),
        "deliveries": headers.get("x-delivery-count") or death.get("count"),
    }


def chosen(selection, letter):
    return bool(selection.get("all")) or letter["id"] in selection.get("ids", []) \
        or letter["task"] in selection.get("tasks", [])


def replay_headers(headers):
    clean = {k: v for k, v in (headers or {}).items() if k not in DEATH_HEADERS}
    clean["x-replayed"] = int(clean.get("x-replayed") or 0) + 1
    return clean


def summary(queue, letters, total, limit):
    groups = Counter((d["task"], d["reason"], d["queue"]) for d in letters)
    return {
        "queue": queue,
        "total": total,
        "listed": len(letters),
        "groups": [{"task": t, "reason": r, "queue": q, "count": n}
                   for (t, r, q), n in sorted(groups.items(), key=lambda g: (-g[1], str(g[0])))],
        "messages": letters[:limit],
    }


# ------------------------------------------------------------------------ Redis ---
def redis_run(app, queue, selection, limit):
    with app.connection_for_write() as connection:
        channel = connection.default_channel
        client = channel.client
        raws = client.lrange(queue, 0, -1)
        letters, replayed, skipped = [], [], []
        for raw in reversed(raws):  # oldest first (dead letters are pushed on the left)
            try:
                message = json.loads(raw)
                letter = describe(message.get("headers"))
            except (ValueError, AttributeError):
                letter, message = describe({}), None
            letters.append(letter)
            if selection is None or message is None or not chosen(selection, letter):
                continue
            if not letter["queue"]:
                skipped.append({"id": letter["id"], "why": "no x-first-death-queue header"})
                continue
            message["headers"] = replay_headers(message.get("headers"))
            priority = channel._get_message_priority(message, reverse=False)
            target = channel._q_for_pri(letter["queue"], priority)
            if client.eval(REPLAY_SCRIPT, 2, queue, target, raw, json.dumps(message)):
                replayed.append(letter["id"])
        total = len(raws)
    return summary(queue, letters, total, limit), replayed, skipped, letters


# --------------------------------------------------------------------- RabbitMQ ---
def amqp_run(app, queue, selection, limit):
    import amqp  # noqa: E402  (py-amqp, kombu's RabbitMQ client)

    # Without publisher confirms: a channel cannot be in confirm and transaction mode at once.
    with app.connection_for_write(transport_options={"confirm_publish": False}) as connection:
        channel = connection.channel()
        total = channel.queue_declare(queue=queue, passive=True).message_count
        if selection is not None:
            channel.tx_select()
        letters, replayed, skipped, existing = [], [], [], {}
        for _ in range(total):
            message = channel.basic_get(queue, no_ack=False)
            if message is None:
                break
            letter = describe(message.headers)
            letters.append(letter)
            if selection is None or not chosen(selection, letter):
                continue
            target = letter["queue"]
            if target and target not in existing:
                try:
                    probe = connection.channel()
                    probe.queue_declare(queue=target, passive=True)
                    probe.close()
                    existing[target] = True
                except connection.channel_errors:
                    existing[target] = False
            if not target or not existing[target]:
                skipped.append({"id": letter["id"], "why": f"its queue {target!r} does not exist"})
                continue
            properties = dict(message.properties)
            headers = replay_headers(properties.pop("application_headers", None))
            properties["delivery_mode"] = 2  # persistent
            channel.basic_publish(amqp.Message(message.body, application_headers=headers, **properties),
                                  exchange="", routing_key=target)
            channel.basic_ack(message.delivery_tag)
            channel.tx_commit()  # the publish and the ack take effect together, or neither
            replayed.append(letter["id"])
        channel.close()  # returns every message not acknowledged above
    return summary(queue, letters, total, limit), replayed, skipped, letters


def runner(app):
    """The list-and-replay function of the app's broker."""
    with app.connection_for_write() as connection:
        return amqp_run if connection.transport.driver_type == "amqp" else redis_run


def main(argv):
    config_dir, lib_dir, app_dir, queue, action = argv[:5]
    rest = argv[5:]
    selection = None
    if action == "replay":
        selection = json.loads(rest.pop(0))
    elif action != "list":
        raise SystemExit(f"unknown action {action!r}: list or replay")
    limit = int(rest[0]) if rest else 1000
    sys.path[:0] = [lib_dir, app_dir]
    import celery_reliable_tools  # noqa: E402  (the worker role's helpers)

    # The workers' environment and loader: same URL, same settings.
    celery_reliable_tools.load_worker_env(config_dir)
    app = celery_reliable_tools.worker_app()
    report, replayed, skipped, letters = runner(app)(app, queue, selection, limit)
    if selection is not None:
        wanted = set(selection.get("ids", []))
        report.update(replayed=replayed, skipped=skipped,
                      not_found=sorted(wanted - {d["id"] for d in letters}))
    print(json.dumps(report, default=str))


if __name__ == "__main__":
    main(sys.argv[1:])
