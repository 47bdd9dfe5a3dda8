"""Each sandbox CI brought up (scripts/test.sh sandbox-BROKER): deployed, fire drill passed,
quick benchmark run, and the drill's own report shows every canary completed exactly once."""

import json

import pytest

from conftest import RESULTS

# scripts/test.sh writes sandbox-BROKER.exit (the exit status of the sandbox, its fire drill
# and the quick benchmark) whatever happens, and copies the drill's report to drill-BROKER.json.
BROKERS = sorted(p.name[len("sandbox-"):-len(".exit")] for p in RESULTS.glob("sandbox-*.exit"))


@pytest.mark.parametrize("broker", BROKERS)
def test_the_sandbox_deployed_and_its_fire_drill_and_benchmark_passed(broker, results):
    status = int((results / f"sandbox-{broker}.exit").read_text())
    assert status == 0, (f"scripts/sandbox.sh up {broker}, its fire drill or bench/run.sh --quick exited "
                         f"{status}: see {results / f'sandbox-{broker}.log'}")


@pytest.mark.parametrize("broker", BROKERS)
def test_the_fire_drill_lost_and_duplicated_nothing(broker, results):
    report_file = results / f"drill-{broker}.json"
    assert report_file.is_file(), f"the fire drill wrote no report ({report_file})"
    report = json.loads(report_file.read_text())
    # int(): ansible-core 2.17 (the RabbitMQ sandbox's) writes the drill's numbers as strings.
    tasks = {key: int(value) for key, value in report["tasks"].items()}
    assert tasks["sent"] > 0, "the drill sent no canary"
    assert (tasks["lost"], tasks["duplicated"], tasks["dead_lettered"]) == (0, 0, 0), tasks
    assert tasks["completed"] == tasks["sent"], tasks
    assert all(fault["recovered"] for fault in report["faults"]), \
        [fault["fault"] for fault in report["faults"] if not fault["recovered"]]
