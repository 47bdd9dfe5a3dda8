#!/usr/bin/env bash
# A local sandbox of the whole stack: a broker host and two worker hosts as systemd
# containers on this machine, deployed with the real site.yml, then put through the fire
# drill (playbooks/drill.yml).
#
#   scripts/sandbox.sh up [redis|rabbitmq|valkey]  create or update the sandbox, run the drill
#                                            (valkey: on Debian 13, which packages it)
#   scripts/sandbox.sh drill                 run the fire drill again
#   scripts/sandbox.sh down                  remove the containers, network and secrets
#
# `up` is idempotent: a second run reuses the containers and changes nothing on them. Asking
# for the other broker recreates the sandbox. Needs root on Debian 12 or Ubuntu 24.04 (it
# installs Docker and builds the base image through scripts/bootstrap.sh).
set -euo pipefail

repo=$(cd "$(dirname "$0")/.." && pwd)
cd "$repo"
image=${CELERY_BUNDLE_IMAGE:-celery-bundle/debian12-systemd:latest}
network=celery-sandbox
broker_host=celery-sandbox-broker
hosts=("$broker_host" celery-sandbox-worker1 celery-sandbox-worker2)
inventory=inventories/sandbox
generated=$inventory/group_vars/all/generated.yml
export ANSIBLE_CONFIG=$repo/ansible.cfg
export ANSIBLE_CALLBACKS_ENABLED=ansible.posix.timer

started=$(date +%s)
step() { printf '\n=== sandbox: %s [%s, +%ds]\n' "$*" "$(date +%H:%M:%S)" $(($(date +%s) - started)); }

current_broker() {
  docker inspect -f '{{ index .Config.Labels "celery-sandbox.broker" }}' "$broker_host" 2>/dev/null || true
}

remove() {
  docker rm -f "${hosts[@]}" >/dev/null 2>&1 || true
  docker network rm "$network" >/dev/null 2>&1 || true
  rm -f "$generated"
}

create_containers() {
  local broker=$1 name
  docker network inspect "$network" >/dev/null 2>&1 || docker network create "$network" >/dev/null
  for name in "${hosts[@]}"; do
    if docker container inspect "$name" >/dev/null 2>&1; then
      docker start "$name" >/dev/null
      continue
    fi
    # systemd as PID 1 without --privileged (see docs/tests.md, "The containers");
    # --restart=always brings a container back when the drill reboots it.
    docker run -d --name "$name" --hostname "$name" --network "$network" \
      --label "celery-sandbox.broker=$broker" --restart=always \
      --cap-add SYS_ADMIN --cap-add SYS_PTRACE \
      --security-opt seccomp=unconfined --security-opt apparmor=unconfined \
      --cgroupns=host -v /sys/fs/cgroup:/sys/fs/cgroup:rw \
      --tmpfs /run --tmpfs /run/lock --stop-signal SIGRTMIN+3 \
      -e container=docker -t "$image" /lib/systemd/systemd >/dev/null
    echo "created $name"
  done
  for name in "${hosts[@]}"; do
    for _ in $(seq 1 30); do
      state=$(docker exec "$name" systemctl is-system-running 2>/dev/null || true)
      [[ $state == running || $state == degraded ]] && break
      sleep 1
    done
  done
}

write_settings() {
  local broker=$1 password
  if [[ -f $generated ]]; then
    password=$(sed -n 's/^celery_broker_password: "\(.*\)"$/\1/p' "$generated")
  fi
  [[ -n ${password:-} ]] || password=$(python3 -c 'import secrets; print(secrets.token_urlsafe(24))')
  umask 077
  cat >"$generated" <<EOF
---
# Written by scripts/sandbox.sh: the sandbox's broker and its random password.
celery_broker_type: $broker
celery_broker_password: "$password"
EOF
}

# Each playbook run; with CELERY_SANDBOX_TIMINGS=FILE its seconds are appended to FILE
# (JSON lines, read by bench/run.sh).
play() {
  step "ansible-playbook -i $inventory $*"
  local t0 rc=0
  t0=$(date +%s.%N)
  ansible-playbook -i "$inventory" "$@" || rc=$?
  if [[ -n ${CELERY_SANDBOX_TIMINGS:-} ]]; then
    python3 -c 'import json, sys, time; print(json.dumps({"playbook": sys.argv[1],
      "seconds": round(time.time() - float(sys.argv[2]), 1), "rc": int(sys.argv[3])}))' \
      "$*" "$t0" "$rc" >>"$CELERY_SANDBOX_TIMINGS"
  fi
  return "$rc"
}

up() {
  local broker=${1:-redis}
  [[ $broker == redis || $broker == rabbitmq || $broker == valkey ]] ||
    { echo "usage: $0 up [redis|rabbitmq|valkey]" >&2; exit 2; }
  # Valkey is packaged from Debian 13 on.
  [[ $broker == valkey && -z ${CELERY_BUNDLE_IMAGE:-} ]] && image=celery-bundle/debian13-systemd:latest
  step "bootstrap (Docker engine, base image, Python tools)"
  CELERY_BUNDLE_IMAGE=$image bash scripts/bootstrap.sh
  export PATH=/usr/bin:${CELERY_BUNDLE_VENV:-$repo/.venv}/bin:$PATH
  local existing
  existing=$(current_broker)
  if [[ -n $existing && $existing != "$broker" ]]; then
    step "the sandbox runs $existing: recreating it for $broker"
    remove
  fi
  step "containers: ${hosts[*]} ($broker)"
  create_containers "$broker"
  write_settings "$broker"
  play molecule/shared/prepare.yml
  play site.yml
  play playbooks/demo_app.yml
  play playbooks/drill.yml
  step "done: a $broker broker and two workers; try: scripts/sandbox.sh drill"
}

case ${1:-} in
  up) shift; up "$@" ;;
  drill)
    export PATH=/usr/bin:${CELERY_BUNDLE_VENV:-$repo/.venv}/bin:$PATH
    play playbooks/drill.yml ;;
  down)
    export PATH=/usr/bin:$PATH
    step "removing ${hosts[*]} and $network"
    remove ;;
  *) echo "usage: $0 up [redis|rabbitmq|valkey] | drill | down" >&2; exit 2 ;;
esac
