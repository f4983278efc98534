"""Checks the master runs before gunicorn binds or forks: the database opens (and is
migrated, once, here rather than in racing workers) and every address is free."""

import errno
import os
import socket
import sqlite3
import ssl
import sys
import traceback

from .config import redacted
from .store import Store


def fail(text):
    print(f"agent-comms-broker: {text}", file=sys.stderr, flush=True)
    raise SystemExit(1)


def check(db_path, binds, settings=None):
    if settings is not None and settings.database_url:
        # psycopg must not be imported in the master (store/postgres.py): a child does it.
        in_child(lambda: prepare_postgres(settings))
    else:
        check_database(db_path)
        if settings is not None:
            prepare_store(Store(db_path), settings)
    if settings is not None and settings.tls:
        check_tls(settings.tls_cert, settings.tls_key)
    if not os.environ.get("LISTEN_FDS"):  # systemd socket activation hands us the sockets
        for address in binds:
            check_address(address)


def check_database(db_path):
    directory = os.path.dirname(os.path.abspath(db_path))
    try:
        os.makedirs(directory, exist_ok=True)
    except FileExistsError:
        fail(f"cannot create the database directory {directory}: a file of that name is in the way")
    except OSError as error:
        fail(f"cannot create the database directory {directory}: {error.strerror}")
    try:
        store = Store(db_path)
        store.close()
    except (sqlite3.Error, OSError) as error:
        fail(f"cannot open the database {db_path}: {error} (is it writable by this user?)")
    except RuntimeError as error:
        fail(f"cannot use the database {db_path}: {error}")


def in_child(work):
    """Run work() in a child process (which exits with it); fail here if it failed (the
    child has said why)."""
    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            work()
            code = 0
        except SystemExit as error:
            code = error.code if isinstance(error.code, int) else 1
        except BaseException:
            traceback.print_exc()
        finally:
            sys.stderr.flush()
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(1)


def prepare_postgres(settings):
    """The PostgreSQL database answers, is migrated (once, by whichever node gets there
    first), and is prepared as prepare_store does."""
    from .store.postgres import DatabaseUnreachable, DatabaseUnusable, open_checked

    where = redacted(settings.database_url)
    try:
        store = open_checked(settings.database_url, pool_size=1)
    except DatabaseUnreachable as error:
        fail(f"cannot connect to the database {where}: {error}")
    except DatabaseUnusable as error:
        fail(f"cannot use the database {where}: {error}")
    prepare_store(store, settings)


def prepare_store(store, settings):
    """Before anything is served, on one connection: the search index as AGENT_COMMS_SEARCH
    wants it, and the notification rules recorded at the newest message (so none of what
    is posted once the broker serves goes unnoticed)."""
    rules = None
    if settings.notify_file:
        from .notify_rules import NotifyConfigError, load

        try:
            rules = load(settings.notify_file)
        except NotifyConfigError as error:
            fail(str(error))
    try:
        if store.set_search(settings.search):
            done = "rebuilt from the messages" if settings.search else "dropped (AGENT_COMMS_SEARCH=off)"
            print(f"agent-comms-broker: search index {done}", file=sys.stderr, flush=True)
        if rules is not None:
            store.add_notify_rules([rule.name for rule in rules.rules])
    finally:
        store.close()


def check_tls(cert, key):
    """The certificate and key load and belong together, as gunicorn's TLS will need."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    try:
        context.load_cert_chain(cert, key)
    except FileNotFoundError as error:
        fail(f"cannot read the TLS certificate or key: {error.filename}: no such file")
    except PermissionError as error:
        fail(f"cannot read the TLS certificate or key: {error.filename}: permission denied")
    except ssl.SSLError as error:
        fail(f"cannot use the TLS certificate {cert} with key {key}: {error.reason or error}")


def check_address(address):
    if address.startswith(("unix:", "fd://")):
        return
    host, colon, port = address.rpartition(":")
    if not colon:
        fail(f"cannot listen on {address}: give HOST:PORT, such as 127.0.0.1:{address} or 0.0.0.0:8080")
    host = host.strip("[]") or "0.0.0.0"
    port_number = int(port) if port.isdigit() else -1
    if not 0 <= port_number <= 65535:
        fail(f"cannot listen on {address}: the port must be a number from 0 to 65535 (HOST:PORT)")
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    probe = socket.socket(family, socket.SOCK_STREAM)
    try:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        probe.bind((host, port_number))
    except OSError as error:
        reason = "address already in use" if error.errno == errno.EADDRINUSE else (error.strerror or str(error))
        fail(f"cannot listen on {address}: {reason}")
    finally:
        probe.close()
