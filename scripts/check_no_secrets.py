#!/usr/bin/env python3
"""Fail if a scenario's secrets appear in its Molecule output (the no_log check).

Usage: check_no_secrets.py LOG VARS_YML JUNIT_XML [LABEL]
Looks for every celery_broker_password and rabbitmq_broker_erlang_cookie in VARS_YML (a molecule.yml, or the
sandbox's generated variables), and for the secrets inside celery_worker_settings (values of
keys that name a password, secret or token, and the password of a URL), as written and
URL-encoded, in LOG (the whole output of a scenario or of the sandbox), and writes the result
as one JUnit test case.
"""

import re
import sys
from pathlib import Path
from urllib.parse import quote, unquote, urlsplit
from xml.sax.saxutils import escape

import yaml


SECRET_KEYS = ("celery_broker_password", "rabbitmq_broker_erlang_cookie")
SETTINGS_KEY = "celery_worker_settings"
SECRET_NAME = re.compile(r"password|secret|token", re.IGNORECASE)


def settings_secrets(node):
    """Secrets inside celery_worker_settings: values of secret-named keys, URL passwords."""
    if isinstance(node, dict):
        for key, value in node.items():
            if SECRET_NAME.search(str(key)) and isinstance(value, str) and value:
                yield value
            else:
                yield from settings_secrets(value)
    elif isinstance(node, list):
        for item in node:
            yield from settings_secrets(item)
    elif isinstance(node, str) and "://" in node:
        password = urlsplit(node).password
        if password:
            yield unquote(password)


def passwords(node):
    if isinstance(node, dict):
        for key, value in node.items():
            if key in SECRET_KEYS and isinstance(value, str):
                yield value
            elif key == SETTINGS_KEY:
                yield from settings_secrets(value)
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
    name = f"no secret in the output of {label or Path(molecule_yml).parent.name}"
    failure = f'<failure message="{escape(str(len(leaked)))} form(s) of the password leaked"/>' if leaked else ""
    Path(junit_path).write_text(
        f'<testsuite name="secrets" tests="1" failures="{int(bool(leaked))}">'
        f'<testcase classname="secrets" name="{escape(name)}">{failure}</testcase></testsuite>\n')
    print(f"{name}: {'LEAKED' if leaked else 'clean'} ({len(secrets)} password(s), {len(log)} bytes read)")
    return 1 if leaked else 0


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:]))
