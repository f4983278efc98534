"""agent-comms-broker: runs the agent-comms message broker under gunicorn.

Usage:
  agent-comms-broker serve [--bind HOST:PORT] [--db PATH] [--workers N]
  agent-comms-broker config-path
  agent-comms-broker (-h | --help | --version)

Commands:
  serve          Run the broker in the foreground (gunicorn, gevent workers).
  config-path    Print the path of the shared gunicorn.conf.py, for a plain
                 `gunicorn -c "$(agent-comms-broker config-path)"` invocation.

Options:
  --bind HOST:PORT  Address to listen on [env AGENT_COMMS_BIND; default 0.0.0.0:8080].
  --db PATH         SQLite database file [env AGENT_COMMS_DB;
                    default /opt/agent-comms/messages.db].
  --workers N       gunicorn worker processes [env AGENT_COMMS_WORKERS; default 2].
  -h --help         Show this text.
  --version         Show the version.

Every other setting is an AGENT_COMMS_* environment variable; the README lists them.
Exit status: 0 after a clean stop, 1 when the broker cannot start (one line on stderr).
"""

import os
import sys
from importlib import resources

from docopt import docopt

from . import __version__, preflight
from .config import ConfigError, Settings

FLAGS = {"--bind": "AGENT_COMMS_BIND", "--db": "AGENT_COMMS_DB", "--workers": "AGENT_COMMS_WORKERS"}


def config_path():
    return str(resources.files(__package__).joinpath("gunicorn.conf.py"))


def main(argv=None):
    args = docopt(__doc__, argv=argv, version=__version__)
    if args["config-path"]:
        print(config_path())
        return 0
    for flag, variable in FLAGS.items():
        if args[flag] is not None:
            os.environ[variable] = args[flag]
    try:
        settings = Settings.from_env()
    except ConfigError as error:
        print(f"agent-comms-broker: {error}", file=sys.stderr)
        return 1
    # Before gunicorn logs a line: a broker that cannot start says why in one line.
    preflight.check(settings.db, [settings.bind])
    from gunicorn.app.wsgiapp import WSGIApplication

    sys.argv = ["agent-comms-broker", "--config", config_path()]
    WSGIApplication("%(prog)s serve").run()
    return 0
