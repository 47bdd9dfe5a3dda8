"""Rendered configuration of the Redis scenario: the worker units and the Redis (or Valkey) broker."""

import os
import re
import shlex

import pytest

from broker_tls import *  # noqa: F401,F403
from celery_stack import scrape
from worker_config import *  # noqa: F401,F403

SERVER = os.environ.get("CELERY_BUNDLE_BROKER_TYPE", "redis")  # as in conftest.py
CONFIG_DIR = f"/etc/{SERVER}"
REDIS_CONF = f"{CONFIG_DIR}/{SERVER}.conf"
DATA_DIR = f"/var/lib/{SERVER}"
UNIT = f"{SERVER}-server.service"


def redis_cli(stack, *args, user=None, password=None):
    auth = ""
    if user:
        auth = f"REDISCLI_AUTH={shlex.quote(password)} "
        args = ("--user", user, "--no-auth-warning") + args
    tls = f"--tls --cacert {CONFIG_DIR}/tls/ca.crt "  # the scenario runs Redis with TLS only
    return stack.broker.run(auth + f"{SERVER}-cli " + tls + " ".join(shlex.quote(a) for a in args))


@pytest.mark.parametrize("line", [
    "appendonly yes",
    "appendfsync everysec",
    "maxmemory-policy noeviction",
    "protected-mode yes",
    f"aclfile {CONFIG_DIR}/users.acl",
])
def test_redis_conf(stack, line):
    assert line in stack.broker.file(REDIS_CONF).content_string.splitlines()


def test_redis_listens_only_on_the_given_addresses(stack):
    listening = stack.broker.check_output("ss -Hltn 'sport = :6379'")
    addresses = {row.split()[3].rsplit(":", 1)[0] for row in listening.splitlines()}
    assert "127.0.0.1" in addresses
    assert "0.0.0.0" not in addresses and "*" not in addresses and "[::]" not in addresses
    ip = stack.broker.check_output("hostname -i").split()[0]
    assert ip in addresses


def test_redis_keeps_an_append_only_file(stack):
    assert stack.broker.file(f"{DATA_DIR}/appendonlydir").is_directory
    manifest = stack.broker.run(f"ls {DATA_DIR}/appendonlydir/*.manifest")
    assert manifest.rc == 0, "no AOF manifest: appendonly is off on the running server"


def test_default_user_cannot_run_commands(stack):
    result = redis_cli(stack, "PING")
    assert "NOAUTH" in result.stdout + result.stderr


def test_celery_user_logs_in_but_gets_no_dangerous_commands(stack):
    password = stack.broker_password()
    assert redis_cli(stack, "PING", user="celery", password=password).stdout.strip() == "PONG"
    denied = redis_cli(stack, "CONFIG", "GET", "appendonly", user="celery", password=password)
    assert "NOPERM" in denied.stdout + denied.stderr
    wrong = redis_cli(stack, "PING", user="celery", password="not-the-password")
    assert "PONG" not in wrong.stdout


def test_acl_file_holds_no_clear_text_password(stack):
    acl = stack.broker.file(f"{CONFIG_DIR}/users.acl")
    assert stack.broker_password() not in acl.content_string
    assert (acl.user, acl.group, acl.mode) == ("root", SERVER, 0o640)


def test_redis_stop_is_bounded_and_restarts(stack):
    assert stack.unit_property(UNIT, "TimeoutStopUSec", stack.broker) == "5min"
    assert stack.unit_property(UNIT, "Restart", stack.broker) == "always"


def test_kernel_settings_are_written(stack):
    sysctl = stack.broker.file("/etc/sysctl.d/60-redis-broker.conf").content_string
    assert "vm.overcommit_memory=1" in sysctl.replace(" ", "")


def test_worker_uses_the_derived_visibility_timeout_and_fast_sweep(stack):
    options = stack.settings()["broker_transport_options"]
    # Explicit 3600 in the scenario, checked > hard limit (60) + countdown (0).
    assert options["visibility_timeout"] == 3600
    assert (options["unacked_restore_interval"], options["unacked_restore_throttle"]) == (10, 1)


def exporter_password(stack):
    env = stack.broker.file("/etc/default/prometheus-redis-exporter")
    assert (env.user, env.group, env.mode) == ("root", "root", 0o600)
    return re.search(r"^REDIS_PASSWORD='([^']+)'$", env.content_string, re.M).group(1)


def test_exporter_serves_memory_and_queue_lengths_on_loopback_only(stack):
    """Debian's prometheus-redis-exporter, logged in as its own user: memory against
    maxmemory and the length of each task queue (what the alert rules read)."""
    listening = stack.broker.check_output("ss -Hltn 'sport = :9121'")
    assert {row.split()[3].rsplit(":", 1)[0] for row in listening.splitlines()} == {"127.0.0.1"}
    stack.worker.check_output("systemctl stop celery-worker@extra.service")
    try:
        stack.send(0, queue="extra", count=3)
        body = scrape(stack.broker, "http://127.0.0.1:9121/metrics")
    finally:
        stack.worker.check_output("systemctl start celery-worker@extra.service")
    assert re.search(r"^redis_up 1$", body, re.M), body[:2000]
    assert re.search(r"^redis_memory_max_bytes [1-9]", body, re.M)
    assert re.search(r"^redis_memory_used_bytes [1-9]", body, re.M)
    # The role's script sizes the task queues (redis_script_values; Debian 13's exporter adds
    # a filename label).
    assert re.search(r'^redis_script_values{(filename="[^"]+",)?key="extra"} 3$', body, re.M), \
        [line for line in body.splitlines() if "script" in line]
    assert re.search(r'^redis_script_values{(filename="[^"]+",)?key="celery"} [0-9]', body, re.M)
    print("\n".join(line for line in body.splitlines() if line.startswith(("redis_script_", "redis_memory_"))))


def test_exporter_user_reads_sizes_never_tasks(stack):
    password = exporter_password(stack)
    assert stack.broker_password() not in stack.broker.file("/etc/default/prometheus-redis-exporter").content_string
    assert redis_cli(stack, "LLEN", "celery", user="celery-exporter", password=password).stdout.strip().isdigit()
    for command in (("LRANGE", "celery", "0", "0"), ("HGETALL", "unacked"), ("LPUSH", "celery", "x"), ("CONFIG", "SET", "maxmemory", "1")):
        denied = redis_cli(stack, *command, user="celery-exporter", password=password)
        assert "NOPERM" in denied.stdout + denied.stderr, command
