#!/usr/bin/env bash
# The bundle's whole test suite, as CI runs it (.ci/run calls this script):
#   1. scripts/bootstrap.sh: Python tools, Docker engine, local systemd base image;
#   2. tests/bootstrap: the bootstrap's apt part on fresh Debian 12 and 13 containers;
#      static checks: yamllint, ansible-lint (production profile), syntax checks, and
#      tests/static (no containers: the bad inputs site.yml must refuse, docs, collection);
#   3. every Molecule scenario in molecule/, one at a time (its tests: tests/integration/);
#   4. the sandbox (scripts/sandbox.sh) with each broker, ending with the fire drill, and the
#      CI-sized benchmark on it (bench/run.sh --quick); tests/results turns their reports
#      into test cases: a lost task or a missed recovery target fails.
# Every result is a pytest JUnit file in the results directory; the last line counts them.
# Usage: scripts/test.sh [SCENARIO ...]   (a scenario name, valkey, sandbox-redis, sandbox-rabbitmq)
set -euo pipefail

repo=$(cd "$(dirname "$0")/.." && pwd)
cd "$repo"
results=${CELERY_BUNDLE_RESULTS_DIR:-$repo/.results}
export CELERY_BUNDLE_RESULTS_DIR=$results
mkdir -p "$results"
rm -rf "$results"/junit-*.xml "$results"/drill-*.json "$results"/sandbox-*.exit "$results"/bench "$results"/bench.json

step() { printf '\n=== %s [%s]\n' "$*" "$(date +%H:%M:%S)"; }
start=$(date +%s)

step "bootstrap"
bash scripts/bootstrap.sh
export PATH=/usr/bin:$repo/.venv/bin:$PATH
export ANSIBLE_CONFIG=$repo/ansible.cfg

# pytest with the results directory's JUnit file, quiet, no cache in the clone.
run_pytest() {
  local junit=$1
  shift
  pytest -p no:cacheprovider -q --junitxml "$results/junit-$junit.xml" "$@"
}
# The no_log check of one run's whole output, against the variables holding its secrets.
scan_secrets() {
  CELERY_BUNDLE_SCAN_LOG=$1 CELERY_BUNDLE_SCAN_SECRETS=$2 CELERY_BUNDLE_SCAN_LABEL=$3 \
    run_pytest "secrets-$3" -s tests/results/test_no_secrets.py
}

step "host packages: bootstrap --host-packages-only on fresh Debian 12 and 13 containers"
CELERY_BUNDLE_IMAGE=celery-bundle/debian13-systemd:latest bash scripts/bootstrap.sh
run_pytest host-packages tests/bootstrap

step "yamllint"
yamllint --strict .

step "ansible-lint (production profile)"
ansible-lint --profile production

step "syntax checks"
for playbook in site.yml playbooks/*.yml; do
  ansible-playbook --syntax-check -i inventories/example "$playbook"
done

step "bad input is refused before any change (pytest tests/static, no containers)"
run_pytest static -n 2 tests/static

if (($#)); then
  scenarios=("$@")
else
  mapfile -t scenarios < <(find molecule -mindepth 2 -maxdepth 2 -name molecule.yml -printf '%h\n' | xargs -n1 basename | sort)
  scenarios+=(valkey sandbox-redis sandbox-rabbitmq)
fi

# The sandbox with one broker, as a newcomer runs it, ending with the fire drill; then the
# CI-sized benchmark on it (bench/run.sh --quick --reuse: re-run time, throughput).
#
# Each sandbox's Debian release (docs/tests.md, "Platforms"); the Molecule scenarios name
# theirs in molecule.yml (rabbitmq: Debian 13, redis and cluster: Debian 12). The RabbitMQ
# sandbox deploys with the oldest Ansible the bundle claims (requirements-lowest.txt, in
# .venv-lowest/), the rest with the current one.
declare -A sandbox_image=(
  [redis]=celery-bundle/debian13-systemd:latest
  [rabbitmq]=celery-bundle/debian12-systemd:latest
)
declare -A sandbox_requirements=(
  [redis]=requirements-dev.txt
  [rabbitmq]=requirements-lowest.txt
)
bench_dir=$results/bench
sandbox() {
  local broker=$1 rc=0
  local requirements=${sandbox_requirements[$broker]}
  local with=(
    CELERY_BUNDLE_IMAGE="${CELERY_BUNDLE_IMAGE:-${sandbox_image[$broker]}}"
    CELERY_BUNDLE_REQUIREMENTS="$repo/$requirements"
    CELERY_BUNDLE_VENV="$repo/$([[ $requirements == requirements-lowest.txt ]] && echo .venv-lowest || echo .venv)"
  )
  rm -f .drill/report.json
  mkdir -p "$bench_dir/$broker"
  env "${with[@]}" CELERY_SANDBOX_TIMINGS="$bench_dir/$broker/timings.jsonl" bash scripts/sandbox.sh up "$broker" 2>&1 |
    tee "$results/sandbox-$broker.log" || rc=$?
  cp .drill/report.json "$results/drill-$broker.json" 2>/dev/null || true
  cp .drill/report.json "$bench_dir/$broker/drill-1.json" 2>/dev/null || true
  if ((rc == 0)); then
    env "${with[@]}" CELERY_BENCH_DIR="$bench_dir" bash bench/run.sh --quick --reuse "$broker" 2>&1 |
      tee -a "$results/sandbox-$broker.log" || rc=$?
  fi
  echo "$rc" >"$results/sandbox-$broker.exit"
  scan_secrets "$results/sandbox-$broker.log" inventories/sandbox/group_vars/all/generated.yml "sandbox-$broker" || rc=1
  return "$rc"
}

# A run of a scenario under other settings: "valkey" is the redis scenario with Valkey on
# Debian 13 (molecule/redis/molecule.yml).
declare -A run_scenario=([valkey]=redis)
declare -A run_env=(
  [valkey]="CELERY_BUNDLE_BROKER_TYPE=valkey CELERY_BUNDLE_IMAGE=celery-bundle/debian13-systemd:latest CELERY_BUNDLE_RUN_SUFFIX=-valkey CELERY_BUNDLE_SERVER_TESTS=1"
)
# A run's Molecule steps when not the scenario's whole test sequence: the valkey run leaves
# out the check step (site.yml --check on fresh hosts), which the redis run makes with the
# same tasks, and (CELERY_BUNDLE_SERVER_TESTS=1, tests/integration/redis/conftest.py) the
# tests that do not depend on the server: lost hosts, fast recovery, the watchdog restarts,
# the hung stop.
declare -A run_steps=(
  [valkey]="destroy create prepare converge idempotence verify"
)
molecule_run() {
  local scenario=$1 molecule_scenario=$2 step
  shift 2
  if [[ -z ${run_steps[$scenario]:-} ]]; then
    env "$@" molecule test -s "$molecule_scenario"
    return
  fi
  for step in ${run_steps[$scenario]}; do
    if ! env "$@" molecule "$step" -s "$molecule_scenario"; then
      env "$@" molecule destroy -s "$molecule_scenario"
      return 1
    fi
  done
  env "$@" molecule destroy -s "$molecule_scenario"
}

declare -A took
for scenario in "${scenarios[@]}"; do
  if [[ $scenario == sandbox-* ]]; then
    step "sandbox and fire drill: scripts/sandbox.sh up ${scenario#sandbox-}"
    t0=$(date +%s)
    sandbox "${scenario#sandbox-}" || true  # its verdict: tests/results (below)
    took[$scenario]=$(($(date +%s) - t0))
    continue
  fi
  molecule_scenario=${run_scenario[$scenario]:-$scenario}
  read -ra extra_env <<<"${run_env[$scenario]:-}"
  step "molecule test -s $molecule_scenario ${extra_env[*]}"
  t0=$(date +%s)
  molecule_run "$scenario" "$molecule_scenario" "${extra_env[@]}" 2>&1 | tee "$results/molecule-$scenario.log"
  took[$scenario]=$(($(date +%s) - t0))
  step "no_log: the broker password never appears in the $scenario output"
  scan_secrets "$results/molecule-$scenario.log" "molecule/$molecule_scenario/molecule.yml" "$scenario" || true
done

if [[ " ${scenarios[*]} " == *" sandbox-"* ]]; then
  step "removing the sandbox"
  bash scripts/sandbox.sh down
  step "the sandboxes, fire drills and benchmark (CI size): their reports as tests"
  # report.py prints the table (MISS for a missed non-gating target); tests/results fails
  # a case for a sandbox that failed, a lost or duplicated canary, a missed recovery target
  # or a report that was not written.
  python3 bench/report.py --size quick "$bench_dir" "$results/bench.json" || true
  run_pytest results tests/results/test_sandbox.py tests/results/test_bench.py || true
fi

step "summary"
for scenario in "${scenarios[@]}"; do
  printf '  %-18s %4d s\n' "$scenario" "${took[$scenario]}"
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
