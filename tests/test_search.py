"""Search (issue 14): GET /search over message text, kept in step by the store with every
post and every retention prune, within the caller's read grants; `agent-chat search`."""

import json
import sqlite3
import subprocess

import requests

from agent_comms_broker.store import SCHEMA_VERSION, Post, SearchTerm, Store
from broker_process import BIN
from cli_process import CHAT
from conftest import post
from legacy_broker import legacy_database, older_schema_database

ADMIN = str(BIN / "agent-comms-broker")


def search(url, q, status=200, **params):
    reply = requests.get(f"{url}/search", params={"q": q, **params}, timeout=10, headers=params.pop("headers", None))
    assert reply.status_code == status, reply.text
    return reply.json()


def found_ids(url, q, **params):
    return [m["id"] for m in search(url, q, **params)["messages"]]


def integrity_check(path):
    """FTS5's own check that the index matches the messages table exactly."""
    db = sqlite3.connect(path)
    try:
        db.execute("INSERT INTO message_text (message_text, rank) VALUES ('integrity-check', 1)")
    finally:
        db.close()


# -- the API -------------------------------------------------------------------------------


def test_words_phrases_prefixes_newest_first(url, channel):
    first = post(url, channel, "ops", "Deploy of CT-950 failed: disk full")["id"]
    second = post(url, channel, "ops", "The café deploy went fine")["id"]
    third = post(url, channel, "dev", "full disk again on the build host")["id"]
    post(url, channel, "dev", "nothing to see")
    assert found_ids(url, "deploy", channel=channel) == [second, first]
    assert found_ids(url, "DISK full", channel=channel) == [third, first]  # every word, any order, any case
    assert found_ids(url, '"disk full"', channel=channel) == [first]  # a phrase: in this order
    assert found_ids(url, "cafe", channel=channel) == [second]  # accents do not count
    assert found_ids(url, "dep*", channel=channel) == [second, first]
    assert found_ids(url, '"full d"*', channel=channel) == [third]  # a phrase's last word as a prefix
    assert found_ids(url, "ct-950", channel=channel) == [first]  # ct and 950: the words of the text
    assert found_ids(url, "deploy nothing", channel=channel) == []
    reply = search(url, "deploy", channel=channel)
    assert reply["query"] == "deploy" and reply["channel"] == channel and reply["count"] == 2
    assert (reply["before"], reply["more"]) == (None, False)
    assert reply["messages"][0]["sender"] == "ops" and reply["messages"][0]["channel"] == channel


def test_what_reads_as_search_syntax_is_searched_as_text(url, channel):
    """Nothing a user types is FTS5 syntax: operators, colons and parentheses are words or
    punctuation, never a 500."""
    stored = post(url, channel, "a", "use OR and NEAR(x y) with col:value -- yes")["id"]
    for query in ("OR", "NEAR(x", "col:value", "AND NOT", '"unterminated', "x) (y", "^start", "a-b-c"):
        reply = requests.get(f"{url}/search", params={"q": query, "channel": channel}, timeout=10)
        assert reply.status_code == 200, (query, reply.text)
    assert found_ids(url, "col:value", channel=channel) == [stored]
    assert found_ids(url, "NEAR(x y)", channel=channel) == [stored]


def test_pages_go_on_with_before(url, channel):
    ids = [
        m["id"]
        for m in requests.post(
            f"{url}/messages/{channel}",
            json=[{"sender": "pager", "message": f"needle number {n}"} for n in range(25)],
            timeout=10,
        ).json()["messages"]
    ]
    seen, before = [], None
    for _ in range(10):
        page = search(url, "needle", channel=channel, limit=10, **({"before": before} if before else {}))
        seen += [m["id"] for m in page["messages"]]
        if not page["more"]:
            assert page["before"] is None
            break
        before = page["before"]
    assert seen == sorted(ids, reverse=True)


def test_a_page_stops_within_the_page_budget(own_broker):
    broker = own_broker(env={"AGENT_COMMS_PAGE_BYTES": "100000"}).start()
    for _ in range(5):
        post(broker.url, "big", "a", "haystack " + "x" * 40_000)
    page = search(broker.url, "haystack", limit=50)
    assert page["count"] == 3 and page["more"]  # the third passes 100,000 bytes: none after it
    rest = search(broker.url, "haystack", limit=50, before=page["before"])
    assert rest["count"] == 2 and not rest["more"]


def test_grants_decide_what_a_search_finds(own_broker):
    broker = own_broker(env={"AGENT_COMMS_AUTH": "required"}).start()

    def token(agent, *options):
        made = subprocess.run(
            [ADMIN, "token", "add", agent, *options, "--db", broker.db_path], capture_output=True, text=True
        )
        assert made.returncode == 0, made.stderr
        return {"Authorization": f"Bearer {made.stdout.strip()}"}

    admin = token("admin", "--read", "*,@*", "--write", "*,@*")
    team = token("team", "--read", "team-*", "--write", "team-*")
    for channel in ("team-a", "secret", "@team", "@boss", "team-b"):
        answer = requests.post(
            f"{broker.url}/messages/{channel}", json={"message": f"launch in {channel}"}, headers=admin, timeout=10
        )
        assert answer.status_code == 201, answer.text
    channels = [m["channel"] for m in search(broker.url, "launch", headers=team)["messages"]]
    assert channels == ["team-b", "@team", "team-a"]  # its grant and its own inbox, newest first
    everything = [m["channel"] for m in search(broker.url, "launch", headers=admin)["messages"]]
    assert everything == ["team-b", "@boss", "@team", "secret", "team-a"]
    refused = requests.get(
        f"{broker.url}/search", params={"q": "launch", "channel": "secret"}, headers=team, timeout=10
    )
    assert refused.status_code == 403 and "may not read channel 'secret'" in refused.json()["error"]
    anonymous = requests.get(f"{broker.url}/search", params={"q": "launch"}, timeout=10)
    assert anonymous.status_code == 401


def test_other_agents_inboxes_stay_private_without_tokens_for_them(own_broker):
    """With tokens for writes, an anonymous search sees channels, not inboxes."""
    broker = own_broker(env={"AGENT_COMMS_AUTH": "write-requires-token"}).start()
    made = subprocess.run([ADMIN, "token", "add", "carol", "--db", broker.db_path], capture_output=True, text=True)
    assert made.returncode == 0, made.stderr
    carol = {"Authorization": f"Bearer {made.stdout.strip()}"}
    post(broker.url, "open", "carol", "whisper in the open", headers=carol)
    post(broker.url, "@carol", "carol", "whisper to carol", headers=carol)
    assert [m["channel"] for m in search(broker.url, "whisper")["messages"]] == ["open"]
    assert [m["channel"] for m in search(broker.url, "whisper", headers=carol)["messages"]] == ["@carol", "open"]


def test_nothing_a_search_answers_tells_of_messages_outside_the_grants(own_broker):
    """A caller who may read few of many matches gets exactly its own, and `more` and
    `before` are the same whether unreadable matches exist or not: no oracle on them."""
    broker = own_broker(env={"AGENT_COMMS_AUTH": "required"}).start()

    def token(agent, *options):
        made = subprocess.run(
            [ADMIN, "token", "add", agent, *options, "--db", broker.db_path], capture_output=True, text=True
        )
        return {"Authorization": f"Bearer {made.stdout.strip()}"}

    admin, narrow = token("admin", "--read", "*,@*"), token("narrow", "--read", "mine", "--write", "mine")
    mine = {"message": "password is hunter2"}
    requests.post(f"{broker.url}/messages/mine", json=mine, headers=narrow, timeout=10)
    before = [search(broker.url, q, headers=narrow, limit=1) for q in ('"password is h"*', "password")]
    for _ in range(3):
        batch = [{"message": "password is hunter2zebra"}] * 500
        assert requests.post(f"{broker.url}/messages/@carol", json=batch, headers=admin, timeout=30).status_code == 201
    after = [search(broker.url, q, headers=narrow, limit=1) for q in ('"password is h"*', "password")]
    assert before == after
    assert [(r["count"], r["more"], r["before"]) for r in after] == [(1, False, None), (1, False, None)]
    assert after[0]["messages"][0]["channel"] == "mine"


def test_prefixes_must_be_long_enough_and_few(url, channel):
    post(url, channel, "a", "searching prefixes")
    assert found_ids(url, "sea*", channel=channel)
    for query, why in (("se*", "at least 3 letters"), ("abc* bcd* cde* def* efg*", "at most 4 words ending in *")):
        reply = requests.get(f"{url}/search", params={"q": query}, timeout=10)
        assert reply.status_code == 400 and why in reply.json()["error"], reply.text


# -- the index follows the messages --------------------------------------------------------


def test_retention_prunes_the_index_in_step(tmp_path):
    path = str(tmp_path / "m.db")
    store = Store(path)
    store.append([Post("c", "a", f"rotating log line {n}") for n in range(20)])
    assert len(store.search([SearchTerm("rotating")], limit=100).messages) == 20
    store.prune(max_messages=5)
    kept = store.search([SearchTerm("rotating")], limit=100).messages
    assert [m.message for m in kept] == [f"rotating log line {n}" for n in range(19, 14, -1)]
    store.prune(max_age=1, now=store.latest("c", 1).messages[0].timestamp + 10)
    assert store.search([SearchTerm("rotating")]).messages == []
    store.close()
    integrity_check(path)


def test_a_schema_3_database_is_indexed_by_the_migration(tmp_path):
    path = str(tmp_path / "v3.db")
    older_schema_database(path, 3, [("old", "a", "written before search", 1.0)])
    store = Store(path)
    assert [m.id for m in store.search([SearchTerm("before")]).messages] == [1]
    store.close()
    integrity_check(path)


def test_a_schema_5_database_keeps_its_index_and_its_switch(tmp_path):
    """Schema 5 kept the index by a trigger on each insert; schema 6 indexes a transaction's
    messages before its commit. The migration keeps what was indexed and whether search
    was on."""
    on, off = str(tmp_path / "on.db"), str(tmp_path / "off.db")
    older_schema_database(on, 5, [("old", "a", "indexed by the old trigger", 1.0)])
    older_schema_database(off, 5, [("old", "a", "indexed by the old trigger", 1.0)])
    db = sqlite3.connect(off, isolation_level=None)
    for name in ("message_text_insert", "message_text_delete", "message_text_update"):
        db.execute(f"DROP TRIGGER {name}")
    db.execute("INSERT INTO message_text (message_text) VALUES ('delete-all')")
    db.close()
    store = Store(on)
    assert store.schema_version() == SCHEMA_VERSION
    store.append([Post("new", "b", "indexed before its commit")])
    assert [m.message for m in store.search([SearchTerm("indexed")]).messages] == [
        "indexed before its commit",
        "indexed by the old trigger",
    ]
    assert not store.set_search(True)  # on it was, on it stays
    store.close()
    integrity_check(on)
    store = Store(off)
    assert store.set_search(True)  # off it was: the broker's start rebuilds it when asked
    assert len(store.search([SearchTerm("trigger")]).messages) == 1
    store.close()
    integrity_check(off)


def test_rows_another_program_adds_are_indexed_by_the_next_write(tmp_path):
    """What the index holds is in search_index: rows added behind the store's back (by
    hand, another tool) are taken in by its next write, and deleting one before that does
    not touch the index."""
    path = str(tmp_path / "m.db")
    store = Store(path)
    store.append([Post("c", "a", "first by the broker")])
    db = sqlite3.connect(path, isolation_level=None)
    insert = "INSERT INTO messages (channel, sender, message, timestamp) VALUES ('c', 'x', ?, 2e9)"
    db.execute(insert, ("added by hand",))
    db.execute(insert, ("removed by hand before any write",))
    db.execute("DELETE FROM messages WHERE message = 'removed by hand before any write'")
    db.close()
    assert [m.message for m in store.search([SearchTerm("by")]).messages] == ["first by the broker"]
    store.append([Post("c", "a", "second by the broker")])
    assert [m.message for m in store.search([SearchTerm("by")]).messages] == [
        "second by the broker",
        "added by hand",
        "first by the broker",
    ]
    store.close()
    integrity_check(path)


def test_a_tasks_reply_posted_with_done_is_found_at_once(url, channel):
    """`done` builds its work with one Store and runs it in the group committer's: the
    reply it inserts is indexed in that transaction too."""
    task = post(url, channel, "boss", "build the thing")["id"]
    taken = requests.post(f"{url}/queue/{channel}/take", json={}, headers={"X-Agent-ID": "w1"}, timeout=10)
    assert taken.status_code == 200, taken.text
    done = requests.post(
        f"{url}/messages/{channel}/{task}/done", json={"message": "zebracorn finished"}, headers={"X-Agent-ID": "w1"}
    )
    assert done.status_code == 200, done.text
    assert [m["message"] for m in search(url, "zebracorn", channel=channel)["messages"]] == ["zebracorn finished"]


def test_a_removed_id_put_back_by_hand_is_indexed_and_can_be_pruned(tmp_path):
    """A row inserted by hand below what the index holds (a removed id put back) is
    indexed by its trigger, so a later prune finds it in the index."""
    path = str(tmp_path / "m.db")
    store = Store(path)
    store.append([Post("a", "s", f"message {n}") for n in range(3)])
    db = sqlite3.connect(path, isolation_level=None)
    db.execute("DELETE FROM messages WHERE id = 2")
    db.execute("INSERT INTO messages (id, channel, sender, message, timestamp) VALUES (2, 'a', 's', 'okapi', 1.5)")
    db.close()
    assert [m.id for m in store.search([SearchTerm("okapi")]).messages] == [2]
    integrity_check(path)
    store.prune(max_messages=1)
    assert store.search([SearchTerm("okapi")]).messages == []
    store.close()
    integrity_check(path)


def test_a_group_commit_indexes_the_posts_kept_not_the_refused(tmp_path):
    from agent_comms_broker.store.model import KeyConflict

    path = str(tmp_path / "m.db")
    store = Store(path)
    store.append([Post("c", "a", "keyed first", key="k")])

    def posting(text, channel="c", key=None):
        return lambda db: store._insert(db, [Post(channel, "a", text, key=key)], 1e9)

    outcomes = store.write_batch(
        [posting("grouped one"), posting("grouped refused", channel="d", key="k"), posting("grouped two")]
    )
    assert isinstance(outcomes[1][1], KeyConflict)
    assert [m.message for m in store.search([SearchTerm("grouped")]).messages] == ["grouped two", "grouped one"]
    store.close()
    integrity_check(path)


def test_broker_py_database_is_searchable_after_adoption(own_broker, tmp_path):
    db = tmp_path / "messages.db"
    legacy_database(str(db), [("tasks", "warp-ct200", "Download movie.mkv", "2025-08-03 18:42:28")])
    broker = own_broker().start()
    assert [m["message"] for m in search(broker.url, "movie")["messages"]] == ["Download movie.mkv"]


# -- agent-chat search ---------------------------------------------------------------------


def chat(*args):
    return subprocess.run([*CHAT, *args], capture_output=True, text=True, timeout=30)


def test_agent_chat_search(url, channel):
    post(url, channel, "finder", "the quarterly report is ready")
    other = post(url, f"{channel}-x", "finder", "report two")["id"]
    done = chat("search", "report", "--channel", channel)
    assert done.returncode == 0, done.stderr
    assert (
        done.stdout.count("\n") == 1 and f"{channel} #" in done.stdout and "finder: the quarterly report" in done.stdout
    )
    listed = chat("--json", "search", "report", "--limit", "1")
    assert listed.returncode == 0, listed.stderr
    assert [json.loads(line)["id"] for line in listed.stdout.splitlines()] == [other]
    assert "older ones follow" in listed.stderr
    for bad, code, words in (
        (("search", "..."), 2, "no word to search for"),
        (("search", "x", "--limit", "0"), 1, "--limit must be"),
        (("search", "x", "--channel", "bad/name"), 2, ""),
    ):
        result = chat(*bad)
        assert result.returncode == code, (bad, result.stdout, result.stderr)
        assert len(result.stderr.strip().splitlines()) == 1 and words in result.stderr
        assert "Traceback" not in result.stderr


def test_activity_counts_each_channels_messages_per_slot(tmp_path):
    store = Store(str(tmp_path / "m.db"))
    start = 1_800_000_000.0
    for at, channel in ((start - 5, "a"), (start + 10, "a"), (start + 70, "a"), (start + 75, "b"), (start + 79, "a")):
        store.append([Post(channel, "x", "m")], now=at)
    assert store.activity(start, 60, now=start + 180) == {"a": [1, 2, 0], "b": [0, 1, 0]}
    assert store.activity(start + 100, 60, now=start + 180) == {}
    store.close()


def test_a_search_stops_at_its_time_budget(tmp_path, monkeypatch):
    from agent_comms_broker.store import Visible, sqlite_search

    store = Store(str(tmp_path / "m.db"))
    store.append([Post("c", "a", f"common word {n}") for n in range(3000)])
    monkeypatch.setattr(sqlite_search, "SEARCH_STEPS", 2)
    found = store.search([SearchTerm("common")], limit=5000, visible=Visible(channels=("other",)))
    assert found.cut and found.messages == []
    monkeypatch.setattr(sqlite_search, "SEARCH_STEPS", 10**9)
    assert len(store.search([SearchTerm("common")], limit=5000).messages) == 3000
    store.close()


def test_search_off_skips_the_index_and_on_again_rebuilds_it(own_broker):
    broker = own_broker(env={"AGENT_COMMS_SEARCH": "off"}, workers=1).start()
    post(broker.url, "quiet", "a", "posted while search was off")
    assert requests.get(f"{broker.url}/search", params={"q": "posted"}, timeout=10).status_code == 404
    assert requests.get(f"{broker.url}/status", timeout=10).json()["search"] is False
    db = sqlite3.connect(broker.db_path)
    triggers = db.execute("SELECT count(*) FROM sqlite_master WHERE type = 'trigger' AND name LIKE 'message_text%'")
    assert triggers.fetchone()[0] == 0
    db.close()
    broker.stop()
    broker.extra_env["AGENT_COMMS_SEARCH"] = "on"
    broker.start()
    assert [m["message"] for m in search(broker.url, "posted")["messages"]] == ["posted while search was off"]
    post(broker.url, "quiet", "a", "and one more")
    assert len(search(broker.url, "one more")["messages"]) == 1
    integrity_check(broker.db_path)


def test_search_off_drops_a_trigger_left_alone_too(tmp_path):
    """Off means no trigger at all, also when one was left behind (by hand, or a crash
    between statements of another tool)."""
    store = Store(str(tmp_path / "m.db"))
    store._db.execute("DROP TRIGGER message_text_update")
    assert store.set_search(False)
    names = store._db.execute("SELECT name FROM sqlite_master WHERE type = 'trigger' AND name LIKE 'message_text%'")
    assert names.fetchall() == []
    assert store.set_search(True) and not store.set_search(True)
    store.close()


def test_words_are_found_alike_on_both_backends(new_store):
    """The README's promises of search, on SQLite and PostgreSQL alike: case and accents
    ignored, punctuation only separates words (in URLs, addresses, dotted names too),
    phrases in order, a prefix on the last word, every term needed."""
    store = new_store()
    store.set_search(True)
    texts = [
        "Crème Brûlée at café.example.com",
        "mail bob@example.org, see https://example.com/file.txt",
        "deploy-log ready",
        "ready to deploy",
    ]
    ids = [m.id for m in store.append([("c", "s", text) for text in texts])]

    def found(*terms):
        return sorted(ids.index(m.id) for m in store.search([SearchTerm(*term) for term in terms]).messages)

    assert found(("CAFE",)) == [0]
    assert found(("creme brulee",)) == [0]
    assert found(("example",)) == [0, 1]
    assert found(("bob",), ("file",)) == [1]
    assert found(("log ready",)) == [2]
    assert found(("ready deploy",)) == []
    assert found(("dep", True)) == [2, 3]
    assert found(("exam", True), ("com",)) == [0, 1]
