"""Drive the cluster scenario: several broker nodes, a steady stream of tasks, playbooks.

Builds on celery_stack.Stack (one broker); adds the other nodes, a producer that keeps
sending while faults are injected, and the accounting of a stream (sent, completed, lost,
run twice).
"""

import json
import shlex
import subprocess
import time
import uuid

import testinfra

from celery_stack import VENV, Stack, worker_shell

# The worker role's helpers (pytest.ini puts roles/celery_worker/files on the path).
import celery_reliable_tools  # noqa: I100


class Stream:
    """A producer on a worker host sending one task every INTERVAL s until stopped."""

    def __init__(self, stack, host_name, seconds, interval, queue="celery", max_seconds=900):
        self.stack = stack
        self.host_name = host_name
        self.stop_file = f"/tmp/stream-{uuid.uuid4().hex}.stop"
        script = "import sys, celery_reliable, demo_app; demo_app.main(sys.argv[1:])"
        command = worker_shell(
            f"exec {VENV}/bin/python -c {shlex.quote(script)} send-stream {seconds} {queue} "
            f"{interval} {self.stop_file} {max_seconds}")
        self.started = time.time()
        self.process = subprocess.Popen(
            ["docker", "exec", host_name, "sh", "-c", command],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    def stop(self, timeout=120):
        """Ask the producer to stop; return the ids it had confirmed, and its stderr."""
        subprocess.run(["docker", "exec", self.host_name, "touch", self.stop_file], check=True)
        out, err = self.process.communicate(timeout=timeout)
        assert self.process.returncode == 0, f"the producer failed: {err[-2000:]}"
        return out.split(), err


class ClusterStack(Stack):
    """Three broker nodes and the worker hosts of the cluster scenario."""

    def __init__(self, nodes, workers):
        super().__init__(nodes[0], workers)
        self.node_names = list(nodes)
        self.nodes = [testinfra.get_host(f"docker://{name}") for name in nodes]

    def node(self, name):
        return self.nodes[self.node_names.index(name)]

    def cluster_status(self, node):
        return json.loads(node.check_output("rabbitmqctl cluster_status --formatter json"))

    def running_nodes(self, node=None):
        node = node or self.nodes[0]
        result = node.run("rabbitmqctl cluster_status --formatter json")
        if result.rc != 0:
            return []
        return json.loads(result.stdout).get("running_nodes", [])

    def wait_cluster_whole(self, timeout=180):
        """Wait until every node runs and sees all the others."""
        def whole():
            return all(len(self.running_nodes(node)) == len(self.nodes) for node in self.nodes)
        self.wait_until("every cluster node to run", whole, timeout, interval=2)

    def stream(self, seconds, interval, host_index=1, queue="celery"):
        return Stream(self, self.worker_names[host_index], seconds, interval, queue)

    def account(self, ids, timeout):
        """Wait until every task id has finished; return sent/completed/lost/rerun/duplicated."""
        ids = list(dict.fromkeys(ids))

        def finished():
            done = {e["id"] for e in self.events() if e["event"] == "done"}
            return all(task in done for task in ids)

        try:
            self.wait_until(f"{len(ids)} streamed tasks to finish", finished, timeout, interval=2)
        except AssertionError:
            pass  # counted as lost below
        wanted = set(ids)
        counts = celery_reliable_tools.count_runs(ids, [e for e in self.events() if e["id"] in wanted])
        return {key: counts[key] for key in ("sent", "completed", "lost", "rerun", "duplicated")}
