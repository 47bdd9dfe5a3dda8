#!/usr/bin/env bash
# The bundle's whole test suite, as CI runs it (.ci/run calls this script):
#   1. scripts/bootstrap.sh: Python tools, Docker engine, local systemd base image;
#   2. static checks: yamllint, ansible-lint (production profile), syntax checks, and the
#      table of bad inputs that site.yml must refuse before changing anything;
#   3. every Molecule scenario in molecule/ (or those named as arguments), one at a time.
# Usage: scripts/test.sh [SCENARIO ...]
set -euo pipefail

repo=$(cd "$(dirname "$0")/.." && pwd)
cd "$repo"
results=${CELERY_BUNDLE_RESULTS_DIR:-$repo/.results}
export CELERY_BUNDLE_RESULTS_DIR=$results
mkdir -p "$results"
rm -f "$results"/junit-*.xml

step() { printf '\n=== %s [%s]\n' "$*" "$(date +%H:%M:%S)"; }
start=$(date +%s)

step "bootstrap"
bash scripts/bootstrap.sh
export PATH=/usr/bin:$repo/.venv/bin:$PATH
export ANSIBLE_CONFIG=$repo/ansible.cfg

step "yamllint"
yamllint --strict .

step "ansible-lint (production profile)"
ansible-lint --profile production

step "syntax checks"
for playbook in site.yml playbooks/*.yml; do
  ansible-playbook --syntax-check -i inventories/example "$playbook"
done

step "bad input is refused before any change (pytest, no containers)"
pytest -p no:cacheprovider -q tests/ --junitxml "$results/junit-static.xml"

if (($#)); then
  scenarios=("$@")
else
  mapfile -t scenarios < <(find molecule -mindepth 2 -maxdepth 2 -name molecule.yml -printf '%h\n' | xargs -n1 basename | sort)
fi

declare -A took
for scenario in "${scenarios[@]}"; do
  step "molecule test -s $scenario"
  t0=$(date +%s)
  molecule test -s "$scenario" 2>&1 | tee "$results/molecule-$scenario.log"
  took[$scenario]=$(($(date +%s) - t0))
  step "no_log: the broker password never appears in the $scenario output"
  python3 scripts/check_no_secrets.py "$results/molecule-$scenario.log" \
    "molecule/$scenario/molecule.yml" "$results/junit-secrets-$scenario.xml"
done

step "summary"
for scenario in "${scenarios[@]}"; do
  printf '  molecule %-10s %4d s\n' "$scenario" "${took[$scenario]}"
  [[ -f $results/recovery-$scenario.json ]] && sed 's/^/    /' "$results/recovery-$scenario.json"
done
printf '  total %d s\n' $(($(date +%s) - start))
# One plain closing line over every test case the scenarios ran (from their JUnit files).
python3 - "$results" <<'PY'
import glob, sys, xml.etree.ElementTree as ET
passed = failed = skipped = 0
for path in glob.glob(f"{sys.argv[1]}/junit-*.xml"):
    for case in ET.parse(path).getroot().iter("testcase"):
        kinds = {child.tag for child in case}
        if kinds & {"failure", "error"}:
            failed += 1
        elif "skipped" in kinds:
            skipped += 1
        else:
            passed += 1
print(f"{passed} passed, {failed} failed, {skipped} skipped")
sys.exit(1 if failed or not passed else 0)
PY
