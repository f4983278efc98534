"""Notifications out (issue 14): rules in AGENT_COMMS_NOTIFY_FILE send matching messages to
ntfy, Gotify and webhooks, at least once and in order, across receivers that are down,
slow or answer 500, and across a broker restart; only to the destinations the allow-list
names. The receivers are HTTP servers of this test on loopback ports (http_peer.Peer),
standing in for ntfy, Gotify and a webhook receiver."""

import hashlib
import hmac
import json
import subprocess
import time

import pytest
import requests

from broker_process import BIN, free_port
from conftest import until
from http_peer import Peer

OK = (200, {"ok": True}, {})
SECRET = "webhook-secret-for-tests"


def write_rules(path, text):
    path.write_text(text)
    return {"AGENT_COMMS_NOTIFY_FILE": str(path)}


def one_rule(path, allow, destination, name, extra=""):
    """A rules file of one rule (retries quick, for the tests); its broker's environment."""
    text = f'allow = ["{allow}"]\nretry_min = 0.2\nretry_max = 0.4\n[[rule]]\nname = "{name}"\n{extra}{destination}\n'
    return write_rules(path, text)


def post(url, channel, message, priority=3, tags=(), sender="agent-a"):
    body = {"sender": sender, "message": message, "priority": priority, "tags": list(tags)}
    started = time.monotonic()
    reply = requests.post(f"{url}/messages/{channel}", json=body, timeout=10)
    assert reply.status_code == 201, reply.text
    return reply.json()["id"], time.monotonic() - started


def bodies(peer):
    return [json.loads(request[3]) for request in peer.requests]


def status_of(url, rule):
    rules = requests.get(f"{url}/status", timeout=10).json()["notifications"]
    return next(item for item in rules if item["rule"] == rule)


def test_ntfy_gotify_and_a_signed_webhook_get_what_their_rules_match(own_broker, tmp_path):
    with Peer([OK]) as ntfy, Peer([OK]) as gotify, Peer([OK]) as hook:
        env = write_rules(
            tmp_path / "notify.toml",
            f"""
allow = ["{ntfy.url}", "{gotify.url}", "{hook.url}/hooks"]

[[rule]]
name = "phone"
channels = ["alerts", "ops-*"]
min_priority = 4
ntfy = {{ server = "{ntfy.url}", topic = "homelab", token = "tk_test" }}

[[rule]]
name = "desk"
channels = ["alerts"]
tags = ["page"]
gotify = {{ server = "{gotify.url}", token = "app-token" }}

[[rule]]
name = "hook"
channels = ["@ops-lead"]
webhook = {{ url = "{hook.url}/hooks/agent-comms", secret = "{SECRET}" }}
""",
        )
        broker = own_broker(env=env).start()
        post(broker.url, "alerts", "low priority: nobody is woken", priority=2)
        urgent, _ = post(broker.url, "alerts", "disk full on CT-950", priority=5, tags=["page", "disk"])
        ops, _ = post(broker.url, "ops-backup", "backup failed", priority=4)
        post(broker.url, "general", "not an alert", priority=5)
        inbox, _ = post(broker.url, "@ops-lead", "a direct message", sender="agent-b")
        post(broker.url, "@someone-else", "not for the hook")
        until(lambda: len(ntfy.requests) == 2 and len(gotify.requests) == 1 and len(hook.requests) == 1)
        time.sleep(0.5)  # nothing more comes

    assert [(r[0], r[1]) for r in ntfy.requests] == [("POST", "/"), ("POST", "/")]
    assert ntfy.requests[0][2]["Authorization"] == "Bearer tk_test"
    assert bodies(ntfy) == [
        {
            "topic": "homelab",
            "message": "disk full on CT-950",
            "title": "agent-a in alerts",
            "priority": 5,
            "tags": ["page", "disk"],
        },
        {"topic": "homelab", "message": "backup failed", "title": "agent-a in ops-backup", "priority": 4},
    ]
    assert (gotify.requests[0][1], gotify.requests[0][2]["X-Gotify-Key"]) == ("/message", "app-token")
    assert bodies(gotify) == [{"title": "agent-a in alerts", "message": "disk full on CT-950", "priority": 10}]
    method, path, headers, body, _ = hook.requests[0]
    assert (method, path) == ("POST", "/hooks/agent-comms")
    stamp = headers["X-Agent-Comms-Timestamp"]
    expected = hmac.new(SECRET.encode(), stamp.encode() + b"." + body, hashlib.sha256).hexdigest()
    assert headers["X-Agent-Comms-Signature"] == f"sha256={expected}"
    assert abs(int(stamp) - time.time()) < 60
    assert headers["X-Agent-Comms-Delivery"] == f"hook-{inbox}"
    sent = json.loads(body)
    assert sent["rule"] == "hook" and sent["message"]["id"] == inbox and sent["message"]["channel"] == "@ops-lead"
    phone = status_of(broker.url, "phone")
    assert (phone["kind"], phone["delivered"], phone["failures"], phone["last_error"]) == ("ntfy", 2, 0, None)
    assert phone["cursor"] >= ops and urgent < ops


def test_a_receiver_that_answers_500_gets_every_message_in_order_once_it_recovers(own_broker, tmp_path):
    def replies(number, path):
        return (500, {"error": "try later"}, {}) if number < 4 else OK

    with Peer(replies) as hook:
        webhook = f'webhook = {{ url = "{hook.url}/in", secret = "{SECRET}" }}'
        env = one_rule(tmp_path / "notify.toml", hook.url, webhook, "hook")
        broker = own_broker(env=env).start()
        ids = [post(broker.url, "builds", f"build {n} finished")[0] for n in range(10)]
        until(lambda: status_of(broker.url, "hook")["failures"] >= 1, what="a failure shown in /status")
        failing = status_of(broker.url, "hook")
        assert "answered 500" in failing["last_error"] and failing["next_try"] is not None
        until(lambda: status_of(broker.url, "hook")["delivered"] == 10, what="all ten delivered")
    delivered = [json.loads(request[3])["message"]["id"] for request in hook.requests if request]
    # The first messages went (and failed) four times; after that each went once, in order.
    assert delivered[:4] == [ids[0]] * 4 and delivered[4:] == ids
    recovered = status_of(broker.url, "hook")
    assert (recovered["failures"], recovered["last_error"], recovered["next_try"]) == (0, None, None)
    metrics = requests.get(f"{broker.url}/metrics", timeout=10).text
    assert 'agent_comms_notifications_total{outcome="failed",rule="hook"} 4.0' in metrics
    assert 'agent_comms_notifications_total{outcome="delivered",rule="hook"} 10.0' in metrics
    assert 'agent_comms_notification_failures{rule="hook"} 0.0' in metrics


def test_a_down_receiver_never_slows_posts_and_gets_everything_when_it_comes_back(own_broker, tmp_path):
    port = free_port()
    receiver = f"http://127.0.0.1:{port}"
    env = one_rule(tmp_path / "notify.toml", receiver, f'ntfy = {{ server = "{receiver}", topic = "t" }}', "phone")
    broker = own_broker(env=env).start()
    timings = [post(broker.url, "alerts", f"alert {n}") for n in range(30)]
    assert max(took for _, took in timings) < 1.0  # nobody is listening, and posts do not wait for it
    until(lambda: status_of(broker.url, "phone")["failures"] >= 2, what="failures while the receiver is down")
    assert "ConnectionRefusedError" in status_of(broker.url, "phone")["last_error"]
    metrics = requests.get(f"{broker.url}/metrics", timeout=10).text
    assert 'agent_comms_notification_failures{rule="phone"} 0.0' not in metrics
    with Peer([OK], port=port) as ntfy:
        until(lambda: len(ntfy.requests) == 30, what="the thirty alerts delivered")
        assert [body["message"] for body in bodies(ntfy)] == [f"alert {n}" for n in range(30)]


def test_a_slow_receiver_times_out_and_is_tried_again(own_broker, tmp_path):
    def replies(number, path):
        if number == 0:
            time.sleep(2)  # past the rule's timeout
        return OK

    with Peer(replies) as gotify:
        destination = f'gotify = {{ server = "{gotify.url}", token = "t" }}'
        env = one_rule(tmp_path / "notify.toml", gotify.url, destination, "desk", extra="timeout = 0.5\n")
        broker = own_broker(env=env).start()
        _, took = post(broker.url, "alerts", "slow one")
        assert took < 1.0
        until(lambda: status_of(broker.url, "desk")["delivered"] == 1, what="the delivery after the time-out")
        metrics = requests.get(f"{broker.url}/metrics", timeout=10).text
        assert 'agent_comms_notifications_total{outcome="failed",rule="desk"} 1.0' in metrics
    # At least once: the timed-out request reached the receiver too.
    assert [body["message"] for body in bodies(gotify)] == ["slow one", "slow one"]


def test_a_broker_restart_loses_no_notification_and_repeats_none_delivered(own_broker, tmp_path):
    port = free_port()
    receiver = f"http://127.0.0.1:{port}"
    webhook = f'webhook = {{ url = "{receiver}/", secret = "{SECRET}" }}'
    env = one_rule(tmp_path / "notify.toml", receiver, webhook, "hook")
    broker = own_broker(env=env).start()
    with Peer([OK], port=port) as hook:
        before = [post(broker.url, "jobs", f"before {n}")[0] for n in range(5)]
        until(lambda: len(hook.requests) == 5, what="the first five delivered")
    # The receiver is gone; messages come in; the broker restarts.
    during = [post(broker.url, "jobs", f"during {n}")[0] for n in range(5)]
    until(lambda: status_of(broker.url, "hook")["failures"] >= 1, what="a failure while the receiver is gone")
    broker.stop()
    broker.start()
    after = [post(broker.url, "jobs", f"after {n}")[0] for n in range(5)]
    with Peer([OK], port=port) as hook:
        until(lambda: len(hook.requests) >= 10, what="the ten that waited delivered")
        time.sleep(0.5)
    delivered = [json.loads(request[3])["message"]["id"] for request in hook.requests]
    assert delivered == during + after  # none of `before` again, none lost, in order
    assert set(before).isdisjoint(delivered)


def test_two_workers_deliver_each_message_once(own_broker, tmp_path):
    with Peer([OK]) as ntfy:
        env = one_rule(tmp_path / "notify.toml", ntfy.url, f'ntfy = {{ server = "{ntfy.url}", topic = "t" }}', "all")
        broker = own_broker(env=env, workers=2).start()
        sent = [f"m{n}" for n in range(40)]
        for text in sent:
            with requests.Session() as session:  # spread over both workers
                reply = session.post(f"{broker.url}/messages/c", json={"sender": "s", "message": text}, timeout=10)
                assert reply.status_code == 201
        until(lambda: len(ntfy.requests) >= 40, what="forty deliveries")
        time.sleep(1)
    assert [body["message"] for body in bodies(ntfy)] == sent


def test_a_redirect_is_not_followed(own_broker, tmp_path):
    with Peer([OK]) as elsewhere, Peer([(302, {}, {"Location": "REPLACED"})]) as hook:
        hook.replies = [(302, {}, {"Location": f"{elsewhere.url}/stolen"})]
        webhook = f'webhook = {{ url = "{hook.url}/in", secret = "{SECRET}" }}'
        env = one_rule(tmp_path / "notify.toml", hook.url, webhook, "hook")
        broker = own_broker(env=env).start()
        post(broker.url, "c", "where does this go?")
        until(lambda: len(hook.requests) >= 2, what="two tries")
        assert elsewhere.requests == []
        assert "answered 302" in status_of(broker.url, "hook")["last_error"]


def serve_with(tmp_path, text):
    path = tmp_path / "notify.toml"
    path.write_bytes(text if isinstance(text, bytes) else text.encode())
    return subprocess.run(
        [
            str(BIN / "agent-comms-broker"),
            "serve",
            "--bind",
            f"127.0.0.1:{free_port()}",
            "--db",
            str(tmp_path / "m.db"),
        ],
        env={"PATH": "/usr/bin:/bin", "AGENT_COMMS_NOTIFY_FILE": str(path)},
        capture_output=True,
        text=True,
        timeout=30,
    )


def test_the_very_first_post_after_start_is_notified(own_broker, tmp_path):
    with Peer([OK]) as ntfy:
        env = one_rule(tmp_path / "notify.toml", ntfy.url, f'ntfy = {{ server = "{ntfy.url}", topic = "t" }}', "phone")
        broker = own_broker(env=env).start()
        post(broker.url, "alerts", "the first request this broker serves")
        until(lambda: len(ntfy.requests) == 1, what="the first post notified")


def test_a_rule_whose_receiver_hangs_holds_up_no_other(own_broker, tmp_path):
    def hang(number, path):
        time.sleep(5)
        return OK

    with Peer(hang) as stuck, Peer([OK]) as fine:
        env = write_rules(
            tmp_path / "notify.toml",
            f"""
allow = ["{stuck.url}", "{fine.url}"]
[[rule]]
name = "stuck"
channels = ["slow"]
timeout = 30
webhook = {{ url = "{stuck.url}/", secret = "{SECRET}" }}
[[rule]]
name = "fine"
channels = ["fast"]
ntfy = {{ server = "{fine.url}", topic = "t" }}
""",
        )
        broker = own_broker(env=env).start()
        post(broker.url, "slow", "into the void")
        time.sleep(0.5)  # the stuck rule is now waiting on its receiver
        started = time.monotonic()
        post(broker.url, "fast", "straight through")
        until(lambda: len(fine.requests) == 1, timeout=3, what="the other rule's delivery")
        assert time.monotonic() - started < 2


def test_a_long_delivery_run_never_has_two_workers_sending(own_broker, tmp_path):
    """The lease outlasts every delivery and is renewed while a run goes on: 80 messages at
    0.15 s each (12 s, past the 10 s lease) reach a slow receiver once each."""

    def slow(number, path):
        time.sleep(0.15)
        return OK

    with Peer(slow) as hook:
        webhook = f'webhook = {{ url = "{hook.url}/", secret = "{SECRET}" }}'
        broker = own_broker(env=one_rule(tmp_path / "notify.toml", hook.url, webhook, "hook"), workers=2).start()
        batch = [{"sender": "s", "message": f"m{n}"} for n in range(80)]
        assert requests.post(f"{broker.url}/messages/c", json=batch, timeout=10).status_code == 201
        until(lambda: len(hook.requests) >= 80, timeout=40, what="eighty deliveries")
        time.sleep(1)
    assert [json.loads(r[3])["message"]["message"] for r in hook.requests] == [f"m{n}" for n in range(80)]


def test_status_shows_no_path_or_query_of_a_destination(own_broker, tmp_path):
    port = free_port()
    receiver = f"http://127.0.0.1:{port}"
    webhook = f'webhook = {{ url = "{receiver}/hooks/T0/B0/XXXXSECRET?token=SUPERSECRET", secret = "{SECRET}" }}'
    broker = own_broker(env=one_rule(tmp_path / "notify.toml", receiver, webhook, "hook")).start()
    post(broker.url, "c", "m")
    until(lambda: status_of(broker.url, "hook")["failures"] >= 1, what="a failure")
    shown = json.dumps(requests.get(f"{broker.url}/status", timeout=10).json())
    assert "SECRET" not in shown and receiver in shown


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (
            '[[rule]]\nname = "x"\nntfy = { server = "http://127.0.0.1:9", topic = "t" }\n',
            "rule 'x': http://127.0.0.1:9 is not in the allow list",
        ),
        (
            'allow = ["http://127.0.0.1:9/hooks"]\n[[rule]]\nname = "x"\n'
            'webhook = { url = "http://127.0.0.1:9/other", secret = "s" }\n',
            "is not in the allow list",
        ),
        (
            'allow = ["http://127.0.0.1:9"]\n[[rule]]\nname = "x"\nwebhook = { url = "http://127.0.0.1:9/" }\n',
            "rule 'x': webhook needs secret",
        ),
        ('allow = ["ftp://x"]\n', "allow: 'ftp://x' is not an http:// or https:// URL"),
        ("[[rule]\n", "is not valid TOML"),
        (b'allow = ["\xff"]\n', "is not valid TOML"),
        ('[[rule]]\nname = "x"\n', "rule 'x': give exactly one destination"),
        (
            'allow = ["http://a"]\n[[rule]]\nname = "x"\nmin_priority = 9\n'
            'ntfy = { server = "http://a", topic = "t" }\n',
            "rule 'x': min_priority must be a whole number from 1 to 5",
        ),
        (
            'allow = ["http://a"]\n[[rule]]\nname = "x"\nchannels = ["bad channel"]\n'
            'ntfy = { server = "http://a", topic = "t" }\n',
            "rule 'x': channels:",
        ),
        ("colour = 1\n", "unknown key 'colour'"),
        ('allow = ["http://[::1"]\n', "is not a valid URL"),
        (
            'allow = ["http://127.0.0.1:9/hooks"]\n[[rule]]\nname = "x"\n'
            'webhook = { url = "http://127.0.0.1:9/hooks/../admin", secret = "s" }\n',
            "has a . or .. segment",
        ),
        (
            'allow = ["http://127.0.0.1:9/hooks"]\n[[rule]]\nname = "x"\n'
            'webhook = { url = "http://127.0.0.1:9/hooks/%2e%2e/admin", secret = "s" }\n',
            "has a . or .. segment",
        ),
        (
            'allow = ["http://127.0.0.1:9"]\n[[rule]]\nname = "x"\n'
            'webhook = { url = "http://127.0.0.1:9/a b", secret = "s" }\n',
            "holds spaces",
        ),
        ('allow = ["http://127.0.0.1:0"]\n', "has port 0"),
    ],
)
def test_a_mistake_in_the_rules_stops_the_broker_with_one_line(tmp_path, text, expected):
    result = serve_with(tmp_path, text)
    assert result.returncode != 0
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("agent-comms-broker: "), result.stderr
    assert expected in lines[0], lines[0]
    assert "Traceback" not in result.stderr


def test_no_rules_no_notifier_and_no_status_entry(url):
    assert "notifications" not in requests.get(f"{url}/status", timeout=10).json()
