"""The bundle as a collection (celery_bundle.reliable): built, installed, run by its names.

No containers: the tarball is built from this tree and the git install takes the
repository's committed HEAD; both go into empty collections paths, and the playbooks are
resolved by their collection names against inventories/example (--list-tasks parses every
play, role and task file they reach). The molecule scenario "rabbitmq" deploys through the
installed collection for real (molecule/shared/collection.yml).
"""

import json
import os
import subprocess
import tarfile
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
GALAXY = yaml.safe_load((ROOT / "galaxy.yml").read_text())
FQCN = f"{GALAXY['namespace']}.{GALAXY['name']}"
ROLES = sorted(p.name for p in (ROOT / "roles").iterdir() if (p / "tasks").is_dir())
PLAYBOOKS = sorted(p.stem for p in (ROOT / "playbooks").glob("*.yml") if "-" not in p.stem)


def run(*argv, cwd, env=None):
    result = subprocess.run(argv, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, f"{' '.join(argv)}:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    return result.stdout


def outside_env(tmp, collections):
    """An environment with no trace of the clone: its own ansible.cfg, no roles_path."""
    (tmp / "ansible.cfg").write_text("[defaults]\n")
    return dict(os.environ, ANSIBLE_CONFIG=str(tmp / "ansible.cfg"), ANSIBLE_COLLECTIONS_PATH=str(collections),
                ANSIBLE_ROLES_PATH=str(tmp / "no-roles"), ANSIBLE_FORCE_COLOR="false")


@pytest.fixture(scope="module")
def tarball(tmp_path_factory):
    out = tmp_path_factory.mktemp("build")
    run("ansible-galaxy", "collection", "build", "--output-path", str(out), str(ROOT), cwd=ROOT)
    (path,) = out.glob(f"{GALAXY['namespace']}-{GALAXY['name']}-*.tar.gz")
    return path


def test_the_tarball_holds_the_roles_and_playbooks_and_no_local_state(tarball):
    names = set(tarfile.open(tarball).getnames())
    for role in ROLES:
        assert f"roles/{role}/tasks/main.yml" in names
        assert f"roles/{role}/meta/argument_specs.yml" in names
    for playbook in PLAYBOOKS:
        assert f"playbooks/{playbook}.yml" in names
    assert "meta/runtime.yml" in names and "MANIFEST.json" in names
    leaked = sorted(n for n in names if n.split("/")[0] in {".venv", ".results", ".drill", ".git", "molecule", ".cache"})
    assert leaked == []


def test_the_dependencies_are_the_roles_collections_of_requirements_yml(tarball):
    manifest = json.load(tarfile.open(tarball).extractfile("MANIFEST.json"))
    requirements = {c["name"]: c["version"] for c in yaml.safe_load((ROOT / "requirements.yml").read_text())["collections"]}
    dependencies = manifest["collection_info"]["dependencies"]
    assert dependencies and all(requirements.get(name) == version for name, version in dependencies.items())


@pytest.mark.parametrize("source", ["tarball", "git"])
def test_installed_into_an_empty_path_it_runs_by_its_collection_names(source, tarball, tmp_path):
    collections = tmp_path / "collections"
    env = outside_env(tmp_path, collections)
    what = str(tarball) if source == "tarball" else f"git+file://{ROOT}/.git"
    run("ansible-galaxy", "collection", "install", "--collections-path", str(collections), what, cwd=tmp_path, env=env)
    installed = collections / "ansible_collections" / GALAXY["namespace"] / GALAXY["name"]
    assert (installed / "MANIFEST.json").is_file()
    inventory = ROOT / "inventories" / "example"
    # The site playbook includes its roles at run time: its gate (check mode, on this
    # machine under the bad-input tests' two names) finds every role in the collection.
    bad_input = ROOT / "tests" / "static" / "bad_input"
    out = run("ansible-playbook", "--check", "--tags", "preflight-only", "-i", str(bad_input / "hosts.yml"),
              "-e", f"@{bad_input / 'good.yml'}", f"{FQCN}.site", cwd=tmp_path, env=env)
    for role in ("celery", "celery_worker", "redis_broker"):
        assert f"{FQCN}.{role} :" in out, out[-3000:]
    # A playbook of the user's own, with the roles by their fully qualified names.
    (tmp_path / "play.yml").write_text(yaml.safe_dump([
        {"name": "Import the bundle's playbook", "ansible.builtin.import_playbook": f"{FQCN}.rolling_restart"},
        {"name": "Brokers", "hosts": "celery_brokers", "gather_facts": False,
         "roles": [{"role": f"{FQCN}.redis_broker"}]},
        {"name": "Workers", "hosts": "celery_workers", "gather_facts": False,
         "roles": [{"role": f"{FQCN}.celery_worker"}]},
    ], sort_keys=False))
    out = run("ansible-playbook", "-i", str(inventory), "play.yml", "--list-tasks", cwd=tmp_path, env=env)
    assert f"{FQCN}.redis_broker :" in out and f"{FQCN}.celery_worker :" in out, out[-3000:]
