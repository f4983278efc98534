"""HTTPS: the broker serves TLS with gunicorn's own support when given a certificate and
key, agent-chat verifies it against --ca (and never skips verification), and a bad
certificate setting stops the broker with one line."""

import json
import os
import subprocess
import time

import pytest
import requests
import trustme

from broker_process import BIN, BrokerProcess

CHAT = str(BIN / "agent-chat")


@pytest.fixture(scope="module")
def certificates(tmp_path_factory):
    """A throwaway CA, and a certificate it signed for 127.0.0.1."""
    folder = tmp_path_factory.mktemp("tls")
    ca = trustme.CA()
    server = ca.issue_cert("127.0.0.1", "localhost")
    paths = {"ca": folder / "ca.pem", "cert": folder / "broker.pem", "key": folder / "broker.key"}
    ca.cert_pem.write_to_path(str(paths["ca"]))
    server.private_key_pem.write_to_path(str(paths["key"]))
    for blob in server.cert_chain_pems:
        blob.write_to_path(str(paths["cert"]), append=True)
    paths["other_ca"] = folder / "other-ca.pem"
    trustme.CA().cert_pem.write_to_path(str(paths["other_ca"]))
    return {name: str(path) for name, path in paths.items()}


@pytest.fixture(scope="module")
def tls_broker(tmp_path_factory, certificates):
    env = {"AGENT_COMMS_TLS_CERT": certificates["cert"], "AGENT_COMMS_TLS_KEY": certificates["key"]}
    process = BrokerProcess(tmp_path_factory.mktemp("tls-broker") / "messages.db", env=env, ca=certificates["ca"])
    process.start()
    yield process
    process.stop()


def chat(broker, *args, env=None):
    """agent-chat with this environment only: no config file of the machine's is read."""
    environment = {
        "AGENT_COMMS_BROKER": broker.url,
        "AGENT_COMMS_CONFIG": os.devnull,
        "PATH": "/usr/bin:/bin",
        **(env or {}),
    }
    return subprocess.run([CHAT, *args], capture_output=True, text=True, env=environment, timeout=30)


def test_the_broker_serves_https_with_hsts(tls_broker, certificates):
    assert tls_broker.url.startswith("https://")
    reply = requests.get(f"{tls_broker.url}/status", verify=certificates["ca"], timeout=10)
    assert reply.status_code == 200 and reply.json()["status"] == "running"
    assert reply.headers["Strict-Transport-Security"].startswith("max-age=")


def test_gunicorns_own_refusals_carry_hsts_over_tls(tls_broker, certificates):
    reply = requests.get(
        f"{tls_broker.url}/status", headers={"X-Long": "x" * 9000}, verify=certificates["ca"], timeout=10
    )
    assert reply.status_code == 431
    assert reply.headers["Strict-Transport-Security"].startswith("max-age=")


def test_plain_http_to_the_tls_port_gets_no_answer(tls_broker):
    with pytest.raises(requests.ConnectionError):
        requests.get(tls_broker.url.replace("https://", "http://") + "/status", timeout=10)
    assert requests.get(f"{tls_broker.url}/healthz", verify=tls_broker.verify, timeout=10).status_code == 200


def test_agent_chat_over_https_with_ca(tls_broker, certificates, tmp_path):
    sent = chat(tls_broker, "--ca", certificates["ca"], "send", "tls", "over https")
    assert sent.returncode == 0, sent.stderr
    read = chat(tls_broker, "read", "tls", "--json", env={"AGENT_COMMS_CA": certificates["ca"]})
    assert json.loads(read.stdout)["message"] == "over https"
    config = tmp_path / "config.ini"
    config.write_text(f"[agent-comms]\nca = {certificates['ca']}\n")
    watched = chat(
        tls_broker,
        "watch",
        "tls",
        "--after",
        "0",
        "--count",
        "1",
        "--json",
        env={"AGENT_COMMS_CONFIG": str(config)},
    )
    assert watched.returncode == 0, watched.stderr
    assert json.loads(watched.stdout)["message"] == "over https"


@pytest.mark.parametrize(
    "command", [["send", "tls", "x"], ["read", "tls"], ["watch", "tls", "--timeout", "5"], ["status"]]
)
@pytest.mark.parametrize("ca", [None, "other_ca"])
def test_agent_chat_refuses_an_unverified_broker(tls_broker, certificates, command, ca):
    options = ["--ca", certificates[ca]] if ca else []
    done = chat(tls_broker, *options, *command)
    assert done.returncode == 2
    assert "cannot verify the TLS certificate" in done.stderr and "--ca" in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1 and "Traceback" not in done.stderr


def test_a_missing_ca_file_is_a_usage_error(tls_broker, tmp_path):
    done = chat(tls_broker, "--ca", str(tmp_path / "absent.pem"), "status")
    assert done.returncode == 1 and "does not exist" in done.stderr


@pytest.mark.parametrize(
    ("settings", "expected"),
    [
        ({"AGENT_COMMS_TLS_CERT": "{cert}"}, "set both or neither"),
        ({"AGENT_COMMS_TLS_CERT": "{cert}", "AGENT_COMMS_TLS_KEY": "/nonexistent/key.pem"}, "no such file"),
        ({"AGENT_COMMS_TLS_CERT": "{ca}", "AGENT_COMMS_TLS_KEY": "{key}"}, "cannot use the TLS certificate"),
    ],
)
def test_bad_tls_settings_stop_the_broker_with_one_line(tmp_path, certificates, settings, expected):
    env = {name: value.format(**certificates) for name, value in settings.items()}
    command = [str(BIN / "agent-comms-broker"), "serve", "--bind", "127.0.0.1:0", "--db", str(tmp_path / "m.db")]
    done = subprocess.run(command, capture_output=True, text=True, timeout=30, env={"PATH": "/usr/bin:/bin", **env})
    assert done.returncode == 1
    assert expected in done.stderr and len(done.stderr.strip().splitlines()) == 1, done.stderr


def test_clients_that_never_finish_a_handshake_cannot_lock_others_out(tmp_path, certificates):
    """Far more TCP connections to the HTTPS port than the workers hold, none sending a
    byte: handshakes are cut for the reserve like slow requests, so /healthz is answered,
    and the log holds no traceback for them."""
    import socket

    env = {
        "AGENT_COMMS_TLS_CERT": certificates["cert"],
        "AGENT_COMMS_TLS_KEY": certificates["key"],
        "AGENT_COMMS_WORKER_CONNECTIONS": "64",
        "AGENT_COMMS_REQUEST_TIMEOUT": "2",
    }
    broker = BrokerProcess(tmp_path / "messages.db", env=env, ca=certificates["ca"]).start()
    silent = []
    try:
        for _ in range(400):
            silent.append(socket.create_connection(("127.0.0.1", broker.port), timeout=10))
        time.sleep(1)
        for _ in range(5):
            started = time.monotonic()
            assert requests.get(f"{broker.url}/healthz", verify=certificates["ca"], timeout=10).status_code == 200
            assert time.monotonic() - started < 3
        time.sleep(3)  # past the request timeout: the silent handshakes were cut, quietly
        assert "Traceback" not in broker.log(), broker.log()[-3000:]
    finally:
        for conn in silent:
            conn.close()
        broker.stop()
