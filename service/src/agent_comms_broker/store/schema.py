"""The SQLite schema as it stands after every migration, and the migrations that bring an
older database (broker.py's included) up to it. PRAGMA user_version holds the schema
number; MIGRATIONS[n] takes schema n to n + 1."""

SCHEMA_VERSION = 2

# The schema as it stands after every migration.
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


# MIGRATIONS[n] takes schema n to n + 1.
MIGRATIONS = [_migrate_0_to_1, _migrate_1_to_2]
