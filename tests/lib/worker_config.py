"""Checks of the rendered worker configuration, shared by the broker scenarios."""

import re
import shlex

import pytest
from celery_stack import VENV, scrape

UNIT = "celery-worker@default.service"


@pytest.mark.parametrize("prop, expected", [
    ("Type", "notify"),
    ("NotifyAccess", "main"),
    ("WatchdogSignal", "6"),
    ("KillMode", "mixed"),
    ("KillSignal", "15"),
    ("Restart", "always"),
    ("OOMPolicy", "continue"),
    ("StartLimitIntervalUSec", "0"),
    ("StateDirectory", "celery"),
    ("User", "celery"),
    ("NoNewPrivileges", "yes"),
    ("ProtectSystem", "strict"),
    ("ProtectHome", "yes"),
    ("PrivateTmp", "yes"),
])
def test_worker_unit_property(stack, prop, expected):
    assert stack.unit_property(UNIT, prop) == expected


def test_stop_timeout_is_drain_plus_soft_shutdown_plus_30(stack):
    assert stack.stop_timeout() == stack.stop_seconds() + 30


def test_the_worker_feeds_its_watchdog(stack, scenario):
    """WatchdogSec is celery_worker_watchdog_seconds (the scenario's), the worker reported
    itself ready and says what it consumes (its STATUS=)."""
    assert stack.unit_file_value("WatchdogSec") == str(scenario["watchdog"])
    assert stack.unit_property(UNIT, "WatchdogUSec") == f"{scenario['watchdog']}s"
    assert stack.unit_property(UNIT, "StatusText") == "Consuming celery"
    assert stack.unit_property(UNIT, "ActiveState") == "active"


def test_every_instance_runs_as_the_worker_user(stack):
    for name in ("default", "extra"):
        unit = f"celery-worker@{name}.service"
        stack.wait_active(unit, timeout=30)
        assert stack.worker.run(f"systemctl is-enabled {unit}").stdout.strip() == "enabled"
        pid = stack.main_pid(unit)
        assert stack.worker.check_output(f"ps -o user= -p {pid}") == "celery"
    assert "--queues=extra" in stack.worker.check_output(
        f"tr '\\0' ' ' < /proc/{stack.main_pid('celery-worker@extra.service')}/cmdline")


def test_reliable_settings_override_the_application(stack):
    """The demo app sets task_acks_late=False and prefetch 4; the workers must not use them
    (prefetch: celery_worker_prefetch_multiplier, 2 by default)."""
    conf = stack.effective_conf([
        "task_acks_late", "task_reject_on_worker_lost", "worker_prefetch_multiplier",
        "task_acks_on_failure_or_timeout", "broker_connection_max_retries",
        "broker_connection_retry_on_startup", "task_time_limit", "task_soft_time_limit",
        "worker_cancel_long_running_tasks_on_connection_loss",
    ])
    assert conf["task_acks_late"] is True
    assert conf["task_reject_on_worker_lost"] is True
    assert conf["worker_prefetch_multiplier"] == 2
    assert conf["task_acks_on_failure_or_timeout"] is True
    assert conf["broker_connection_max_retries"] is None
    assert conf["broker_connection_retry_on_startup"] is True
    assert conf["worker_cancel_long_running_tasks_on_connection_loss"] is True
    # celery_task_max_runtime 30 in the scenario: soft 30, hard 60.
    assert (conf["task_soft_time_limit"], conf["task_time_limit"]) == (30, 60)


def test_secrets_stay_out_of_world_readable_files(stack):
    env = stack.worker.file("/etc/celery/worker.env")
    assert (env.user, env.group, env.mode) == ("root", "root", 0o600)
    assert any(f"CELERY_BROKER_URL='{scheme}://" in env.content_string
               for scheme in ("redis", "rediss", "amqp", "amqps"))
    password = stack.broker_password()
    for path in ("/etc/systemd/system/celery-worker@.service", "/etc/celery/settings.json",
                 "/etc/celery/instance-default.env"):
        assert password not in stack.worker.file(path).content_string, path
    settings = stack.worker.file("/etc/celery/settings.json")
    assert (settings.user, settings.group, settings.mode) == ("root", "celery", 0o640)


def test_worker_unit_exposure_is_at_most_2(stack):
    """systemd-analyze security of the worker unit: 2.0 or less (Celery's own example: 9.2)."""
    out = stack.worker.check_output("systemd-analyze security --no-pager celery-worker@default.service")
    match = re.search(r"Overall exposure level for \S+: ([0-9.]+)", out)
    assert match, out[-500:]
    score = float(match.group(1))
    print(f"systemd-analyze security exposure of celery-worker@default.service: {score}")
    assert score <= 2.0, out


def test_writable_paths_are_only_the_declared_ones(stack):
    """Inside the running unit's mount namespace, as its user: only the declared paths are writable."""
    pid = stack.main_pid(UNIT)
    uid = stack.worker.check_output("id -u celery")
    gid = stack.worker.check_output("id -g celery")

    def can_write(directory):
        return stack.worker.run(
            f"nsenter --target {pid} --mount --setuid {uid} --setgid {gid} "
            f"sh -c 'touch {directory}/.probe && rm -f {directory}/.probe'").rc == 0

    assert can_write("/var/lib/celery"), "the state directory is not writable"
    assert can_write("/var/lib/demo-app"), "celery_worker_read_write_paths is not writable"
    for directory in ("/opt/celery/app", "/opt/celery/venv", "/etc/celery", "/usr/local/lib/celery-worker"):
        # Root-owned anyway; remount read-only is what matters, so try as root too.
        assert stack.worker.run(
            f"nsenter --target {pid} --mount touch {directory}/.probe").rc != 0, directory


def exporter_samples(host, port=9808):
    """{(metric name, frozenset of label pairs): value} of the exporter's /metrics on HOST."""
    samples = {}
    for line in scrape(host, f"http://127.0.0.1:{port}/metrics").splitlines():
        found = re.match(r'^([a-z_]+)(?:\{(.*)\})? (\S+)$', line)
        if found:
            pairs = frozenset(re.findall(r'([a-z_]+)="((?:[^"\\]|\\.)*)"', found.group(2) or ""))
            samples[found.group(1), pairs] = float(found.group(3))
    return samples


def test_the_exporter_sees_this_hosts_workers_and_counts_failures(stack):
    """celery-exporter.service (loopback): every instance of this host is up by its
    heartbeats, none of another host's; a frozen worker shows 0 while Celery's own events
    stop; a task that raises is counted as failed under its name, one that runs as succeeded."""
    listening = stack.worker.check_output("ss -Hltn 'sport = :9808'")
    assert {row.split()[3].rsplit(":", 1)[0] for row in listening.splitlines()} == {"127.0.0.1"}
    host = stack.worker.check_output("hostname").strip()
    units = stack.worker.check_output("systemctl list-units --plain --no-legend 'celery-worker@*.service'")
    instances = sorted(re.findall(r"^celery-worker@(\S+)\.service", units, re.M))
    assert instances

    def up(worker):
        return exporter_samples(stack.worker).get(("celery_worker_up", frozenset({("worker", worker)})))

    def count(worker, state, name="demo_app.fail"):
        key = ("celery_tasks_total", frozenset({("worker", worker), ("name", name), ("state", state)}))
        return exporter_samples(stack.worker).get(key, 0)

    for instance in instances:
        stack.wait_until(f"{instance}@{host} up in the exporter", lambda: up(f"{instance}@{host}") == 1, 30)
    workers = {dict(labels)["worker"] for (name, labels) in exporter_samples(stack.worker) if name == "celery_worker_up"}
    assert workers == {f"{instance}@{host}" for instance in instances}

    worker = f"extra@{host}"
    failed = count(worker, "failed")
    succeeded = count(worker, "succeeded", "demo_app.work")
    script = "import sys, celery_reliable, demo_app; demo_app.main(sys.argv[1:])"
    stack.run_as_worker(f"{VENV}/bin/python -c {shlex.quote(script)} send-fail extra")
    stack.send(0, queue="extra")
    stack.wait_until("the failure counted", lambda: count(worker, "failed") == failed + 1, 30)
    stack.wait_until("the success counted", lambda: count(worker, "succeeded", "demo_app.work") == succeeded + 1, 30)
    assert count(worker, "received") >= 1

    pid = stack.main_pid("celery-worker@extra.service")
    stack.worker.check_output(f"kill -STOP {pid}")
    try:
        stack.wait_until("the frozen worker down in the exporter", lambda: up(worker) == 0, 12)
    finally:
        stack.worker.check_output(f"kill -CONT {pid}")
    stack.wait_until("the thawed worker up again", lambda: up(worker) == 1, 20)
    print({f"{name}{dict(labels)}": value for (name, labels), value in exporter_samples(stack.worker).items()
           if labels and dict(labels).get("worker") == worker})


def test_a_file_that_drifted_is_written_again_by_the_next_run(stack):
    """The roles write a file only where it differs from the host's (one find with checksums
    per role, __celery_file_differs): drift in content or mode on a worker host is still
    repaired by the next run of site.yml, and the workers restart with their files back.
    Fails if a role skips its files on another test than content, mode, owner and group."""
    worker, config = stack.worker, "/etc/celery"
    instance_env = f"{config}/instance-extra.env"
    original = worker.file(instance_env).content_string
    worker.check_output(f"echo '# drift' >> {instance_env} && chmod 0644 {config}/settings.json")
    rc, output = stack.playbook("site.yml", "--limit", stack.worker_names[0], "--tags", "celery_worker_configure",
                                timeout=600)
    assert rc == 0, output[-3000:]
    assert worker.file(instance_env).content_string == original
    assert worker.file(f"{config}/settings.json").mode == 0o640
    recap = re.search(rf"{re.escape(stack.worker_names[0])}\s+: ok=\d+\s+changed=(\d+)", output)
    assert recap and int(recap.group(1)) >= 2, output[-3000:]
    for name in ("default", "extra"):
        stack.wait_active(f"celery-worker@{name}.service", timeout=60)
