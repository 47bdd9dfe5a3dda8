# Managed by Ansible (celery_worker role): installed next to the settings loader.
"""The bundle's helpers on a worker host, in one place.

Used by the tools that act as a producer or a witness next to the workers: the fire drill's
canary (playbooks/files/celery_drill_canary.py), the throughput benchmark
(playbooks/files/celery_bench.py), the dead-letter lister (playbooks/files/celery_dead_letters.py),
the demo application's senders (templates/demo_app.py.j2) and the Molecule tests.

- load_env_file / load_worker_env: the workers' environment, read the way systemd's
  EnvironmentFile= reads it (KEY=VALUE, no shell expansion), so a tool connects with the
  workers' broker URL and settings;
- worker_app: the workers' own configured Celery app (celery_reliable);
- send: publish tasks by name and return their ids;
- count_runs: from the ids sent and the "start"/"done" events the tasks wrote, the counts the
  drill and the tests report (sent, completed, lost, duplicated, runs);
- merge_counts: the fire drill's totals over the hosts' count_runs (a canary handed over
  finishes on another host than the one that sent it) and the dead-letter queue's ids.

As a command (the tests run their producers this way):

    python3 celery_reliable_tools.py run CONFIG_DIR [INSTANCE] -- COMMAND ARGS...
        run COMMAND with the workers' environment (worker.env, then instance-INSTANCE.env)
    python3 celery_reliable_tools.py merge < {"per_host": [COUNTS, ...], "dead_letters": [ID, ...]}
        print merge_counts as JSON (the fire drill's report)
"""

import os
import sys


def load_env_file(path, environ=None):
    """Set the KEY=VALUE lines of PATH in ENVIRON (os.environ), as systemd reads them."""
    environ = os.environ if environ is None else environ
    with open(path, encoding="utf-8") as env:
        for line in env:
            line = line.strip()
            if not line or line.startswith(("#", ";")) or "=" not in line:
                continue
            key, value = line.split("=", 1)
            if len(value) >= 2 and value[0] == value[-1] and value[0] in "'\"":
                value = value[1:-1]
            environ[key.strip()] = value
    return environ


def load_worker_env(config_dir, instance=None, environ=None):
    """The units' environment: worker.env, then the instance's own file if INSTANCE is given."""
    environ = load_env_file(os.path.join(config_dir, "worker.env"), environ)
    if instance:
        load_env_file(os.path.join(config_dir, f"instance-{instance}.env"), environ)
    return environ


def worker_app(lib_dir=None, app_dir=None):
    """The workers' configured app (same broker URL, transport options and settings)."""
    sys.path[:0] = [d for d in (lib_dir, app_dir) if d and d not in sys.path]
    import celery_reliable  # noqa: E402  (the workers' own loader)

    return celery_reliable.app


def send(app, name, count, queue, args=(), kwargs=None):
    """Publish COUNT tasks NAME to QUEUE on one connection; return their ids."""
    with app.producer_or_acquire() as producer:
        return [app.send_task(name, args=args, kwargs=kwargs, queue=queue, producer=producer).id
                for _ in range(int(count))]


def count_runs(sent, events):
    """Counts over the task ids SENT, from the tasks' events ({"event": "start"|"done", "id"}).

    completed: sent and finished at least once; lost: sent, never finished; duplicated:
    finished more than once; rerun: sent and started more than once (an interrupted run,
    then a complete one); runs: starts of any task in EVENTS (re-runs included). done maps
    every finished id to how often it finished.
    """
    sent = list(dict.fromkeys(sent))
    done, started = {}, {}
    runs = 0
    for event in events:
        if event["event"] == "done":
            done[event["id"]] = done.get(event["id"], 0) + 1
        elif event["event"] == "start":
            started[event["id"]] = started.get(event["id"], 0) + 1
            runs += 1
    lost = [task_id for task_id in sent if task_id not in done]
    duplicated = [task_id for task_id in sent if done.get(task_id, 0) > 1]
    return {"sent": len(sent), "completed": len(sent) - len(lost), "lost": len(lost),
            "duplicated": len(duplicated), "rerun": sum(1 for t in sent if started.get(t, 0) > 1),
            "runs": runs, "lost_ids": lost, "duplicated_ids": duplicated, "done": done}


def merge_counts(per_host, dead_letter_ids=()):
    """Totals over the count_runs results of several hosts.

    duplicated: ids finished more than once over all hosts together; dead_lettered: ids of
    DEAD_LETTER_IDS that some host sent or saw finish (other messages in the queue are not
    the caller's).
    """
    done = {}
    for counts in per_host:
        for task_id, times in counts["done"].items():
            done[task_id] = done.get(task_id, 0) + times
    known = set(done).union(*(counts["lost_ids"] for counts in per_host))
    totals = {key: sum(int(counts[key]) for counts in per_host) for key in ("sent", "completed", "lost", "runs")}
    totals.update(duplicated=sum(1 for times in done.values() if times > 1),
                  dead_lettered=len(known & set(dead_letter_ids)))
    return totals


def main(argv):
    if argv == ["merge"]:
        import json
        request = json.load(sys.stdin)
        print(json.dumps(merge_counts(request["per_host"], request.get("dead_letters", ())), sort_keys=True))
        return
    if len(argv) >= 4 and argv[0] == "run" and "--" in argv:
        split = argv.index("--")
        config_dir, instance = (argv[1:split] + [None])[:2]
        command = argv[split + 1:]
        if command:
            os.execvpe(command[0], command, load_worker_env(config_dir, instance, dict(os.environ)))
    sys.exit("usage: celery_reliable_tools.py run CONFIG_DIR [INSTANCE] -- COMMAND ARGS...\n"
             "       celery_reliable_tools.py merge < COUNTS_JSON")


if __name__ == "__main__":
    main(sys.argv[1:])
