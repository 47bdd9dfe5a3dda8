"""Fixtures shared by the scenarios' conftest.py (imported with ``from stack_fixtures import *``).

A scenario's conftest defines ``SCENARIO`` facts through the ``scenario`` fixture:
broker and worker container names, the broker's unit, and how long a task held by a
SIGKILLed worker may take to come back on that broker.
"""

import pytest

from celery_stack import Stack
from recovery_report import Recovery

_REPORTS = []


@pytest.fixture(scope="session")
def stack(scenario):
    return Stack(scenario["broker"], scenario["workers"])


@pytest.fixture(scope="session")
def recovery(scenario):
    report = Recovery(scenario["name"])
    _REPORTS.append(report)
    return report


def pytest_terminal_summary(terminalreporter):
    for report in _REPORTS:
        if report.figures:
            terminalreporter.write_line("")
            terminalreporter.write_line(report.table())
            terminalreporter.write_line(f"  written to {report.save()}")
