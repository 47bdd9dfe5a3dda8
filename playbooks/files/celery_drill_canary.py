# Managed by Ansible (playbooks/drill.yml): installed for a fire drill, removed after it.
"""Canary tasks of the bundle's fire drill.

As a worker application: the drill starts an extra instance of the bundle's own unit,
``celery-worker@<drill instance>.service``, whose environment names this module as the
application (``CELERY_WORKER_USER_APP``). It runs with the same reliable settings, stop
sequence and transport as your workers, on its own queue, so your tasks are not touched.
Each canary run appends a "start" and a "done" line to ``CELERY_DRILL_EVENTS``.

As a command, run by the drill as root on a worker host:

    celery_drill_canary.py send QUEUE COUNT SECONDS   send COUNT canaries to QUEUE
    celery_drill_canary.py recovered FAULT_T END_T TIMEOUT KIND
                                                      wait until the canaries in flight at
                                                      FAULT_T ran again or finished, and a
                                                      queued one started: for KIND worker in
                                                      a worker process started after
                                                      FAULT_T, else after END_T (the fault
                                                      over); print the seconds from FAULT_T
    celery_drill_canary.py handover ID FAULT_T TIMEOUT
                                                      wait until canary ID, held by a worker
                                                      on another host at FAULT_T, starts
                                                      here; print the seconds from FAULT_T
    celery_drill_canary.py consume QUEUE on|off       make this host's drill worker consume
                                                      QUEUE too, or stop (remote control);
                                                      return once its active queues show it
    celery_drill_canary.py settle TIMEOUT             wait for every canary sent from this
                                                      host to finish; print the counts, and
                                                      how often each canary finished here
    celery_drill_canary.py cleanup QUEUE...           delete the canary queues (and on Redis
                                                      the instance's fast-recovery records)

Each prints one JSON object. The broker URL and settings come from the worker's own
environment files, read here the way systemd reads them (celery_reliable_tools.py, the
worker role's helpers, which also send the canaries and count them).
"""

import json
import os
import socket
import sys
import time

from celery import Celery

EVENTS_FILE = os.environ.get("CELERY_DRILL_EVENTS", "/var/lib/celery/drill/events.jsonl")
TASK_NAME = "celery_drill.canary"

app = Celery("celery_drill_canary")
# When this worker's main process started (the pool's children inherit it): a recovery from
# a worker fault counts only once a *new* worker process runs canaries again.
MAIN_STARTED = time.time()


def _append(path, record):
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o640)
    try:
        os.write(fd, (json.dumps(record) + "\n").encode())
        os.fsync(fd)
    finally:
        os.close(fd)


@app.task(bind=True, name=TASK_NAME)
def canary(self, seconds):
    """Sleep for SECONDS, recording the start and the end."""
    _append(EVENTS_FILE, {"event": "start", "id": self.request.id, "t": time.time(),
                          "node": self.request.hostname, "main": MAIN_STARTED})
    time.sleep(seconds)
    _append(EVENTS_FILE, {"event": "done", "id": self.request.id, "t": time.time(),
                          "node": self.request.hostname})
    return seconds


# ---- command side (root on a worker host) -----------------------------------------------

def _read_jsonl(path):
    try:
        with open(path, encoding="utf-8") as lines:
            return [json.loads(line) for line in lines if line.strip()]
    except FileNotFoundError:
        return []


def _sent_file():
    return os.path.join(os.path.dirname(EVENTS_FILE), "sent.jsonl")


def send(ctx, queue, count, seconds):
    import celery_reliable_tools  # noqa: E402  (the worker role's helpers, on sys.path in main)

    since = time.time()
    ids = celery_reliable_tools.send(ctx, TASK_NAME, count, queue, args=(float(seconds),))
    for task_id in ids:
        _append(_sent_file(), {"id": task_id, "queue": queue, "t": time.time()})
    return {"since": since, "ids": ids}


def recovered(fault_t, end_t, timeout, kind):
    """Seconds from the fault until this host's canaries run again.

    Recovered means: every canary in flight at the fault started again or finished, and, if
    some were still queued, a canary started after the fault was over: after a worker fault
    (kill, restart, reboot) in a worker process that began after the fault, after any other
    (a pool process killed, the broker restarted) once the fault's command had returned.
    """
    fault_t, end_t = float(fault_t), float(end_t)
    new_process_only = kind == "worker"
    deadline = time.time() + float(timeout)
    sent = {row["id"] for row in _read_jsonl(_sent_file())}
    while True:
        events = _read_jsonl(EVENTS_FILE)
        before = [e for e in events if e["t"] <= fault_t and e["id"] in sent]
        after = [e for e in events if e["t"] > fault_t and e["id"] in sent]
        done_before = {e["id"] for e in before if e["event"] == "done"}
        in_flight = {e["id"] for e in before if e["event"] == "start"} - done_before
        queued = sent - done_before - in_flight
        first_after = {}
        for e in after:
            first_after.setdefault(e["id"], e["t"])
        waits = [first_after.get(task_id) for task_id in in_flight]
        if queued:
            starts = [e["t"] for e in after if e["event"] == "start"
                      and (e.get("main", 0) > fault_t if new_process_only else e["t"] > end_t)]
            waits.append(min(starts) if starts else None)
        if waits and None not in waits:
            return {"recovered": True, "seconds": round(max(waits) - fault_t, 2),
                    "in_flight": len(in_flight), "queued": len(queued)}
        if not waits:
            return {"recovered": True, "seconds": 0.0, "in_flight": 0, "queued": 0}
        if time.time() > deadline:
            return {"recovered": False, "seconds": None, "in_flight": len(in_flight),
                    "queued": len(queued)}
        time.sleep(0.2)


def handover(task_id, fault_t, timeout):
    """Seconds from FAULT_T until canary TASK_ID, held by another host then, starts here."""
    fault_t = float(fault_t)
    deadline = time.time() + float(timeout)
    while True:
        starts = [e["t"] for e in _read_jsonl(EVENTS_FILE)
                  if e["id"] == task_id and e["event"] == "start" and e["t"] > fault_t]
        if starts:
            return {"recovered": True, "seconds": round(min(starts) - fault_t, 2), "in_flight": 1, "queued": 0}
        if time.time() > deadline:
            return {"recovered": False, "seconds": None, "in_flight": 1, "queued": 0}
        time.sleep(0.2)


def _node_name():
    # As the unit's CELERY_WORKER_NODENAME: %i@ celery_worker_node_host, or the host name (%H).
    return f"{os.environ['CELERY_DRILL_INSTANCE']}@{os.environ.get('CELERY_WORKER_NODE_HOST') or socket.gethostname()}"


def consume(ctx, queue, switch):
    """Make this host's drill worker consume QUEUE, or stop (Celery's remote control).

    The worker answers add_consumer and cancel_consumer before it acts on them: Celery queues
    the change on the worker's event loop (call_soon), which may sit until the loop's next
    wake-up, a second or more later. A canary sent in that gap still reaches the worker that
    was told to stop (the fire drill failed so once). Done means the worker's own list of
    active queues shows the change: only then is the consumer added or cancelled at the broker.
    """
    node = _node_name()
    wanted = switch == "on"
    command = ctx.control.add_consumer if wanted else ctx.control.cancel_consumer
    deadline = time.time() + 60  # a worker that just (re)started answers once its consumer is up
    replies = []
    while time.time() < deadline:
        if not replies:
            replies = command(queue, destination=[node], reply=True, timeout=3)
        if replies:
            # Each request also wakes the worker's loop, which then runs the queued change.
            active = ctx.control.inspect(destination=[node], timeout=3).active_queues() or {}
            if node in active and (queue in {q["name"] for q in active[node]}) == wanted:
                return {"node": node, "queue": queue, "consuming": wanted, "replies": replies}
        time.sleep(0.5)
    sys.exit(f"{node} did not {'start' if wanted else 'stop'} consuming {queue!r} within 60 s")


def settle(timeout):
    """Wait for every canary sent from this host to finish; count lost and duplicated."""
    import celery_reliable_tools  # noqa: E402  (the worker role's helpers, on sys.path in main)

    deadline = time.time() + float(timeout)
    sent = [row["id"] for row in _read_jsonl(_sent_file())]
    while True:
        counts = celery_reliable_tools.count_runs(sent, _read_jsonl(EVENTS_FILE))
        if not counts["lost"] or time.time() > deadline:
            # Canaries handed over between hosts finish on another host than the one that
            # sent them: the drill adds "done" up over all hosts to find one that finished twice.
            return counts
        time.sleep(0.5)


def dead_letters(ctx, queue):
    """Task ids in the dead-letter queue QUEUE (celery_dead_letters.py, copied next to this file)."""
    import celery_dead_letters  # noqa: E402

    letters = celery_dead_letters.runner(ctx)(ctx, queue, None, 0)[3]
    return {"total": len(letters), "ids": sorted({d["id"] for d in letters if d["id"]})}


def cleanup(ctx, *queues):
    node = _node_name()
    deleted = {}
    with ctx.connection_for_write() as conn:
        channel = conn.default_channel
        for queue in queues:
            try:
                channel.queue_delete(queue)
                deleted[queue] = True
            except Exception as exc:  # already gone: nothing to clean
                deleted[queue] = str(exc)
                channel = conn.default_channel
            # Celery declared a direct exchange named after each queue (RabbitMQ keeps it).
            try:
                channel.exchange_delete(queue)
            except Exception:  # already gone, or a transport without exchanges to delete
                channel = conn.default_channel
        client = getattr(channel, "client", None)
        if client is not None and hasattr(client, "delete"):
            client.delete(f"unacked_incarnations:{node}")
    return {"deleted": deleted}


def main(argv):
    # celery_drill_canary.py CONFIG_DIR LIB_DIR APP_DIR INSTANCE COMMAND ARGS...
    global EVENTS_FILE
    config_dir, lib_dir, app_dir, instance, command, *args = argv
    sys.path[:0] = [lib_dir, app_dir]
    import celery_reliable_tools  # noqa: E402  (the worker role's helpers)

    celery_reliable_tools.load_worker_env(config_dir, instance)
    EVENTS_FILE = os.environ["CELERY_DRILL_EVENTS"]
    os.environ["CELERY_DRILL_INSTANCE"] = instance
    if command == "recovered":
        result = recovered(*args)
    elif command == "settle":
        result = settle(*args)
    elif command == "handover":
        result = handover(*args)
    else:
        ctx = celery_reliable_tools.worker_app()
        if command == "send":
            result = send(ctx, *args)
        elif command == "consume":
            result = consume(ctx, *args)
        elif command == "cleanup":
            result = cleanup(ctx, *args)
        elif command == "dead-letters":
            result = dead_letters(ctx, *args)
        else:
            sys.exit(f"unknown command {command!r}")
    print(json.dumps(result))


if __name__ == "__main__":
    main(sys.argv[1:])
