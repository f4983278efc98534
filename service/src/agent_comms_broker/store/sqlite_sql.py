"""Every SQL statement of the SQLite store but those of its schema (schema.py) and search
(sqlite_search.py): the logic that runs them is shared with the PostgreSQL store (store.py,
coordination.py, notify_records.py, rows.py), which has statements of its own with the
same names (postgres_sql.py). Parameters are `?` (qmark style)."""

import functools

# -- message rows (rows.py) ------------------------------------------------------------

# A message row and, if it was ever claimed, its task's (the columns Message takes, then
# the task's state, agent, expires, attempt, failures and reply).
MESSAGE_COLUMNS = """m.id, m.channel, m.sender, m.message, m.timestamp, m.reply_to, m.thread, m.priority,
    m.tags, m.meta, m.signature, t.state, t.agent, t.expires, t.attempt, t.failures, t.reply"""
MESSAGES = "messages AS m LEFT JOIN tasks AS t ON t.id = m.id"
PAGE_COLUMNS = """m.id, m.channel, m.sender, m.message, m.timestamp, m.reply_to, m.thread, m.priority, m.tags, m.meta,
    m.signature"""
# The tasks of a page's messages: {ids} is one ? per id.
SELECT_TASKS_OF = "SELECT id, state, agent, expires, attempt, failures, reply FROM tasks WHERE id IN ({ids})"
SELECT_ONE = f"SELECT {MESSAGE_COLUMNS} FROM {MESSAGES} WHERE m.id = ? AND m.channel = ?"


def tasks_of(ids):
    """The statement and parameters that select the tasks of these message ids."""
    return SELECT_TASKS_OF.format(ids=",".join("?" * len(ids))), ids


# -- messages, channels, agents, tokens (store.py) ----------------------------------------
LAST_TIMESTAMP = "SELECT timestamp FROM messages ORDER BY id DESC LIMIT 1"
# Bytes of the database's pages in use: what AGENT_COMMS_MAX_DATABASE caps. Pages retention
# freed are reused by later posts, so they do not count.
USED_BYTES = """
SELECT (page_count - freelist_count) * page_size
FROM pragma_page_count(), pragma_freelist_count(), pragma_page_size()"""
# When retention has emptied the table, the newest timestamp it removed.
LAST_PRUNED_TIMESTAMP = "SELECT max(pruned_timestamp) FROM channels"
MAX_ID = "SELECT coalesce(max(id), 0) FROM messages"
# The largest id ever given (AUTOINCREMENT's high-water mark): kept when retention removes
# the newest messages too. No cursor a client was given can be past it.
LAST_GIVEN_ID = "SELECT coalesce((SELECT seq FROM sqlite_sequence WHERE name = 'messages'), 0)"
INSERT_MESSAGES = """
INSERT INTO messages (channel, sender, message, timestamp, reply_to, thread, priority, tags, meta, signature)
VALUES {rows}"""
# Rows one INSERT takes at most (10 values each, well within SQLite's 32,766).
ROWS_PER_INSERT = 64


@functools.cache
def insert_messages(count):
    """The INSERT of `count` messages."""
    return INSERT_MESSAGES.format(rows=", ".join(["(?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"] * count))


INSERT_TAG = "INSERT OR IGNORE INTO message_tags (id, tag, channel) VALUES (?, ?, ?)"
# What a reply's thread is: the channel and thread of the message it answers.
SELECT_REPLY_TARGET = "SELECT channel, thread FROM messages WHERE id = ?"
# Idempotency keys: what a sender's key stored, while it is younger than KEY_LIFETIME.
SELECT_KEYED = "SELECT id, channel FROM idempotency WHERE sender = ? AND key = ? AND created > ?"
RECORD_KEY = "INSERT OR REPLACE INTO idempotency (sender, key, id, channel, created) VALUES (?, ?, ?, ?, ?)"
DELETE_OLD_KEYS = "DELETE FROM idempotency WHERE created <= ?"
UPSERT_CHANNEL = """
INSERT INTO channels (name, message_count, last_activity) VALUES (?, ?, ?)
ON CONFLICT (name) DO UPDATE SET
    message_count = message_count + excluded.message_count,
    last_activity = excluded.last_activity"""
UPSERT_AGENT_SENT = """
INSERT INTO agents (id, first_seen, last_seen, message_count) VALUES (?, ?, ?, ?)
ON CONFLICT (id) DO UPDATE SET
    last_seen = max(last_seen, excluded.last_seen),
    message_count = message_count + excluded.message_count"""
UPSERT_AGENT_SEEN = """
INSERT INTO agents (id, first_seen, last_seen) VALUES (?, ?, ?)
ON CONFLICT (id) DO UPDATE SET last_seen = max(last_seen, excluded.last_seen)"""

# Channel reads; `{only}` is what a read's filters add (Filter.sql), before its limit.
SELECT_LATEST = f"""
SELECT {PAGE_COLUMNS} FROM messages AS m WHERE m.channel = ? {{only}} ORDER BY m.id DESC LIMIT ?"""
SELECT_AFTER_ID = f"""
SELECT {PAGE_COLUMNS} FROM messages AS m WHERE m.channel = ? AND m.id > ? {{only}} ORDER BY m.id LIMIT ?"""
SELECT_AFTER_TIME = f"""
SELECT {PAGE_COLUMNS} FROM messages AS m WHERE m.channel = ? AND m.timestamp > ? {{only}}
ORDER BY m.timestamp, m.id LIMIT ?"""
# Rows sharing the page's last timestamp, so a page never splits such a group.
SELECT_SAME_TIME = f"""
SELECT {PAGE_COLUMNS} FROM messages AS m WHERE m.channel = ? AND m.timestamp = ? AND m.id > ? {{only}}
ORDER BY m.id"""
# The filters: a thread (its first message and its replies), a tag, a lowest priority.
ONLY_THREAD = "AND (m.id = ? OR m.thread = ?)"
ONLY_TAG = "AND m.id IN (SELECT id FROM message_tags WHERE channel = ? AND tag = ?)"
ONLY_PRIORITY = "AND m.priority >= ?"
SELECT_ALL_AFTER_ID = f"SELECT {PAGE_COLUMNS} FROM messages AS m WHERE m.id > ? ORDER BY m.id LIMIT ?"
# The same for a reader granted some channels only (patterns where `*` is any characters,
# as GLOB reads them), over a window of ids: (after, window end, limit) then the patterns.
SELECT_GRANTED_AFTER_ID = f"""
SELECT {PAGE_COLUMNS} FROM messages AS m WHERE m.id > ? AND m.id <= ? AND ({{granted}})
ORDER BY m.id LIMIT ?"""
GRANTED = "m.channel GLOB ?"


def granted(patterns):
    """SELECT_GRANTED_AFTER_ID's `{granted}` for these patterns, and its parameters."""
    return " OR ".join([GRANTED] * len(patterns)), list(patterns)


CHANNEL_EXISTS = "SELECT 1 FROM channels WHERE name = ?"
COUNT_ALL_CHANNELS = "SELECT count(*) FROM channels"
SELECT_CHANNEL_PRUNED = "SELECT pruned_id, pruned_timestamp FROM channels WHERE name = ?"
SELECT_MAX_PRUNED_ID = "SELECT coalesce(max(pruned_id), 0) FROM channels"
SELECT_CHANNEL_LAST_ID = "SELECT coalesce(max(id), 0) FROM messages WHERE channel = ?"

# Listings in pages by name: `after` is the last name of the previous page ('' first).
SELECT_CHANNELS = """
SELECT name, message_count, last_activity FROM channels
WHERE message_count > 0 AND name > ? ORDER BY name LIMIT ?"""
SELECT_AGENTS = """
SELECT id, first_seen, last_seen, message_count FROM agents WHERE id > ? ORDER BY id LIMIT ?"""
AGENT_EXISTS = "SELECT 1 FROM agents WHERE id = ?"
COUNT_AGENTS = "SELECT count(*) FROM agents"
# Seen, without creating the agent: a read may name an agent the cap leaves out.
UPDATE_AGENT_SEEN = "UPDATE agents SET last_seen = max(last_seen, ?) WHERE id = ?"
# Agents not seen since a time, that no token names, are forgotten.
DELETE_IDLE_AGENTS = """
DELETE FROM agents WHERE last_seen < ? AND id NOT IN (SELECT agent FROM tokens)"""
# The window of the latest `limit` messages starts here (for a page the budget cuts).
SELECT_LATEST_WINDOW_START = """
SELECT min(id) FROM (SELECT m.id FROM messages AS m WHERE m.channel = ? {only} ORDER BY m.id DESC LIMIT ?)"""
SELECT_TOTALS = """
SELECT (SELECT coalesce(sum(message_count), 0) FROM channels),
       (SELECT count(*) FROM channels WHERE message_count > 0),
       (SELECT count(*) FROM agents),
       (SELECT count(*) FROM agents WHERE last_seen >= ?)"""

# Retention, oldest first, a bounded batch per transaction so writers never wait long.
SELECT_EXPIRED = """
SELECT channel, count(*), max(id), max(timestamp) FROM
    (SELECT id, channel, timestamp FROM messages WHERE timestamp < ? ORDER BY id LIMIT ?)
GROUP BY channel"""
DELETE_EXPIRED = """
DELETE FROM messages WHERE id IN
    (SELECT id FROM messages WHERE timestamp < ? ORDER BY id LIMIT ?)"""
# What hangs on the messages a batch removes goes with them: their tags and tasks (the
# same selection of ids, taken before the messages go), and moves of read positions that
# reached no message kept.
EXPIRED_IDS = "SELECT id FROM messages WHERE timestamp < ? ORDER BY id LIMIT ?"
EXCESS_IDS = "SELECT id FROM messages WHERE channel = ? AND id <= ? ORDER BY id LIMIT ?"
DELETE_TAGS_OF = "DELETE FROM message_tags WHERE id IN ({ids})"
DELETE_TASKS_OF = "DELETE FROM tasks WHERE id IN ({ids})"
DELETE_PASSED_MOVES = "DELETE FROM cursor_moves WHERE channel = ? AND read_id <= ?"
SELECT_OVERFULL_CHANNELS = "SELECT name, message_count FROM channels WHERE message_count > ?"
SELECT_NTH_NEWEST_ID = "SELECT id FROM messages WHERE channel = ? ORDER BY id DESC LIMIT 1 OFFSET ?"
SELECT_EXCESS = """
SELECT count(*), max(id), max(timestamp) FROM
    (SELECT id, timestamp FROM messages WHERE channel = ? AND id <= ? ORDER BY id LIMIT ?)"""
DELETE_EXCESS = """
DELETE FROM messages WHERE id IN
    (SELECT id FROM messages WHERE channel = ? AND id <= ? ORDER BY id LIMIT ?)"""
RECORD_PRUNED = """
UPDATE channels SET message_count = max(0, message_count - ?),
    pruned_id = max(pruned_id, ?), pruned_timestamp = max(pruned_timestamp, ?)
WHERE name = ?"""

# Recent activity (the dashboard's sparklines). Timestamps rise with ids: the newest
# message at or before a time is found by walking back from the newest id, over the
# messages since (no index on time alone needed).
LAST_ID_AT = "SELECT id FROM messages WHERE timestamp <= ? ORDER BY id DESC LIMIT 1"
# (start, slot seconds, after id)
COUNT_BY_SLOT = """
SELECT channel, CAST((timestamp - ?) / ? AS INTEGER) AS slot, count(*) FROM messages
WHERE id > ? GROUP BY channel, slot"""

TOKEN_COLUMNS = "id, hash, agent, read, write, note, created, expires, revoked, last_used"
INSERT_TOKEN = f"INSERT INTO tokens ({TOKEN_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?, NULL, NULL)"
SELECT_TOKEN_BY_HASH = f"SELECT {TOKEN_COLUMNS} FROM tokens WHERE hash = ?"
SELECT_TOKENS = f"SELECT {TOKEN_COLUMNS} FROM tokens ORDER BY created, id"
UPDATE_TOKEN_GRANTS = "UPDATE tokens SET read = ?, write = ?, note = ?, expires = ? WHERE id = ?"
REVOKE_TOKEN = "UPDATE tokens SET revoked = ? WHERE id = ? AND revoked IS NULL"
SELECT_TOKEN_IDS = "SELECT id FROM tokens WHERE id = ?"
SELECT_TOKEN_AGENTS = """
SELECT DISTINCT agent FROM tokens WHERE revoked IS NULL AND (expires IS NULL OR expires > ?)"""
TOUCH_TOKEN = "UPDATE tokens SET last_used = ? WHERE id = ?"

# Agents' public keys: every key each agent published, the current one's `replaced` NULL.
AGENT_KEY_COLUMNS = "sign_key, box_key, box_sig, source, added, replaced"
SELECT_AGENT_KEYS = f"SELECT {AGENT_KEY_COLUMNS} FROM agent_keys WHERE agent = ? ORDER BY added DESC"
SELECT_CURRENT_KEY = f"SELECT {AGENT_KEY_COLUMNS} FROM agent_keys WHERE agent = ? AND replaced IS NULL"
RETIRE_KEY = "UPDATE agent_keys SET replaced = ? WHERE agent = ? AND replaced IS NULL"
INSERT_KEY = """
INSERT INTO agent_keys (agent, sign_key, box_key, box_sig, source, added) VALUES (?, ?, ?, ?, ?, ?)"""
SELECT_KEY_AGENTS = "SELECT DISTINCT agent FROM agent_keys"
# A signed message stored already, by its signature.
SELECT_SIGNED = "SELECT id FROM messages WHERE signature = ? LIMIT 1"

# -- tasks and read positions (coordination.py) ----------------------------------------
# The oldest task a take can have, three ways: released back to pending; claimed with a
# lease that ended; never claimed (after the channel's floor: every task up to it has a row).
SELECT_PENDING = "SELECT id FROM tasks WHERE channel = ? AND state = 'pending' ORDER BY id LIMIT 1"
SELECT_LAPSED = """
SELECT id, failures FROM tasks WHERE channel = ? AND state = 'claimed' AND expires <= ? ORDER BY id LIMIT 1"""
SELECT_FLOOR = "SELECT floor FROM queues WHERE channel = ?"
SELECT_UNCLAIMED = """
SELECT m.id FROM messages AS m WHERE m.channel = ? AND m.reply_to IS NULL AND m.id > ?
  AND NOT EXISTS (SELECT 1 FROM tasks AS t WHERE t.id = m.id)
ORDER BY m.id LIMIT 1"""
SET_FLOOR = """
INSERT INTO queues (channel, floor) VALUES (?, ?)
ON CONFLICT (channel) DO UPDATE SET floor = max(floor, excluded.floor)"""
# (id, channel, agent, expires, now)
INSERT_CLAIM = """
INSERT INTO tasks (id, channel, state, agent, expires, attempt, failures, reply, updated)
VALUES (?, ?, 'claimed', ?, ?, 1, 0, NULL, ?) ON CONFLICT (id) DO NOTHING"""
# (agent, expires, now, id)
CLAIM_PENDING = """
UPDATE tasks SET state = 'claimed', agent = ?, expires = ?, attempt = attempt + 1, updated = ?
WHERE id = ? AND state = 'pending'"""
# (agent, expires, now, id, now): the lease that ended counts as a failure.
CLAIM_LAPSED = """
UPDATE tasks SET state = 'claimed', agent = ?, expires = ?, attempt = attempt + 1, failures = failures + 1,
    updated = ?
WHERE id = ? AND state = 'claimed' AND expires <= ?"""
# (now, id, now): a lapsed claim that was the task's last attempt.
BURY_LAPSED = """
UPDATE tasks SET state = 'dead', expires = NULL, failures = failures + 1, updated = ?
WHERE id = ? AND state = 'claimed' AND expires <= ?"""
# (expires, now, id, agent): the holder extends its lease.
EXTEND_CLAIM = """
UPDATE tasks SET expires = ?, updated = ? WHERE id = ? AND state = 'claimed' AND agent = ?"""
# (reply, now, id, agent)
FINISH = """
UPDATE tasks SET state = 'done', expires = NULL, reply = ?, updated = ?
WHERE id = ? AND state = 'claimed' AND agent = ?"""
# (state, agent kept, now, id, agent)
RELEASE = """
UPDATE tasks SET state = ?, agent = ?, expires = NULL, failures = failures + 1, updated = ?
WHERE id = ? AND state = 'claimed' AND agent = ?"""
SELECT_TASK_ROW = f"SELECT {MESSAGE_COLUMNS} FROM {MESSAGES} WHERE m.id = ? AND m.channel = ?"

# The queue view: tasks of a channel, rows by state as they stand now (a lapsed claim is
# pending, or dead on its last attempt).
SELECT_QUEUES = "SELECT channel FROM queues ORDER BY channel"
COUNT_TASKS = "SELECT count(*) FROM messages WHERE channel = ? AND reply_to IS NULL"
COUNT_BY_STATE = """
SELECT CASE WHEN state = 'claimed' AND expires <= :now
            THEN CASE WHEN failures + 1 >= :max THEN 'dead' ELSE 'pending' END
            ELSE state END AS current, count(*)
FROM tasks WHERE channel = :channel GROUP BY current"""
SELECT_CLAIMED = """
SELECT id, agent, expires, attempt FROM tasks
WHERE channel = ? AND state = 'claimed' AND expires > ? ORDER BY id LIMIT ?"""
SELECT_DEAD = """
SELECT id, agent, attempt FROM tasks
WHERE channel = ? AND (state = 'dead' OR (state = 'claimed' AND expires <= ? AND failures + 1 >= ?))
ORDER BY id LIMIT ?"""

# Read positions: forward only. (agent, channel, read, now)
MOVE_CURSOR = """
INSERT INTO cursors (agent, channel, read_id, updated) VALUES (?, ?, ?, ?)
ON CONFLICT (agent, channel) DO UPDATE SET read_id = excluded.read_id, updated = excluded.updated
WHERE excluded.read_id > cursors.read_id"""
RECORD_MOVE = "INSERT OR IGNORE INTO cursor_moves (channel, read_id, agent, at) VALUES (?, ?, ?, ?)"
SELECT_CURSOR = "SELECT read_id FROM cursors WHERE agent = ? AND channel = ?"
SELECT_CURSORS = "SELECT channel, read_id FROM cursors WHERE agent = ?"
COUNT_AFTER = "SELECT count(*) FROM messages WHERE channel = ? AND id > ?"
# A message's receipts: each agent's first move to its id or past it.
SELECT_RECEIPTS = """
SELECT agent, min(at) AS read_at FROM cursor_moves WHERE channel = ? AND read_id >= ?
GROUP BY agent ORDER BY read_at, agent"""

# -- notifications out (notify_records.py) ----------------------------------------
# A rule seen for the first time starts at the newest message: it notifies what comes
# after it was configured, not the whole history.
ADD_RULE = """
INSERT INTO notify_rules (rule, cursor, updated)
VALUES (?, coalesce((SELECT seq FROM sqlite_sequence WHERE name = 'messages'), 0), ?)
ON CONFLICT (rule) DO NOTHING"""
SELECT_RULES = "SELECT rule, cursor, delivered, failures, last_error, next_try FROM notify_rules ORDER BY rule"
# (cursor, delivered, now, rule): only forward.
ADVANCE = """
UPDATE notify_rules SET cursor = max(cursor, ?), delivered = delivered + ?, failures = 0, last_error = NULL,
    next_try = 0, updated = ?
WHERE rule = ?"""
# (error, next_try, now, rule)
FAILED = "UPDATE notify_rules SET failures = failures + 1, last_error = ?, next_try = ?, updated = ? WHERE rule = ?"
ADD_LEASE = "INSERT INTO leases (name, owner, expires) VALUES (?, ?, 0) ON CONFLICT (name) DO NOTHING"
# (owner, expires, name, owner, now): the holder renews; anyone takes a lapsed lease.
TAKE_LEASE = "UPDATE leases SET owner = ?, expires = ? WHERE name = ? AND (owner = ? OR expires < ?)"
DROP_LEASE = "UPDATE leases SET expires = 0 WHERE name = ? AND owner = ?"
