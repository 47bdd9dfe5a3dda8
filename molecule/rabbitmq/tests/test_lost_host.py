"""A worker host lost for good (molecule/shared/tests/lost_host.py).

The partition test runs on Redis only: on RabbitMQ a worker learns that its connection is
dead later than the broker does (py-amqp gives up after two heartbeat timeouts, the broker
after about one), so a task may run on two hosts for that difference (docs/operating.md, "Limits").
"""

from lost_host import test_a_lost_worker_host_hands_its_task_over  # noqa: F401
