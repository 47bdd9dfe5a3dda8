"""Bad input is refused before anything changes, with a message naming the variable.

Each case runs site.yml (check mode, local connection, a valid baseline plus one bad
override) and asserts that the run fails in the first play, "Check the settings before
changing anything", that the message names what is wrong, and that nothing changed: no
task of a later play ran and no host reports a change.
"""

import json
import os
import subprocess
import tempfile
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
HERE = Path(__file__).resolve().parent / "bad_input"
PREFLIGHT_PLAY = "Check the settings before changing anything"
FACT_CACHE = Path(tempfile.gettempdir()) / f"celery-bundle-bad-input-facts-{os.getuid()}"

CASES = {
    "password missing": ({"celery_broker_password": None}, "celery_broker_password"),
    "password placeholder": ({"celery_broker_password": "changeme"}, "celery_broker_password"),
    "node host with an @": ({"celery_worker_node_host": "a@b"}, "celery_worker_node_host"),
    "password with a line break": ({"celery_broker_password": "a-real-secret\nsecond-line"}, "celery_broker_password"),
    "unknown broker type": ({"celery_broker_type": "kafka"}, "celery_broker_type"),
    "runtime zero": ({"celery_task_max_runtime": 0}, "celery_task_max_runtime"),
    "visibility timeout below hard limit": (
        {"celery_broker_visibility_timeout": 600}, "celery_broker_visibility_timeout"),
    "visibility timeout below hard limit + countdown": (
        {"celery_task_max_countdown": 600, "celery_broker_visibility_timeout": 4000},
        "celery_broker_visibility_timeout"),
    "prefetch multiplier zero": ({"celery_worker_prefetch_multiplier": 0}, "celery_worker_prefetch_multiplier must be"),
    "visibility timeout below the wait of a reserved task": (
        {"celery_worker_prefetch_multiplier": 4, "celery_broker_visibility_timeout": 8000},
        "Raise it, or lower celery_worker_prefetch_multiplier"),
    "prefetch multiplier that differs between hosts": (
        {"celery_worker_prefetch_multiplier": "{{ 3 if inventory_hostname == 'bad-input-worker' else 2 }}"},
        "must be one value for the whole deployment"),
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
    "watchdog shorter than the fence": (
        {"celery_worker_watchdog_seconds": 20}, "celery_worker_watchdog_seconds"),
    "start timeout too short": ({"celery_worker_start_timeout": 5}, "celery_worker_start_timeout"),
    "negative delivery limit": ({"celery_task_delivery_limit": -1}, "celery_task_delivery_limit"),
    "no delivery limit on quorum queues": (
        {"celery_broker_type": "rabbitmq", "celery_broker_queue_type": "quorum", "celery_task_delivery_limit": 0},
        "celery_task_delivery_limit"),
    "dead-letter queue a worker consumes": (
        {"celery_broker_dead_letter_queue": "celery"}, "celery_broker_dead_letter_queue"),
    # celery_worker_settings that would switch a guarantee off (refused unless named in
    # celery_worker_unsafe_settings), or set a derived value.
    "late ack off": ({"celery_worker_settings": {"task_acks_late": False}}, "task_acks_late: false (needs true"),
    "reject on worker lost off": (
        {"celery_worker_settings": {"task_reject_on_worker_lost": False}}, "task_reject_on_worker_lost"),
    "requeue on failure": (
        {"celery_worker_settings": {"task_acks_on_failure_or_timeout": False}}, "task_acks_on_failure_or_timeout"),
    "prefetch 50 with late ack": (
        {"celery_worker_settings": {"worker_prefetch_multiplier": 50}}, "worker_prefetch_multiplier: 50"),
    "connection retries limited": (
        {"celery_worker_settings": {"broker_connection_max_retries": 3}}, "broker_connection_max_retries"),
    "no retry on start-up": (
        {"celery_worker_settings": {"broker_connection_retry_on_startup": False}}, "broker_connection_retry_on_startup"),
    "tasks kept running on connection loss": (
        {"celery_worker_settings": {"worker_cancel_long_running_tasks_on_connection_loss": False}},
        "worker_cancel_long_running_tasks_on_connection_loss"),
    "publisher confirms off": (
        {"celery_broker_type": "rabbitmq", "celery_worker_settings": {"broker_transport_options": {"confirm_publish": False}}},
        "broker_transport_options.confirm_publish"),
    "string for a boolean setting": (
        {"celery_worker_settings": {"task_acks_late": "false"}}, "task_acks_late"),
    "time limit through annotations": (
        {"celery_worker_settings": {"task_annotations": {"*": {"time_limit": 99999}}}}, "task_annotations"),
    "heartbeat in celery_worker_settings": (
        {"celery_worker_settings": {"broker_heartbeat": 120}}, "celery_broker_heartbeat"),
    "lease in celery_worker_settings": (
        {"celery_worker_settings": {"broker_transport_options": {"reliable_lease_seconds": 600}}},
        "celery_broker_redis_lease_seconds"),
    # Values the broker would refuse at its restart (the broker would then be down).
    "redis user named default": ({"celery_broker_user": "default"}, "celery_broker_user"),
    "user name with a space": ({"celery_broker_user": "cel ery"}, "celery_broker_user"),
    "maxmemory with a space": ({"redis_broker_maxmemory": "2 GB"}, "redis_broker_maxmemory"),
    "port out of range": ({"celery_broker_port": 70000}, "celery_broker_port"),
    "redis exporter logging in as the celery user": (
        {"redis_broker_exporter_user": "celery"}, "redis_broker_exporter_user"),
    "celery exporter listener not an address": (
        {"celery_worker_exporter_bind": "localhost"}, "celery_worker_exporter_bind"),
    "redis db 16": ({"celery_broker_redis_db": 16}, "celery_broker_redis_db"),
    "redis bind address out of range": ({"redis_broker_bind": ["10.0.0.300"]}, "redis_broker_bind"),
    "rabbitmq listener not an address": (
        {"celery_broker_type": "rabbitmq", "rabbitmq_broker_bind": ["broker.example"]}, "rabbitmq_broker_bind"),
    "redis on loopback only with remote workers": ({"redis_broker_bind": ["127.0.0.1"]}, "redis_broker_bind"),
    "rabbitmq on loopback only with remote workers": (
        {"celery_broker_type": "rabbitmq", "rabbitmq_broker_bind": ["127.0.0.1", "::1"]}, "rabbitmq_broker_bind"),
    "rabbitmq metrics listener not an address": (
        {"celery_broker_type": "rabbitmq", "rabbitmq_broker_prometheus_bind": "localhost"}, "rabbitmq_broker_prometheus_bind"),
    "rabbitmq heartbeat zero": (
        {"celery_broker_type": "rabbitmq", "rabbitmq_broker_heartbeat": 0}, "rabbitmq_broker_heartbeat"),
    "erlang distribution address not an IPv4 address": (
        {"celery_broker_type": "rabbitmq", "rabbitmq_broker_distribution_address": "10.0.0.300"},
        "rabbitmq_broker_distribution_address"),
    "rabbitmq message TTL above the maximum": (
        {"celery_broker_type": "rabbitmq", "rabbitmq_broker_message_ttl": 5000000}, "rabbitmq_broker_message_ttl"),
    # Values that would open the host.
    "workers run as root": ({"celery_worker_user": "root"}, "celery_worker_user"),
    "worker group root": ({"celery_worker_group": "root"}, "celery_worker_group"),
    "config dir is /etc": ({"celery_worker_config_dir": "/etc"}, "celery_worker_config_dir"),
    "path climbing out with ..": ({"celery_worker_venv": "/opt/celery/../../etc"}, "celery_worker_venv"),
    "whole file system writable": ({"celery_worker_read_write_paths": ["/"]}, "celery_worker_read_write_paths"),
    "instance named ..": (
        {"celery_worker_instances": [{"name": "..", "queues": ["celery"], "concurrency": 1}]}, "celery_worker_instances"),
    "rabbitmq heartbeat too long for the lost timeout": (
        {"celery_broker_type": "rabbitmq", "celery_broker_heartbeat": 20}, "celery_broker_heartbeat"),
    "rabbitmq fence not below two heartbeats": (
        {"celery_broker_type": "rabbitmq", "celery_worker_rabbitmq_fence_seconds": 32},
        "celery_worker_rabbitmq_fence_seconds"),
    "rabbitmq consumer timeout below hard limit": (
        {"celery_broker_type": "rabbitmq", "celery_broker_consumer_timeout": 600}, "celery_broker_consumer_timeout"),
    "rabbitmq consumer timeout below the wait of a reserved task": (
        {"celery_broker_type": "rabbitmq", "celery_broker_consumer_timeout": 4000},
        "celery_broker_consumer_timeout (4000 s) must be"),
}


# Cases on a cluster inventory (tests/static/bad_input/hosts-cluster.yml: three brokers, two
# workers, worker1 in celery_beat), on top of a valid RabbitMQ cluster baseline.
CLUSTER_BASELINE = {"celery_broker_type": "rabbitmq", "rabbitmq_broker_erlang_cookie": "A" * 32}
CLUSTER_CASES = {
    "redis on several broker hosts": ({"celery_broker_type": "redis"}, "Redis runs on one host"),
    "valkey on several broker hosts": ({"celery_broker_type": "valkey"}, "Valkey runs on one host"),
    "cluster without an erlang cookie": (
        {"rabbitmq_broker_erlang_cookie": None}, "rabbitmq_broker_erlang_cookie"),
    "erlang cookie too short": ({"rabbitmq_broker_erlang_cookie": "short"}, "rabbitmq_broker_erlang_cookie"),
    "classic queues in a cluster": ({"celery_broker_queue_type": "classic"}, "celery_broker_queue_type"),
    "erlang distribution on loopback in a cluster": (
        {"rabbitmq_broker_distribution_address": "127.0.0.1"}, "rabbitmq_broker_distribution_address"),
    "two nodes with one name": ({"rabbitmq_broker_node_name": "rabbit@same"}, "node name"),
    "beat on every worker host": ({"celery_worker_beat": True}, "celery_worker_beat"),
    "two worker hosts with one node name": ({"celery_worker_node_host": "same"}, "celery_worker_node_host"),
}


def run_site(overrides, tmp_path, *options, playbook="site.yml", inventory="hosts.yml", baseline_extra=None):
    extra = tmp_path / "extra.json"
    env = dict(os.environ,
               ANSIBLE_CONFIG=str(ROOT / "ansible.cfg"),
               ANSIBLE_STDOUT_CALLBACK="ansible.posix.json",
               ANSIBLE_LOCALHOST_WARNING="false",
               ANSIBLE_INVENTORY_UNPARSED_WARNING="false",
               # Facts are gathered once and reused by every case (the same machine
               # each time): half of each run's time went into gathering them.
               ANSIBLE_GATHERING="smart",
               ANSIBLE_CACHE_PLUGIN="ansible.builtin.jsonfile",
               ANSIBLE_CACHE_PLUGIN_CONNECTION=str(FACT_CACHE),
               ANSIBLE_CACHE_PLUGIN_TIMEOUT="900")
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


def test_a_locked_setting_named_in_the_opt_out_list_is_accepted(tmp_path):
    overrides = {"celery_worker_settings": {"task_acks_late": False, "worker_prefetch_multiplier": 4},
                 "celery_worker_unsafe_settings": ["task_acks_late", "worker_prefetch_multiplier"]}
    assert_preflight_passes(*run_site(overrides, tmp_path, "--tags", "preflight-only"))


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


def test_the_drill_refuses_a_limit_that_leaves_out_a_host_it_touches(tmp_path):
    """--limit cannot narrow the permission check: the broker restart touches the broker host."""
    overrides = {"celery_drill_allowed": True, "celery_drill_restart_broker": True}
    outcome = run_site(overrides, tmp_path, "--limit", "bad-input-worker", playbook="playbooks/drill.yml")
    assert_refused_in_first_play(*outcome, DRILL_PREFLIGHT_PLAY, "Left out by --limit: bad-input-broker")


DEAD_LETTERS_PLAY = "Dead letters | List them, and replay the chosen ones"


def test_the_dead_letter_playbook_refuses_a_selection_that_is_not_a_list(tmp_path):
    """playbooks/dead_letters.yml: a task id given as a string is refused before any connection."""
    outcome = run_site({"celery_dead_letters_replay_ids": "0f6c-not-a-list"}, tmp_path,
                       playbook="playbooks/dead_letters.yml")
    assert_refused_in_first_play(*outcome, DEAD_LETTERS_PLAY, "celery_dead_letters_replay_ids")
