"""Bad input is refused before anything changes, with a message naming the variable.

Each case runs site.yml (check mode, local connection, a valid baseline plus one bad
override) and asserts that the run fails in the first play, "Check the settings before
changing anything", that the message names what is wrong, and that nothing changed: no
task of a later play ran and no host reports a change.
"""

import json
import os
import subprocess
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
HERE = Path(__file__).resolve().parent / "bad_input"
PREFLIGHT_PLAY = "Check the settings before changing anything"

CASES = {
    "password missing": ({"celery_broker_password": None}, "celery_broker_password"),
    "password placeholder": ({"celery_broker_password": "changeme"}, "celery_broker_password"),
    "unknown broker type": ({"celery_broker_type": "kafka"}, "celery_broker_type"),
    "runtime zero": ({"celery_task_max_runtime": 0}, "celery_task_max_runtime"),
    "visibility timeout below hard limit": (
        {"celery_broker_visibility_timeout": 600}, "celery_broker_visibility_timeout"),
    "visibility timeout below hard limit + countdown": (
        {"celery_task_max_countdown": 600, "celery_broker_visibility_timeout": 4000},
        "celery_broker_visibility_timeout"),
    "hard limit not above soft": ({"celery_task_time_limit": 3600}, "celery_task_time_limit"),
    "stop timeout below drain": ({"celery_worker_stop_timeout": 100}, "celery_worker_stop_timeout"),
    "quorum queues on redis": ({"celery_broker_queue_type": "quorum"}, "celery_broker_queue_type"),
    "worker app missing": ({"celery_worker_app": None}, "celery_worker_app"),
    "instance name unsafe for a unit": (
        {"celery_worker_instances": [{"name": "a/b", "queues": ["celery"], "concurrency": 1}]},
        "celery_worker_instances"),
    "concurrency zero": (
        {"celery_worker_instances": [{"name": "w", "queues": ["celery"], "concurrency": 0}]},
        "concurrency"),
    "duplicate instance names": (
        {"celery_worker_instances": [{"name": "w", "queues": ["a"], "concurrency": 1},
                                     {"name": "w", "queues": ["b"], "concurrency": 1}]},
        "unique names"),
    "no queues": (
        {"celery_worker_instances": [{"name": "w", "queues": [], "concurrency": 1}]},
        "queues"),
    "time limit in celery_worker_settings": (
        {"celery_worker_settings": {"task_time_limit": 10}}, "celery_task_time_limit"),
    "visibility timeout in celery_worker_settings": (
        {"celery_worker_settings": {"broker_transport_options": {"visibility_timeout": 10}}},
        "celery_broker_visibility_timeout"),
    "relative app dir": ({"celery_worker_app_dir": "app"}, "celery_worker_app_dir"),
    "relative writable path": ({"celery_worker_read_write_paths": ["tmp/x"]}, "celery_worker_read_write_paths"),
    "redis bound nowhere": ({"redis_broker_bind": []}, "redis_broker_bind"),
    "redis eviction through extra config": (
        {"redis_broker_extra_config": {"maxmemory-policy": "allkeys-lru"}}, "maxmemory-policy"),
    "tls without certificate files": ({"celery_broker_tls": True}, "celery_broker_tls_ca_file"),
    "tls with a CA file that does not exist": (
        {"celery_broker_tls": True, "celery_broker_tls_ca_file": "/nonexistent/ca.pem",
         "celery_broker_tls_cert_file": "/nonexistent/b.pem", "celery_broker_tls_key_file": "/nonexistent/b.key"},
        "celery_broker_tls_ca_file"),
    "rabbitmq TTL shorter than a task": (
        {"celery_broker_type": "rabbitmq", "rabbitmq_broker_message_ttl": 60}, "rabbitmq_broker_message_ttl"),
    "lost timeout too short": ({"celery_worker_lost_timeout": 20}, "celery_worker_lost_timeout"),
    "fence not below the lease": (
        {"celery_worker_redis_fence_seconds": 44}, "celery_worker_redis_fence_seconds"),
    "rabbitmq heartbeat too long for the lost timeout": (
        {"celery_broker_type": "rabbitmq", "celery_broker_heartbeat": 20}, "celery_broker_heartbeat"),
    "rabbitmq fence not below two heartbeats": (
        {"celery_broker_type": "rabbitmq", "celery_worker_rabbitmq_fence_seconds": 32},
        "celery_worker_rabbitmq_fence_seconds"),
    "rabbitmq consumer timeout below hard limit": (
        {"celery_broker_type": "rabbitmq", "celery_broker_consumer_timeout": 600}, "celery_broker_consumer_timeout"),
}


# Cases on a cluster inventory (tests/bad_input/hosts-cluster.yml: three brokers, two
# workers, worker1 in celery_beat), on top of a valid RabbitMQ cluster baseline.
CLUSTER_BASELINE = {"celery_broker_type": "rabbitmq", "rabbitmq_broker_erlang_cookie": "A" * 32}
CLUSTER_CASES = {
    "redis on several broker hosts": ({"celery_broker_type": "redis"}, "Redis runs on one host"),
    "cluster without an erlang cookie": (
        {"rabbitmq_broker_erlang_cookie": None}, "rabbitmq_broker_erlang_cookie"),
    "erlang cookie too short": ({"rabbitmq_broker_erlang_cookie": "short"}, "rabbitmq_broker_erlang_cookie"),
    "classic queues in a cluster": ({"celery_broker_queue_type": "classic"}, "celery_broker_queue_type"),
    "two nodes with one name": ({"rabbitmq_broker_node_name": "rabbit@same"}, "node name"),
    "beat on every worker host": ({"celery_worker_beat": True}, "celery_worker_beat"),
}


def run_site(overrides, tmp_path, *options, playbook="site.yml", inventory="hosts.yml", baseline_extra=None):
    extra = tmp_path / "extra.json"
    env = dict(os.environ,
               ANSIBLE_CONFIG=str(ROOT / "ansible.cfg"),
               ANSIBLE_STDOUT_CALLBACK="ansible.posix.json",
               ANSIBLE_LOCALHOST_WARNING="false",
               ANSIBLE_INVENTORY_UNPARSED_WARNING="false")
    # None means "not defined": drop it from the baseline instead of passing null.
    good = {**yaml.safe_load((HERE / "good.yml").read_text()), **(baseline_extra or {})}
    baseline = {k: v for k, v in good.items() if k not in overrides or overrides[k] is not None}
    base_file = tmp_path / "baseline.json"
    base_file.write_text(json.dumps(baseline))
    extra.write_text(json.dumps({k: v for k, v in overrides.items() if v is not None}))
    proc = subprocess.run(
        ["ansible-playbook", "--check", *options, "-i", str(HERE / inventory),
         "-e", f"@{base_file}", "-e", f"@{extra}", str(ROOT / playbook)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.stdout.strip(), proc.stderr[-3000:]
    return proc, json.loads(proc.stdout)


def failure_messages(report):
    messages = []
    for play in report["plays"]:
        for task in play["tasks"]:
            for result in task["hosts"].values():
                if result.get("failed"):
                    messages.append(str(result.get("msg", "")))
                    messages.extend(str(item.get("msg", "")) for item in result.get("results", [])
                                    if item.get("failed"))
    return messages


def assert_refused_in_first_play(proc, report, first_play, expected):
    """The run failed in FIRST_PLAY alone, with a message containing EXPECTED, changing nothing."""
    assert proc.returncode != 0, "the run did not fail"
    plays = [play["play"]["name"] for play in report["plays"]]
    assert plays == [first_play], f"later plays ran: {plays}"
    messages = failure_messages(report)
    assert messages, "no task failed"
    assert any(expected in message for message in messages), messages
    assert all(stats.get("changed", 0) == 0 for stats in report["stats"].values()), report["stats"]


def assert_preflight_passes(proc, report):
    preflight = [p for p in report["plays"] if p["play"]["name"] == PREFLIGHT_PLAY][0]
    assert not failure_messages({"plays": [preflight]}), proc.stdout[-2000:]


def test_the_baseline_passes_the_preflight(tmp_path):
    # Only the preflight play (tagged always) runs: a tag nothing else carries.
    assert_preflight_passes(*run_site({}, tmp_path, "--tags", "preflight-only"))


@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_input_is_refused_before_any_change(case, tmp_path):
    overrides, expected = CASES[case]
    assert_refused_in_first_play(*run_site(overrides, tmp_path), PREFLIGHT_PLAY, expected)


def test_the_cluster_baseline_passes_the_preflight(tmp_path):
    assert_preflight_passes(*run_site({}, tmp_path, "--tags", "preflight-only", inventory="hosts-cluster.yml",
                                      baseline_extra=CLUSTER_BASELINE))


@pytest.mark.parametrize("case", sorted(CLUSTER_CASES))
def test_bad_cluster_input_is_refused_before_any_change(case, tmp_path):
    overrides, expected = CLUSTER_CASES[case]
    outcome = run_site(overrides, tmp_path, inventory="hosts-cluster.yml", baseline_extra=CLUSTER_BASELINE)
    assert_refused_in_first_play(*outcome, PREFLIGHT_PLAY, expected)


DRILL_PREFLIGHT_PLAY = "Drill | Check the inventory and the permission to inject faults"
DRILL_CASES = {
    "fault injection not allowed": ({}, "celery_drill_allowed: true"),
    "drill instance named like a real one": (
        {"celery_drill_allowed": True, "celery_drill_instance": "default"}, "celery_drill_instance"),
}


@pytest.mark.parametrize("case", sorted(DRILL_CASES))
def test_the_drill_refuses_before_touching_a_host(case, tmp_path):
    """playbooks/drill.yml stops in its first play: no canary, no fault."""
    overrides, expected = DRILL_CASES[case]
    outcome = run_site(overrides, tmp_path, playbook="playbooks/drill.yml")
    assert_refused_in_first_play(*outcome, DRILL_PREFLIGHT_PLAY, expected)
