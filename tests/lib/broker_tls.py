"""TLS to the broker (celery_broker_tls), shared by the scenarios that turn it on."""

import shlex

PROBE = r'''
import socket, ssl, sys
host, port, ca, plain = sys.argv[1], int(sys.argv[2]), sys.argv[3], bytes.fromhex(sys.argv[4])
trusted = ssl.create_default_context(cafile=ca)
with socket.create_connection((host, port), timeout=5) as raw:
    with trusted.wrap_socket(raw, server_hostname=host) as tls:
        print("trusted-ca", tls.version())
try:
    with socket.create_connection((host, port), timeout=5) as raw:
        ssl.create_default_context().wrap_socket(raw, server_hostname=host)
    print("other-ca accepted")
except ssl.SSLCertVerificationError:
    print("other-ca refused")
with socket.create_connection((host, port), timeout=5) as raw:
    raw.sendall(plain)
    try:
        data = raw.recv(64)
    except (socket.timeout, ConnectionResetError):
        data = b""
print("plain-text", data[:8].hex() or "-")
'''


def test_the_broker_speaks_tls_only_with_a_verified_certificate(stack, scenario):
    """The worker reaches the broker over TLS, verifying its certificate against the CA the
    role installed; a client trusting other CAs is refused; plain text gets no answer."""
    host, port = scenario["broker"], scenario["broker_port"]
    out = stack.worker.check_output(
        "/opt/celery/venv/bin/python -c " + " ".join(shlex.quote(a) for a in (
            PROBE, host, str(port), "/etc/celery/broker-ca.pem", scenario["plain_hello"].hex())))
    lines = dict(line.split(" ", 1) for line in out.splitlines())
    assert lines["trusted-ca"] in ("TLSv1.2", "TLSv1.3"), out
    assert lines["other-ca"] == "refused", out
    assert not bytes.fromhex(lines["plain-text"].replace("-", "")).startswith(scenario["plain_answer"]), out


def test_the_workers_use_the_tls_url_and_settings(stack, scenario):
    url = stack.broker_url()
    # Never the URL itself in an assertion: it holds the password.
    scheme, address = url.split("://")[0], url.split("@")[-1]
    assert scheme in ("rediss", "amqps")
    assert address.startswith(f"{scenario['broker']}:{scenario['broker_port']}/")
    conf = stack.effective_conf(["broker_use_ssl"])["broker_use_ssl"]
    assert conf, "broker_use_ssl is empty"
    assert "/etc/celery/broker-ca.pem" in conf.values()
    ca = stack.worker.file("/etc/celery/broker-ca.pem")
    assert ca.exists and ca.content_string.startswith("-----BEGIN CERTIFICATE-----")


def test_the_broker_key_is_readable_by_root_and_the_broker_only(stack, scenario):
    key = stack.broker.file(f"{scenario['tls_dir']}/broker.key")
    assert (key.user, key.group, key.mode) == ("root", scenario["broker_group"], 0o640)
