"""Notifications out on SQLite: each rule's cursor and delivery record, and the leases that
let one worker (of any broker sharing the database) deliver at a time. Part of the Store
(a mixin of it); every statement here. Writes are *_work functions for the group
committer, as claims are."""

import time

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


class NotifyRecords:
    def notify_rules(self):
        """{rule: (cursor, delivered, failures, last_error, next_try)} of the rules seen."""
        rows = self._read(lambda db: db.execute(SELECT_RULES).fetchall())
        return {row[0]: row[1:] for row in rows}

    def add_notify_rules(self, names, now=None):
        """Record rules not seen before (the master does, at start: a rule's first message
        is any posted once the broker serves)."""
        self._write(self.add_notify_rules_work(names, now))

    def add_notify_rules_work(self, names, now=None):
        """Work that records rules not seen before, each at the newest message id."""
        stamp = time.time() if now is None else now

        def work(db):
            for name in names:
                db.execute(ADD_RULE, (name, stamp))

        return work

    def notify_advance_work(self, rule, cursor, delivered, now=None):
        stamp = time.time() if now is None else now
        return lambda db: db.execute(ADVANCE, (cursor, delivered, stamp, rule)).rowcount

    def notify_failed_work(self, rule, error, next_try, now=None):
        stamp = time.time() if now is None else now
        return lambda db: db.execute(FAILED, (error, next_try, stamp, rule)).rowcount

    def take_lease_work(self, name, owner, duration, now=None):
        """Work that takes (or renews) the lease `name` for `owner` for `duration` seconds
        unless another owner holds it unexpired: whether `owner` holds it now."""
        stamp = time.time() if now is None else now

        def work(db):
            db.execute(ADD_LEASE, (name, owner))
            return db.execute(TAKE_LEASE, (owner, stamp + duration, name, owner, stamp)).rowcount > 0

        return work

    def drop_lease_work(self, name, owner):
        return lambda db: db.execute(DROP_LEASE, (name, owner)).rowcount > 0
