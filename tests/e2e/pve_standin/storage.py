"""The node's storages, read from a storage.cfg in Proxmox's own format, and the volumes
in them; the appliance index `pveam update` fetches.

Every storage type keeps its volumes here as directories under STATE/volumes/<storage>/
(no LVM or ZFS on this machine), but each is named and checked as its type is on a real
node: lvmthin `vm-<vmid>-disk-<n>`, zfspool `subvol-<vmid>-disk-<n>`, dir
`<vmid>/vm-<vmid>-disk-<n>.raw`, and only a storage whose content includes `rootdir`
holds container volumes, only one with `vztmpl` holds templates."""

import re
import shutil

from .node import REPOSITORY, STATE, PveError

STORAGE_CFG = STATE / "storage.cfg"
VOLUMES = STATE / "volumes"
APLINFO = STATE / "aplinfo.list"
# Present: `pveam update` fails as it does when download.proxmox.com cannot be reached.
UPDATE_FAILS = STATE / "pveam-update-fails"

# The storages of a fresh install on ext4/LVM (pve-docs, "Default storage"); the test
# writes STORAGE_CFG for the ZFS layout (LAYOUTS['zfs']).
LAYOUTS = {
    "lvm": (
        "dir: local\n\tpath /var/lib/vz\n\tcontent iso,vztmpl,backup\n\n"
        "lvmthin: local-lvm\n\tthinpool data\n\tvgname pve\n\tcontent rootdir,images\n"
    ),
    "zfs": (
        "dir: local\n\tpath /var/lib/vz\n\tcontent iso,vztmpl,backup\n\n"
        "zfspool: local-zfs\n\tpool rpool/data\n\tsparse 1\n\tcontent images,rootdir\n"
    ),
}
TEMPLATE_SUFFIXES = (".tar.gz", ".tar.xz", ".tar.zst", ".tar.bz2")


def storages():
    """{name: {'type': ..., 'content': {...}, ...}} from storage.cfg, as Proxmox parses
    it: a `type: name` line, then indented `key value` lines."""
    text = STORAGE_CFG.read_text() if STORAGE_CFG.exists() else LAYOUTS["lvm"]
    parsed, current = {}, None
    for line in text.splitlines():
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        if not line[0].isspace():
            kind, _, name = line.partition(":")
            current = parsed[name.strip()] = {"type": kind.strip(), "content": set()}
        elif current is not None:
            key, _, value = line.strip().partition(" ")
            current[key] = set(value.split(",")) if key == "content" else value.strip()
    return parsed


def storage(name, content=None):
    config = storages().get(name)
    if config is None:
        raise PveError(f"storage '{name}' does not exist")
    if content == "rootdir" and "rootdir" not in config["content"]:
        raise PveError(f"storage '{name}' does not support container directories")
    if content == "vztmpl" and "vztmpl" not in config["content"]:
        raise PveError("Storage does not support templates!")
    return config


# -- volumes ----------------------------------------------------------------------------


def volume_name(kind, vmid, number):
    return {
        "zfspool": f"subvol-{vmid}-disk-{number}",
        "dir": f"{vmid}/vm-{vmid}-disk-{number}.raw",
    }.get(kind, f"vm-{vmid}-disk-{number}")


def volume_path(volid):
    """Where a volume's files are: a directory of its own."""
    name, _, volume = volid.partition(":")
    storage(name)
    if not volume or ".." in volume.split("/"):
        raise PveError(f"unable to parse volume ID '{volid}'")
    return VOLUMES / name / volume


def allocate(name, vmid, size_gib):
    """A new container volume of size_gib on storage name (`STORAGE:SIZE` in pct's
    options): its volume id."""
    kind = storage(name, "rootdir")["type"]
    taken = {int(number) for number in re.findall(rf"-{vmid}-disk-(\d+)", " ".join(owned_volumes(vmid)))}
    number = next(n for n in range(len(taken) + 1) if n not in taken)
    volid = f"{name}:{volume_name(kind, vmid, number)}"
    path = volume_path(volid)
    path.mkdir(parents=True)
    (path.parent / f".{path.name}.size").write_text(f"{size_gib}G")
    return volid


def owned_volumes(vmid):
    """The volume ids of every storage that belong to vmid (by their names)."""
    found = []
    for name in storages():
        base = VOLUMES / name
        for path in [*base.glob(f"*-{vmid}-disk-*"), *base.glob(f"{vmid}/*-{vmid}-disk-*")]:
            if path.is_dir():
                found.append(f"{name}:{path.relative_to(base)}")
    return sorted(found)


def free(volid):
    path = volume_path(volid)
    shutil.rmtree(path, ignore_errors=True)
    (path.parent / f".{path.name}.size").unlink(missing_ok=True)


def usage():
    """total, used and available bytes of the disk the volumes are on."""
    STATE.mkdir(parents=True, exist_ok=True)
    return shutil.disk_usage(STATE)


# -- templates --------------------------------------------------------------------------


def template_dir(name):
    """The template cache of storage name (template/cache under a dir storage's path)."""
    storage(name, "vztmpl")
    return VOLUMES / name / "template" / "cache"


def template_path(volid):
    """STORAGE:vztmpl/NAME -> its file."""
    name, separator, template = volid.partition(":vztmpl/")
    if not separator or "/" in template:
        raise PveError(f"unable to parse volume ID '{volid}'")
    return template_dir(name) / template


def release_and_version(template):
    """'debian-12-standard_12.12-1_amd64.tar.zst' -> ('debian-12-standard', 'amd64'),
    [12, 12, 1]."""
    stem = template
    for suffix in TEMPLATE_SUFFIXES:
        stem = stem.removesuffix(suffix)
    release, version, arch = stem.split("_")
    return (release, arch), [int(part) for part in re.findall(r"\d+", version)]


def fetch_index():
    """What `pveam update` fetches: the appliance server's index, which lists only the
    newest build of each release (an older build's name stops being known)."""
    newest = {}
    for archive in REPOSITORY.glob("*.tar.*"):
        if archive.name.endswith(TEMPLATE_SUFFIXES):
            release, version = release_and_version(archive.name)
            if release not in newest or version > newest[release][0]:
                newest[release] = (version, archive.name)
    APLINFO.parent.mkdir(parents=True, exist_ok=True)
    APLINFO.write_text("".join(f"system {name}\n" for _, name in sorted(newest.values())))


def index():
    """[(section, template)] the node knows: what the last successful update fetched."""
    if not APLINFO.exists():
        return []
    return [tuple(line.split(" ", 1)) for line in APLINFO.read_text().splitlines() if line]
