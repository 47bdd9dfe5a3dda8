"""The worker role's helpers (roles/celery_worker/files/celery_reliable_tools.py), unit-tested:
the environment read as systemd reads EnvironmentFile=, and the accounting of sent tasks that
the fire drill and the tests report."""

import json
import subprocess
import sys
from pathlib import Path

FILES = Path(__file__).resolve().parents[2] / "roles" / "celery_worker" / "files"

import celery_reliable_tools as tools


def test_the_environment_is_read_as_systemd_reads_it(tmp_path):
    (tmp_path / "worker.env").write_text(
        "# Managed by Ansible\n; a comment\n\nCELERY_BROKER_URL='amqp://celery:p%40ss@broker:5672/celery'\n"
        'QUOTED="two words"\nPLAIN=a=b\nEMPTY=\nnot a setting\n')
    (tmp_path / "instance-drill.env").write_text("CELERY_WORKER_QUEUES=celery_drill.h1,celery_drill.handover\n"
                                                 "PLAIN=instance\n")
    env = tools.load_worker_env(str(tmp_path), "drill", {})
    assert env == {"CELERY_BROKER_URL": "amqp://celery:p%40ss@broker:5672/celery", "QUOTED": "two words",
                   "PLAIN": "instance", "EMPTY": "", "CELERY_WORKER_QUEUES": "celery_drill.h1,celery_drill.handover"}
    assert tools.load_worker_env(str(tmp_path), None, {})["PLAIN"] == "a=b"


def test_run_gives_the_command_the_workers_environment(tmp_path):
    (tmp_path / "worker.env").write_text("CELERY_BROKER_URL='redis://:secret@broker:6379/0'\n")
    out = subprocess.run([sys.executable, str(FILES / "celery_reliable_tools.py"), "run", str(tmp_path), "--",
                          "sh", "-c", 'printf %s "$CELERY_BROKER_URL"'], capture_output=True, text=True, check=True)
    assert out.stdout == "redis://:secret@broker:6379/0"


def test_counting_finds_lost_duplicated_and_rerun_tasks():
    events = [{"event": "start", "id": "a"}, {"event": "done", "id": "a"},
              {"event": "start", "id": "b"}, {"event": "start", "id": "b"}, {"event": "done", "id": "b"},
              {"event": "start", "id": "c"}, {"event": "done", "id": "c"}, {"event": "done", "id": "c"},
              {"event": "start", "id": "d"},
              {"event": "start", "id": "other"}]
    counts = tools.count_runs(["a", "b", "c", "d", "e", "a"], events)
    assert {k: counts[k] for k in ("sent", "completed", "lost", "duplicated", "rerun", "runs")} == \
        {"sent": 5, "completed": 3, "lost": 2, "duplicated": 1, "rerun": 1, "runs": 6}
    assert counts["lost_ids"] == ["d", "e"] and counts["duplicated_ids"] == ["c"]
    assert counts["done"] == {"a": 1, "b": 1, "c": 2}


def test_the_drill_totals_add_the_hosts_up():
    """A canary sent from host 1 and handed over finishes on host 2: finished twice over both
    hosts is a duplicate even when each host saw it finish once; a dead letter counts only
    when it is one of the canaries."""
    host1 = tools.count_runs(["a", "h"], [{"event": "done", "id": "a"}, {"event": "done", "id": "h"}])
    host2 = tools.count_runs(["b", "x"], [{"event": "start", "id": "b"}, {"event": "done", "id": "b"},
                                          {"event": "done", "id": "h"}])
    totals = tools.merge_counts([host1, host2], ["x", "stranger"])
    assert totals == {"sent": 4, "completed": 3, "lost": 1, "runs": 1, "duplicated": 1, "dead_lettered": 1}
    out = subprocess.run([sys.executable, str(FILES / "celery_reliable_tools.py"), "merge"],
                         input=json.dumps({"per_host": [host1, host2], "dead_letters": ["x"]}),
                         capture_output=True, text=True, check=True)
    assert json.loads(out.stdout) == totals
