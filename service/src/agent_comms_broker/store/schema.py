"""The SQLite schema as it stands after every migration, and the migrations that bring an
older database (broker.py's included) up to it. PRAGMA user_version holds the schema
number; MIGRATIONS[n] takes schema n to n + 1."""

SCHEMA_VERSION = 7

# Schema 1, which the later migrations build on.
CREATE_MESSAGES = """
CREATE TABLE messages (
    id        INTEGER PRIMARY KEY AUTOINCREMENT,
    channel   TEXT NOT NULL,
    sender    TEXT NOT NULL,
    message   TEXT NOT NULL,
    timestamp REAL NOT NULL
)"""
CREATE_MESSAGES_BY_CHANNEL = "CREATE INDEX messages_by_channel ON messages (channel, id)"
CREATE_MESSAGES_BY_TIME = "CREATE INDEX messages_by_channel_time ON messages (channel, timestamp)"
# pruned_id / pruned_timestamp: the newest message retention removed, for the gap flag.
CREATE_CHANNELS = """
CREATE TABLE channels (
    name             TEXT PRIMARY KEY,
    message_count    INTEGER NOT NULL DEFAULT 0,
    last_activity    REAL,
    pruned_id        INTEGER NOT NULL DEFAULT 0,
    pruned_timestamp REAL NOT NULL DEFAULT 0
) WITHOUT ROWID"""
CREATE_AGENTS = """
CREATE TABLE agents (
    id            TEXT PRIMARY KEY,
    first_seen    REAL NOT NULL,
    last_seen     REAL NOT NULL,
    message_count INTEGER NOT NULL DEFAULT 0
) WITHOUT ROWID"""
# Bearer tokens: only a SHA-256 of each secret is kept. `read` and `write` are
# comma-separated channel patterns ('*' is a wildcard); '' grants nothing.
CREATE_TOKENS = """
CREATE TABLE tokens (
    id        TEXT PRIMARY KEY,
    hash      TEXT NOT NULL UNIQUE,
    agent     TEXT NOT NULL,
    read      TEXT NOT NULL,
    write     TEXT NOT NULL,
    note      TEXT NOT NULL DEFAULT '',
    created   REAL NOT NULL,
    expires   REAL,
    revoked   REAL,
    last_used REAL
) WITHOUT ROWID"""

# The seed's broker.py kept DATETIME text ('YYYY-MM-DD HH:MM:SS', UTC) and a read_by column.
# julianday() arithmetic is exact only to ~0.1 ms at today's dates: round to the millisecond.
ADOPT_SEED_MESSAGES = """
INSERT INTO messages (id, channel, sender, message, timestamp)
SELECT id, channel, sender, message,
       CASE WHEN typeof(timestamp) IN ('integer', 'real') THEN timestamp
            ELSE coalesce(round((julianday(timestamp) - 2440587.5) * 86400.0, 3), 0) END
FROM seed_messages ORDER BY id"""
ADOPT_SEED_AGENTS = """
INSERT INTO agents (id, first_seen, last_seen, message_count)
SELECT a.id,
       min(coalesce(m.first, a.seen), a.seen),
       max(coalesce(m.last, a.seen), a.seen),
       coalesce(m.n, 0)
FROM (SELECT id, coalesce(round((julianday(last_seen) - 2440587.5) * 86400.0, 3), 0) AS seen
      FROM seed_agents) AS a
LEFT JOIN (SELECT sender, min(timestamp) AS first, max(timestamp) AS last, count(*) AS n
           FROM messages GROUP BY sender) AS m ON m.sender = a.id"""
ADD_AGENTS_ONLY_IN_MESSAGES = """
INSERT OR IGNORE INTO agents (id, first_seen, last_seen, message_count)
SELECT sender, min(timestamp), max(timestamp), count(*) FROM messages GROUP BY sender"""
COUNT_CHANNELS = """
INSERT INTO channels (name, message_count, last_activity)
SELECT channel, count(*), max(timestamp) FROM messages GROUP BY channel"""


def _create_schema(db):
    for statement in (
        CREATE_MESSAGES,
        CREATE_MESSAGES_BY_CHANNEL,
        CREATE_MESSAGES_BY_TIME,
        CREATE_CHANNELS,
        CREATE_AGENTS,
    ):
        db.execute(statement)


def _migrate_0_to_1(db):
    """Create the schema, or adopt the tables of the seed's broker.py when present."""
    tables = {row[0] for row in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
    if "messages" not in tables:
        if "agents" in tables:
            db.execute("ALTER TABLE agents RENAME TO seed_agents")
        _create_schema(db)
        if "agents" in tables:
            db.execute(ADOPT_SEED_AGENTS)
            db.execute("DROP TABLE seed_agents")
        return
    db.execute("ALTER TABLE messages RENAME TO seed_messages")
    if "agents" in tables:
        db.execute("ALTER TABLE agents RENAME TO seed_agents")
    _create_schema(db)
    db.execute(ADOPT_SEED_MESSAGES)
    if "agents" in tables:
        db.execute(ADOPT_SEED_AGENTS)
        db.execute("DROP TABLE seed_agents")
    db.execute(ADD_AGENTS_ONLY_IN_MESSAGES)
    db.execute(COUNT_CHANNELS)
    db.execute("DROP TABLE seed_messages")


def _migrate_1_to_2(db):
    """Bearer tokens."""
    db.execute(CREATE_TOKENS)


# Coordination (schema 3): a message's reply, priority, tags and meta; tasks and their
# claims; each agent's read position per channel and the moves that took it there (for
# receipts); idempotency keys. Messages store tags as a JSON list for reading and, for
# `tag=` reads, once more in message_tags.
COORDINATION = [
    "ALTER TABLE messages ADD COLUMN reply_to INTEGER",
    "ALTER TABLE messages ADD COLUMN thread INTEGER",
    "ALTER TABLE messages ADD COLUMN priority INTEGER NOT NULL DEFAULT 3",
    "ALTER TABLE messages ADD COLUMN tags TEXT",
    "ALTER TABLE messages ADD COLUMN meta TEXT",
    "CREATE INDEX messages_by_thread ON messages (thread, id) WHERE thread IS NOT NULL",
    # A channel's tasks: its messages that are not replies.
    "CREATE INDEX messages_tasks ON messages (channel, id) WHERE reply_to IS NULL",
    """CREATE TABLE message_tags (
        id      INTEGER NOT NULL,
        tag     TEXT NOT NULL,
        channel TEXT NOT NULL,
        PRIMARY KEY (id, tag)
    ) WITHOUT ROWID""",
    "CREATE INDEX message_tags_by_channel ON message_tags (channel, tag, id)",
    # A row for every message ever claimed. `failures` counts releases and expired leases
    # (AGENT_COMMS_MAX_ATTEMPTS of them make it dead); `reply` is what `done` posted.
    """CREATE TABLE tasks (
        id       INTEGER PRIMARY KEY,
        channel  TEXT NOT NULL,
        state    TEXT NOT NULL,
        agent    TEXT,
        expires  REAL,
        attempt  INTEGER NOT NULL,
        failures INTEGER NOT NULL DEFAULT 0,
        reply    INTEGER,
        updated  REAL NOT NULL
    )""",
    "CREATE INDEX tasks_by_state ON tasks (channel, state, id)",
    # Every task of the channel up to `floor` has a row in tasks: a take looks for a
    # message never claimed after it only.
    """CREATE TABLE queues (
        channel TEXT PRIMARY KEY,
        floor   INTEGER NOT NULL
    ) WITHOUT ROWID""",
    """CREATE TABLE cursors (
        agent   TEXT NOT NULL,
        channel TEXT NOT NULL,
        read_id INTEGER NOT NULL,
        updated REAL NOT NULL,
        PRIMARY KEY (agent, channel)
    ) WITHOUT ROWID""",
    # Each forward move of a read position: a message's receipt is the first move of each
    # agent to its id or past it.
    """CREATE TABLE cursor_moves (
        channel TEXT NOT NULL,
        read_id INTEGER NOT NULL,
        agent   TEXT NOT NULL,
        at      REAL NOT NULL,
        PRIMARY KEY (channel, read_id, agent)
    ) WITHOUT ROWID""",
    """CREATE TABLE idempotency (
        sender  TEXT NOT NULL,
        key     TEXT NOT NULL,
        id      INTEGER NOT NULL,
        channel TEXT NOT NULL,
        created REAL NOT NULL,
        PRIMARY KEY (sender, key)
    ) WITHOUT ROWID""",
    "CREATE INDEX idempotency_by_age ON idempotency (created)",
]


def _migrate_2_to_3(db):
    """Replies, priorities, tags and meta; task queues; read positions; idempotency keys."""
    for statement in COORDINATION:
        db.execute(statement)


# Search (schema 4): a full-text index (FTS5) of the first SEARCH_CHARS characters of each
# message's text, over the messages table itself through a view (external content: the
# text is not stored twice), kept in step in the transaction of every insert and every
# delete (schema 6 changed how, below). The cap bounds what one message adds to
# the index: a long unbroken string (base64) is one term, stored whole.
SEARCH_CHARS = 16384
SEARCH_TABLE = [
    f"""CREATE VIEW message_text_source AS
        SELECT id, substr(message, 1, {SEARCH_CHARS}) AS message FROM messages""",
    """CREATE VIRTUAL TABLE message_text USING fts5(
        message, content = 'message_text_source', content_rowid = 'id',
        tokenize = 'unicode61 remove_diacritics 2'
    )""",
]
# What kept the index in step in schema 4 and 5: a trigger for each insert, delete and edit.
SEARCH_TRIGGERS_4 = [
    f"""CREATE TRIGGER message_text_insert AFTER INSERT ON messages BEGIN
        INSERT INTO message_text (rowid, message) VALUES (new.id, substr(new.message, 1, {SEARCH_CHARS}));
    END""",
    f"""CREATE TRIGGER message_text_delete AFTER DELETE ON messages BEGIN
        INSERT INTO message_text (message_text, rowid, message)
        VALUES ('delete', old.id, substr(old.message, 1, {SEARCH_CHARS}));
    END""",
    f"""CREATE TRIGGER message_text_update AFTER UPDATE OF message ON messages BEGIN
        INSERT INTO message_text (message_text, rowid, message)
        VALUES ('delete', old.id, substr(old.message, 1, {SEARCH_CHARS}));
        INSERT INTO message_text (rowid, message) VALUES (new.id, substr(new.message, 1, {SEARCH_CHARS}));
    END""",
]
# The messages already stored.
REBUILD_SEARCH = "INSERT INTO message_text (message_text) VALUES ('rebuild')"
EMPTY_SEARCH = "INSERT INTO message_text (message_text) VALUES ('delete-all')"


def _migrate_3_to_4(db):
    """A full-text index of message text, built from the messages already stored."""
    for statement in [*SEARCH_TABLE, *SEARCH_TRIGGERS_4, REBUILD_SEARCH]:
        db.execute(statement)


# Notifications out (schema 5): each rule's cursor (the last message id it has dealt
# with), what it delivered and its failures in a row; and named leases, so that one worker
# at a time delivers.
NOTIFY = [
    """CREATE TABLE notify_rules (
        rule      TEXT PRIMARY KEY,
        cursor    INTEGER NOT NULL,
        delivered INTEGER NOT NULL DEFAULT 0,
        failures  INTEGER NOT NULL DEFAULT 0,
        last_error TEXT,
        next_try  REAL NOT NULL DEFAULT 0,
        updated   REAL NOT NULL
    ) WITHOUT ROWID""",
    """CREATE TABLE leases (
        name    TEXT PRIMARY KEY,
        owner   TEXT NOT NULL,
        expires REAL NOT NULL
    ) WITHOUT ROWID""",
]


def _migrate_4_to_5(db):
    """Notification cursors and leases."""
    for statement in NOTIFY:
        db.execute(statement)


# Search (schema 6): new messages reach the index in one statement per transaction, run by
# the store just before it commits (INDEX_NEW), no longer by a trigger on each insert. The
# trigger made SQLite open a statement savepoint for every message inserted, and at every
# savepoint FTS5 writes what it holds in memory as a new segment of the index: a segment
# per message, merged again and again (a batch of 100 posts took 2.5 times as long). The
# one row of search_index says search is on and up to which id the index holds the
# messages; what is above it (posts of this transaction, or rows another program added)
# the next write adds. Deletes and edits still go through triggers, for indexed rows only,
# and so does a row inserted below that id (by hand), which INDEX_NEW would never see.
CREATE_SEARCH_INDEX = "CREATE TABLE search_index (indexed_through INTEGER NOT NULL)"
START_SEARCH_INDEX = "INSERT INTO search_index (indexed_through) SELECT coalesce(max(id), 0) FROM messages"
INDEXED = "{row}.id <= (SELECT indexed_through FROM search_index)"
SEARCH_TRIGGERS = [
    # Only a row inserted below what the index holds (by hand: a removed id put back);
    # posts get ids above it and go in with INDEX_NEW.
    f"""CREATE TRIGGER message_text_insert AFTER INSERT ON messages WHEN {INDEXED.format(row="new")} BEGIN
        INSERT INTO message_text (rowid, message) VALUES (new.id, substr(new.message, 1, {SEARCH_CHARS}));
    END""",
    f"""CREATE TRIGGER message_text_delete AFTER DELETE ON messages WHEN {INDEXED.format(row="old")} BEGIN
        INSERT INTO message_text (message_text, rowid, message)
        VALUES ('delete', old.id, substr(old.message, 1, {SEARCH_CHARS}));
    END""",
    # Messages are never edited; should one be (by hand), the index follows.
    f"""CREATE TRIGGER message_text_update AFTER UPDATE OF message ON messages WHEN {INDEXED.format(row="old")} BEGIN
        INSERT INTO message_text (message_text, rowid, message)
        VALUES ('delete', old.id, substr(old.message, 1, {SEARCH_CHARS}));
        INSERT INTO message_text (rowid, message) VALUES (new.id, substr(new.message, 1, {SEARCH_CHARS}));
    END""",
]
SEARCH_TRIGGER_NAMES = ("message_text_insert", "message_text_delete", "message_text_update")
# Run before each commit of a transaction that inserted messages (nothing when search is off).
INDEX_NEW = [
    f"""INSERT INTO message_text (rowid, message)
        SELECT id, substr(message, 1, {SEARCH_CHARS}) FROM messages
        WHERE id > (SELECT indexed_through FROM search_index)""",
    """UPDATE search_index SET indexed_through = max(indexed_through, (SELECT coalesce(max(id), 0) FROM messages))""",
]


def _migrate_5_to_6(db):
    """The search index takes a transaction's new messages in one statement, not by trigger."""
    insert_trigger = "SELECT 1 FROM sqlite_master WHERE type = 'trigger' AND name = 'message_text_insert'"
    was_on = db.execute(insert_trigger).fetchone()
    for name in SEARCH_TRIGGER_NAMES:
        db.execute(f"DROP TRIGGER IF EXISTS {name}")
    db.execute(CREATE_SEARCH_INDEX)
    if was_on:  # the triggers kept the index in step with every message until now
        for statement in SEARCH_TRIGGERS:
            db.execute(statement)
        db.execute(START_SEARCH_INDEX)


# Signed messages (schema 7): a message's signature, as its author made it (JSON text, see
# signing.py); and the agents' public keys, each key an agent ever published kept with when
# it was added and when a newer one replaced it (NULL: the current one), so that a change
# is on record and messages signed before it still check.
AGENT_KEYS = [
    "ALTER TABLE messages ADD COLUMN signature TEXT",
    """CREATE TABLE agent_keys (
        agent    TEXT NOT NULL,
        sign_key TEXT NOT NULL,
        box_key  TEXT,
        box_sig  TEXT,
        source   TEXT NOT NULL,
        added    REAL NOT NULL,
        replaced REAL,
        PRIMARY KEY (agent, added)
    ) WITHOUT ROWID""",
    # A signature is good for one post: a repeat of one stored is refused (store.shared).
    "CREATE INDEX messages_by_signature ON messages (signature) WHERE signature IS NOT NULL",
    # One current key per agent.
    "CREATE UNIQUE INDEX agent_keys_current ON agent_keys (agent) WHERE replaced IS NULL",
]


def _migrate_6_to_7(db):
    """Message signatures and agent keys."""
    for statement in AGENT_KEYS:
        db.execute(statement)


# MIGRATIONS[n] takes schema n to n + 1.
MIGRATIONS = [
    _migrate_0_to_1,
    _migrate_1_to_2,
    _migrate_2_to_3,
    _migrate_3_to_4,
    _migrate_4_to_5,
    _migrate_5_to_6,
    _migrate_6_to_7,
]
