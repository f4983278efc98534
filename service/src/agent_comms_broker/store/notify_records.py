"""Notifications out, on either backend: each rule's cursor and delivery record, and the
leases that let one worker (of any broker sharing the database) deliver at a time. Part
of the store (a mixin of it); its statements are the backend's (`self.sql`). Writes are
*_work functions for the group committer, as claims are."""

import time


class NotifyRecords:
    def notify_rules(self):
        """{rule: (cursor, delivered, failures, last_error, next_try)} of the rules seen."""
        rows = self._read(lambda db: db.execute(self.sql.SELECT_RULES).fetchall())
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
                db.execute(self.sql.ADD_RULE, (name, stamp))

        return work

    def notify_advance_work(self, rule, cursor, delivered, now=None):
        stamp = time.time() if now is None else now
        return lambda db: db.execute(self.sql.ADVANCE, (cursor, delivered, stamp, rule)).rowcount

    def notify_failed_work(self, rule, error, next_try, now=None):
        stamp = time.time() if now is None else now
        return lambda db: db.execute(self.sql.FAILED, (error, next_try, stamp, rule)).rowcount

    def take_lease_work(self, name, owner, duration, now=None):
        """Work that takes (or renews) the lease `name` for `owner` for `duration` seconds
        unless another owner holds it unexpired: whether `owner` holds it now."""
        stamp = time.time() if now is None else now

        def work(db):
            db.execute(self.sql.ADD_LEASE, (name, owner))
            return db.execute(self.sql.TAKE_LEASE, (owner, stamp + duration, name, owner, stamp)).rowcount > 0

        return work

    def drop_lease_work(self, name, owner):
        return lambda db: db.execute(self.sql.DROP_LEASE, (name, owner)).rowcount > 0
