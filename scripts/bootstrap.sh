#!/usr/bin/env bash
# Prepare a machine to run this bundle's tests (and the sandbox):
#   - Python tools (ansible, molecule, testinfra, linters) in a venv: .venv/
#   - a Docker engine (Debian's docker.io; started by hand when systemd is not PID 1)
#   - the local systemd base image the Molecule scenarios boot (built with debootstrap,
#     since no registry is reachable on our CI machines)
# Idempotent: a running engine, an existing venv and an existing image are reused.
# Environment:
#   CELERY_BUNDLE_IMAGE  image name (default: celery-bundle/debian12-systemd:latest)
#   CELERY_BUNDLE_VENV   venv path  (default: <repo>/.venv)
set -euo pipefail

repo=$(cd "$(dirname "$0")/.." && pwd)
image=${CELERY_BUNDLE_IMAGE:-celery-bundle/debian12-systemd:latest}
venv=${CELERY_BUNDLE_VENV:-$repo/.venv}
log() { printf '[bootstrap %s] %s\n' "$(date +%H:%M:%S)" "$*"; }

need_root() {
  if [[ $(id -u) -ne 0 ]]; then
    echo "bootstrap: installing system packages needs root (run with sudo)" >&2
    exit 1
  fi
}

install_packages() {
  local missing=()
  command -v dockerd >/dev/null 2>&1 || missing+=(docker.io)
  command -v debootstrap >/dev/null 2>&1 || missing+=(debootstrap)
  # Ubuntu: debootstrap needs Debian's archive keys to verify bookworm.
  host_is_debian || [[ -f /usr/share/keyrings/debian-archive-keyring.gpg ]] || missing+=(debian-archive-keyring)
  [[ -x /usr/bin/docker ]] || missing+=(docker.io)
  if ((${#missing[@]})); then
    need_root
    log "installing ${missing[*]} from Debian"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
  fi
}

start_engine() {
  export PATH=/usr/bin:$PATH
  if docker info >/dev/null 2>&1; then
    log "docker engine already running"
    return
  fi
  need_root
  log "starting dockerd"
  mkdir -p /var/log
  nohup dockerd >/var/log/dockerd-celery-bundle.log 2>&1 &
  for _ in $(seq 1 60); do
    docker info >/dev/null 2>&1 && { log "docker engine up"; return; }
    sleep 1
  done
  echo "bootstrap: dockerd did not come up; see /var/log/dockerd-celery-bundle.log" >&2
  exit 1
}

host_is_debian() {
  [[ -f /etc/os-release ]] && grep -qx 'ID=debian' /etc/os-release
}

debian_mirror() {
  # Another distribution's mirror (Ubuntu) has no bookworm: use Debian's own.
  host_is_debian || { echo "http://deb.debian.org/debian"; return; }
  local uri=""
  if compgen -G '/etc/apt/sources.list.d/*.sources' >/dev/null; then
    uri=$(awk '/^URIs:/ {print $2; exit}' /etc/apt/sources.list.d/*.sources)
  fi
  if [[ -z $uri && -f /etc/apt/sources.list ]]; then
    uri=$(awk '$1 == "deb" {for (i = 2; i <= NF; i++) if ($i ~ /^http/) {print $i; exit}}' /etc/apt/sources.list)
  fi
  echo "${uri:-http://deb.debian.org/debian}"
}

build_image() {
  if docker image inspect "$image" >/dev/null 2>&1; then
    log "base image $image already present"
    return
  fi
  need_root
  local rootfs mirror
  rootfs=$(mktemp -d /tmp/celery-bundle-rootfs.XXXXXX)
  mirror=$(debian_mirror)
  log "building $image with debootstrap from $mirror (about a minute)"
  local keyring=()
  host_is_debian || keyring=(--keyring=/usr/share/keyrings/debian-archive-keyring.gpg)
  debootstrap --variant=minbase "${keyring[@]}" \
    --include=systemd,systemd-sysv,python3,python3-apt,dbus,procps,iproute2,ca-certificates,sudo \
    bookworm "$rootfs" "$mirror" >/tmp/celery-bundle-debootstrap.log 2>&1 || {
      tail -20 /tmp/celery-bundle-debootstrap.log >&2; exit 1; }
  # Containers have no console getty to wait for, and no udev.
  rm -f "$rootfs"/etc/systemd/system/getty.target.wants/* 2>/dev/null || true
  tar -C "$rootfs" -c . | docker import -c 'CMD ["/lib/systemd/systemd"]' - "$image" >/dev/null
  rm -rf "$rootfs"
  log "base image $image built"
}

python_tools() {
  local stamp="$venv/.requirements.sha"
  local want
  want=$(sha256sum "$repo/requirements-dev.txt" | cut -d' ' -f1)
  if [[ -f $stamp && $(cat "$stamp") == "$want" ]]; then
    log "python tools already installed in $venv"
    return
  fi
  log "installing python tools into $venv"
  python3 -m venv "$venv"
  "$venv/bin/pip" install -q --upgrade pip
  "$venv/bin/pip" install -q -r "$repo/requirements-dev.txt"
  echo "$want" >"$stamp"
}

install_packages
start_engine
build_image
python_tools
log "ready: PATH=/usr/bin:$venv/bin:\$PATH"
