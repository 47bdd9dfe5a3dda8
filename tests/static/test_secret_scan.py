"""The no_log check's search (tests/lib/secret_scan.py) on hand-made variables and output."""

from secret_scan import leaked_forms, secrets


def test_secrets_are_found_in_molecule_and_settings_forms():
    variables = {"all": {"vars": {"celery_broker_password": "p@ss/1", "celery_worker_settings": {
        "broker_transport_options": {"sentinel_kwargs": {"password": "s3cret"}},
        "result_backend": "redis://user:u%40pw@host/0"}}}}
    found = set(secrets(variables))
    assert found == {"p@ss/1", "s3cret", "u@pw"}
    assert leaked_forms("url redis://x:p%40ss%2F1@h", found) == ["p%40ss%2F1"]
    assert leaked_forms("nothing here", found) == []
