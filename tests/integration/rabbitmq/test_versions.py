"""RabbitMQ versions: no deprecated feature in use, and no unsupported version jump.

CI runs this scenario on Debian 13 (RabbitMQ 4.0); on Debian 12 (RabbitMQ 3.10, which has no
deprecated-features subsystem) the first test has nothing to ask.
"""

import json
import re

import pytest

VERSION_FILE = "/var/lib/rabbitmq/rabbitmq_broker.version"


def _version(stack):
    out = stack.broker.check_output("rabbitmqctl -q version").strip()
    return tuple(int(part) for part in re.match(r"(\d+)\.(\d+)", out).groups())


def test_the_broker_reports_no_deprecated_feature_in_use(stack):
    if _version(stack) < (3, 13):
        pytest.skip("RabbitMQ before 3.13 has no deprecated-features subsystem to ask")
    used = json.loads(stack.broker.check_output(
        "rabbitmqctl -q list_deprecated_features --used --formatter json"))
    assert used == [], f"deprecated features in use: {used}"


def test_the_broker_log_warns_of_no_deprecated_feature(stack):
    # Some deprecated features (management_metrics_collection) are not in the --used list
    # but are logged once when the node starts with them on. The workers have run by now.
    out = stack.broker.run("grep -h -A1 'Deprecated features' /var/log/rabbitmq/rabbit@*.log")
    assert out.stdout.strip() == "", out.stdout


def test_the_role_records_the_running_version(stack):
    recorded = stack.broker.check_output(f"cat {VERSION_FILE}").strip()
    assert recorded == stack.broker.check_output("rabbitmqctl -q version").strip()


def test_an_unsupported_version_jump_is_refused_before_any_change(stack):
    # As after a Debian 12 to 13 upgrade: the node last ran 3.10, the package is now newer.
    major, minor = _version(stack)
    recorded = stack.broker.check_output(f"cat {VERSION_FILE}").strip()
    jump_from = "3.10.8" if (major, minor) >= (3, 12) else "3.8.9"
    config_before = stack.broker.check_output("md5sum /etc/rabbitmq/rabbitmq.conf")
    stack.broker.check_output(f"echo {jump_from} > {VERSION_FILE}")
    try:
        rc, output = stack.playbook("site.yml", "--limit", stack.broker_name, timeout=600)
    finally:
        stack.broker.check_output(f"echo {recorded} > {VERSION_FILE}")
    assert rc != 0, output[-4000:]
    assert "cannot move from" in output and "rabbitmq_broker_upgrade_check" in output, output[-4000:]
    # The gate stopped it: nothing was rewritten, the node still runs.
    assert stack.broker.check_output("md5sum /etc/rabbitmq/rabbitmq.conf") == config_before
    assert stack.broker.service("rabbitmq-server").is_running
