"""The no_log check: no secret of a run appears in its whole output.

scripts/test.sh runs it after each scenario and each sandbox, while the secrets are still
where the run took them from:
  CELERY_BUNDLE_SCAN_LOG      the run's whole output (molecule-NAME.log, sandbox-BROKER.log)
  CELERY_BUNDLE_SCAN_SECRETS  the variables holding its secrets (its molecule.yml, or the
                              sandbox's generated variables)
  CELERY_BUNDLE_SCAN_LABEL    the run's name, in the test's id
What counts as a secret: tests/lib/secret_scan.py.
"""

import os
from pathlib import Path

import pytest
import yaml

from secret_scan import leaked_forms, secrets

LOG, SECRETS, LABEL = (os.environ.get(f"CELERY_BUNDLE_SCAN_{name}", "") for name in ("LOG", "SECRETS", "LABEL"))


@pytest.mark.parametrize("run", [LABEL or LOG])
def test_no_secret_in_the_output_of(run):
    assert LOG and SECRETS, "name the run's output and secrets: CELERY_BUNDLE_SCAN_LOG, CELERY_BUNDLE_SCAN_SECRETS"
    log = Path(LOG).read_text(errors="replace")
    found = set(secrets(yaml.safe_load(Path(SECRETS).read_text())))
    assert found, f"no celery_broker_password in {SECRETS}"
    leaked = leaked_forms(log, found)
    print(f"{run}: {'LEAKED' if leaked else 'clean'} ({len(found)} secret(s), {len(log)} bytes read)")
    assert not leaked, f"{len(leaked)} form(s) of a secret leaked into {LOG}"
