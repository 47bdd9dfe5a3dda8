"""CI's verdict on what a run left in its results directory (CELERY_BUNDLE_RESULTS_DIR,
.results/ by default): the sandboxes, their fire drills and the benchmark report, and the
outputs scanned for secrets. scripts/test.sh runs these tests; their JUnit cases join the
scenarios' in the run's summary."""

import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
RESULTS = Path(os.environ.get("CELERY_BUNDLE_RESULTS_DIR") or ROOT / ".results")


@pytest.fixture(scope="session")
def results():
    return RESULTS
