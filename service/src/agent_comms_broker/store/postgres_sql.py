"""Every SQL statement of the PostgreSQL store but those of its schema (postgres_schema.py)
and search (postgres_search.py), under the names of the SQLite store's (sqlite_sql.py):
the logic that runs them is shared (shared.py, coordination.py, notify_records.py,
rows.py). Parameters are `%s` (psycopg's format style).

Every write transaction first locks the one row of `writer` (WRITE_LOCK): writers take
turns, as under SQLite's write lock, so ids (given from that row) rise in commit order
across every broker node, and caps and claims see every earlier write.
"""

# -- message rows (rows.py) ------------------------------------------------------------

# A message row and, if it was ever claimed, its task's (the columns Message takes, then
# the task's state, agent, expires, attempt, failures and reply).
MESSAGE_COLUMNS = """m.id, m.channel, m.sender, m.message, m.timestamp, m.reply_to, m.thread, m.priority,
    m.tags, m.meta, m.signature, t.state, t.agent, t.expires, t.attempt, t.failures, t.reply"""
MESSAGES = "messages AS m LEFT JOIN tasks AS t ON t.id = m.id"
PAGE_COLUMNS = """m.id, m.channel, m.sender, m.message, m.timestamp, m.reply_to, m.thread, m.priority, m.tags, m.meta,
    m.signature"""
# The tasks of a page's messages (a list of ids).
SELECT_TASKS_OF = "SELECT id, state, agent, expires, attempt, failures, reply FROM tasks WHERE id = ANY(%s)"
SELECT_ONE = f"SELECT {MESSAGE_COLUMNS} FROM {MESSAGES} WHERE m.id = %s AND m.channel = %s"


def tasks_of(ids):
    """The statement and parameters that select the tasks of these message ids."""
    return SELECT_TASKS_OF, (ids,)


# -- messages, channels, agents, tokens (store.py) ----------------------------------------
LAST_TIMESTAMP = "SELECT timestamp FROM messages ORDER BY id DESC LIMIT 1"
# Bytes of the database: what AGENT_COMMS_MAX_DATABASE caps.
USED_BYTES = "SELECT pg_database_size(current_database())"
# When retention has emptied the table, the newest timestamp it removed.
LAST_PRUNED_TIMESTAMP = "SELECT max(pruned_timestamp) FROM channels"
MAX_ID = "SELECT coalesce(max(id), 0) FROM messages"
# The largest id ever given: kept when retention removes the newest messages too. No
# cursor a client was given can be past it.
LAST_GIVEN_ID = "SELECT last_id FROM writer"
# The write lock, taken first by every write transaction (so no two can deadlock), and
# the last id given; a transaction that inserted moves it on before it commits.
WRITE_LOCK = "SELECT last_id FROM writer FOR UPDATE"
# Every node's hub listens on NOTIFY_CHANNEL; a transaction that inserted sends its last
# id there (delivered at its commit, in commit order).
NOTIFY_CHANNEL = "agent_comms_messages"
LISTEN = f"LISTEN {NOTIFY_CHANNEL}"
SET_LAST_ID_AND_NOTIFY = f"UPDATE writer SET last_id = %s RETURNING pg_notify('{NOTIFY_CHANNEL}', last_id::text)"
# New messages, one array per column (ids given from WRITE_LOCK's row): one statement for
# any number of rows.
INSERT_MESSAGES = """
INSERT INTO messages (id, channel, sender, message, timestamp, reply_to, thread, priority, tags, meta, signature)
SELECT * FROM unnest(%s::bigint[], %s::text[], %s::text[], %s::text[], %s::float8[], %s::bigint[], %s::bigint[],
                     %s::int[], %s::text[], %s::text[], %s::text[])"""
INSERT_TAGS = """
INSERT INTO message_tags (id, tag, channel) SELECT * FROM unnest(%s::bigint[], %s::text[], %s::text[])
ON CONFLICT DO NOTHING"""
# What a reply's thread is: the channel and thread of the message it answers.
SELECT_REPLY_TARGET = "SELECT channel, thread FROM messages WHERE id = %s"
# Idempotency keys: what a sender's key stored, while it is younger than KEY_LIFETIME.
SELECT_KEYED = "SELECT id, channel FROM idempotency WHERE sender = %s AND key = %s AND created > %s"
RECORD_KEY = """
INSERT INTO idempotency (sender, key, id, channel, created) VALUES (%s, %s, %s, %s, %s)
ON CONFLICT (sender, key) DO UPDATE SET id = excluded.id, channel = excluded.channel, created = excluded.created"""
DELETE_OLD_KEYS = "DELETE FROM idempotency WHERE created <= %s"
UPSERT_CHANNEL = """
INSERT INTO channels (name, message_count, last_activity) VALUES (%s, %s, %s)
ON CONFLICT (name) DO UPDATE SET
    message_count = channels.message_count + excluded.message_count,
    last_activity = excluded.last_activity"""
UPSERT_AGENT_SENT = """
INSERT INTO agents (id, first_seen, last_seen, message_count) VALUES (%s, %s, %s, %s)
ON CONFLICT (id) DO UPDATE SET
    last_seen = greatest(agents.last_seen, excluded.last_seen),
    message_count = agents.message_count + excluded.message_count"""
UPSERT_AGENT_SEEN = """
INSERT INTO agents (id, first_seen, last_seen) VALUES (%s, %s, %s)
ON CONFLICT (id) DO UPDATE SET last_seen = greatest(agents.last_seen, excluded.last_seen)"""

# Channel reads; `{only}` is what a read's filters add (Filter.sql), before its limit.
SELECT_LATEST = f"""
SELECT {PAGE_COLUMNS} FROM messages AS m WHERE m.channel = %s {{only}} ORDER BY m.id DESC LIMIT %s"""
SELECT_AFTER_ID = f"""
SELECT {PAGE_COLUMNS} FROM messages AS m WHERE m.channel = %s AND m.id > %s {{only}} ORDER BY m.id LIMIT %s"""
SELECT_AFTER_TIME = f"""
SELECT {PAGE_COLUMNS} FROM messages AS m WHERE m.channel = %s AND m.timestamp > %s {{only}}
ORDER BY m.timestamp, m.id LIMIT %s"""
# Rows sharing the page's last timestamp, so a page never splits such a group.
SELECT_SAME_TIME = f"""
SELECT {PAGE_COLUMNS} FROM messages AS m WHERE m.channel = %s AND m.timestamp = %s AND m.id > %s {{only}}
ORDER BY m.id"""
# The filters: a thread (its first message and its replies), a tag, a lowest priority.
ONLY_THREAD = "AND (m.id = %s OR m.thread = %s)"
ONLY_TAG = "AND m.id IN (SELECT id FROM message_tags WHERE channel = %s AND tag = %s)"
ONLY_PRIORITY = "AND m.priority >= %s"
SELECT_ALL_AFTER_ID = f"SELECT {PAGE_COLUMNS} FROM messages AS m WHERE m.id > %s ORDER BY m.id LIMIT %s"
# The same for a reader granted some channels only (patterns where `*` is any characters,
# made LIKE patterns), over a window of ids: (after, window end, the patterns, limit).
SELECT_GRANTED_AFTER_ID = f"""
SELECT {PAGE_COLUMNS} FROM messages AS m WHERE m.id > %s AND m.id <= %s AND ({{granted}})
ORDER BY m.id LIMIT %s"""
GRANTED = "m.channel LIKE ANY(%s)"


def like(pattern):
    """A channel pattern (`*`: any characters, as SQLite's GLOB reads it) as a LIKE pattern."""
    escaped = pattern.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
    return escaped.replace("*", "%")


def granted(patterns):
    """SELECT_GRANTED_AFTER_ID's `{granted}` for these patterns, and its parameters."""
    return GRANTED, [[like(pattern) for pattern in patterns]]


CHANNEL_EXISTS = "SELECT 1 FROM channels WHERE name = %s"
COUNT_ALL_CHANNELS = "SELECT count(*) FROM channels"
SELECT_CHANNEL_PRUNED = "SELECT pruned_id, pruned_timestamp FROM channels WHERE name = %s"
SELECT_MAX_PRUNED_ID = "SELECT coalesce(max(pruned_id), 0) FROM channels"
SELECT_CHANNEL_LAST_ID = "SELECT coalesce(max(id), 0) FROM messages WHERE channel = %s"

# Listings in pages by name: `after` is the last name of the previous page ('' first).
SELECT_CHANNELS = """
SELECT name, message_count, last_activity FROM channels
WHERE message_count > 0 AND name > %s ORDER BY name LIMIT nullif(%s, -1)"""
SELECT_AGENTS = """
SELECT id, first_seen, last_seen, message_count FROM agents WHERE id > %s ORDER BY id LIMIT nullif(%s, -1)"""
AGENT_EXISTS = "SELECT 1 FROM agents WHERE id = %s"
COUNT_AGENTS = "SELECT count(*) FROM agents"
# Seen, without creating the agent: a read may name an agent the cap leaves out.
UPDATE_AGENT_SEEN = "UPDATE agents SET last_seen = greatest(last_seen, %s) WHERE id = %s"
# Agents not seen since a time, that no token names, are forgotten.
DELETE_IDLE_AGENTS = """
DELETE FROM agents WHERE last_seen < %s AND id NOT IN (SELECT agent FROM tokens)"""
# The window of the latest `limit` messages starts here (for a page the budget cuts).
SELECT_LATEST_WINDOW_START = """
SELECT min(id) FROM
    (SELECT m.id FROM messages AS m WHERE m.channel = %s {only} ORDER BY m.id DESC LIMIT %s) AS window_ids"""
SELECT_TOTALS = """
SELECT (SELECT coalesce(sum(message_count), 0)::bigint FROM channels),
       (SELECT count(*) FROM channels WHERE message_count > 0),
       (SELECT count(*) FROM agents),
       (SELECT count(*) FROM agents WHERE last_seen >= %s)"""

# Retention, oldest first, a bounded batch per transaction so writers never wait long.
SELECT_EXPIRED = """
SELECT channel, count(*), max(id), max(timestamp) FROM
    (SELECT id, channel, timestamp FROM messages WHERE timestamp < %s ORDER BY id LIMIT %s) AS expired
GROUP BY channel"""
DELETE_EXPIRED = """
DELETE FROM messages WHERE id IN
    (SELECT id FROM messages WHERE timestamp < %s ORDER BY id LIMIT %s)"""
# What hangs on the messages a batch removes goes with them: their tags and tasks (the
# same selection of ids, taken before the messages go), and moves of read positions that
# reached no message kept.
EXPIRED_IDS = "SELECT id FROM messages WHERE timestamp < %s ORDER BY id LIMIT %s"
EXCESS_IDS = "SELECT id FROM messages WHERE channel = %s AND id <= %s ORDER BY id LIMIT %s"
DELETE_TAGS_OF = "DELETE FROM message_tags WHERE id IN ({ids})"
DELETE_TASKS_OF = "DELETE FROM tasks WHERE id IN ({ids})"
DELETE_PASSED_MOVES = "DELETE FROM cursor_moves WHERE channel = %s AND read_id <= %s"
SELECT_OVERFULL_CHANNELS = "SELECT name, message_count FROM channels WHERE message_count > %s"
SELECT_NTH_NEWEST_ID = "SELECT id FROM messages WHERE channel = %s ORDER BY id DESC LIMIT 1 OFFSET %s"
SELECT_EXCESS = """
SELECT count(*), max(id), max(timestamp) FROM
    (SELECT id, timestamp FROM messages WHERE channel = %s AND id <= %s ORDER BY id LIMIT %s) AS excess"""
DELETE_EXCESS = """
DELETE FROM messages WHERE id IN
    (SELECT id FROM messages WHERE channel = %s AND id <= %s ORDER BY id LIMIT %s)"""
RECORD_PRUNED = """
UPDATE channels SET message_count = greatest(0, message_count - %s),
    pruned_id = greatest(pruned_id, %s), pruned_timestamp = greatest(pruned_timestamp, %s)
WHERE name = %s"""

# Recent activity (the dashboard's sparklines), as sqlite_sql.py's. (start, slot, after id)
LAST_ID_AT = "SELECT id FROM messages WHERE timestamp <= %s ORDER BY id DESC LIMIT 1"
COUNT_BY_SLOT = """
SELECT channel, floor((timestamp - %s) / %s)::integer AS slot, count(*) FROM messages
WHERE id > %s GROUP BY channel, slot"""

TOKEN_COLUMNS = "id, hash, agent, read, write, note, created, expires, revoked, last_used"
INSERT_TOKEN = f"INSERT INTO tokens ({TOKEN_COLUMNS}) VALUES (%s, %s, %s, %s, %s, %s, %s, %s, NULL, NULL)"
SELECT_TOKEN_BY_HASH = f"SELECT {TOKEN_COLUMNS} FROM tokens WHERE hash = %s"
SELECT_TOKENS = f"SELECT {TOKEN_COLUMNS} FROM tokens ORDER BY created, id"
UPDATE_TOKEN_GRANTS = "UPDATE tokens SET read = %s, write = %s, note = %s, expires = %s WHERE id = %s"
REVOKE_TOKEN = "UPDATE tokens SET revoked = %s WHERE id = %s AND revoked IS NULL"
SELECT_TOKEN_IDS = "SELECT id FROM tokens WHERE id = %s"
SELECT_TOKEN_AGENTS = """
SELECT DISTINCT agent FROM tokens WHERE revoked IS NULL AND (expires IS NULL OR expires > %s)"""
TOUCH_TOKEN = "UPDATE tokens SET last_used = %s WHERE id = %s"

# Agents' public keys: every key each agent published, the current one's `replaced` NULL.
AGENT_KEY_COLUMNS = "sign_key, box_key, box_sig, source, added, replaced"
SELECT_AGENT_KEYS = f"SELECT {AGENT_KEY_COLUMNS} FROM agent_keys WHERE agent = %s ORDER BY added DESC"
SELECT_CURRENT_KEY = f"SELECT {AGENT_KEY_COLUMNS} FROM agent_keys WHERE agent = %s AND replaced IS NULL"
RETIRE_KEY = "UPDATE agent_keys SET replaced = %s WHERE agent = %s AND replaced IS NULL"
INSERT_KEY = """
INSERT INTO agent_keys (agent, sign_key, box_key, box_sig, source, added) VALUES (%s, %s, %s, %s, %s, %s)"""
SELECT_KEY_AGENTS = "SELECT DISTINCT agent FROM agent_keys"
# A signed message stored already, by its signature.
SELECT_SIGNED = "SELECT id FROM messages WHERE signature = %s LIMIT 1"

# -- tasks and read positions (coordination.py) ----------------------------------------
# The oldest task a take can have, three ways: released back to pending; claimed with a
# lease that ended; never claimed (after the channel's floor: every task up to it has a row).
SELECT_PENDING = "SELECT id FROM tasks WHERE channel = %s AND state = 'pending' ORDER BY id LIMIT 1"
SELECT_LAPSED = """
SELECT id, failures FROM tasks WHERE channel = %s AND state = 'claimed' AND expires <= %s ORDER BY id LIMIT 1"""
SELECT_FLOOR = "SELECT floor FROM queues WHERE channel = %s"
SELECT_UNCLAIMED = """
SELECT m.id FROM messages AS m WHERE m.channel = %s AND m.reply_to IS NULL AND m.id > %s
  AND NOT EXISTS (SELECT 1 FROM tasks AS t WHERE t.id = m.id)
ORDER BY m.id LIMIT 1"""
SET_FLOOR = """
INSERT INTO queues (channel, floor) VALUES (%s, %s)
ON CONFLICT (channel) DO UPDATE SET floor = greatest(queues.floor, excluded.floor)"""
# (id, channel, agent, expires, now)
INSERT_CLAIM = """
INSERT INTO tasks (id, channel, state, agent, expires, attempt, failures, reply, updated)
VALUES (%s, %s, 'claimed', %s, %s, 1, 0, NULL, %s) ON CONFLICT (id) DO NOTHING"""
# (agent, expires, now, id)
CLAIM_PENDING = """
UPDATE tasks SET state = 'claimed', agent = %s, expires = %s, attempt = attempt + 1, updated = %s
WHERE id = %s AND state = 'pending'"""
# (agent, expires, now, id, now): the lease that ended counts as a failure.
CLAIM_LAPSED = """
UPDATE tasks SET state = 'claimed', agent = %s, expires = %s, attempt = attempt + 1, failures = failures + 1,
    updated = %s
WHERE id = %s AND state = 'claimed' AND expires <= %s"""
# (now, id, now): a lapsed claim that was the task's last attempt.
BURY_LAPSED = """
UPDATE tasks SET state = 'dead', expires = NULL, failures = failures + 1, updated = %s
WHERE id = %s AND state = 'claimed' AND expires <= %s"""
# (expires, now, id, agent): the holder extends its lease.
EXTEND_CLAIM = """
UPDATE tasks SET expires = %s, updated = %s WHERE id = %s AND state = 'claimed' AND agent = %s"""
# (reply, now, id, agent)
FINISH = """
UPDATE tasks SET state = 'done', expires = NULL, reply = %s, updated = %s
WHERE id = %s AND state = 'claimed' AND agent = %s"""
# (state, agent kept, now, id, agent)
RELEASE = """
UPDATE tasks SET state = %s, agent = %s, expires = NULL, failures = failures + 1, updated = %s
WHERE id = %s AND state = 'claimed' AND agent = %s"""
SELECT_TASK_ROW = f"SELECT {MESSAGE_COLUMNS} FROM {MESSAGES} WHERE m.id = %s AND m.channel = %s"

# The queue view: tasks of a channel, rows by state as they stand now (a lapsed claim is
# pending, or dead on its last attempt).
SELECT_QUEUES = "SELECT channel FROM queues ORDER BY channel"
COUNT_TASKS = "SELECT count(*) FROM messages WHERE channel = %s AND reply_to IS NULL"
COUNT_BY_STATE = """
SELECT CASE WHEN state = 'claimed' AND expires <= %(now)s
            THEN CASE WHEN failures + 1 >= %(max)s THEN 'dead' ELSE 'pending' END
            ELSE state END AS now_state, count(*)
FROM tasks WHERE channel = %(channel)s GROUP BY now_state"""
SELECT_CLAIMED = """
SELECT id, agent, expires, attempt FROM tasks
WHERE channel = %s AND state = 'claimed' AND expires > %s ORDER BY id LIMIT %s"""
SELECT_DEAD = """
SELECT id, agent, attempt FROM tasks
WHERE channel = %s AND (state = 'dead' OR (state = 'claimed' AND expires <= %s AND failures + 1 >= %s))
ORDER BY id LIMIT %s"""

# Read positions: forward only. (agent, channel, read, now)
MOVE_CURSOR = """
INSERT INTO cursors (agent, channel, read_id, updated) VALUES (%s, %s, %s, %s)
ON CONFLICT (agent, channel) DO UPDATE SET read_id = excluded.read_id, updated = excluded.updated
WHERE excluded.read_id > cursors.read_id"""
RECORD_MOVE = """
INSERT INTO cursor_moves (channel, read_id, agent, at) VALUES (%s, %s, %s, %s) ON CONFLICT DO NOTHING"""
SELECT_CURSOR = "SELECT read_id FROM cursors WHERE agent = %s AND channel = %s"
SELECT_CURSORS = "SELECT channel, read_id FROM cursors WHERE agent = %s"
COUNT_AFTER = "SELECT count(*) FROM messages WHERE channel = %s AND id > %s"
# A message's receipts: each agent's first move to its id or past it.
SELECT_RECEIPTS = """
SELECT agent, min(at) AS read_at FROM cursor_moves WHERE channel = %s AND read_id >= %s
GROUP BY agent ORDER BY read_at, agent"""

# -- notifications out (notify_records.py) ----------------------------------------
# A rule seen for the first time starts at the newest message: it notifies what comes
# after it was configured, not the whole history.
ADD_RULE = """
INSERT INTO notify_rules (rule, cursor, updated)
VALUES (%s, (SELECT last_id FROM writer), %s)
ON CONFLICT (rule) DO NOTHING"""
SELECT_RULES = "SELECT rule, cursor, delivered, failures, last_error, next_try FROM notify_rules ORDER BY rule"
# (cursor, delivered, now, rule): only forward.
ADVANCE = """
UPDATE notify_rules SET cursor = greatest(cursor, %s), delivered = delivered + %s, failures = 0, last_error = NULL,
    next_try = 0, updated = %s
WHERE rule = %s"""
# (error, next_try, now, rule)
FAILED = "UPDATE notify_rules SET failures = failures + 1, last_error = %s, next_try = %s, updated = %s WHERE rule = %s"
ADD_LEASE = "INSERT INTO leases (name, owner, expires) VALUES (%s, %s, 0) ON CONFLICT (name) DO NOTHING"
# (owner, expires, name, owner, now): the holder renews; anyone takes a lapsed lease.
TAKE_LEASE = "UPDATE leases SET owner = %s, expires = %s WHERE name = %s AND (owner = %s OR expires < %s)"
DROP_LEASE = "UPDATE leases SET expires = 0 WHERE name = %s AND owner = %s"
