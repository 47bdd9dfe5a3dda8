# Managed by Ansible (celery_worker role): do not edit, changes are overwritten.
"""Prometheus metrics of this host's Celery workers, from Celery's own events.

Runs as celery-exporter.service (celery_worker_exporter) with the workers' environment:

    python celery_reliable_exporter.py --listen 127.0.0.1:9808

Every worker sends a "worker-heartbeat" event every 2 seconds, and with
worker_send_task_events (celery_worker_task_events) one event per step of each task
(received, started, succeeded, failed, retried, rejected, revoked). This process receives
them from the broker's event exchange (a queue of its own, or a Redis channel: it never
takes anything from a task queue) and counts the events of this host's workers only,
those whose node name ends in "@HOST" (CELERY_WORKER_NODE_HOST, else the host's name), so
that every worker host runs its own exporter and no event is counted twice.

Served on /metrics:
  celery_worker_up{worker}                    1 while its heartbeats arrive; 0 once none came
                                              for 3 intervals (a frozen or cut-off worker)
  celery_worker_tasks_active{worker}          tasks it runs, from its last heartbeat
  celery_worker_processed_tasks_total{worker} tasks it took since it started (heartbeat)
  celery_tasks_total{worker,name,state}       task events by task name and state
  celery_task_runtime_seconds_{sum,count}{worker,name}  run time of the succeeded tasks
  celery_exporter_broker_connected            1 while the exporter receives events
  celery_exporter_events_total                events of this host's workers received
A worker that says it goes offline (a clean stop: a restart, an instance removed) drops
out of the worker series at once (node_exporter's unit states cover a unit that is down);
one whose heartbeats stopped without that stays at 0 for SILENT_FORGET seconds.
"""

import argparse
import collections
import json
import logging
import os
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

LOG = logging.getLogger("celery-exporter")

TASK_STATES = ("received", "started", "succeeded", "failed", "retried", "rejected", "revoked")
FINAL_STATES = ("succeeded", "failed", "rejected", "revoked")
# Task ids whose name is remembered (the name is only in the "task-received" event).
NAMES_KEPT = 100_000
# A worker is down once no heartbeat came for this many of its intervals.
MISSED_HEARTBEATS = 3
SILENT_FORGET = 3600.0

HELP = {
    "celery_worker_up": ("gauge", "1 while the worker's heartbeat events arrive, 0 once they "
                         "stopped for 3 intervals without the worker going offline."),
    "celery_worker_tasks_active": ("gauge", "Tasks the worker runs, from its last heartbeat."),
    "celery_worker_processed_tasks_total": ("counter", "Tasks the worker took since it started."),
    "celery_tasks_total": ("counter", "Task events of this host's workers, by task name and state."),
    "celery_task_runtime_seconds": ("summary", "Run time of the tasks that succeeded."),
    "celery_exporter_broker_connected": ("gauge", "1 while the exporter receives events from the broker."),
    "celery_exporter_events_total": ("counter", "Events of this host's workers received."),
}


def label_value(value):
    return str(value).replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def labels(**pairs):
    return "{" + ",".join(f'{key}="{label_value(value)}"' for key, value in pairs.items()) + "}"


class Metrics:
    """What the events said, for this host's workers; safe across threads."""

    def __init__(self, node_host, clock=time.monotonic):
        self.suffix = "@" + node_host
        self.clock = clock
        self.lock = threading.Lock()
        self.workers = {}
        self.tasks = collections.Counter()
        self.runtime = collections.defaultdict(lambda: [0.0, 0])
        self.names = collections.OrderedDict()
        self.events = 0
        self.connected = False

    def on_event(self, event):
        worker = event.get("hostname") or ""
        kind = event.get("type") or ""
        if not worker.endswith(self.suffix):
            return
        with self.lock:
            self.events += 1
            if kind.startswith("worker-"):
                self._on_worker(worker, kind[len("worker-"):], event)
            elif kind.startswith("task-"):
                self._on_task(worker, kind[len("task-"):], event)

    def _on_worker(self, worker, kind, event):
        if kind == "offline":
            self.workers.pop(worker, None)
            return
        state = self.workers.setdefault(worker, {"active": 0, "processed": 0})
        state.update(seen=self.clock(), freq=float(event.get("freq") or 2.0))
        if kind == "heartbeat":
            state.update(active=int(event.get("active") or 0), processed=int(event.get("processed") or 0))

    def _on_task(self, worker, state, event):
        if state not in TASK_STATES:
            return
        task_id = event.get("uuid")
        if state == "received":
            self.names[task_id] = event.get("name") or "unknown"
            self.names.move_to_end(task_id)
            while len(self.names) > NAMES_KEPT:
                self.names.popitem(last=False)
            name = self.names[task_id]
        elif state in FINAL_STATES:
            name = self.names.pop(task_id, "unknown")
        else:
            name = self.names.get(task_id, "unknown")
        self.tasks[worker, name, state] += 1
        if state == "succeeded" and event.get("runtime") is not None:
            runtime = self.runtime[worker, name]
            runtime[0] += float(event["runtime"])
            runtime[1] += 1

    def render(self):
        now = self.clock()
        out = []

        def family(name):
            kind, text = HELP[name]
            out.append(f"# HELP {name} {text}")
            out.append(f"# TYPE {name} {kind}")

        with self.lock:
            for worker, state in list(self.workers.items()):
                if now - state["seen"] > SILENT_FORGET:
                    del self.workers[worker]
            workers = sorted(self.workers.items())
            family("celery_worker_up")
            for worker, state in workers:
                up = now - state["seen"] <= MISSED_HEARTBEATS * state["freq"]
                out.append(f"celery_worker_up{labels(worker=worker)} {int(up)}")
            family("celery_worker_tasks_active")
            for worker, state in workers:
                out.append(f"celery_worker_tasks_active{labels(worker=worker)} {state['active']}")
            family("celery_worker_processed_tasks_total")
            for worker, state in workers:
                out.append(f"celery_worker_processed_tasks_total{labels(worker=worker)} {state['processed']}")
            family("celery_tasks_total")
            for (worker, name, state), count in sorted(self.tasks.items()):
                out.append(f"celery_tasks_total{labels(worker=worker, name=name, state=state)} {count}")
            family("celery_task_runtime_seconds")
            for (worker, name), (total, count) in sorted(self.runtime.items()):
                out.append(f"celery_task_runtime_seconds_sum{labels(worker=worker, name=name)} {total:.6f}")
                out.append(f"celery_task_runtime_seconds_count{labels(worker=worker, name=name)} {count}")
            family("celery_exporter_broker_connected")
            out.append(f"celery_exporter_broker_connected {int(self.connected)}")
            family("celery_exporter_events_total")
            out.append(f"celery_exporter_events_total {self.events}")
        return "\n".join(out) + "\n"


def make_app():
    """A bare Celery app with the workers' broker settings (not the user's application)."""
    from celery import Celery
    from kombu.transport import TRANSPORT_ALIASES

    # Redis: the workers' transport (celery_reliable_redis.py), whose visibility sweep
    # returns messages as the workers' does (every consuming client runs that sweep).
    TRANSPORT_ALIASES["redis"] = TRANSPORT_ALIASES["rediss"] = "celery_reliable_redis:Transport"
    app = Celery("celery-exporter")
    with open(os.environ["CELERY_WORKER_SETTINGS_FILE"], encoding="utf-8") as settings_file:
        app.conf.update(json.load(settings_file))
    return app


def receive(app, metrics, retry_seconds=5.0):
    """Receive events forever; reconnect after any broker error."""
    while True:
        try:
            with app.connection_for_read() as connection:
                connection.ensure_connection(max_retries=1)
                receiver = app.events.Receiver(connection, handlers={"*": metrics.on_event})
                with metrics.lock:
                    metrics.connected = True
                LOG.info("receiving events from %s", connection.as_uri())
                # Also asks every worker for a heartbeat now, so that "up" is known at once.
                receiver.capture(limit=None, timeout=None, wakeup=True)
        except Exception as error:  # noqa: BLE001 - any broker error: report, wait, reconnect
            LOG.warning("events receiver: %r; reconnecting in %.0f s", error, retry_seconds)
        with metrics.lock:
            metrics.connected = False
        time.sleep(retry_seconds)


def serve(metrics, address, port):
    class Handler(BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802 - the http.server interface
            if self.path.split("?")[0] not in ("/metrics", "/"):
                self.send_error(404)
                return
            body = metrics.render().encode()
            self.send_response(200)
            self.send_header("Content-Type", "text/plain; version=0.0.4; charset=utf-8")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    class Server(ThreadingHTTPServer):
        address_family = socket.AF_INET6 if ":" in address else socket.AF_INET
        daemon_threads = True

    return Server((address, port), Handler)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--listen", default="127.0.0.1:9808", help="ADDRESS:PORT ([V6]:PORT)")
    parser.add_argument("--node-host", default=os.environ.get("CELERY_WORKER_NODE_HOST") or socket.gethostname(),
                        help="host part of this host's worker node names")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    address, _, port = args.listen.rpartition(":")
    metrics = Metrics(args.node_host)
    server = serve(metrics, address.strip("[]"), int(port))
    threading.Thread(target=receive, args=(make_app(), metrics), daemon=True, name="events").start()
    LOG.info("serving the metrics of the workers *@%s on http://%s/metrics", args.node_host, args.listen)
    server.serve_forever()


if __name__ == "__main__":
    main()
