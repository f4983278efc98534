"""A real PostgreSQL server for tests: Debian's `postgresql` package (installed when
missing), a cluster made with initdb in a temporary directory, listening on a Unix socket
there and on a free loopback port, stopped at the end. The server runs as the `postgres`
user when the tests run as root (initdb refuses root). Crash safety is off (fsync): the
tests prove what the broker does, not what PostgreSQL's disk writes do."""

import glob
import itertools
import os
import pwd
import shutil
import subprocess
import tempfile
from pathlib import Path

from broker_process import free_port
from debian_packages import require_files

VERSIONS = ("17", "16", "15")
SETTINGS = {
    "fsync": "off",
    "synchronous_commit": "off",
    "full_page_writes": "off",
    "max_connections": "200",
    "shared_buffers": "32MB",
    "listen_addresses": "'127.0.0.1'",
}


def _bin_dir():
    for version in VERSIONS:
        path = Path(f"/usr/lib/postgresql/{version}/bin")
        if (path / "initdb").exists():
            return path
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"))
    return Path(found[-1]).parent if found else None


def ensure_installed():
    if _bin_dir() is None:
        # The package (the server of the Debian release, and postgresql-common) may start a
        # cluster of its own on 5432; the tests never use it.
        require_files({"/usr/bin/pg_createcluster": "postgresql"}, "PostgreSQL")
    if _bin_dir() is None:
        raise RuntimeError("the postgresql package brought no initdb under /usr/lib/postgresql")
    return _bin_dir()


class PostgresServer:
    def __init__(self, durable=False, listen=None, clients=()):
        """durable: PostgreSQL's own defaults (fsync, synchronous_commit on), for benchmarks.
        listen: the addresses to listen on (default: localhost); clients: networks (CIDR)
        whose clients log in with a password (SCRAM), as a database host other machines use."""
        self.listen, self.clients = listen, clients
        self.settings = {
            name: value
            for name, value in SETTINGS.items()
            if not durable or name not in ("fsync", "synchronous_commit", "full_page_writes")
        }
        self.bin = ensure_installed()
        self.root = Path(tempfile.mkdtemp(prefix="agent-comms-pg-"))
        self.data = self.root / "data"
        self.socket_dir = self.root
        self.port = free_port()
        self.user = "postgres" if os.geteuid() == 0 else pwd.getpwuid(os.geteuid()).pw_name
        self._names = itertools.count(1)

    def _as_owner(self, *command, **kwargs):
        if os.geteuid() == 0:
            command = ("runuser", "-u", "postgres", "--", *command)
        return subprocess.run(command, capture_output=True, text=True, check=True, **kwargs)

    def start(self):
        if os.geteuid() == 0:
            shutil.chown(self.root, "postgres")
        self._as_owner(str(self.bin / "initdb"), "-D", str(self.data), "-A", "trust", "-U", "postgres", "--no-sync")
        if self.clients:
            with open(self.data / "pg_hba.conf", "a") as hba:
                hba.writelines(f"host all all {network} scram-sha-256\n" for network in self.clients)
        self.start_server()
        return self

    def start_server(self):
        """Start the server (again, after stop_server)."""
        options = " ".join(f"-c {name}={value}" for name, value in self.settings.items())
        options += f" -c unix_socket_directories={self.socket_dir} -p {self.port}"
        if self.listen:
            options += f" -c listen_addresses={self.listen}"
        self.pg_ctl("start", "-w", "-o", options, "-l", str(self.root / "server.log"))

    def stop_server(self, mode="fast"):
        """Stop the server, keeping its data (start_server starts it again)."""
        self.pg_ctl("stop", "-m", mode)

    def pg_ctl(self, *args):
        return self._as_owner(str(self.bin / "pg_ctl"), "-D", str(self.data), *args, timeout=60)

    def stop(self):
        try:
            self.pg_ctl("stop", "-m", "immediate")
        except subprocess.CalledProcessError:
            pass
        shutil.rmtree(self.root, ignore_errors=True)

    def url(self, database="postgres"):
        return f"postgresql://postgres@127.0.0.1:{self.port}/{database}"

    def psql(self, sql, database="postgres"):
        return self._as_owner(
            str(self.bin / "psql"),
            "-X",
            "-q",
            "-h",
            str(self.socket_dir),
            "-p",
            str(self.port),
            "-d",
            database,
            "-v",
            "ON_ERROR_STOP=1",
            "-At",
            "-c",
            sql,
            timeout=60,
        ).stdout

    def new_database(self):
        """A new empty database; its URL."""
        name = f"test_{os.getpid()}_{next(self._names)}"
        self.psql(f"CREATE DATABASE {name} TEMPLATE template0")
        return self.url(name)

    def log(self):
        try:
            return (self.root / "server.log").read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def processes(self):
        """The server's processes: the postmaster and its children."""
        postmaster = int((self.data / "postmaster.pid").read_text().split()[0])
        children = subprocess.run(["pgrep", "-P", str(postmaster)], capture_output=True, text=True).stdout.split()
        return [postmaster, *map(int, children)]
