#!/usr/bin/env bash
# The bundle's benchmark: how fast tasks come back after each fault, what late ack and the
# bundle's prefetch cost in throughput, and how long a deployment takes. For each broker, on the
# local sandbox (scripts/sandbox.sh), from nothing:
#   1. a fresh deployment (site.yml on a broker and two new worker hosts), timed, then the
#      fire drill (playbooks/drill.yml) with every fault: worker SIGKILL, pool process
#      SIGKILL, systemctl restart, host reboot, broker restart;
#   2. an idempotent re-run of site.yml, timed (it must change nothing);
#   3. the fire drill again, RUNS times in all (median and max per fault);
#   4. the throughput benchmark (playbooks/bench_throughput.yml): TASKS no-op tasks, then
#      TASKS tasks of 10 ms, drained with the bundle's settings and with Celery's defaults,
#      ROUNDS times each, alternating.
# Then bench/report.py prints the table with PASS, FAIL or MISS per target and writes it as
# JSON: the full run to bench/results/latest.json (committed: the figures docs/benchmark.md
# quotes), a --quick run to .results/bench-quick.json (not committed). Exit status 1 if a
# recovery target is missed (FAIL).
#
# Usage: bench/run.sh [--quick] [--reuse] [redis] [rabbitmq]   (default: both, full size)
#   full:    3 drills, 5000 tasks x 3 rounds   (about 32 min on 2 cores)
#   --quick: 1 drill,  1000 tasks x 1 round    (the CI-sized run)
#   --reuse: keep the sandbox that `CELERY_SANDBOX_TIMINGS=DIR/BROKER/timings.jsonl
#            scripts/sandbox.sh up BROKER` just built, with its drill copied to
#            DIR/BROKER/drill-1.json (DIR: $CELERY_BENCH_DIR), and only add the re-run,
#            the further drills and the throughput; no report (scripts/test.sh does this).
# Without --reuse it removes the sandbox of scripts/sandbox.sh at the start and at the end.
set -euo pipefail

repo=$(cd "$(dirname "$0")/.." && pwd)
cd "$repo"
runs=3 tasks=5000 rounds=3 size=full reuse=false
report=bench/results/latest.json
brokers=()
for arg in "$@"; do
  case $arg in
    --quick) runs=1 tasks=1000 rounds=1 size=quick report=.results/bench-quick.json ;;
    --reuse) reuse=true ;;
    redis | rabbitmq | valkey) brokers+=("$arg") ;;
    *) echo "usage: $0 [--quick] [--reuse] [redis] [rabbitmq] [valkey]" >&2; exit 2 ;;
  esac
done
((${#brokers[@]})) || brokers=(redis rabbitmq)

out=${CELERY_BENCH_DIR:-$repo/.results/bench}
$reuse || rm -rf "$out"
mkdir -p "$out" "$(dirname "$report")"
export ANSIBLE_CONFIG=$repo/ansible.cfg
started=$(date +%s)
step() { printf '\n=== bench: %s [%s, +%ds]\n' "$*" "$(date +%H:%M:%S)" $(($(date +%s) - started)); }

for broker in "${brokers[@]}"; do
  dir=$out/$broker
  mkdir -p "$dir"
  export CELERY_SANDBOX_TIMINGS=$dir/timings.jsonl
  if ! $reuse; then
    step "$broker: removing any sandbox, then a fresh one (deployment timed) and drill 1/$runs"
    bash scripts/sandbox.sh down
    bash scripts/sandbox.sh up "$broker"
    cp .drill/report.json "$dir/drill-1.json"
  fi
  export PATH=/usr/bin:${CELERY_BUNDLE_VENV:-$repo/.venv}/bin:$PATH

  step "$broker: re-run of site.yml (timed, must change nothing)"
  t0=$(date +%s.%N)
  ansible-playbook -i inventories/sandbox site.yml | tee "$dir/rerun.log"
  python3 - "$t0" "$dir/rerun.log" >>"$CELERY_SANDBOX_TIMINGS" <<'PY'
import json, re, sys, time
log = open(sys.argv[2]).read()
changed = sum(int(n) for n in re.findall(r"changed=(\d+)", log))
print(json.dumps({"playbook": "site.yml (re-run)", "seconds": round(time.time() - float(sys.argv[1]), 1),
                  "changed": changed, "rc": 0}))
PY

  for n in $(seq 2 "$runs"); do
    step "$broker: drill $n/$runs"
    bash scripts/sandbox.sh drill
    cp .drill/report.json "$dir/drill-$n.json"
  done

  step "$broker: throughput, $tasks no-op and $tasks 10 ms tasks x $rounds round(s), reliable vs Celery's defaults"
  ansible-playbook -i inventories/sandbox playbooks/bench_throughput.yml \
    -e celery_bench_tasks="$tasks" -e celery_bench_rounds="$rounds" \
    -e celery_bench_report_file="$dir/throughput.json"
done

$reuse && exit 0
step "report"
bash scripts/sandbox.sh down
python3 bench/report.py --size "$size" "$out" "$report"
