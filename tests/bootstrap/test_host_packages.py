"""The host-package part of scripts/bootstrap.sh on fresh Debian machines: in a new container
of each release's minimal image (stock python3, no venv module, no Docker),
`scripts/bootstrap.sh --host-packages-only` must install what the README's commands need,
after which `python3 -m venv` works and dockerd, debootstrap and git are on PATH; a second
run installs nothing. Needs Docker and the base images (scripts/bootstrap.sh builds them);
scripts/test.sh runs it first."""

import subprocess
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
IMAGES = {
    "bookworm": "celery-bundle/debian12-systemd:latest",
    "trixie": "celery-bundle/debian13-systemd:latest",
}
CHECK = r"""
. /etc/os-release; echo "$PRETTY_NAME, $(/usr/bin/python3 --version)"
if /usr/bin/python3 -c "import ensurepip" 2>/dev/null; then
  echo "this image is not stock: python3 already has its venv module" >&2; exit 3
fi
bash /opt/bundle/scripts/bootstrap.sh --host-packages-only
/usr/bin/python3 -m venv /tmp/venv-check && /tmp/venv-check/bin/python -c "import sys; print('venv ok:', sys.version.split()[0])"
for tool in dockerd docker debootstrap git; do command -v "$tool" >/dev/null || { echo "missing $tool" >&2; exit 4; }; done
bash /opt/bundle/scripts/bootstrap.sh --host-packages-only | grep -q "host packages already installed"
echo "second run installs nothing"
"""


@pytest.mark.parametrize("release", sorted(IMAGES))
def test_bootstrap_installs_the_host_packages_on_a_fresh(release):
    started = time.monotonic()
    run = subprocess.run(
        ["docker", "run", "--rm", "-e", "DEBIAN_FRONTEND=noninteractive",
         "-v", f"{ROOT / 'scripts' / 'bootstrap.sh'}:/opt/bundle/scripts/bootstrap.sh:ro",
         IMAGES[release], "bash", "-euc", CHECK],
        capture_output=True, text=True, timeout=900)
    print(run.stdout[-3000:], run.stderr[-3000:], sep="\n")
    print(f"{release}: exit {run.returncode} after {time.monotonic() - started:.0f} s")
    assert run.returncode == 0, f"bootstrap --host-packages-only on {release} exited {run.returncode}: {run.stderr[-500:]}"
    assert "second run installs nothing" in run.stdout
