"""Backups of the broker's database and restoring them: an online copy with SQLite's
backup API (consistent while the broker writes), checked before it is kept, and a restore
that keeps the database it replaces. `agent-comms-broker backup` and `restore` call these.
"""

import contextlib
import datetime
import os
import sqlite3
import tempfile

from .store import SCHEMA_VERSION

# What every agent-comms database has, whatever its schema version.
REQUIRED_TABLES = ("messages", "channels", "agents")
MESSAGE_COLUMNS = {"id", "channel", "sender", "message", "timestamp"}
# The files SQLite may keep beside a database: its write-ahead log, the log's index and a
# rollback journal. A restore moves them all, so none is replayed into the restored file.
COMPANION_SUFFIXES = ("-wal", "-shm", "-journal")


class BackupError(Exception):
    """A backup or restore cannot be done; str() is one line naming the file and why."""


def backup_database(db_path, dest_path):
    """Copy the database at db_path to dest_path (a new file) while the broker runs, and
    return how many messages the copy holds.

    The copy is one snapshot, taken in one read transaction: every message committed
    before it began is in it, none committed later is, and the broker's writers are not
    held up. It is checked (PRAGMA integrity_check) and left in rollback-journal mode,
    one self-contained file readable only by its owner. It is written under a temporary
    name beside dest_path and renamed at the end, so a failed backup leaves nothing.
    """
    db_path, dest_path = os.fspath(db_path), os.fspath(dest_path)
    if os.path.lexists(dest_path):
        raise BackupError(f"{dest_path} exists already: choose a new name (a backup never overwrites)")
    directory = os.path.dirname(os.path.abspath(dest_path))
    if not os.path.isdir(directory):
        raise BackupError(f"cannot write {dest_path}: no directory {directory}")
    # Read-write, though it only reads: if the broker stops meanwhile, closing the last
    # connection then folds the -wal back in and removes it, rather than leaving a -wal
    # and -shm owned by this user (root, say) that the broker's user could not open.
    source = _open(db_path, "rw")
    try:
        _require_agent_comms(source, db_path)
        with _private_files():
            partial = _temporary_beside(dest_path, ".partial")
            try:
                count = _copy(source, partial, what=f"the backup {dest_path}")
                _place_new(partial, dest_path)
            finally:
                _remove(partial)
    finally:
        source.close()
    return count


def check_database(path):
    """Whether the file at path is a sound agent-comms database: it passes SQLite's
    integrity check and has the broker's tables at a schema version this broker knows.
    Returns how many messages it holds; raises BackupError saying what is wrong. The file
    is opened read-only."""
    path = os.fspath(path)
    db = _open(path, "ro")
    try:
        _require_agent_comms(db, path)
        return _checked_count(db, path)
    finally:
        db.close()


def restore_database(src_path, db_path):
    """Put the backup at src_path in place of the database at db_path. Returns (messages
    restored, where the replaced database is kept), or (messages, None) when there was no
    database at db_path.

    Stop the broker first: a running broker keeps writing to the file it has open. The
    restore refuses while any process holds the database open. The backup is checked
    before anything is touched, then copied (the file at src_path stays as it is) beside
    db_path; the replaced database, with its -wal and -shm, is renamed to
    db_path + '.before-restore-<UTC time>' (e.g. messages.db.before-restore-20250101T120000Z),
    so a restore can itself be undone.
    """
    src_path, db_path = os.fspath(src_path), os.fspath(db_path)
    count = check_database(src_path)
    if os.path.exists(db_path) and os.path.samefile(src_path, db_path):
        raise BackupError(f"{src_path} is the database itself: restore from a backup copy")
    directory = os.path.dirname(os.path.abspath(db_path))
    if not os.path.isdir(directory):
        raise BackupError(f"cannot restore to {db_path}: no directory {directory}")
    replaced = os.path.exists(db_path)
    if replaced:
        _require_unused(db_path)
    source = _open(src_path, "ro")
    try:
        with _private_files():
            partial = _temporary_beside(db_path, ".restoring")
        try:
            copied = _copy(source, partial, what=f"the restored database beside {db_path}")
            if copied != count:
                raise BackupError(f"{src_path} changed while it was restored ({count} then {copied} messages)")
            _owned_like(partial, db_path if replaced else directory, same_mode=replaced)
            kept = _keep_replaced(db_path) if replaced else None
            try:
                os.replace(partial, db_path)
            except OSError as error:
                raise BackupError(f"cannot put the backup in place of {db_path} (kept as {kept}): {error}") from None
            _sync_directory(directory)
        finally:
            _remove(partial)
    finally:
        source.close()
    return count, kept


# -- helpers ----------------------------------------------------------------------------


def _open(path, mode):
    """A connection to an existing database file; never creates one."""
    if not os.path.isfile(path):
        raise BackupError(f"no database at {path}" if not os.path.exists(path) else f"{path} is not a file")
    try:
        return sqlite3.connect(f"file:{_uri_path(path)}?mode={mode}", uri=True, isolation_level=None, timeout=10)
    except sqlite3.Error as error:
        raise BackupError(f"cannot open {path}: {error}") from None


def _uri_path(path):
    # '?' and '#' would end the path part of a file: URI.
    return os.path.abspath(path).replace("%", "%25").replace("?", "%3f").replace("#", "%23")


def _require_agent_comms(db, path):
    """Refuses a file that is not an agent-comms database this broker can serve."""
    try:
        tables = {row[0] for row in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
        version = db.execute("PRAGMA user_version").fetchone()[0]
        columns = {row[1] for row in db.execute("PRAGMA table_info(messages)")}
    except sqlite3.DatabaseError as error:
        raise BackupError(f"{path} is not an agent-comms database: {error}") from None
    missing = [name for name in REQUIRED_TABLES if name not in tables]
    if missing or not MESSAGE_COLUMNS <= columns:
        raise BackupError(f"{path} is not an agent-comms database: it has no {(missing or ['messages'])[0]} table")
    if version > SCHEMA_VERSION:
        raise BackupError(f"{path} has schema {version}, newer than this broker's ({SCHEMA_VERSION}): upgrade first")
    if version < 1:
        raise BackupError(f"{path} is not an agent-comms database: schema version {version}")


def _checked_count(db, path):
    try:
        problems = [row[0] for row in db.execute("PRAGMA integrity_check")]
        if problems != ["ok"]:
            raise BackupError(f"{path} fails its integrity check: {problems[0]}")
        return db.execute("SELECT count(*) FROM messages").fetchone()[0]
    except sqlite3.DatabaseError as error:
        raise BackupError(f"{path} fails its integrity check: {error}") from None


def _temporary_beside(path, suffix):
    """A new empty file in path's directory, named after it, for a copy to fill."""
    try:
        fd, temporary = tempfile.mkstemp(
            dir=os.path.dirname(os.path.abspath(path)), prefix=f".{os.path.basename(path)}.", suffix=suffix
        )
    except OSError as error:
        raise BackupError(f"cannot write beside {path}: {error.strerror or error}") from None
    os.close(fd)
    return temporary


def _copy(source, path, what):
    """Copy the database of `source` into the (empty) file at path in one snapshot, in
    rollback-journal mode, synced to disk; returns its message count, checked."""
    try:
        copy = sqlite3.connect(path, isolation_level=None)
        try:
            # pages=-1 (the default): the whole database in one step, so one read
            # transaction of the source, which writers in WAL mode never wait for.
            source.backup(copy)
            mode = copy.execute("PRAGMA journal_mode = DELETE").fetchone()[0]
            if mode != "delete":
                raise BackupError(f"cannot write {what}: journal mode stayed {mode}")
            count = _checked_count(copy, what)
        finally:
            copy.close()
        with open(path, "rb+") as written:
            os.fsync(written.fileno())
    except sqlite3.Error as error:
        raise BackupError(f"cannot write {what}: {error}") from None
    except OSError as error:
        raise BackupError(f"cannot write {what}: {error.strerror or error}") from None
    return count


def _place_new(partial, dest_path):
    """Give the finished copy its name without ever replacing a file that appeared there."""
    try:
        os.link(partial, dest_path)
    except FileExistsError:
        raise BackupError(f"{dest_path} exists already: choose a new name (a backup never overwrites)") from None
    except OSError:
        # A filesystem without hard links: rename, having checked the name is still free.
        if os.path.lexists(dest_path):
            raise BackupError(f"{dest_path} exists already: choose a new name (a backup never overwrites)") from None
        try:
            os.rename(partial, dest_path)
        except OSError as error:
            raise BackupError(f"cannot write the backup {dest_path}: {error.strerror or error}") from None
    _sync_directory(os.path.dirname(os.path.abspath(dest_path)))


def _require_unused(db_path):
    """Refuses while another process has the database open (a running broker's workers
    keep it open for as long as they live)."""
    db = _open(db_path, "rw")
    try:
        db.execute("PRAGMA busy_timeout = 0")
        db.execute("PRAGMA locking_mode = EXCLUSIVE")
        db.execute("BEGIN EXCLUSIVE")
        db.execute("ROLLBACK")
    except sqlite3.Error as error:
        if "locked" in str(error) or "busy" in str(error):
            raise BackupError(f"{db_path} is in use (is the broker running?): stop the broker, then restore") from None
        # Damaged past opening: that may be why it is being restored. It is kept aside.
    finally:
        db.close()


def _keep_replaced(db_path):
    """Rename the database and its companion files aside; returns the new name."""
    stamp = datetime.datetime.now(datetime.UTC).strftime("%Y%m%dT%H%M%SZ")
    kept = f"{db_path}.before-restore-{stamp}"
    number = 1
    while any(os.path.lexists(kept + suffix) for suffix in ("", *COMPANION_SUFFIXES)):
        number += 1  # a second restore within the same second
        kept = f"{db_path}.before-restore-{stamp}.{number}"
    # The database file last, and back again on a failure: a -wal left beside a new
    # database file would be replayed into it.
    moved = []
    try:
        for suffix in (*COMPANION_SUFFIXES, ""):
            if os.path.lexists(db_path + suffix):
                os.rename(db_path + suffix, kept + suffix)
                moved.append(suffix)
    except OSError as error:
        for suffix in moved:
            os.rename(kept + suffix, db_path + suffix)
        raise BackupError(f"cannot move {db_path} aside to {kept}: {error.strerror or error}") from None
    return kept


def _owned_like(path, like, same_mode):
    """The restored file gets the owner of the database it replaces (or of its directory)
    when run as root, and the replaced file's mode, so the broker's user can open it."""
    state = os.stat(like)
    if os.geteuid() == 0:
        os.chown(path, state.st_uid, state.st_gid)
    if same_mode:
        os.chmod(path, state.st_mode & 0o777)


@contextlib.contextmanager
def _private_files():
    """Files created meanwhile are readable by their owner only (umask 077)."""
    previous = os.umask(0o077)
    try:
        yield
    finally:
        os.umask(previous)


def _remove(path):
    for suffix in ("", "-journal"):
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path + suffix)


def _sync_directory(directory):
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
