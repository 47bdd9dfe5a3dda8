"""Drive a deployed stack from the tests: send demo tasks, read their events, inject faults.

Hosts are reached with testinfra's docker backend (``docker exec``); reboots go through
the docker SDK. The demo application (templates/demo_app.py.j2) appends one JSON line per
task start and end to its events file on each worker host.
"""

import json
import os
import shlex
import subprocess
import time

from pathlib import Path
from urllib.parse import unquote, urlsplit

import docker
import testinfra

APP_DIR = "/opt/celery/app"
VENV = "/opt/celery/venv"
CONFIG_DIR = "/etc/celery"
LIB_DIR = "/usr/local/lib/celery-worker"


def worker_shell(command):
    """A shell command line running COMMAND (shell syntax) in the application directory with
    the worker units' environment, read by the worker role's helpers (celery_reliable_tools.py)
    the way systemd reads the units' EnvironmentFile=."""
    return (f"cd {APP_DIR} && PYTHONPATH={LIB_DIR}:{APP_DIR} exec {VENV}/bin/python"
            f" {LIB_DIR}/celery_reliable_tools.py run {CONFIG_DIR} -- sh -c {shlex.quote(command)}")


EVENTS_FILE = "/var/lib/demo-app/events.jsonl"
REPO = Path(__file__).resolve().parents[2]


def scrape(host, url):
    """The body of an HTTP GET of URL, fetched on HOST (Python's standard library there)."""
    script = "import sys, urllib.request; sys.stdout.write(urllib.request.urlopen(sys.argv[1], timeout=10).read().decode())"
    return host.check_output(f"python3 -c {shlex.quote(script)} {shlex.quote(url)}")


class Stack:
    """The broker and worker containers of one Molecule scenario."""

    def __init__(self, broker, workers):
        self.broker_name = broker
        self.worker_names = list(workers)
        self.broker = testinfra.get_host(f"docker://{broker}")
        self.workers = [testinfra.get_host(f"docker://{name}") for name in workers]
        self.worker = self.workers[0]
        self._docker = docker.from_env()

    # ------------------------------------------------------------------ settings ---
    def playbook(self, playbook, *args, timeout=900):
        """Run a playbook of the bundle against this scenario's inventory; return (rc, output)."""
        inventory = Path(os.environ["MOLECULE_EPHEMERAL_DIRECTORY"]) / "inventory"
        env = dict(os.environ, ANSIBLE_ROLES_PATH=str(REPO / "roles"), ANSIBLE_FORCE_COLOR="false",
                   ANSIBLE_CONFIG=str(REPO / "ansible.cfg"))
        result = subprocess.run(
            ["ansible-playbook", "-i", str(inventory), str(REPO / playbook), *args],
            cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
        return result.returncode, result.stdout + result.stderr

    def settings(self, host=None):
        """The Celery settings the workers run with, as the role rendered them."""
        host = host or self.worker
        return json.loads(host.file(f"{CONFIG_DIR}/settings.json").content_string)

    def effective_conf(self, keys, host=None):
        """Values of Celery settings as the worker's app sees them (app + role overrides)."""
        host = host or self.worker
        script = (
            "import json, celery_reliable as m; "
            f"print(json.dumps({{k: m.app.conf[k] for k in {list(keys)!r}}}))"
        )
        out = self.run_as_worker(f"{VENV}/bin/python -c {shlex.quote(script)}", host)
        return json.loads(out)

    def broker_url(self, host=None):
        url = self.run_as_worker("printenv CELERY_BROKER_URL", host).strip()
        assert url, "no CELERY_BROKER_URL in worker.env"
        return url

    def broker_password(self):
        return unquote(urlsplit(self.broker_url()).password)

    def run_as_worker(self, command, host=None):
        """Run a shell command with the worker units' environment and working directory.

        The environment is read by the worker role's helpers (celery_reliable_tools.py) the
        way systemd reads the units' EnvironmentFile=, not by the shell."""
        return (host or self.worker).check_output(worker_shell(command))

    # --------------------------------------------------------------------- tasks ---
    def send(self, seconds, queue="celery", count=1, host=None):
        """Publish COUNT demo tasks sleeping SECONDS to QUEUE; return their ids.

        Published as the README tells producers on a worker host to: through celery_reliable,
        so with the workers' settings (TLS verification, queue arguments, confirms).
        """
        script = "import sys, celery_reliable, demo_app; demo_app.main(sys.argv[1:])"
        out = self.run_as_worker(
            f"{VENV}/bin/python -c {shlex.quote(script)} send {seconds} {queue} {count}", host)
        ids = out.split()
        assert len(ids) == count, out
        return ids

    def send_beat(self, seconds, queue, host=None):
        """Publish one demo task that records an "alive" event every 0.5 s; return its id."""
        script = "import sys, celery_reliable, demo_app; demo_app.main(sys.argv[1:])"
        return self.run_as_worker(
            f"{VENV}/bin/python -c {shlex.quote(script)} send-beat {seconds} {queue}", host).strip()

    def send_poison(self, queue, dead_letters, flag_file="/var/lib/demo-app/poison", timeout=120):
        """Publish a demo task that SIGKILLs its pool process while FLAG_FILE exists (on every
        worker host), and wait until DEAD_LETTERS() (the dead-letter queue's depth) grows;
        the flag files are removed whatever happens. Returns the task's id."""
        before = dead_letters()
        script = "import sys, celery_reliable, demo_app; demo_app.main(sys.argv[1:])"
        for host in self.workers:
            host.check_output(f"touch {flag_file} && chmod 0644 {flag_file}")
        try:
            task = self.run_as_worker(
                f"{VENV}/bin/python -c {shlex.quote(script)} send-crash {queue} {shlex.quote(flag_file)}").strip()
            self.wait_until("the poison task in the dead-letter queue",
                            lambda: dead_letters() > before, timeout=timeout, interval=1)
        finally:
            for host in self.workers:
                host.check_output(f"rm -f {flag_file}")
        return task

    def dead_letters(self, tmp_path, **selection):
        """Run playbooks/dead_letters.yml (a replay with SELECTION, else a listing).

        Returns its report (the helper's JSON) and the number of changes Ansible reported.
        """
        report = tmp_path / f"dead-letters-{time.monotonic_ns()}.json"
        extra = {f"celery_dead_letters_replay_{key}": value for key, value in selection.items()}
        rc, out = self.playbook("playbooks/dead_letters.yml",
                                "-e", json.dumps({**extra, "celery_dead_letters_report_file": str(report)}))
        assert rc == 0, out[-3000:]
        changed = [int(word.split("=")[1]) for line in out.splitlines() if " : ok=" in line
                   for word in line.split() if word.startswith("changed=")]
        return json.loads(report.read_text()), sum(changed)

    def runs_of(self, task_id):
        """Each run of TASK_ID: node, pid, start, last sign of life (alive or done), done or not."""
        runs = {}
        for e in self.events():
            if e["id"] != task_id:
                continue
            key = (e["node"], e["pid"])
            if e["event"] == "start":
                runs[key] = {"node": e["node"], "start": e["t"], "last": e["t"], "done": False}
            elif key in runs:
                runs[key]["last"] = e["t"]
                runs[key]["done"] = runs[key]["done"] or e["event"] == "done"
        return sorted(runs.values(), key=lambda r: r["start"])

    def send_fill(self, queue, pad_bytes, max_count, host=None):
        """Publish padded tasks until the broker refuses one; return (accepted ids, refusal)."""
        host = host or self.worker
        script = "import sys, celery_reliable, demo_app; demo_app.main(sys.argv[1:])"
        result = host.run(worker_shell(
            f"{VENV}/bin/python -c {shlex.quote(script)} send-fill {queue} {pad_bytes} {max_count}"))
        assert result.rc == 0, result.stderr[-2000:]
        refusals = [line for line in result.stderr.splitlines() if line.startswith("refused: ")]
        return result.stdout.split(), (refusals[0] if refusals else None)

    def redis_counts(self, *commands, host=None):
        """Answers of read-only Redis commands (e.g. "llen celery", "hlen unacked") as the workers' user."""
        script = (
            "import os, sys, redis; url = os.environ['CELERY_BROKER_URL'].split(';')[0]; "
            "tls = dict(ssl_ca_certs='/etc/celery/broker-ca.pem') if url.startswith('rediss') else {}; "
            "r = redis.Redis.from_url(url, **tls); "
            "print(' '.join(str(r.execute_command(*c.split())) for c in sys.argv[1:]))"
        )
        args = " ".join(shlex.quote(c) for c in commands)
        out = self.run_as_worker(f"{VENV}/bin/python -c {shlex.quote(script)} {args}", host)
        return [int(v) for v in out.split()]

    def queue_depths(self, vhost="celery"):
        """RabbitMQ: messages in each queue of VHOST, by queue name."""
        out = self.broker.check_output(f"rabbitmqctl -q list_queues -p {vhost} name messages")
        return {row.split()[0]: int(row.split()[1]) for row in out.splitlines()
                if len(row.split()) == 2 and row.split()[1].isdigit()}

    def events(self):
        """Every event recorded on every worker host, in time order."""
        found = []
        for host in self.workers:
            text = host.run(f"cat {EVENTS_FILE} 2>/dev/null").stdout
            found.extend(json.loads(line) for line in text.splitlines() if line.strip())
        return sorted(found, key=lambda e: e["t"])

    def runs(self, task_id, event="start"):
        return [e for e in self.events() if e["id"] == task_id and e["event"] == event]

    def wait_until(self, what, predicate, timeout, interval=0.5):
        """Poll PREDICATE until it returns a truthy value; fail naming WHAT after TIMEOUT s."""
        deadline = time.monotonic() + timeout
        while True:
            value = predicate()
            if value:
                return value
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out after {timeout} s waiting for {what}")
            time.sleep(interval)

    def wait_runs(self, task_id, n, event="start", timeout=60):
        """Wait until TASK_ID has N events of kind EVENT; return them."""
        return self.wait_until(
            f"{event} #{n} of task {task_id}",
            lambda: (lambda r: r if len(r) >= n else None)(self.runs(task_id, event)),
            timeout,
        )

    # -------------------------------------------------------------------- faults ---
    def unit_file_value(self, prefix, host=None, unit_file="/etc/systemd/system/celery-worker@.service"):
        """What follows PREFIX= on the last line of a unit file that starts with it."""
        host = host or self.worker
        lines = [line for line in host.file(unit_file).content_string.splitlines()
                 if line.startswith(f"{prefix}=")]
        assert lines, f"{prefix}= not in {unit_file}"
        return lines[-1][len(prefix) + 1:]

    def drain_timeout(self):
        """Seconds of warm drain the worker units use before the cold shutdown."""
        return int(self.unit_file_value("Environment=CELERY_WORKER_DRAIN_TIMEOUT"))

    def stop_seconds(self):
        """How long a stop may keep a running task: the drain plus the soft shutdown."""
        return self.drain_timeout() + self.settings()["worker_soft_shutdown_timeout"]

    def stop_timeout(self):
        return int(self.unit_file_value("TimeoutStopSec"))

    def unit_property(self, unit, prop, host=None):
        host = host or self.worker
        return host.check_output(f"systemctl show -P {prop} {unit}")

    def main_pid(self, unit, host=None):
        return int(self.unit_property(unit, "MainPID", host))

    def wait_active(self, unit, host=None, timeout=60):
        host = host or self.worker

        def state():
            return host.run(f"systemctl is-active {unit}").stdout.strip()

        try:
            self.wait_until(f"{unit} to be active", lambda: state() == "active", timeout)
        except AssertionError as error:
            raise AssertionError(f"{error}; it is {state()}") from None

    def reboot(self, name, stop_timeout):
        """Reboot a host: docker restart, systemd stopping its units within STOP_TIMEOUT."""
        self._docker.containers.get(name).restart(timeout=stop_timeout)

    def wait_booted(self, host, timeout=90):
        def booted():
            state = host.run("systemctl is-system-running").stdout.strip()
            return state in ("running", "degraded")

        self.wait_until("the host to finish booting", booted, timeout)
