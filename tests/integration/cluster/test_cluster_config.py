"""The cluster as deployed: every node joined, quorum task queues replicated on all three,
the dead-letter policy on them, workers that know every node, exactly one beat."""

import json
from urllib.parse import urlsplit

import pytest

from celery_stack import scrape


@pytest.mark.parametrize("index", [0, 1, 2])
def test_every_node_runs_in_one_cluster(cluster, index):
    status = cluster.cluster_status(cluster.nodes[index])
    expected = sorted(f"rabbit@{name}" for name in cluster.node_names)
    assert sorted(status["disk_nodes"]) == expected
    assert sorted(status["running_nodes"]) == expected


def test_nodes_share_a_private_cookie(cluster):
    for node in cluster.nodes:
        cookie = node.file("/var/lib/rabbitmq/.erlang.cookie")
        assert cookie.user == "rabbitmq"
        assert cookie.mode == 0o400
    sums = {node.check_output("sha256sum /var/lib/rabbitmq/.erlang.cookie").split()[0] for node in cluster.nodes}
    assert len(sums) == 1, "the nodes do not share one cookie"


@pytest.mark.parametrize("index", [0, 1, 2])
def test_erlang_distribution_listens_on_the_cluster_address_only(cluster, index):
    node = cluster.nodes[index]
    address = node.check_output(f"getent ahostsv4 {cluster.node_names[index]} | head -1").split()[0]

    def listening(port):
        rows = node.check_output(f"ss -Hltn 'sport = :{port}'").splitlines()
        return {row.split()[3].rsplit(":", 1)[0] for row in rows}

    assert listening(4369) == {"127.0.0.1", address}
    assert listening(25672) == {address}


@pytest.mark.parametrize("queue", ["celery", "extra", "celery.dlq"])
def test_task_queues_are_quorum_queues_on_every_node(cluster, queue):
    out = cluster.nodes[0].check_output(
        "rabbitmqctl list_queues --vhost celery --quiet --formatter json name type")
    types = {q["name"]: q["type"] for q in json.loads(out)}
    assert types.get(queue) == "quorum", types
    members = cluster.nodes[0].check_output(f"rabbitmq-queues quorum_status --vhost celery {queue}")
    for name in cluster.node_names:
        assert f"rabbit@{name}" in members, f"{queue} has no replica on {name}"


def policy_definition(cluster, name):
    """The definition of the vhost's policy NAME (a JSON string on some RabbitMQ versions)."""
    out = cluster.nodes[0].check_output("rabbitmqctl list_policies --vhost celery --quiet --formatter json")
    (policy,) = [p for p in json.loads(out) if p["name"] == name]
    definition = policy["definition"]
    return json.loads(definition) if isinstance(definition, str) else definition


def test_policy_dead_letters_and_limits_deliveries(cluster):
    definition = policy_definition(cluster, "celery-tasks")
    assert definition["dead-letter-exchange"] == "celery.dlx"
    assert definition["delivery-limit"] == 3, "celery_task_delivery_limit of the scenario, through the default"
    assert definition["dead-letter-strategy"] == "at-least-once"
    assert "message-ttl" in definition


def test_the_dead_letter_queue_keeps_its_messages_however_often_they_are_listed(cluster):
    """Listing returns the dead letters: RabbitMQ 4.x would drop them at its default limit of 20."""
    out = cluster.nodes[0].check_output("rabbitmqctl list_queues -p celery name policy --quiet --formatter json")
    (dlq,) = [q for q in json.loads(out) if q["name"] == "celery.dlq"]
    assert dlq["policy"] == "celery-tasks-dead-letters"
    assert policy_definition(cluster, "celery-tasks-dead-letters") == {"delivery-limit": 1000000}


@pytest.mark.parametrize("index", [0, 1])
def test_workers_know_every_node(cluster, index):
    urls = cluster.broker_url(cluster.workers[index]).split(";")
    hosts = [urlsplit(url).hostname for url in urls]
    assert hosts == cluster.node_names
    settings = cluster.settings(cluster.workers[index])
    assert settings["task_default_queue_type"] == "quorum"
    assert settings["broker_transport_options"]["confirm_publish"] is True


def test_exactly_one_beat(cluster, scenario):
    beat_host = cluster.workers[cluster.worker_names.index(scenario["beat_host"])]
    assert beat_host.service("celery-beat.service").is_running
    assert beat_host.service("celery-beat.service").is_enabled
    assert beat_host.check_output("systemctl show -P StateDirectory celery-beat.service") == "celery-beat"
    for name, host in zip(cluster.worker_names, cluster.workers):
        if name != scenario["beat_host"]:
            assert not host.file("/etc/systemd/system/celery-beat.service").exists
            assert not host.service("celery-beat.service").is_running


def test_every_node_serves_prometheus_metrics_on_loopback(cluster):
    """rabbitmq_prometheus on each node (RabbitMQ 3.10 here): the queues each node leads,
    quorum task queues and the dead-letter queue among them, with their depth and
    consumers, and the global redelivery counter the alert rules read."""
    seen = set()
    for node in cluster.nodes:
        listening = node.check_output("ss -Hltn 'sport = :15692'")
        assert {row.split()[3].rsplit(":", 1)[0] for row in listening.splitlines()} == {"127.0.0.1"}
        body = scrape(node, "http://127.0.0.1:15692/metrics/detailed?vhost=celery"
                            "&family=queue_coarse_metrics&family=queue_consumer_count")
        seen |= {line.split('queue="', 1)[1].split('"', 1)[0] for line in body.splitlines()
                 if line.startswith("rabbitmq_detailed_queue_consumers{")}
        assert "\nrabbitmq_global_messages_redelivered_total{" in scrape(node, "http://127.0.0.1:15692/metrics")
    assert {"celery", "extra", "celery.dlq"} <= seen, seen
