"""The replaced system's README examples, run verbatim through bash with only the address
changed from the deployed broker to the test broker."""

import json
import subprocess

import requests

DEPLOYED = "http://192.168.122.86:8080"

# Copied character for character from the seed README ("Troubleshooting") and from the
# example the seed's broker.py printed at start-up.
CHECK_STATUS = "curl http://192.168.122.86:8080/status"
POST_TEST = """curl -X POST http://192.168.122.86:8080/messages/test \\
     -H 'Content-Type: application/json' \\
     -d '{"sender":"test-agent","message":"Hello World!"}'"""
READ_TEST = "curl http://192.168.122.86:8080/messages/test"
POST_GENERAL = """curl -X POST http://192.168.122.86:8080/messages/general \\
       -H 'Content-Type: application/json' \\
       -d '{"sender":"agent1","message":"Hello from agent 1!"}'"""
READ_GENERAL = "curl http://192.168.122.86:8080/messages/general"


def run(command, url):
    local = command.replace(DEPLOYED, url)
    assert DEPLOYED not in local
    result = subprocess.run(
        ["bash", "-c", local + " --silent --show-error --fail-with-body"], capture_output=True, text=True, timeout=30
    )
    assert result.returncode == 0, result.stderr + result.stdout
    return json.loads(result.stdout)


def test_status_example(url):
    status = run(CHECK_STATUS, url)
    assert status["status"] == "running" and "channels" in status and "agents" in status


def test_connectivity_examples(url):
    before = requests.get(f"{url}/messages/test", params={"limit": 1000}).json()["count"]
    posted = run(POST_TEST, url)
    assert posted["status"] == "success" and posted["message"] == "Hello World!"
    read = run(READ_TEST, url)
    assert read["count"] == before + 1
    assert read["messages"][-1]["sender"] == "test-agent"
    assert read["messages"][-1]["message"] == "Hello World!"


def test_startup_banner_examples(url):
    run(POST_GENERAL, url)
    assert run(READ_GENERAL, url)["messages"][-1]["message"] == "Hello from agent 1!"


def test_api_section_query_form(url):
    """`GET /messages/{channel}?limit=10&since=timestamp`, as the API section writes it."""
    first = run(POST_TEST, url)
    run(POST_TEST, url)
    page = run(f"curl '{DEPLOYED}/messages/test?limit=10&since={first['timestamp']}'", url)
    assert page["count"] == 1 and page["messages"][0]["id"] > first["id"]
