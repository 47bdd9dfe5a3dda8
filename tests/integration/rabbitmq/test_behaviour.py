"""Restart behaviour on the RabbitMQ path (the tests live in tests/lib/behaviour.py)."""

from behaviour import *  # noqa: F401,F403
