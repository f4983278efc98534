"""Filters that read what Proxmox's command-line tools print (pct, pveam, pvesm) and the
settings pct takes, so the role compares values, not text. The formats are those of
Proxmox VE 8's own sources: pve-container's src/PVE/CLI/pct.pm (config), pve-guest-common's
GuestHelpers::format_pending (pending), pve-manager's PVE/CLI/pveam.pm (available, list)
and pve-storage's PVE/CLI/pvesm.pm (status)."""

import fnmatch
import re
import shlex

TEMPLATE_SUFFIXES = (".tar.gz", ".tar.xz", ".tar.zst", ".tar.bz2", ".tgz")


# -- pct --------------------------------------------------------------------------------


def decode_text(text):
    """The reverse of PVE::Tools::encode_text, which escapes as %XX only control
    characters, ':' and bytes beyond ASCII (a '%' it leaves as it is, so '%41' in a
    description stays '%41')."""

    def byte(match):
        value = int(match.group(1), 16)
        return chr(value) if value < 0x20 or value == 0x3A or value > 0x7E else match.group(0)

    raw = re.sub(r"%([0-9A-Fa-f]{2})", byte, text)
    return raw.encode("latin-1", errors="surrogateescape").decode("utf-8", errors="replace")


def pve_config(text):
    """`pct config VMID` (or the API's config) as a dict: one `key: value` line per
    option, sorted, then raw `lxc.*` lines; the description escaped on one line (pct.pm
    prints it with encode_text), read back here without the newline Proxmox keeps at its
    end."""
    if isinstance(text, dict):  # GET /nodes/{node}/lxc/{vmid}/config: the same, as JSON
        values = {key: str(value) for key, value in text.items() if key != "digest"}
        return values | ({"description": values["description"].rstrip("\n")} if "description" in values else {})
    config = {}
    for line in text.splitlines():
        key, separator, value = line.partition(": ")
        if not separator or not re.fullmatch(r"[a-z][a-z0-9_.\-]*", key):
            continue
        config[key] = decode_text(value).rstrip("\n") if key == "description" else value
    return config


def pve_pending(text):
    """`pct pending VMID` (or the API's pending rows) as {key: {'current': value or
    None, 'pending': value or None, 'delete': bool}}. format_pending prints `cur k: v`
    for every option in effect, then `new k: v` for a change that waits for the next
    start, or `del k: v` for a removal that does."""
    if isinstance(text, list):  # GET /nodes/{node}/lxc/{vmid}/pending: the same, as rows
        return {
            row["key"]: {
                "current": None if row.get("value") is None else str(row["value"]),
                "pending": None if row.get("pending") is None else str(row["pending"]),
                "delete": bool(row.get("delete")),
            }
            for row in text
        }
    options = {}
    for line in text.splitlines():
        match = re.fullmatch(r"(cur|new|del) ([a-z][a-z0-9_.\-]*): (.*)", line)
        if not match:
            continue
        kind, key, value = match.groups()
        if key == "description":
            value = decode_text(value).rstrip("\n")
        option = options.setdefault(key, {"current": None, "pending": None, "delete": False})
        if kind == "new":
            option["pending"] = value
        else:
            option["current"] = value
            option["delete"] = option["delete"] or kind == "del"
    return options


def pve_pending_changes(pending):
    """What waits for the next start, from pve_pending: {key: new value, or None for a
    removal}."""
    return {
        key: (None if option["delete"] else option["pending"])
        for key, option in pending.items()
        if option["delete"] or option["pending"] is not None
    }


def pve_properties(value):
    """A Proxmox property string ('name=eth0,bridge=vmbr0,ip=dhcp') as a dict. A part
    without '=' is the option's default key (the volume of a mount point, say) and is
    kept under ''."""
    properties = {}
    for part in (value or "").split(","):
        if not part:
            continue
        key, separator, item = part.partition("=")
        if separator:
            properties[key] = item
        else:
            properties[""] = part
    return properties


def pve_property_string(properties, first=("", "name", "mp")):
    """The reverse of pve_properties, in the order pct prints it: the default key, then
    the required ones (name for a network interface, mp for a mount point), then the rest
    sorted. Empty values are left out."""
    properties = {key: str(value) for key, value in properties.items() if value not in (None, "")}
    keys = [key for key in first if key in properties] + sorted(key for key in properties if key not in first)
    return ",".join(properties[key] if key == "" else f"{key}={properties[key]}" for key in keys)


def is_mount_point(key):
    return re.fullmatch(r"mp\d+", key) is not None


def comparable(key, value):
    """A value as Proxmox stores it, so that what is asked for and what pct prints
    compare equal when they mean the same."""
    value = "" if value is None else str(value)
    if key == "tags":
        return pve_tags(value)
    if key in ("features", "startup"):
        return pve_property_string(pve_properties(value), first=())
    if key in ("nameserver", "searchdomain"):
        return " ".join(re.split(r"[,;\s]+", value.strip()))
    if key == "description":
        return value.rstrip("\n")
    return value


def pve_changes(current, wanted):
    """The options to set so the container has what wanted asks ({key: value as pct
    takes it}), given current (pve_config of `pct config`). An empty wanted value means
    "leave it as it is". A network interface (a dict) keeps what Proxmox added (hwaddr,
    and anything not asked for) and drops a key asked for as empty. A mount point (a
    dict with `volume` and `mp`) is added when missing; an existing one keeps its volume
    and only its other options are brought in line."""
    changes = {}
    for key, value in wanted.items():
        if isinstance(value, dict):
            have = pve_properties(current.get(key, ""))
            if is_mount_point(key):
                options = {name: item for name, item in value.items() if name != "volume"}
                want = {"": have[""], **have, **options} if have else {"": value["volume"], **options}
            else:
                want = {**have, **value}
            want = {name: str(item) for name, item in want.items() if item not in (None, "")}
            if want != have:
                changes[key] = pve_property_string(want)
        elif value not in (None, "") and comparable(key, value) != comparable(key, current.get(key)):
            changes[key] = comparable(key, value)
    return changes


def pve_mount_points(mounts, current=None):
    """proxmox_lxc_mounts as the mount points pve_changes takes: {'mp0': {'volume': ...,
    'mp': path, 'backup': 1}, ...}. A mount that the container has already (at the same
    path) keeps its key; a new one takes the lowest free mpN, so taking an item out of the
    list or reordering it never mounts a volume somewhere else (mount points not listed
    are left alone). Any other key of an item is a mount option (ro, acl, quota...);
    backup is left out for a node directory, which vzdump never backs up."""
    current = current or {}
    by_path = {}
    for key, value in current.items():
        if is_mount_point(key):
            by_path[pve_properties(value).get("mp", "").rstrip("/")] = key
    taken = {key for key in current if is_mount_point(key)}
    points = {}
    for mount in mounts or []:
        key = by_path.get(str(mount["path"]).rstrip("/"))
        if key is None:
            key = next(f"mp{number}" for number in range(256) if f"mp{number}" not in taken)
            taken.add(key)
        options = {name: value for name, value in mount.items() if name not in ("volume", "path", "backup")}
        options = {name: int(value) if isinstance(value, bool) else value for name, value in options.items()}
        if not str(mount["volume"]).startswith("/"):
            options["backup"] = int(bool(mount.get("backup", True)))
        points[key] = {"volume": mount["volume"], "mp": mount["path"], **options}
    return points


def pve_touches_volumes(changes):
    """Whether changes set a mount point or the root disk: what Proxmox refuses while
    a container is protected (update_pct_config's check_protection)."""
    return any(key == "rootfs" or is_mount_point(key) for key in changes)


def pve_firewall_rules(ports, source, comment):
    """The firewall rules that open ports (TCP) from source, as the API lists rules:
    {'type': 'in', 'action': 'ACCEPT', 'proto': 'tcp', 'dport': '8080', ...}."""
    rules = []
    for port in ports or []:
        rule = {"type": "in", "action": "ACCEPT", "proto": "tcp", "dport": str(port), "enable": 1, "comment": comment}
        rules.append(rule | ({"source": source} if source else {}))
    return rules


def pve_rule_key(rule):
    """What tells two firewall rules apart for the role: direction, action, protocol,
    port, source and whether it is on."""
    return "|".join(str(rule.get(key, "")) for key in ("type", "action", "proto", "dport", "source", "enable"))


def pve_options(values):
    """A dict of options as pct's command-line arguments: ['--key', 'value', ...]."""
    return [part for key in values for part in (f"--{key}", str(values[key]))]


def pve_tags(tags):
    """Tags as Proxmox stores them (GuestHelpers::get_unique_tags with the default tag
    style): lower case, unique, sorted, joined by ';'. Takes a list or a string split on
    ',', ';' or spaces."""
    if isinstance(tags, str):
        tags = re.split(r"[,;\s]+", tags)
    return ";".join(sorted({str(tag).strip().lower() for tag in tags or [] if str(tag).strip()}))


# -- pveam ------------------------------------------------------------------------------


def pveam_available(text):
    """`pveam available [--section S]`: ('section', 'template name') per line, as
    pveam.pm prints them (`%-15s %s`)."""
    rows = []
    for line in text.splitlines():
        parts = line.split()
        if len(parts) == 2 and parts[1].endswith(TEMPLATE_SUFFIXES):
            rows.append({"section": parts[0], "template": parts[1]})
    return rows


def pveam_list(text):
    """`pveam list STORAGE`: the template names in the storage (its volids are
    STORAGE:vztmpl/NAME; a header line `NAME SIZE` comes first)."""
    names = []
    for line in text.splitlines():
        volid = line.split()[0] if line.split() else ""
        storage, separator, name = volid.partition(":vztmpl/")
        if separator and storage:
            names.append(name)
    return names


def template_parts(name):
    """'debian-12-standard_12.12-1_amd64.tar.zst' -> ('debian-12-standard', '12.12-1',
    'amd64'); None for a name not in the appliance index's form."""
    for suffix in TEMPLATE_SUFFIXES:
        if name.endswith(suffix):
            parts = name[: -len(suffix)].split("_")
            if len(parts) == 3 and all(parts):
                return tuple(parts)
    return None


def version_key(version):
    """Orders '12.12-1' after '12.2-3' and '13.1-2' after both: numbers compare as
    numbers, the other parts as text."""
    return [(0, int(part), "") if part.isdigit() else (1, 0, part) for part in re.findall(r"\d+|[^\d.\-~+]+", version)]


def is_template_name(pattern):
    """A full template file name (chosen exactly), rather than a pattern to pick by."""
    return str(pattern).endswith(TEMPLATE_SUFFIXES)


def pve_newest_template(names, pattern, arch="amd64"):
    """The newest template among names that pattern picks: a full name picks itself; any
    other pattern is matched (shell wildcards allowed) against the part before the version,
    so 'debian-12-standard' picks the newest Debian 12 build. Empty if none matches."""
    if is_template_name(pattern):
        return pattern if pattern in names else ""
    matching = []
    for name in names:
        parts = template_parts(name)
        if parts and fnmatch.fnmatchcase(parts[0], pattern) and parts[2] == arch:
            matching.append((version_key(parts[1]), name))
    return max(matching)[1] if matching else ""


# -- pvesm ------------------------------------------------------------------------------


def pvesm_status(text):
    """`pvesm status [--content C]`: one dict per storage (name, type, status, and total,
    used and available in KiB, or None where pvesm.pm prints N/A), in its order."""
    rows = []
    for line in text.splitlines():
        parts = line.split()
        if len(parts) < 6 or parts[0] == "Name":
            continue
        sizes = [int(part) if part.isdigit() else None for part in parts[3:6]]
        row = {"name": parts[0], "type": parts[1], "status": parts[2]}
        rows.append(row | dict(zip(("total", "used", "available"), sizes, strict=True)))
    return rows


def pve_api_storages(rows):
    """GET /nodes/{node}/storage as pvesm_status gives `pvesm status`."""
    return [
        {"name": row["storage"], "type": row["type"], "status": "active" if row.get("active") else "inactive"}
        for row in rows
    ]


# -- OpenSSH ------------------------------------------------------------------------------


def ssh_config(text):
    """`ssh -G HOST` (the settings OpenSSH would use for HOST, one `key value` line each)
    as a dict; keys that may repeat (identityfile, certificatefile) as lists."""
    config = {}
    for line in text.splitlines():
        key, _, value = line.strip().partition(" ")
        if not key:
            continue
        if key in ("identityfile", "certificatefile"):
            config.setdefault(key, []).append(value)
        else:
            config[key] = value
    return config


def shell_words(text):
    """Command-line arguments as a shell splits them (ansible_ssh_common_args)."""
    return shlex.split(text or "")


def ssh_proxy_command(config, ssh_args=()):
    """The ProxyCommand that reaches the host the way OpenSSH's settings (ssh_config of
    `ssh -G`) do, for a client that knows ProxyCommand but not ProxyJump (paramiko): its
    own ProxyCommand, else `ssh -W [%h]:%p` through the jump hosts; '' for none."""
    if config.get("proxycommand", "none") != "none":
        return config["proxycommand"]
    jump = config.get("proxyjump", "none")
    if jump == "none":
        return ""
    *before, last = jump.split(",")
    # As a destination, `user@host:port` and `[address]` mean what they mean to ProxyJump
    # only as an ssh:// URI.
    words = ["ssh", *ssh_args, *(["-J", ",".join(before)] if before else []), "-W", "[%h]:%p", f"ssh://{last}"]
    return shlex.join(words).replace("'[%h]:%p'", "[%h]:%p")


def known_hosts_name(host, port):
    """The name a known_hosts file holds a host's key under: [host]:port unless port 22."""
    return host if int(port) == 22 else f"[{host}]:{port}"


class FilterModule:
    def filters(self):
        return {
            "pve_config": pve_config,
            "pve_pending": pve_pending,
            "pve_pending_changes": pve_pending_changes,
            "pve_properties": pve_properties,
            "pve_property_string": pve_property_string,
            "pve_tags": pve_tags,
            "pve_changes": pve_changes,
            "pve_options": pve_options,
            "pve_mount_points": pve_mount_points,
            "pve_touches_volumes": pve_touches_volumes,
            "pve_firewall_rules": pve_firewall_rules,
            "pve_rule_key": pve_rule_key,
            "pveam_available": pveam_available,
            "pveam_list": pveam_list,
            "pve_newest_template": pve_newest_template,
            "pve_is_template_name": is_template_name,
            "pvesm_status": pvesm_status,
            "pve_api_storages": pve_api_storages,
            "ssh_config": ssh_config,
            "shell_words": shell_words,
            "ssh_proxy_command": ssh_proxy_command,
            "known_hosts_name": known_hosts_name,
        }
