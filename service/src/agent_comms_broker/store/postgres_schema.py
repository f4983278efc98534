"""The PostgreSQL schema, and its migrations: the tables of SQLite's schema 6 (schema.py),
column for column, so that a database moves between the backends with every id kept.

`broker_schema` holds the schema number; MIGRATIONS[n] takes schema n to n + 1. They run
in one transaction under an advisory lock, so of several nodes starting together one
migrates and the others find nothing left to do.

Names and channels sort as bytes (COLLATE "C"), as SQLite's do, so listings page in the
same order on both backends whatever the database's locale.
"""

SCHEMA_VERSION = 2
# pg_advisory_xact_lock's key for migrations: any number no other program uses.
MIGRATION_LOCK = 0x61676E74
SEARCH_CHARS = 16384

SCHEMA_1 = [
    """CREATE TABLE broker_schema (version integer NOT NULL)""",
    # The write lock and the id counter (postgres_sql.WRITE_LOCK): one row.
    """CREATE TABLE writer (
        one     boolean PRIMARY KEY DEFAULT true CHECK (one),
        last_id bigint NOT NULL
    )""",
    "INSERT INTO writer (last_id) VALUES (0)",
    """CREATE TABLE messages (
        id        bigint PRIMARY KEY,
        channel   text COLLATE "C" NOT NULL,
        sender    text COLLATE "C" NOT NULL,
        message   text NOT NULL,
        timestamp double precision NOT NULL,
        reply_to  bigint,
        thread    bigint,
        priority  integer NOT NULL DEFAULT 3,
        tags      text,
        meta      text
    )""",
    "CREATE INDEX messages_by_channel ON messages (channel, id)",
    "CREATE INDEX messages_by_channel_time ON messages (channel, timestamp)",
    "CREATE INDEX messages_by_thread ON messages (thread, id) WHERE thread IS NOT NULL",
    "CREATE INDEX messages_tasks ON messages (channel, id) WHERE reply_to IS NULL",
    """CREATE TABLE channels (
        name             text COLLATE "C" PRIMARY KEY,
        message_count    bigint NOT NULL DEFAULT 0,
        last_activity    double precision,
        pruned_id        bigint NOT NULL DEFAULT 0,
        pruned_timestamp double precision NOT NULL DEFAULT 0
    )""",
    """CREATE TABLE agents (
        id            text COLLATE "C" PRIMARY KEY,
        first_seen    double precision NOT NULL,
        last_seen     double precision NOT NULL,
        message_count bigint NOT NULL DEFAULT 0
    )""",
    """CREATE TABLE tokens (
        id        text COLLATE "C" PRIMARY KEY,
        hash      text NOT NULL UNIQUE,
        agent     text COLLATE "C" NOT NULL,
        read      text NOT NULL,
        write     text NOT NULL,
        note      text NOT NULL DEFAULT '',
        created   double precision NOT NULL,
        expires   double precision,
        revoked   double precision,
        last_used double precision
    )""",
    """CREATE TABLE message_tags (
        id      bigint NOT NULL,
        tag     text COLLATE "C" NOT NULL,
        channel text COLLATE "C" NOT NULL,
        PRIMARY KEY (id, tag)
    )""",
    "CREATE INDEX message_tags_by_channel ON message_tags (channel, tag, id)",
    """CREATE TABLE tasks (
        id       bigint PRIMARY KEY,
        channel  text COLLATE "C" NOT NULL,
        state    text NOT NULL,
        agent    text COLLATE "C",
        expires  double precision,
        attempt  integer NOT NULL,
        failures integer NOT NULL DEFAULT 0,
        reply    bigint,
        updated  double precision NOT NULL
    )""",
    "CREATE INDEX tasks_by_state ON tasks (channel, state, id)",
    """CREATE TABLE queues (
        channel text COLLATE "C" PRIMARY KEY,
        floor   bigint NOT NULL
    )""",
    """CREATE TABLE cursors (
        agent   text COLLATE "C" NOT NULL,
        channel text COLLATE "C" NOT NULL,
        read_id bigint NOT NULL,
        updated double precision NOT NULL,
        PRIMARY KEY (agent, channel)
    )""",
    """CREATE TABLE cursor_moves (
        channel text COLLATE "C" NOT NULL,
        read_id bigint NOT NULL,
        agent   text COLLATE "C" NOT NULL,
        at      double precision NOT NULL,
        PRIMARY KEY (channel, read_id, agent)
    )""",
    """CREATE TABLE idempotency (
        sender  text COLLATE "C" NOT NULL,
        key     text NOT NULL,
        id      bigint NOT NULL,
        channel text COLLATE "C" NOT NULL,
        created double precision NOT NULL,
        PRIMARY KEY (sender, key)
    )""",
    "CREATE INDEX idempotency_by_age ON idempotency (created)",
    """CREATE TABLE notify_rules (
        rule       text COLLATE "C" PRIMARY KEY,
        cursor     bigint NOT NULL,
        delivered  bigint NOT NULL DEFAULT 0,
        failures   integer NOT NULL DEFAULT 0,
        last_error text,
        next_try   double precision NOT NULL DEFAULT 0,
        updated    double precision NOT NULL
    )""",
    """CREATE TABLE leases (
        name    text COLLATE "C" PRIMARY KEY,
        owner   text NOT NULL,
        expires double precision NOT NULL
    )""",
    # Search (postgres_search.py): whether it is kept; its index is made and dropped there.
    "CREATE TABLE search_index (kept boolean NOT NULL)",
    "INSERT INTO broker_schema (version) VALUES (0)",
]


# What search indexes of a text (postgres_search.py): lower case, accents removed when
# the unaccent extension can be had, and ASCII punctuation made spaces, so that URLs,
# e-mail addresses and dotted names are words apart as SQLite's tokenizer makes them
# (PostgreSQL's parser would keep each whole). IMMUTABLE, as an index expression must
# be; the dictionary is named with its schema, so no search_path changes what it does.
WORDS_FUNCTION = """
CREATE OR REPLACE FUNCTION agent_comms_words(text) RETURNS text
LANGUAGE sql IMMUTABLE STRICT PARALLEL SAFE
AS $$ SELECT regexp_replace(lower({fold}), '[[:punct:][:space:]]+', ' ', 'g') $$"""
UNACCENT_SCHEMA = "SELECT extnamespace::regnamespace::text FROM pg_extension WHERE extname = 'unaccent'"


def _create(db):
    for statement in SCHEMA_1:
        db.execute(statement)
    _create_words_function(db)


def _create_words_function(db):
    """agent_comms_words(), with accents removed if CREATE EXTENSION unaccent is allowed
    (a trusted extension: the database's owner may; PostgreSQL's contrib has it)."""
    db.execute("SAVEPOINT unaccent")
    try:
        db.execute("CREATE EXTENSION IF NOT EXISTS unaccent")
        schema = db.execute(UNACCENT_SCHEMA).fetchone()[0]
        db.execute(WORDS_FUNCTION.format(fold=f"{schema}.unaccent('{schema}.unaccent'::regdictionary, $1)"))
    except Exception:  # no such extension, or no right to create it: accents then count
        db.execute("ROLLBACK TO SAVEPOINT unaccent")
        db.execute(WORDS_FUNCTION.format(fold="$1"))
    db.execute("RELEASE SAVEPOINT unaccent")


# Schema 2: message signatures and agent keys, as SQLite's schema 7 (schema.py).
AGENT_KEYS = [
    "ALTER TABLE messages ADD COLUMN signature text",
    """CREATE TABLE agent_keys (
        agent    text COLLATE "C" NOT NULL,
        sign_key text NOT NULL,
        box_key  text,
        box_sig  text,
        source   text NOT NULL,
        added    double precision NOT NULL,
        replaced double precision,
        PRIMARY KEY (agent, added)
    )""",
    # A signature is good for one post: a repeat of one stored is refused (store.shared).
    "CREATE INDEX messages_by_signature ON messages (signature) WHERE signature IS NOT NULL",
    # One current key per agent.
    "CREATE UNIQUE INDEX agent_keys_current ON agent_keys (agent) WHERE replaced IS NULL",
]


def _add_agent_keys(db):
    for statement in AGENT_KEYS:
        db.execute(statement)


# MIGRATIONS[n] takes schema n to n + 1.
MIGRATIONS = [_create, _add_agent_keys]

# Read from the catalog table, not with to_regclass(): its cache may still hold "no such
# table" from before the lock wait, while another node created it (measured: 5 of 6 nodes
# starting together then made the schema again and failed).
SCHEMA_EXISTS = """
SELECT EXISTS (SELECT 1 FROM pg_catalog.pg_tables
               WHERE schemaname = current_schema() AND tablename = 'broker_schema')"""
SELECT_VERSION = "SELECT version FROM broker_schema"
SET_VERSION = "UPDATE broker_schema SET version = %s"
LOCK_MIGRATIONS = f"SELECT pg_advisory_xact_lock({MIGRATION_LOCK})"


def schema_version(db):
    """The schema number of the database (0: none of ours)."""
    if not db.execute(SCHEMA_EXISTS).fetchone()[0]:
        return 0
    return db.execute(SELECT_VERSION).fetchone()[0]


def migrate(db):
    """Bring the database to SCHEMA_VERSION, inside the caller's transaction."""
    db.execute(LOCK_MIGRATIONS)
    version = schema_version(db)
    if version > SCHEMA_VERSION:
        raise RuntimeError(f"database schema {version} is newer than this broker's ({SCHEMA_VERSION})")
    for step in range(version, SCHEMA_VERSION):
        MIGRATIONS[step](db)
    if version != SCHEMA_VERSION:
        db.execute(SET_VERSION, (SCHEMA_VERSION,))
