"""Signed and sealed messages, end to end: agents' keys made and published with the real
agent-chat, posts signed by it and checked by the real broker (under gunicorn, on a
SQLite file) and again by other agents' CLI and MCP sessions; a message altered in the
database afterwards, a wrong key, a channel that takes signed posts only, a key changed
on purpose, and direct messages sealed to their recipient. The store's part runs on both
backends."""

import base64
import json
import os
import sqlite3
import stat
import subprocess

import anyio
import pytest
import requests
import rfc8785
from nacl.signing import SigningKey

from broker_process import BIN, BrokerProcess
from cli_process import CHAT, ENTRY_POINTS
from mcp_process import stdio_session

BROKER_CLI = str(BIN / "agent-comms-broker")
REQUIRED = "signed-*"
# A public key no agent holds the private half of.
KEY_OF_NOBODY = "ShqgUmjS7o8BUHKR/YI7rTU0noZ6Xipw6KozH9bQgQU="


@pytest.fixture(scope="module")
def broker(tmp_path_factory):
    """This module's broker: channels signed-* take signed posts only."""
    process = BrokerProcess(
        tmp_path_factory.mktemp("signing") / "messages.db", env={"AGENT_COMMS_REQUIRE_SIGNED": REQUIRED}
    ).start()
    yield process
    process.stop()


@pytest.fixture
def keys_of(tmp_path):
    """agent-chat as one agent, with its own key directory: keys_of("alice")("send", ...)."""

    def agent(name, token=None):
        own = {"AGENT_COMMS_AGENT_ID": name, "AGENT_COMMS_KEY_DIR": str(tmp_path / f"keys-{name}")}
        if token:
            own["AGENT_COMMS_TOKEN"] = token

        def run(*args, status=0, stdin=None):
            env = {**os.environ, **own}
            done = subprocess.run([*CHAT, *args], env=env, input=stdin, capture_output=True, text=True, timeout=60)
            assert done.returncode == status, (args, done.returncode, done.stdout, done.stderr)
            return done

        run.key_dir = tmp_path / f"keys-{name}"
        return run

    return agent


def published(agent):
    """An agent with keys on the broker."""
    agent("keys", "init")
    agent("keys", "publish")
    return agent


def stored_text(broker, message_id):
    with sqlite3.connect(broker.db_path) as db:
        return db.execute("SELECT message FROM messages WHERE id = ?", (message_id,)).fetchone()[0]


def alter(broker, message_id, text):
    """Change a stored message behind the broker's back, as a hand-edited backup would."""
    with sqlite3.connect(broker.db_path) as db:
        db.execute("UPDATE messages SET message = ? WHERE id = ?", (text, message_id))


def key_options(public):
    """`agent-comms-broker key add`'s options for the public part of a key file."""
    return ["--sign", public["sign"], "--box", public["box"], "--box-sig", public["box_sig"]]


def json_lines(done):
    return [json.loads(line) for line in done.stdout.splitlines()]


def sent_id(done):
    return int(done.stdout.strip())


def test_signed_posts_are_verified_by_another_agents_cli_and_unsigned_ones_say_so(keys_of, url, channel):
    alice, bob = published(keys_of("alice-1")), keys_of("bob-1")
    first = sent_id(alice("send", channel, "deploy v2", "--tag", "ops", "--meta", '{"n": 1.5, "ok": true}'))
    requests.post(f"{url}/messages/{channel}", json={"sender": "carol-1", "message": "plain"}, timeout=10)
    stored = requests.get(f"{url}/messages/{channel}/{first}", timeout=10).json()
    assert stored["signature"]["alg"] == "ed25519" and stored["signature"]["key"]
    lines = bob("read", channel).stdout.splitlines()
    assert lines[0].endswith("] alice-1 [verified]: deploy v2"), lines
    assert lines[1].endswith("] carol-1: plain"), lines
    assert [m["verification"] for m in json_lines(bob("read", channel, "--json"))] == ["verified", "unsigned"]
    # A reply, and a task's reply posted with done, are signed and check too.
    alice("send", channel, "on it", "--reply-to", str(first))
    assert json_lines(bob("read", channel, "--json", "--thread", str(first)))[-1]["verification"] == "verified"


def test_a_message_altered_in_the_database_afterwards_shows_bad(keys_of, broker, channel):
    alice, bob = published(keys_of("alice-2")), keys_of("bob-2")
    kept = sent_id(alice("send", channel, "pay 10 to bob"))
    forged = sent_id(alice("send", channel, "pay 20 to bob"))
    alter(broker, forged, "pay 20000 to mallory")
    lines = bob("read", channel).stdout.splitlines()
    assert lines[0].endswith("alice-2 [verified]: pay 10 to bob") and "[BAD SIGNATURE]: pay 20000" in lines[1]
    assert [m["id"] for m in json_lines(bob("read", channel, "--json", "--require-signed"))] == [kept]
    dropped = bob("read", channel, "--require-signed")
    assert (
        dropped.stderr.strip()
        == f"agent-chat: dropped message {forged} of {channel} from alice-2: its signature is BAD"
    )


def signed_body(signing_key, channel, sender, message, ts=1, **fields):
    document = {
        "type": "agent-comms/message",
        "v": 1,
        "channel": channel,
        "sender": sender,
        "message": message,
        "reply_to": None,
        "priority": 3,
        "tags": [],
        "meta": {},
        "ts": ts,
    }
    signature = signing_key.sign(rfc8785.dumps(document)).signature
    key = base64.b64encode(bytes(signing_key.verify_key)).decode()
    envelope = {"v": 1, "alg": "ed25519", "key": key, "ts": ts, "sig": base64.b64encode(signature).decode()}
    return {"sender": sender, "message": message, "signature": envelope, **fields}


def test_a_post_signed_with_the_wrong_key_or_over_other_words_is_refused(url, channel):
    mine, other = SigningKey.generate(), SigningKey.generate()
    sender = "dora-3"
    public = base64.b64encode(bytes(mine.verify_key)).decode()
    unpublished = requests.post(f"{url}/messages/{channel}", json=signed_body(mine, channel, sender, "hi"), timeout=10)
    assert unpublished.status_code == 400 and "has published no signing key" in unpublished.json()["error"]
    assert requests.put(f"{url}/agents/{sender}/keys", json={"sign": public}, timeout=10).status_code == 201
    cases = {
        "another key": signed_body(other, channel, sender, "hi"),
        "other words": {**signed_body(mine, channel, sender, "hi"), "message": "HI"},
        "another channel": signed_body(mine, "elsewhere", sender, "hi"),
        "a malformed signature": {**signed_body(mine, channel, sender, "hi"), "signature": {"v": 1}},
    }
    for case, body in cases.items():
        refused = requests.post(f"{url}/messages/{channel}", json=body, timeout=10)
        assert refused.status_code == 400, (case, refused.text)
        assert refused.headers["Content-Type"].startswith("application/json") and refused.json()["error"], case
    assert requests.get(f"{url}/messages/{channel}", timeout=10).json()["messages"] == []
    good = requests.post(f"{url}/messages/{channel}", json=signed_body(mine, channel, sender, "hi"), timeout=10)
    assert good.status_code == 201 and good.json()["signature"]["key"] == public


def test_a_channel_that_requires_signatures_refuses_unsigned_posts(keys_of, url):
    channel = "signed-deploys"
    unsigned = requests.post(f"{url}/messages/{channel}", json={"sender": "old", "message": "x"}, timeout=10)
    assert unsigned.status_code == 400 and "takes signed posts only" in unsigned.json()["error"]
    refused = keys_of("erin-4")("send", channel, "unsigned", status=2)
    assert refused.stderr.count("\n") == 1 and "takes signed posts only" in refused.stderr
    alice = published(keys_of("alice-4"))
    alice("send", channel, "signed")
    assert [m["message"] for m in requests.get(f"{url}/messages/{channel}", timeout=10).json()["messages"]] == [
        "signed"
    ]


def test_old_unsigned_clients_keep_working_where_nothing_is_required(url, channel):
    """The replaced system's API and chat.py spelling, with no signature anywhere."""
    reply = requests.post(f"{url}/messages/{channel}", json={"sender": "legacy", "message": "hello"}, timeout=10)
    assert reply.status_code == 201 and "signature" not in reply.json()
    done = subprocess.run([*ENTRY_POINTS["chat.py"], "read", channel], capture_output=True, text=True, timeout=30)
    assert done.returncode == 0 and done.stdout.rstrip().endswith("] legacy: hello"), done


def test_a_key_changed_on_purpose_is_recorded_and_shown_until_trusted(keys_of, broker, url, channel):
    token = subprocess.run(
        [BROKER_CLI, "token", "add", "frank-5", "--db", str(broker.db_path)], capture_output=True, text=True, check=True
    ).stdout.strip()
    frank, bob = keys_of("frank-5", token=token), keys_of("bob-5")
    published(frank)
    frank("send", channel, "before")
    assert bob("read", channel).stdout.rstrip().endswith("frank-5 [verified]: before")  # bob pins frank's key
    # Without the token no one replaces frank's keys, not even frank's own CLI.
    frank("keys", "init", "--force")
    anonymous = keys_of("frank-5")
    anonymous.key_dir.mkdir(parents=True, exist_ok=True)
    for name in os.listdir(frank.key_dir):
        (anonymous.key_dir / name).write_bytes((frank.key_dir / name).read_bytes())
    assert "has a token" in anonymous("keys", "publish", status=3).stderr
    assert frank("keys", "publish").stdout.startswith("changed: frank-5's keys")
    listed = requests.get(f"{url}/agents/frank-5/keys", timeout=10).json()
    assert listed["changes"] == 1 and listed["keys"][1]["replaced"] is not None
    frank("send", channel, "after")
    seen = bob("read", channel)
    assert seen.stdout.splitlines()[-1].endswith("frank-5 [KEY CHANGED]: after")
    assert seen.stdout.splitlines()[0].endswith("frank-5 [verified]: before")  # signed before the change
    assert "frank-5's signing key is not the one you pinned" in seen.stderr
    shown = bob("keys", "show", "frank-5").stdout
    assert "current" in shown and "replaced" in shown and "changed 1 time" in shown
    bob("keys", "trust", "frank-5")
    assert bob("read", channel).stdout.rstrip().endswith("frank-5 [verified]: after")


def test_an_agent_without_a_token_publishes_once_and_the_operator_pins_keys(keys_of, broker, url):
    gina = published(keys_of("gina-6"))
    gina("keys", "init", "--force")
    assert "only a holder of agent gina-6's token" in gina("keys", "publish", status=2).stderr
    public = json.loads(next(gina.key_dir.glob("*.json")).read_text())["public"]
    added = subprocess.run(
        [BROKER_CLI, "key", "add", "gina-6", *key_options(public), "--db", broker.db_path],
        capture_output=True,
        text=True,
    )
    assert added.returncode == 0 and added.stdout == "changed gina-6\n", added
    current = requests.get(f"{url}/agents/gina-6/keys", timeout=10).json()["current"]
    assert (current["sign"], current["source"]) == (public["sign"], "operator")
    bad = subprocess.run(
        [BROKER_CLI, "key", "add", "gina-6", "--sign", "nope", "--db", str(broker.db_path)],
        capture_output=True,
        text=True,
    )
    assert bad.returncode == 1 and bad.stderr.startswith("agent-comms-broker: the keys: sign must be")


def test_a_direct_message_is_ciphertext_in_the_database_and_plaintext_only_for_its_recipient(keys_of, broker):
    alice, hank, ivan = keys_of("alice-7"), published(keys_of("hank-7")), keys_of("ivan-7")
    published(alice)
    secret = "the root password is hunter2"
    message_id = sent_id(alice("send", "@hank-7", secret, "--meta", '{"kind": "credential"}'))
    stored = stored_text(broker, message_id)
    assert "hunter2" not in stored and base64.b64decode(stored)
    inbox = hank("inbox")
    assert inbox.stdout.rstrip().endswith(f"alice-7 [verified] [sealed]: {secret}"), inbox
    opened = json_lines(hank("inbox", "--json"))[0]
    assert (opened["message"], opened["meta"], opened["sealed"]) == (secret, {"kind": "credential"}, "opened")
    other = ivan("read", "@hank-7").stdout
    assert "hunter2" not in other and "(sealed for hank-7: it does not open here)" in other
    # To an agent with no published key, a direct message goes in the clear, and says so.
    clear = alice("send", "@ivan-7", "hi")
    assert "ivan-7 has published no encryption key" in clear.stderr
    assert stored_text(broker, sent_id(clear)) == "hi"


def test_keys_are_private_to_their_user_and_may_be_under_a_passphrase(keys_of, channel):
    jane = keys_of("jane-8")
    jane("keys", "init", "--passphrase", status=3)  # no terminal to ask on, no variable
    os.environ["AGENT_COMMS_KEY_PASSPHRASE"] = "correct horse"
    try:
        jane("keys", "init", "--passphrase")
        path = next(jane.key_dir.glob("*.json"))
        assert stat.S_IMODE(path.stat().st_mode) == 0o600 and stat.S_IMODE(jane.key_dir.stat().st_mode) == 0o700
        document = json.loads(path.read_text())
        assert "secret" not in document and document["sealed"]["kdf"] == "argon2id"
        jane("keys", "publish")
        jane("send", channel, "with a passphrase")
        os.environ["AGENT_COMMS_KEY_PASSPHRASE"] = "wrong"
        assert jane("send", channel, "x", status=3).stderr.startswith("agent-chat: wrong passphrase for the keys at")
    finally:
        del os.environ["AGENT_COMMS_KEY_PASSPHRASE"]
    assert "keys at" in jane("send", channel, "x", status=3).stderr


def test_mcp_sessions_sign_and_check(keys_of, broker, channel, tmp_path):
    alice, bob = published(keys_of("alice-9")), published(keys_of("bob-9"))
    del bob

    async def scenario():
        async with (
            stdio_session(broker.url, agent="alice-9", AGENT_COMMS_KEY_DIR=str(alice.key_dir)) as writer,
            stdio_session(broker.url, agent="bob-9", AGENT_COMMS_KEY_DIR=str(tmp_path / "keys-bob-9")) as reader,
        ):
            sent = (await writer.call_tool("send", {"channel": channel, "message": "signed by mcp"})).structured_content
            assert sent["signature"]["alg"] == "ed25519"
            direct = await writer.call_tool("send", {"channel": "@bob-9", "message": "for bob only"})
            forged = (await writer.call_tool("send", {"channel": channel, "message": "ok"})).structured_content
            alter(broker, forged["id"], "not ok")
            page = (await reader.call_tool("read", {"channel": channel})).structured_content
            assert [m["verification"] for m in page["messages"]] == ["verified", "bad"]
            inbox = await reader.call_tool("inbox", {})
            message = inbox.structured_content["messages"][0]
            assert (message["message"], message["sealed"], message["verification"]) == (
                "for bob only",
                "opened",
                "verified",
            )
            assert "for bob only" in inbox.content[0].text and "signature verified" in inbox.content[0].text
            assert "for bob only" not in stored_text(broker, direct.structured_content["id"])
            # A seal that cannot be made safely is a tool error, not a message in the clear.
            with sqlite3.connect(broker.db_path) as db:
                db.execute("UPDATE agent_keys SET box_key = ? WHERE agent = 'bob-9'", (KEY_OF_NOBODY,))
            refused = await writer.call_tool("send", {"channel": "@bob-9", "message": "again"})
            assert refused.is_error and "not signed by its signing key" in refused.content[0].text

    anyio.run(scenario)


@pytest.mark.parametrize("backend", ["sqlite", "postgres"])
def test_the_store_keeps_signatures_and_every_key_an_agent_had(new_store):
    from agent_comms_broker.store import KeysRefused, Post

    store = new_store()

    envelope = '{"v":1,"alg":"ed25519","key":"k","ts":1,"sig":"s"}'
    stored = store.append([Post("c", "a", "hi", signature=envelope), Post("c", "a", "plain")])
    assert [m.signature for m in stored] == [envelope, None]
    assert [m.as_dict().get("signature") for m in store.latest("c", 10).messages] == [json.loads(envelope), None]
    assert store.publish_keys("a", "S1", "B1", "G1", "agent", may_replace=False)[0] == "added"
    assert store.publish_keys("a", "S1", "B1", "G1", "agent", may_replace=False)[0] == "unchanged"
    with pytest.raises(KeysRefused):
        store.publish_keys("a", "S2", None, None, "agent", may_replace=False)
    assert store.publish_keys("a", "S2", None, None, "operator", may_replace=True)[0] == "changed"
    with pytest.raises(KeysRefused):  # pinned by the operator
        store.publish_keys("a", "S3", None, None, "agent", may_replace=True)
    assert store.key_agents() == {"a"}
    keys = store.agent_keys("a")
    assert [(k.sign, k.replaced is None) for k in keys] == [("S2", True), ("S1", False)]
    assert store.current_key("a").sign == "S2" and store.current_key("nobody") is None


def test_a_signed_message_is_good_for_one_post(keys_of, url, channel):
    """Anyone can read a signed task: re-posting it must not make a second verified task."""
    alice = published(keys_of("alice-10"))
    first = sent_id(alice("send", channel, "deploy v2.3 to prod", "--priority", "5"))
    stored = requests.get(f"{url}/messages/{channel}/{first}", timeout=10).json()
    replay = {name: stored[name] for name in ("sender", "message", "priority", "signature")}
    again = requests.post(f"{url}/messages/{channel}", json=replay, timeout=10)
    assert again.status_code == 409 and "a signature is good for one post" in again.json()["error"]
    batch = requests.post(f"{url}/messages/{channel}-b", json=[replay, replay], timeout=10)
    assert batch.status_code in (400, 409), batch.text  # another channel, and twice: refused whole
    assert len(requests.get(f"{url}/messages/{channel}", timeout=10).json()["messages"]) == 1
    # A retry of the same post with its idempotency key is answered with the first.
    keyed = {**replay, "key": "retry-1"}
    requests.post(f"{url}/messages/{channel}-k", json=keyed, timeout=10)  # refused: stored in {channel}
    look_alike = keys_of("Alice-10")
    look_alike("keys", "init")
    assert "looks like agent 'alice-10', which has keys" in look_alike("keys", "publish", status=2).stderr


def test_a_sender_seals_only_to_an_encryption_key_the_recipient_signed(keys_of, broker, channel):
    alice = published(keys_of("alice-11"))
    published(keys_of("kim-11"))
    alice("send", "@kim-11", "first, sealed")  # alice pins kim's key
    # The operator (or whoever edits the database) swaps kim's encryption key for its own.
    from nacl.public import PrivateKey

    mine = base64.b64encode(bytes(PrivateKey.generate().public_key)).decode()
    with sqlite3.connect(broker.db_path) as db:
        db.execute("UPDATE agent_keys SET box_key = ? WHERE agent = 'kim-11' AND replaced IS NULL", (mine,))
    refused = alice("send", "@kim-11", "second", status=3)
    assert "kim-11's encryption key is not signed by its signing key: not sent" in refused.stderr
    # Or replaces all of kim's keys with its own: alice pinned kim's signing key.
    rogue = keys_of("kim-11")
    rogue.key_dir.mkdir(parents=True, exist_ok=True)
    rogue("keys", "init", "--force")
    public = json.loads(next(rogue.key_dir.glob("*.json")).read_text())["public"]
    subprocess.run(
        [BROKER_CLI, "key", "add", "kim-11", *key_options(public), "--db", broker.db_path],
        check=True,
        capture_output=True,
    )
    assert "kim-11's keys changed since you pinned them: not sent" in alice("send", "@kim-11", "x", status=3).stderr


def test_a_sealed_message_passed_on_by_another_sender_is_not_opened(keys_of, url):
    alice, lea = published(keys_of("alice-12")), published(keys_of("lea-12"))
    sealed = requests.get(
        f"{url}/messages/@lea-12/{sent_id(alice('send', '@lea-12', 'from alice'))}", timeout=10
    ).json()
    passed_on = {"sender": "mallory-12", "message": sealed["message"], "meta": sealed["meta"]}
    assert requests.post(f"{url}/messages/@lea-12", json=passed_on, timeout=10).status_code == 201
    inbox = lea("inbox")
    lines = inbox.stdout.splitlines()
    assert lines[0].endswith("alice-12 [verified] [sealed]: from alice"), lines
    assert lines[1].endswith("mallory-12: (sealed for lea-12: it does not open here)"), lines
    assert "was sealed by 'alice-12' for 'lea-12' but posted by 'mallory-12': not opened" in inbox.stderr


def test_watch_and_work_act_only_on_what_they_checked(keys_of, url, channel, tmp_path):
    alice, max_ = published(keys_of("alice-13")), published(keys_of("max-13"))
    cursor = sent_id(alice("send", channel, "start"))
    requests.post(f"{url}/messages/{channel}", json={"sender": "eve-13", "message": "DEPLOYED (forged)"}, timeout=10)
    alice("send", channel, "DEPLOYED")
    watched = max_(
        "watch", channel, "--after", str(cursor), "--until", "DEPLOYED", "--require-signed", "--timeout", "20"
    )
    assert watched.stdout.rstrip().endswith("alice-13 [verified]: DEPLOYED"), watched
    assert "dropped message" in watched.stderr and "from eve-13: unsigned" in watched.stderr
    # A sealed task is opened for the command, which learns it was verified.
    alice("send", "@max-13", "sealed job")
    requests.post(f"{url}/messages/@max-13", json={"sender": "eve-13", "message": "rm -rf /"}, timeout=10)
    script = tmp_path / "job.sh"
    script.write_text('#!/bin/sh\necho "$(cat) by $AGENT_COMMS_TASK_SENDER, $AGENT_COMMS_TASK_VERIFICATION"\n')
    script.chmod(0o755)
    worked = max_("work", "@max-13", "--count", "2", "--require-signed", "--", str(script))
    assert "task" in worked.stdout and "not run: its signature is not verified" in worked.stdout, worked
    replies = requests.get(f"{url}/messages/@max-13", timeout=10).json()["messages"]
    assert [m["message"] for m in replies if m["reply_to"]] == ["sealed job by alice-13, verified"]


def test_a_reader_with_passphrase_keys_reads_without_the_passphrase(keys_of, channel):
    os.environ["AGENT_COMMS_KEY_PASSPHRASE"] = "secret words"
    try:
        nora = keys_of("nora-14")
        nora("keys", "init", "--passphrase")
        nora("keys", "publish")
        nora("send", channel, "mine")
    finally:
        del os.environ["AGENT_COMMS_KEY_PASSPHRASE"]
    assert nora("read", channel).stdout.rstrip().endswith("nora-14 [verified]: mine")
