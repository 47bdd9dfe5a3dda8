"""The CI-sized benchmark's report (bench/report.py --size quick, bench.json): each target
that gates CI is a test; the others (throughput, converge times) are printed by report.py
and recorded in docs/benchmark.md, never gating (the machines are noisy)."""

import json

import pytest

from conftest import RESULTS

REPORT = RESULTS / "bench.json"


def gating_targets():
    """(id, target) for each CI-gating target; one failing case when there is no report."""
    if not REPORT.is_file():
        return [pytest.param(None, id="no benchmark report")]
    report = json.loads(REPORT.read_text())
    return [pytest.param(target, id=f"{broker}: {target['target']}")
            for broker, summary in sorted(report["brokers"].items())
            for target in summary["targets"] if target["gates_ci"]]


@pytest.mark.parametrize("target", gating_targets())
def test_the_benchmark_meets_its_recovery_target(target):
    assert target is not None, f"bench/report.py wrote no {REPORT}: see its output in the run's log"
    value, limit = target["value"], target["limit"]
    assert value is not None, f"{target['target']}: not measured"
    if target["target"].startswith("every "):
        assert value == 0, f"{target['target']}: {value}"
    else:
        assert value <= limit, f"{target['target']}: measured {value}, limit {limit}"
