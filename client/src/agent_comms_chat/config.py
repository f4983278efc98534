"""Where agent-chat finds its broker, agent id, token and CA: flag, then environment, then
config file, then default. The config files are INI with one [agent-comms] section:

    [agent-comms]
    broker = http://192.168.122.86:8080
    agent_id = warp-ct200
    token = ...
    ca = /etc/agent-comms/ca.pem

They are the user's ~/.config/agent-comms/config.ini (under $XDG_CONFIG_HOME if set), then
the system's /etc/agent-comms/chat.ini; --config FILE or $AGENT_COMMS_CONFIG names the one
file to read instead of both.
"""

import os
import unicodedata

DEFAULT_BROKER = "http://192.168.122.86:8080"
SYSTEM_CONFIG = "/etc/agent-comms/chat.ini"
SECTION = "agent-comms"


class ConfigError(Exception):
    pass


def user_config_path(environ=os.environ):
    base = environ.get("XDG_CONFIG_HOME") or os.path.join(os.path.expanduser("~"), ".config")
    return os.path.join(base, "agent-comms", "config.ini")


def _one_line(error):
    return " ".join(str(error).split())


def read_config_files(paths, required=False):
    """{key: (value, path)} from the [agent-comms] sections of the files; earlier paths
    win. A file that does not exist is skipped, unless `required` (named by the user)."""
    # What would read nothing needs no parser: importing configparser is a few ms of a
    # command's time, and most hosts have no config file (or set AGENT_COMMS_CONFIG=/dev/null).
    paths = [path for path in paths if path != os.devnull and (required or os.path.exists(path))]
    if not paths:
        return {}
    import configparser

    found = {}
    for path in reversed(paths):
        # No interpolation: a token or URL may hold a "%".
        parser = configparser.RawConfigParser()
        try:
            if required:
                with open(path, encoding="utf-8") as file:
                    parser.read_file(file, source=path)
            else:
                parser.read(path, encoding="utf-8")
        except OSError as error:
            raise ConfigError(f"cannot read the config file {path}: {error.strerror or error}") from None
        except UnicodeDecodeError:
            raise ConfigError(f"cannot read the config file {path}: it is not UTF-8") from None
        except configparser.Error as error:
            raise ConfigError(f"cannot read the config file {path}: {_one_line(error)}") from None
        if parser.has_section(SECTION):
            found.update({key: (value, path) for key, value in parser.items(SECTION)})
    return found


def config_paths(flags, environ=os.environ):
    """The config files to read, and whether they were named by the user."""
    if flags.get("--config"):
        return [flags["--config"]], True
    if environ.get("AGENT_COMMS_CONFIG"):
        return [environ["AGENT_COMMS_CONFIG"]], True
    return [user_config_path(environ), SYSTEM_CONFIG], False


def default_agent_id():
    """Stable across runs on one host, so the broker's last-seen means something."""
    import socket

    return "agent-" + (socket.gethostname().split(".")[0] or "unknown")


def check_broker_url(url, where):
    """The URL without a trailing slash, or ConfigError saying what is wrong with it and,
    where that is clear, what was meant."""
    from urllib.parse import urlsplit

    url = url.strip()
    if "://" not in url:
        raise ConfigError(
            f"the broker URL {url!r} ({where}) has no scheme: write http://{url} (or https://{url} for TLS)"
        )
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as error:
        raise ConfigError(f"the broker URL {url!r} ({where}) is not valid: {error}") from None
    if parts.scheme.lower() not in ("http", "https"):
        raise ConfigError(f"the broker URL {url!r} ({where}) must start with http:// or https://")
    if not parts.hostname:
        raise ConfigError(f"the broker URL {url!r} ({where}) names no host: write it as http://HOST:PORT")
    if parts.username is not None or parts.password is not None:
        raise ConfigError(f"the broker URL ({where}) must not hold a user or password: give a token with --token")
    if parts.query or parts.fragment or "?" in url or "#" in url:
        raise ConfigError(f"the broker URL {url!r} ({where}) must not have a query or fragment")
    if port == 0:
        raise ConfigError(f"the broker URL {url!r} ({where}) has port 0")
    try:
        parts.hostname.encode("idna")  # as it is sent, in the Host header and to the resolver
    except UnicodeError:
        raise ConfigError(f"the broker URL {url!r} ({where}) has a host name that is not valid") from None
    return url.rstrip("/")


def check_header_value(value, name, where):
    """A value sent in a request header: a control character would end the header, and
    HTTP drops spaces around a value."""
    try:
        value.encode("utf-8")  # bytes that were not UTF-8 come from the command line as surrogates
    except UnicodeEncodeError:
        raise ConfigError(f"the {name} ({where}) is not valid UTF-8 text") from None
    if any(unicodedata.category(char) == "Cc" for char in value):
        raise ConfigError(f"the {name} ({where}) contains control characters")
    if value != value.strip():
        raise ConfigError(f"the {name} ({where}) starts or ends with a space")
    return value


def resolve(flags, environ=os.environ, paths=None, required=False):
    """The broker URL, agent id, token and CA to use, from flags, environment, files and
    defaults. `paths` (with `required`) overrides the config files `config_paths` picks."""
    if paths is None:
        paths, required = config_paths(flags, environ)
    files = None

    def pick(flag, variable, key, default):
        """(value, where it came from)."""
        nonlocal files
        if flags.get(flag) == "":
            raise ConfigError(f"{flag} is empty: give a value, or leave the option out")
        if flags.get(flag):
            return flags[flag], flag
        if environ.get(variable):
            return environ[variable], variable
        if files is None:
            files = read_config_files(paths, required)
        if files.get(key, ("", None))[0]:
            value, path = files[key]
            return value, f"{key} in {path}"
        return (default() if callable(default) else default), "default"

    agent_id, agent_where = pick("--agent-id", "AGENT_COMMS_AGENT_ID", "agent_id", None)
    token, token_where = pick("--token", "AGENT_COMMS_TOKEN", "token", None)
    ca, ca_where = pick("--ca", "AGENT_COMMS_CA", "ca", None)
    broker, broker_where = pick("--broker", "AGENT_COMMS_BROKER", "broker", DEFAULT_BROKER)
    if ca is not None and not os.path.isfile(ca):
        raise ConfigError(f"the CA file {ca} ({ca_where}) does not exist")
    if agent_id is not None:
        check_header_value(agent_id, "agent id", agent_where)
    if token is not None:
        check_header_value(token, "token", token_where)
    if agent_id is None and token is None:
        agent_id = default_agent_id()
    # With a token and no agent id given, the broker names the sender: the token's agent.
    return {"broker": check_broker_url(broker, broker_where), "agent_id": agent_id, "token": token, "ca": ca}
