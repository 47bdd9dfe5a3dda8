#!/usr/bin/env bash
# Prove the host-package part of scripts/bootstrap.sh on fresh Debian machines: in a new
# container of each release's minimal image (stock python3, no venv module, no Docker),
# `scripts/bootstrap.sh --host-packages-only` must install what the README's commands need,
# after which `python3 -m venv` works and dockerd, debootstrap and git are on PATH.
# Usage: scripts/check_host_packages.sh JUNIT_FILE RELEASE=IMAGE [RELEASE=IMAGE ...]
set -euo pipefail

repo=$(cd "$(dirname "$0")/.." && pwd)
junit=$1
shift
cases="" failures=0
for pair in "$@"; do
  release=${pair%%=*} image=${pair#*=}
  echo "--- host packages on a fresh $release container ($image)"
  t0=$(date +%s)
  rc=0
  docker run --rm -e DEBIAN_FRONTEND=noninteractive \
    -v "$repo/scripts/bootstrap.sh:/opt/bundle/scripts/bootstrap.sh:ro" "$image" bash -euc '
      . /etc/os-release; echo "$PRETTY_NAME, $(/usr/bin/python3 --version)"
      if /usr/bin/python3 -c "import ensurepip" 2>/dev/null; then
        echo "this image is not stock: python3 already has its venv module" >&2; exit 3
      fi
      bash /opt/bundle/scripts/bootstrap.sh --host-packages-only
      /usr/bin/python3 -m venv /tmp/venv-check && /tmp/venv-check/bin/python -c "import sys; print(\"venv ok:\", sys.version.split()[0])"
      for tool in dockerd docker debootstrap git; do command -v "$tool" >/dev/null || { echo "missing $tool" >&2; exit 4; }; done
      bash /opt/bundle/scripts/bootstrap.sh --host-packages-only | grep -q "host packages already installed"
      echo "second run installs nothing"' || rc=$?
  seconds=$(($(date +%s) - t0))
  echo "--- $release: exit $rc after $seconds s"
  failure=""
  if ((rc)); then
    failures=$((failures + 1))
    failure="<failure message=\"bootstrap --host-packages-only on $release exited $rc\"/>"
  fi
  cases+="<testcase classname=\"host-packages\" name=\"bootstrap installs the host packages on a fresh $release ($seconds s)\">$failure</testcase>"
done
printf '<testsuite name="host-packages" tests="%d" failures="%d">%s</testsuite>\n' "$#" "$failures" "$cases" >"$junit"
exit $((failures > 0))
