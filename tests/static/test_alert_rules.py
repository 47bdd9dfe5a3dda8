"""The Prometheus alert rules (prometheus/celery_bundle.rules.yml) pass promtool's checks and
unit tests: each alert fires on series that should fire it, and no other alert fires
(prometheus/celery_bundle.rules_test.yml). promtool comes from Debian's prometheus package
(scripts/bootstrap.sh puts it in .tools/bin)."""

import os
import shutil
import subprocess
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[2]
RULES = ROOT / "prometheus" / "celery_bundle.rules.yml"
TESTS = ROOT / "prometheus" / "celery_bundle.rules_test.yml"


def promtool():
    tool = os.environ.get("PROMTOOL") or shutil.which("promtool") or str(ROOT / ".tools" / "bin" / "promtool")
    assert Path(tool).is_file(), f"no promtool at {tool}: run scripts/bootstrap.sh"
    return tool


def run(*args):
    result = subprocess.run([promtool(), *args], cwd=ROOT / "prometheus", capture_output=True, text=True, timeout=120)
    return result.returncode, result.stdout + result.stderr


def test_rules_pass_promtool_check():
    rc, out = run("check", "rules", RULES.name)
    assert rc == 0, out


def test_rules_pass_their_unit_tests():
    rc, out = run("test", "rules", TESTS.name)
    assert rc == 0, out
    assert "SUCCESS" in out, out


def test_every_alert_has_a_firing_unit_test_and_says_what_to_do():
    rules = [rule for group in yaml.safe_load(RULES.read_text())["groups"] for rule in group["rules"]
             if "alert" in rule]
    tested = {case["alertname"] for test in yaml.safe_load(TESTS.read_text())["tests"]
              for case in test["alert_rule_test"] if case["exp_alerts"]}
    quiet = {case["alertname"] for test in yaml.safe_load(TESTS.read_text())["tests"]
             for case in test["alert_rule_test"] if not case["exp_alerts"]}
    names = {rule["alert"] for rule in rules}
    assert names == tested, f"alerts without a firing test: {names - tested}"
    assert names == quiet, f"alerts without a quiet test: {names - quiet}"
    for rule in rules:
        assert rule["labels"]["severity"] in ("warning", "critical"), rule["alert"]
        assert rule["annotations"]["summary"] and rule["annotations"]["description"], rule["alert"]
