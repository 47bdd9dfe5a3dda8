"""Find a run's secrets in its output (the no_log check: tests/results/test_no_secrets.py).

It looks for every celery_broker_password and rabbitmq_broker_erlang_cookie, and for the
secrets inside celery_worker_settings (values of keys that name a password, secret or token,
and the password of a URL), as written and URL-encoded.
"""

import re
from urllib.parse import quote, unquote, urlsplit

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


def secrets(node):
    if isinstance(node, dict):
        for key, value in node.items():
            if key in SECRET_KEYS and isinstance(value, str):
                yield value
            elif key == SETTINGS_KEY:
                yield from settings_secrets(value)
            else:
                yield from secrets(value)
    elif isinstance(node, list):
        for item in node:
            yield from secrets(item)


def leaked_forms(log, found):
    return sorted({form for secret in found for form in (secret, quote(secret, safe="")) if form in log})
