"""Where agent-chat finds its broker, agent id and token: flag, then environment, then
config file, then default. The config files are INI with one [agent-comms] section:

    [agent-comms]
    broker = http://192.168.122.86:8080
    agent_id = warp-ct200
    token = ...
    ca = /etc/agent-comms/ca.pem
"""

import configparser
import os
import socket

DEFAULT_BROKER = "http://192.168.122.86:8080"
SYSTEM_CONFIG = "/etc/agent-comms/chat.ini"
SECTION = "agent-comms"


def user_config_path(environ=os.environ):
    base = environ.get("XDG_CONFIG_HOME") or os.path.join(os.path.expanduser("~"), ".config")
    return os.path.join(base, "agent-comms", "config.ini")


def read_config_files(paths):
    """The [agent-comms] values of the files that exist; earlier paths win."""
    parser = configparser.ConfigParser()
    try:
        parser.read(list(reversed(paths)), encoding="utf-8")
    except configparser.Error as error:
        raise ConfigError(f"cannot read config: {error}") from None
    return dict(parser[SECTION]) if parser.has_section(SECTION) else {}


class ConfigError(Exception):
    pass


def default_agent_id():
    """Stable across runs on one host, so the broker's last-seen means something."""
    return "agent-" + (socket.gethostname().split(".")[0] or "unknown")


def resolve(flags, environ=os.environ, paths=None):
    """The broker URL, agent id and token to use, from flags, environment, files, defaults."""
    if paths is None:
        paths = [user_config_path(environ), SYSTEM_CONFIG]
    files = None

    def pick(flag, variable, key, default):
        nonlocal files
        if flags.get(flag):
            return flags[flag]
        if environ.get(variable):
            return environ[variable]
        if files is None:
            files = read_config_files(paths)
        if files.get(key):
            return files[key]
        return default() if callable(default) else default

    agent_id = pick("--agent-id", "AGENT_COMMS_AGENT_ID", "agent_id", None)
    token = pick("--token", "AGENT_COMMS_TOKEN", "token", None)
    ca = pick("--ca", "AGENT_COMMS_CA", "ca", None)
    if ca is not None and not os.path.isfile(ca):
        raise ConfigError(f"the CA file {ca} (--ca, AGENT_COMMS_CA or ca in the config file) does not exist")
    if agent_id is None and token is None:
        agent_id = default_agent_id()
    # With a token and no agent id given, the broker names the sender: the token's agent.
    return {
        "broker": pick("--broker", "AGENT_COMMS_BROKER", "broker", DEFAULT_BROKER).rstrip("/"),
        "agent_id": agent_id,
        "token": token,
        "ca": ca,
    }
