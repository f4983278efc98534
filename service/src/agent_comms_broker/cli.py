"""agent-comms-broker: runs the agent-comms message broker under gunicorn, and manages
its tokens and backups.

Usage:
  agent-comms-broker serve [--bind HOST:PORT] [--db PATH | --database-url URL] [--workers N]
  agent-comms-broker token add AGENT [--read PATTERNS] [--write PATTERNS] [--expires WHEN]
                                     [--note TEXT] [--secret-stdin] [--db PATH | --database-url URL]
  agent-comms-broker token list [--json] [--db PATH | --database-url URL]
  agent-comms-broker token revoke ID... [--db PATH | --database-url URL]
  agent-comms-broker key add AGENT --sign KEY [--box KEY --box-sig SIG] [--db PATH | --database-url URL]
  agent-comms-broker key list AGENT [--json] [--db PATH | --database-url URL]
  agent-comms-broker backup DEST [--db PATH | --database-url URL]
  agent-comms-broker restore SRC [--db PATH | --database-url URL]
  agent-comms-broker check FILE
  agent-comms-broker migrate-to-postgres --from PATH --to URL
  agent-comms-broker config-path
  agent-comms-broker (-h | --help | --version)

Commands:
  serve          Run the broker in the foreground (gunicorn, gevent workers).
  token add      Create a bearer token for AGENT and print it. It is shown this once:
                 the broker keeps only its SHA-256. With --secret-stdin the token is
                 read from stdin instead (32+ characters; for Ansible and scripts) and
                 the command prints `added|updated|unchanged ID AGENT`.
  token list     The tokens: id, agent, grants, expiry, last use, state. Never secrets.
  token revoke   Revoke tokens by id; the broker refuses them from the next request.
  key add        Pin AGENT's public keys (base64, as `agent-chat keys init` printed
                 them; also in the "public" part of the agent's key file): posts signed
                 by it must check against the sign key, and its direct messages are
                 sealed to the box key, which the box-sig (the box key signed by the
                 sign key) vouches for. Keys the operator pinned are
                 replaced only by the operator; the keys before stay listed.
  key list       AGENT's keys, the current one first, with when each was added and
                 replaced, and who gave it (agent or operator).
  backup         Copy the database to DEST while the broker runs (SQLite's online
                 backup), check the copy and print how many messages it holds.
  restore        Put the backup SRC in place of the database, keeping the replaced
                 one beside it. Stop the broker first.
  check          Is FILE a sound agent-comms database (a backup to restore)? Prints how
                 many messages it holds; exit 1 if it is not.
  migrate-to-postgres
                 Copy a SQLite database (the broker's, or broker.py's) into an empty
                 PostgreSQL database, every id kept, in one transaction. PATH is not
                 changed; a broker may run on it meanwhile (what it stores after the
                 copy began is not copied: stop it first to move for good).
  config-path    Print the path of the shared gunicorn.conf.py, for a plain
                 `gunicorn -c "$(agent-comms-broker config-path)"` invocation.

Options:
  --bind HOST:PORT      Address to listen on [env AGENT_COMMS_BIND; default 0.0.0.0:8080].
  --db PATH             SQLite database file [env AGENT_COMMS_DB;
                        default /opt/agent-comms/messages.db].
  --database-url URL    PostgreSQL instead of SQLite: postgresql://USER:PASSWORD@HOST/DB
                        [env AGENT_COMMS_DATABASE_URL]. Several brokers may share one.
  --from PATH           The SQLite database migrate-to-postgres copies.
  --to URL              The empty PostgreSQL database it copies into.
  --workers N           gunicorn worker processes [env AGENT_COMMS_WORKERS; default 2].
  --read PATTERNS       Channels the token may read: comma-separated names or patterns
                        such as tasks,team-*; * is every channel, '' none [default: *].
  --write PATTERNS      Channels the token may post to, the same way [default: *].
  --expires WHEN        When the token expires: after a duration (90d, 12h), or at a
                        date or time (2027-03-01, 2027-03-01T12:00Z; UTC unless it says).
                        With --secret-stdin, a duration counts from when the token was
                        first added: running the command again does not extend it
                        [default: never].
  --note TEXT           A note shown by `token list` [default: ].
  --secret-stdin        Read the token from stdin instead of making one.
  --sign KEY            key add: the agent's Ed25519 public key, base64 (32 bytes).
  --box KEY             key add: the agent's X25519 public key, base64 (32 bytes).
  --box-sig SIG         key add: the --box key signed by the --sign key, base64.
  --json                One JSON array instead of a table.
  -h --help             Show this text.
  --version             Show the version.

Every other setting is an AGENT_COMMS_* environment variable; the README lists them.
Exit status: 0 on success (and after a clean stop of `serve`), 1 when the broker cannot
start or a command fails (one line on stderr).
"""

import datetime
import json
import os
import sqlite3
import sys
import time
from importlib import resources

from docopt import docopt

from . import __version__, auth, preflight
from .config import ConfigError, Settings, duration, redacted
from .store import Store

FLAGS = {
    "--bind": "AGENT_COMMS_BIND",
    "--db": "AGENT_COMMS_DB",
    "--database-url": "AGENT_COMMS_DATABASE_URL",
    "--workers": "AGENT_COMMS_WORKERS",
}


class CommandError(Exception):
    """A command cannot do what it was asked; str() is the one line to print."""


def config_path():
    return str(resources.files(__package__).joinpath("gunicorn.conf.py"))


def main(argv=None):
    args = docopt(__doc__, argv=argv, version=__version__)
    if args["config-path"]:
        print(config_path())
        return 0
    given = {variable: flag for flag, variable in FLAGS.items() if args.get(flag) is not None}
    if args.get("--db") is not None:  # the file given wins over a URL of the environment
        os.environ.pop("AGENT_COMMS_DATABASE_URL", None)
    for variable, flag in given.items():
        os.environ[variable] = args[flag]
    try:
        try:
            settings = Settings.from_env()
        except ConfigError as error:
            variable = str(error).partition(":")[0]
            raise ConfigError(f"{given[variable]} ({error})" if variable in given else str(error)) from None
        if args["migrate-to-postgres"]:
            return migrate_command(args["--from"], args["--to"])
        if args["token"]:
            return token_command(args, settings)
        if args["key"]:
            return key_command(args, settings)
        if (args["backup"] or args["restore"]) and settings.database_url:
            raise CommandError(
                "backup and restore copy SQLite files; for PostgreSQL use pg_dump and pg_restore (see the README)"
            )
        if args["backup"] or args["restore"] or args["check"]:
            return backup_command(args, settings.db)
    except (ConfigError, CommandError) as error:
        print(f"agent-comms-broker: {error}", file=sys.stderr)
        return 1
    # Before gunicorn logs a line: a broker that cannot start says why in one line.
    preflight.check(settings.db, [settings.bind], settings)
    from gunicorn.app.wsgiapp import WSGIApplication

    sys.argv = ["agent-comms-broker", "--config", config_path()]
    WSGIApplication("%(prog)s serve").run()
    return 0


# -- tokens ----------------------------------------------------------------------------


def require_database(db_path):
    """The broker's database must exist already for an admin command."""
    if not os.path.exists(db_path):
        raise CommandError(
            f"no database at {db_path}: start the broker once, or give --db PATH "
            "(the broker of `make run` keeps ./data/messages.db)"
        )


def open_store(settings):
    """The broker's store, for admin commands."""
    if settings.database_url:
        return open_postgres(settings.database_url)
    db_path = settings.db
    require_database(db_path)
    try:
        return Store(db_path)
    except (sqlite3.Error, OSError, RuntimeError) as error:
        raise CommandError(f"cannot open the database {db_path}: {error}") from None


def open_postgres(url):
    from .store.postgres import DatabaseUnreachable, DatabaseUnusable, open_checked

    try:
        return open_checked(url, pool_size=1)
    except (DatabaseUnreachable, DatabaseUnusable) as error:
        raise CommandError(f"cannot use the database {redacted(url)}: {error}") from None


def token_command(args, settings):
    store = open_store(settings)
    try:
        if args["add"]:
            return add_token(store, args)
        if args["list"]:
            return list_tokens(store, args["--json"])
        return revoke_tokens(store, args["ID"])
    finally:
        store.close()


def checked_agent(agent):
    """AGENT, by the same rule as a post's sender."""
    from bottle import HTTPError

    from .http.validate import validate_agent_id

    try:
        return validate_agent_id(agent, "AGENT")
    except HTTPError as error:
        raise CommandError(error.body) from None


def token_grants(args):
    agent = checked_agent(args["AGENT"])
    try:
        read = auth.parse_patterns(args["--read"])
        write = auth.parse_patterns(args["--write"])
    except auth.TokenError as error:
        raise CommandError(str(error)) from None
    return agent, read, write, args["--note"], expiry(args["--expires"])


def expiry(text):
    """(unix time or None, whether it was a duration counted from now)."""
    if text in (None, "never"):
        return None, False
    try:
        return time.time() + duration(text), True
    except ValueError:
        pass
    try:
        moment = datetime.datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        raise CommandError(f"--expires: {text!r} is not a duration (90d, 12h) or a date (2027-03-01)") from None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=datetime.UTC)
    return moment.timestamp(), False


def add_token(store, args):
    agent, read, write, note, (expires, relative) = token_grants(args)
    if not args["--secret-stdin"]:
        secret = auth.new_secret()
        token = store.add_token(auth.new_token_id(), auth.digest(secret), agent, read, write, note, expires)
        print(secret)
        print(
            f"token {token.id} for agent {agent} (read: {read or 'none'}; write: {write or 'none'}; "
            f"expires: {_when(expires)}). It is shown only now: keep it somewhere safe.",
            file=sys.stderr,
        )
        return 0
    try:
        secret = auth.check_secret(sys.stdin.readline().strip())
    except auth.TokenError as error:
        raise CommandError(str(error)) from None
    digest = auth.digest(secret)
    known = store.token_by_hash(digest)
    if known is None:
        token = store.add_token(auth.new_token_id(), digest, agent, read, write, note, expires)
        print(f"added {token.id} {agent}")
        return 0
    if known.agent != agent:
        raise CommandError(f"that token is already registered to agent {known.agent} (token {known.id})")
    if known.revoked is not None:
        # A revoked secret may have leaked: a re-run (an idempotent deploy) must not revive it.
        raise CommandError(f"that token ({known.id}, agent {agent}) was revoked: choose a new secret")
    if relative and known.expires is not None:
        expires = known.expires  # a duration counts from the first add: re-runs do not extend it
    if (known.read, known.write, known.note, known.expires) == (read, write, note, expires):
        print(f"unchanged {known.id} {agent}")
        return 0
    store.update_token(known.id, read, write, note, expires)
    print(f"updated {known.id} {agent}")
    return 0


def _when(stamp):
    if stamp is None:
        return "never"
    return datetime.datetime.fromtimestamp(stamp, datetime.UTC).strftime("%Y-%m-%d %H:%M:%SZ")


def list_tokens(store, as_json):
    now = time.time()
    tokens = store.tokens()
    if as_json:
        fields = ("id", "agent", "read", "write", "note", "created", "expires", "revoked", "last_used")
        print(json.dumps([{name: getattr(t, name) for name in fields} | {"state": t.state(now)} for t in tokens]))
        return 0
    rows = [("ID", "AGENT", "READ", "WRITE", "EXPIRES", "LAST USED", "STATE", "NOTE")]
    for t in tokens:
        used = _when(t.last_used) if t.last_used else "-"
        rows.append((t.id, t.agent, t.read or "-", t.write or "-", _when(t.expires), used, t.state(now), t.note))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        print("  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip())
    return 0


def revoke_tokens(store, ids):
    unknown = []
    for token_id in ids:
        outcome = store.revoke_token(token_id)
        if outcome is None:
            unknown.append(token_id)
        else:
            print(f"revoked {token_id}" if outcome else f"{token_id} was already revoked")
    if unknown:
        raise CommandError(f"no token with id {', '.join(unknown)} (see `agent-comms-broker token list`)")
    return 0


# -- agents' public keys ---------------------------------------------------------------


def key_command(args, settings):
    from .signing import SignatureError, check_keys

    agent = checked_agent(args["AGENT"])
    store = open_store(settings)
    try:
        if args["list"]:
            list_keys(agent, store.agent_keys(agent), args["--json"])
            return 0
        try:
            check_keys(agent, args["--sign"], args["--box"], args["--box-sig"])
        except SignatureError as error:
            raise CommandError(f"the keys: {error}") from None
        keys = (args["--sign"], args["--box"], args["--box-sig"])
        outcome, _ = store.publish_keys(agent, *keys, "operator", may_replace=True)
        print(f"{outcome} {agent}")
        return 0
    finally:
        store.close()


def list_keys(agent, keys, as_json):
    if as_json:
        print(json.dumps([key.as_dict() for key in keys]))
        return
    if not keys:
        print(f"agent {agent} has no keys")
    for key in keys:
        state = "current" if key.replaced is None else f"replaced {_when(key.replaced)}"
        print(f"{key.sign}  box {key.box or '-'}  {key.source}  added {_when(key.added)}  {state}")


# -- moving to PostgreSQL --------------------------------------------------------------


def migrate_command(source, url):
    from .config import database_url
    from .migrate_pg import MigrationError, migrate

    try:
        database_url(url)
    except ValueError as error:
        raise CommandError(f"--to: {error}") from None
    try:
        copied = migrate(source, url)
    except MigrationError as error:
        raise CommandError(str(error)) from None
    rows = ", ".join(f"{count} {table}" for table, count in copied.items() if count)
    print(f"copied {source} to {redacted(url)}: {rows or 'nothing (an empty database)'}")
    return 0


# -- backups ---------------------------------------------------------------------------


def backup_command(args, db_path):
    from . import backup

    try:
        if args["check"]:
            count = backup.check_database(args["FILE"])
            print(f"{count} messages in {args['FILE']}: a sound agent-comms database")
        elif args["backup"]:
            require_database(db_path)
            count = backup.backup_database(db_path, args["DEST"])
            print(f"{count} messages backed up to {args['DEST']}")
        else:
            count, kept = backup.restore_database(args["SRC"], db_path)
            kept_note = f"; the replaced database is kept as {kept}" if kept else " (there was none before)"
            print(f"{count} messages restored to {db_path}{kept_note}")
    except backup.BackupError as error:
        raise CommandError(str(error)) from None
    return 0
