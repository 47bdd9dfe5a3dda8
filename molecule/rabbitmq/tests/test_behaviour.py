"""Restart behaviour on the RabbitMQ path (the tests live in molecule/shared/tests/behaviour.py)."""

from behaviour import *  # noqa: F401,F403
