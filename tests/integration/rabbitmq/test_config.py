"""Rendered configuration of the RabbitMQ scenario: the worker units and the RabbitMQ broker."""

import shlex

import pytest

from broker_tls import *  # noqa: F401,F403
from celery_stack import CONFIG_DIR, scrape
from worker_config import *  # noqa: F401,F403

VHOST = "celery"


def rabbitmqctl(stack, *args):
    return stack.broker.check_output("rabbitmqctl -q " + " ".join(shlex.quote(a) for a in args))


def test_running_broker_reports_the_derived_consumer_timeout(stack):
    # Explicit 121 s in the scenario (checked > prefetch multiplier 2 x hard limit 60 + countdown 0).
    out = rabbitmqctl(stack, "eval", "application:get_env(rabbit, consumer_timeout).")
    assert out.strip() == "{ok,121000}"


def test_rabbitmq_listens_only_on_the_given_addresses(stack):
    # TLS only in this scenario: nothing on the plain-text port.
    assert stack.broker.check_output("ss -Hltn 'sport = :5672'").strip() == ""
    listening = stack.broker.check_output("ss -Hltn 'sport = :5671'")
    addresses = {row.split()[3].rsplit(":", 1)[0] for row in listening.splitlines()}
    assert "127.0.0.1" in addresses
    assert "0.0.0.0" not in addresses and "*" not in addresses and "[::]" not in addresses
    ip = stack.broker.check_output("hostname -i").split()[0]
    assert ip in addresses


def _listening(host, port):
    rows = host.check_output(f"ss -Hltn 'sport = :{port}'").splitlines()
    return {row.split()[3].rsplit(":", 1)[0] for row in rows}


def test_erlang_distribution_listens_on_loopback_only(stack):
    # A single node: epmd (systemd's epmd.socket) and the distribution port on 127.0.0.1
    # only; the CLI still reaches the node under its host name (erl_inetrc).
    assert _listening(stack.broker, 4369) == {"127.0.0.1"}
    assert _listening(stack.broker, 25672) == {"127.0.0.1"}
    assert stack.broker.check_output("getent ahostsv4 $(hostname) | head -1").split()[0] != "127.0.0.1"
    assert "Ping succeeded" in stack.broker.check_output("rabbitmq-diagnostics ping")


def test_guest_user_is_gone_and_cannot_log_in(stack):
    users = rabbitmqctl(stack, "list_users")
    assert "guest" not in users.split()
    script = (
        "import amqp, sys\n"
        "c = amqp.Connection('celery-rabbitmq-broker:5671', userid='guest', password='guest', "
        "virtual_host='celery', connect_timeout=5, "
        "ssl={'ca_certs': '/etc/celery/broker-ca.pem', 'cert_reqs': 2, "
        "'server_hostname': 'celery-rabbitmq-broker'})\n"
        "try:\n    c.connect()\nexcept Exception as e:\n    print('refused', type(e).__name__)\n"
        "else:\n    print('logged in')\n"
    )
    out = stack.worker.check_output(f"/opt/celery/venv/bin/python -c {shlex.quote(script)}")
    # Refused by RabbitMQ's authentication, not by a connection or TLS error.
    assert out.strip() == "refused AccessRefused", out


def test_celery_user_reaches_only_its_vhost(stack):
    perms = rabbitmqctl(stack, "list_user_permissions", "celery")
    assert [line.split()[0] for line in perms.splitlines() if line.strip() and not line.startswith("vhost")] == [VHOST]


def test_task_queues_carry_the_dead_letter_policy(stack):
    queues = dict(line.split()[:2] for line in rabbitmqctl(stack, "list_queues", "-p", VHOST, "name", "policy").splitlines()
                  if len(line.split()) >= 2 and line.split()[0] != "name")
    assert queues.get("celery") == "celery-tasks"
    assert queues.get("extra") == "celery-tasks"
    policy = rabbitmqctl(stack, "list_policies", "-p", VHOST)
    assert '"dead-letter-exchange":"celery.dlx"' in policy.replace(" ", "")
    assert '"message-ttl":70000' in policy.replace(" ", "")


def test_rabbitmq_stop_is_bounded_and_restarts(stack):
    assert stack.unit_property("rabbitmq-server.service", "TimeoutStopUSec", stack.broker) == "5min"
    assert stack.unit_property("rabbitmq-server.service", "Restart", stack.broker) == "always"


def test_secret_files_are_tight(stack):
    conf = stack.broker.file("/etc/rabbitmq/rabbitmq.conf")
    assert (conf.user, conf.group, conf.mode) == ("root", "rabbitmq", 0o640)
    assert stack.broker_password() not in conf.content_string


def test_worker_uses_the_rabbitmq_settings(stack):
    conf = stack.effective_conf(["broker_channel_error_retry", "broker_heartbeat", "broker_transport_options"])
    assert conf["broker_channel_error_retry"] is True
    assert conf["broker_heartbeat"] == 8  # (celery_worker_lost_timeout 30 (the scenario) - 6) / 3
    assert conf["broker_transport_options"]["confirm_publish"] is True


def test_every_worker_echoes_through_the_broker(stack):
    """The fence's echo queue (celery_reliable_amqp.py): one exclusive queue per running worker
    instance (named for its node plus a random part, new for every connection), and a deadline
    (the heartbeat, 8 s here) in each worker's environment."""
    rows = rabbitmqctl(stack, "list_queues", "-p", VHOST, "name", "exclusive", "consumers")
    lines = [line.split() for line in rows.splitlines() if line.startswith("celery.reliable.echo.")]
    echo = {fields[0].rsplit(".", 1)[0]: fields[1:] for fields in lines}
    assert len(echo) == len(lines), f"more than one echo queue for a worker: {rows}"
    expected = set()
    for name, host in zip(stack.worker_names, stack.workers):
        units = host.check_output("systemctl list-units --state=running --plain --no-legend 'celery-worker@*'")
        for unit in units.splitlines():
            instance = unit.split()[0].removeprefix("celery-worker@").removesuffix(".service")
            expected.add(f"celery.reliable.echo.{instance}@{name}")
    assert set(echo) == expected, rows
    assert all(values == ["true", "1"] for values in echo.values()), echo
    for host in stack.workers:
        env = host.file(f"{CONFIG_DIR}/worker.env").content_string
        assert "CELERY_WORKER_AMQP_FENCE_SECONDS='8'" in env


@pytest.mark.parametrize("queue", ["celery.dlq"])
def test_dead_letter_queue_is_durable(stack, queue):
    rows = rabbitmqctl(stack, "list_queues", "-p", VHOST, "name", "durable")
    assert f"{queue}\ttrue" in rows or f"{queue} true" in " ".join(rows.split("\t"))


def test_prometheus_metrics_per_queue_on_loopback_only(stack):
    """rabbitmq_prometheus serves per-queue depth, unacknowledged count and consumers (the
    dead-letter queue included) on 127.0.0.1:15692, and nothing on the network."""
    listening = stack.broker.check_output("ss -Hltn 'sport = :15692'")
    assert {row.split()[3].rsplit(":", 1)[0] for row in listening.splitlines()} == {"127.0.0.1"}
    body = scrape(stack.broker, f"http://127.0.0.1:15692/metrics/detailed?vhost={VHOST}"
                                "&family=queue_coarse_metrics&family=queue_consumer_count")
    for metric in ("rabbitmq_detailed_queue_messages_ready", "rabbitmq_detailed_queue_messages_unacked",
                   "rabbitmq_detailed_queue_consumers"):
        for queue in ("celery", "celery.dlq"):
            assert f'{metric}{{vhost="{VHOST}",queue="{queue}"}}' in body, (metric, queue, body[:1500])
    assert 'rabbitmq_detailed_queue_consumers{vhost="celery",queue="celery"} 0' not in body
    # The series the alert rules (prometheus/celery_bundle.rules.yml) read from /metrics.
    assert "\nrabbitmq_global_messages_redelivered_total{" in scrape(stack.broker, "http://127.0.0.1:15692/metrics")
    print("\n".join(line for line in body.splitlines() if 'queue="celery' in line))
