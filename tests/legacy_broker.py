"""A database as the replaced broker.py left it (DATETIME text, read_by, agents.status),
for the tests that the broker adopts it; and one at an older schema of this broker's, for
the tests of each migration."""

import sqlite3


def legacy_database(path, rows, agents=()):
    """rows: (channel, sender, message, 'YYYY-MM-DD HH:MM:SS'); agents: (id, last_seen)."""
    db = sqlite3.connect(path)
    db.execute("""CREATE TABLE messages (id INTEGER PRIMARY KEY AUTOINCREMENT, channel TEXT NOT NULL,
                  sender TEXT NOT NULL, message TEXT NOT NULL,
                  timestamp DATETIME DEFAULT CURRENT_TIMESTAMP, read_by TEXT DEFAULT '')""")
    db.execute("""CREATE TABLE agents (id TEXT PRIMARY KEY, last_seen DATETIME DEFAULT CURRENT_TIMESTAMP,
                  status TEXT DEFAULT 'online')""")
    db.executemany("INSERT INTO messages (channel, sender, message, timestamp) VALUES (?, ?, ?, ?)", rows)
    db.executemany("INSERT INTO agents (id, last_seen) VALUES (?, ?)", agents)
    db.commit()
    db.close()


def older_schema_database(path, version, rows):
    """A database at schema `version` (the migrations up to it), holding `rows`:
    (channel, sender, message, unix timestamp)."""
    from agent_comms_broker.store.schema import MIGRATIONS

    db = sqlite3.connect(path, isolation_level=None)
    for step in MIGRATIONS[:version]:
        step(db)
    db.execute(f"PRAGMA user_version = {version}")
    db.executemany("INSERT INTO messages (channel, sender, message, timestamp) VALUES (?, ?, ?, ?)", rows)
    db.close()
