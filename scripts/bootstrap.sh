#!/usr/bin/env bash
# Prepare a machine to run this bundle's tests (and the sandbox):
#   - Python tools (ansible, molecule, testinfra, linters) in a venv: .venv/
#   - a Docker engine (Debian's docker.io; started by hand when systemd is not PID 1)
#   - the local systemd base image the Molecule scenarios boot (built with debootstrap,
#     since no registry is reachable on our CI machines)
#   - promtool (from Debian's prometheus package) in .tools/bin, for the alert rules' tests
# Idempotent: a running engine, an existing venv and an existing image are reused.
#
# Usage: scripts/bootstrap.sh [--host-packages-only]
#   --host-packages-only: only install the Debian packages a stock system lacks (CI proves
#   this part on fresh Debian 12 and 13 containers: stock python3, no venv module).
# Environment:
#   CELERY_BUNDLE_IMAGE   image name (default: celery-bundle/debian12-systemd:latest)
#   CELERY_BUNDLE_RELEASE Debian release of the image (default: trixie if the image name has
#                         debian13 in it, else bookworm)
#   CELERY_BUNDLE_VENV    venv path  (default: <repo>/.venv)
#   CELERY_BUNDLE_REQUIREMENTS  what goes into it (default: <repo>/requirements-dev.txt;
#                         requirements-lowest.txt: the oldest Ansible the bundle claims)
#   CELERY_BUNDLE_PYTHON  interpreter of the venv (default: Debian's /usr/bin/python3)
set -euo pipefail

repo=$(cd "$(dirname "$0")/.." && pwd)
image=${CELERY_BUNDLE_IMAGE:-celery-bundle/debian12-systemd:latest}
# The release follows the image's name when only the image is given (debian13 = trixie).
case $image in
  *debian13*) default_release=trixie ;;
  *) default_release=bookworm ;;
esac
release=${CELERY_BUNDLE_RELEASE:-$default_release}
venv=${CELERY_BUNDLE_VENV:-$repo/.venv}
requirements=${CELERY_BUNDLE_REQUIREMENTS:-$repo/requirements-dev.txt}
# Debian's own interpreter, not whatever comes first on PATH (pyenv, a CI runner's Python):
# its venv module is the python3-venv package installed below.
python=${CELERY_BUNDLE_PYTHON:-/usr/bin/python3}
log() { printf '[bootstrap %s] %s\n' "$(date +%H:%M:%S)" "$*"; }

need_root() {
  if [[ $(id -u) -ne 0 ]]; then
    echo "bootstrap: installing system packages needs root (run with sudo)" >&2
    exit 1
  fi
}

# The Debian packages the commands of the README need and a stock system may lack.
install_packages() {
  local missing=()
  [[ -x $python ]] || missing+=(python3)
  # Stock Debian has python3 without its venv module ("ensurepip is not available").
  [[ -x $python ]] && "$python" -c 'import ensurepip, venv' >/dev/null 2>&1 || missing+=(python3-venv)
  command -v git >/dev/null 2>&1 || missing+=(git)
  [[ -f /etc/ssl/certs/ca-certificates.crt ]] || missing+=(ca-certificates)
  command -v dockerd >/dev/null 2>&1 || missing+=(docker.io)
  command -v debootstrap >/dev/null 2>&1 || missing+=(debootstrap)
  # Ubuntu: debootstrap needs Debian's archive keys to verify bookworm.
  host_is_debian || [[ -f /usr/share/keyrings/debian-archive-keyring.gpg ]] || missing+=(debian-archive-keyring)
  [[ -x /usr/bin/docker ]] || missing+=(docker.io)
  if ((${#missing[@]})); then
    need_root
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    # Debian 13 ships the client apart from the engine (docker-cli); Debian 12 in docker.io.
    if [[ ! -x /usr/bin/docker ]] && apt-cache show docker-cli >/dev/null 2>&1; then
      missing+=(docker-cli)
    fi
    log "installing ${missing[*]} from Debian"
    apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
  else
    log "host packages already installed"
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
  log "building $image ($release) with debootstrap from $mirror (about a minute)"
  local keyring=()
  host_is_debian || keyring=(--keyring=/usr/share/keyrings/debian-archive-keyring.gpg)
  debootstrap --variant=minbase "${keyring[@]}" \
    --include=systemd,systemd-sysv,python3,python3-apt,dbus,procps,iproute2,ca-certificates,sudo \
    "$release" "$rootfs" "$mirror" >/tmp/celery-bundle-debootstrap.log 2>&1 || {
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
  want=$( (cat "$requirements"; readlink -f "$python") | sha256sum | cut -d' ' -f1)
  if [[ -f $stamp && $(cat "$stamp") == "$want" ]]; then
    log "python tools already installed in $venv"
    return
  fi
  log "installing python tools into $venv ($("$python" --version))"
  rm -rf "$venv"
  "$python" -m venv "$venv"
  "$venv/bin/pip" install -q --upgrade pip
  "$venv/bin/pip" install -q -r "$requirements"
  echo "$want" >"$stamp"
}

# promtool, which tests the Prometheus alert rules (tests/static/test_alert_rules.py): taken out of
# Debian's prometheus package into .tools/bin, without installing the package (which would
# start a Prometheus server on this machine).
promtool() {
  local tool=$repo/.tools/bin/promtool tmp
  if [[ -x $tool ]]; then
    log "promtool already in $tool"
    return
  fi
  log "extracting promtool from Debian's prometheus package into $tool"
  tmp=$(mktemp -d)
  chmod 0755 "$tmp"
  (cd "$tmp" && { apt-get download -qq prometheus 2>/dev/null ||
    { apt-get update -qq && apt-get download -qq prometheus 2>/dev/null; }; })
  dpkg-deb -x "$tmp"/prometheus_*.deb "$tmp/root"
  mkdir -p "$(dirname "$tool")"
  install -m 0755 "$tmp/root/usr/bin/promtool" "$tool"
  rm -rf "$tmp"
}

install_packages
if [[ ${1:-} == --host-packages-only ]]; then
  "$python" -m venv "$(mktemp -d)/venv-check" && log "host packages ready: $("$python" --version) with venv"
  exit 0
fi
start_engine
build_image
python_tools
promtool
log "ready: PATH=/usr/bin:$venv/bin:\$PATH"
