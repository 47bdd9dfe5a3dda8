#!/usr/bin/env python3
"""Fail if a scenario's secrets appear in its Molecule output (the no_log check).

Usage: check_no_secrets.py LOG VARS_YML JUNIT_XML [LABEL]
Looks for every celery_broker_password and rabbitmq_broker_erlang_cookie in VARS_YML (a molecule.yml, or the
sandbox's generated variables), as written and URL-encoded, in LOG (the whole output of a
scenario or of the sandbox), and writes the result as one JUnit test case.
"""

import sys
from pathlib import Path
from urllib.parse import quote
from xml.sax.saxutils import escape

import yaml


SECRET_KEYS = ("celery_broker_password", "rabbitmq_broker_erlang_cookie")


def passwords(node):
    if isinstance(node, dict):
        for key, value in node.items():
            if key in SECRET_KEYS and isinstance(value, str):
                yield value
            else:
                yield from passwords(value)
    elif isinstance(node, list):
        for item in node:
            yield from passwords(item)


def main(log_path, molecule_yml, junit_path, label=None):
    log = Path(log_path).read_text(errors="replace")
    secrets = set(passwords(yaml.safe_load(Path(molecule_yml).read_text())))
    assert secrets, f"no celery_broker_password in {molecule_yml}"
    leaked = [form for secret in secrets for form in {secret, quote(secret, safe="")} if form in log]
    name = f"no broker password in the output of {label or Path(molecule_yml).parent.name}"
    failure = f'<failure message="{escape(str(len(leaked)))} form(s) of the password leaked"/>' if leaked else ""
    Path(junit_path).write_text(
        f'<testsuite name="secrets" tests="1" failures="{int(bool(leaked))}">'
        f'<testcase classname="secrets" name="{escape(name)}">{failure}</testcase></testsuite>\n')
    print(f"{name}: {'LEAKED' if leaked else 'clean'} ({len(secrets)} password(s), {len(log)} bytes read)")
    return 1 if leaked else 0


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:]))
