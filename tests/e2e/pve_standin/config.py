"""A container's Proxmox config as pve-container keeps it (/etc/pve/lxc/<vmid>.conf): the
options in effect, the description as leading '#' lines, and a [pve:pending] section for
changes that wait for the next start.

Which change waits is pve-container's rule (PVE::LXC::Config::update_pct_config and
vmconfig_hotplug_pending): on a stopped container every change applies at once; on a
running one the "fast-plug" options are written at once (hostname among them: the name
inside the container changes only at the next start), memory, swap, network interfaces
and new mount points are hot-plugged, and everything else (features, nameserver,
searchdomain, timezone...) stays pending until the container starts again."""

import random
import re
from urllib.parse import unquote

from .node import ParameterError, PveError, join_list, split_list

PENDING_SECTION = "[pve:pending]"
FASTPLUG = {"description", "onboot", "startup", "protection", "hostname", "hookscript", "cores", "tags", "lock"}
HOTPLUG = {"memory", "swap", "cpulimit", "cpuunits"}
HOT_DELETE = {"swap", "cpulimit", "cpuunits"}
READ_ONLY = {"unprivileged"}
# Taken by `pct create` only: never stored in the config.
CREATE_ONLY = {
    "start", "storage", "password", "ssh-public-keys", "unique", "restore", "force", "pool",
    "ignore-unpack-errors", "ha-managed",
}  # fmt: skip


def encode_text(text):
    """PVE::Tools::encode_text: control characters, ':' and anything beyond ASCII escaped
    as %XX, everything else as it is."""
    safe = set(range(0x20, 0x3A)) | set(range(0x3B, 0x7F))
    return "".join(chr(byte) if byte in safe else f"%{byte:02X}" for byte in text.encode())


def is_interface(key):
    return re.fullmatch(r"net\d+", key) is not None


def is_mount_point(key):
    return re.fullmatch(r"mp\d+", key) is not None


class PctConfig:
    def __init__(self, current=None, pending=None, delete=None):
        self.current = dict(current or {})
        self.pending = dict(pending or {})
        self.delete = list(delete or [])

    @classmethod
    def load(cls, path):
        config, section = cls(), "current"
        description = []
        for line in path.read_text().splitlines():
            if line == PENDING_SECTION:
                section = "pending"
            elif line.startswith("#") and section == "current":
                description.append(unquote(line[1:]) + "\n")
            elif ": " in line:
                key, _, value = line.partition(": ")
                if section == "pending" and key == "delete":
                    config.delete = [item for item in value.split(",") if item]
                else:
                    getattr(config, section)[key] = value
        if description:
            config.current["description"] = "".join(description)
        return config

    def save(self, path):
        current = dict(self.current)
        description = current.pop("description", "")
        lines = [f"#{encode_text(line)}" for line in description.splitlines()]
        lines += [f"{key}: {current[key]}" for key in sorted(current)]
        if self.pending or self.delete:
            lines += ["", PENDING_SECTION]
            lines += [f"{key}: {self.pending[key]}" for key in sorted(self.pending)]
            lines += [f"delete: {','.join(self.delete)}"] if self.delete else []
        path.write_text("\n".join(lines) + "\n")

    def merged(self):
        """What `pct config` shows by default: the pending values in place of the current
        ones, pending removals gone (AbstractConfig::load_current_config)."""
        values = {**self.current, **self.pending}
        for key in self.delete:
            values.pop(key, None)
        return values

    def apply_pending(self):
        """What a start does first (PVE::LXC::vm_start: vmconfig_apply_pending)."""
        self.current = self.merged()
        self.pending, self.delete = {}, []

    def pending_lines(self):
        """`pct pending`, as PVE::GuestHelpers::format_pending prints it."""
        lines = []
        for key in sorted(set(self.current) | set(self.pending)):
            value, new = self.current.get(key), self.pending.get(key)
            if key == "description":
                value = encode_text(value) if value is not None else None
                new = encode_text(new) if new is not None else None
            if value is not None:
                if key in self.delete:
                    lines.append(f"del {key}: {value}")
                elif new is not None:
                    lines += [f"cur {key}: {value}", f"new {key}: {new}"]
                else:
                    lines.append(f"cur {key}: {value}")
            elif new is not None:
                lines.append(f"new {key}: {new}")
        return lines

    def change(self, values, delete, running):
        """`pct set`: returns the changes to apply live ({key: value}, [deleted keys]); the
        rest is applied to the config at once or left pending, as on Proxmox."""
        unknown = (set(values) | set(delete)) & (READ_ONLY | CREATE_ONLY)
        if unknown & READ_ONLY:
            raise PveError(f"unable to modify read-only option: '{sorted(unknown & READ_ONLY)[0]}'")
        if unknown:
            raise ParameterError({key: "property is not defined in schema" for key in unknown})
        live, live_delete = {}, []
        for key in delete:
            if key not in self.merged():
                print(f"cannot delete '{key}' - not set in current configuration!")
                continue
            if self.pending.pop(key, None) is not None and key not in self.current:
                continue  # only pending: dropping that change is all there is to do
            if not running or key in FASTPLUG | HOT_DELETE or is_interface(key) or key.startswith("unused"):
                self.current.pop(key, None)
                live_delete += [key] if running else []
            elif key not in self.delete:
                self.delete.append(key)
        for key, value in values.items():
            self.delete = [item for item in self.delete if item != key]
            hot = key in FASTPLUG | HOTPLUG or is_interface(key) or (is_mount_point(key) and key not in self.current)
            if not running or hot:
                self.pending.pop(key, None)
                if running and key not in FASTPLUG and self.current.get(key) != value:
                    live[key] = value
                self.current[key] = value
            elif self.current.get(key) == value:
                self.pending.pop(key, None)
            else:
                self.pending[key] = value
        return live, live_delete


def normalise(values, previous):
    """Option values as pct stores and prints them."""
    if "net0" in values:
        net = {"name": "eth0", "type": "veth", **split_list(values["net0"])}
        old_mac = split_list(previous.get("net0", "")).get("hwaddr")
        net.setdefault("hwaddr", old_mac or "BC:24:11:" + ":".join(f"{random.randrange(256):02X}" for _ in range(3)))
        values["net0"] = join_list(net)
    if "features" in values:
        values["features"] = join_list(split_list(values["features"]), first=())
    if "tags" in values:
        # GuestHelpers::get_unique_tags with the default tag style: lower case, sorted, unique.
        values["tags"] = ";".join(sorted({tag.lower() for tag in re.split(r"[,;\s]+", values["tags"]) if tag}))
    for key in ("nameserver", "searchdomain"):
        if key in values:
            values[key] = " ".join(re.split(r"[,;\s]+", values[key].strip()))
    if "description" in values and not values["description"].endswith("\n"):
        values["description"] += "\n"
    for key, value in values.items():
        if key in ("onboot", "protection", "unprivileged") and value not in ("0", "1"):
            raise PveError(f"400 Parameter verification failed.\n{key}: type check ('boolean') failed - got '{value}'")
    return values
