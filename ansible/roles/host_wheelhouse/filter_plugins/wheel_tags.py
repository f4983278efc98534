"""Which wheels a host's Python can install, from what the host says of itself (version,
machine, C library): the tags pip would accept there (packaging.tags, as pip computes
them), and the `pip download` options that fetch wheels for it from another machine."""

from packaging.tags import compatible_tags, cpython_tags
from packaging.utils import parse_wheel_filename

# The oldest glibc any manylinux tag names (manylinux1 is manylinux_2_5).
OLDEST_GLIBC_MINOR = 5
LEGACY_MANYLINUX = {17: "manylinux2014", 12: "manylinux2010", 5: "manylinux1"}


def platforms(host):
    """The platform tags of a Linux host: manylinux for each glibc up to its own (newest
    first, as pip orders them), and plain linux_<machine>."""
    machine = host["machine"]
    tags = []
    if host.get("libc", [""])[0] == "glibc":
        major, minor = (int(part) for part in host["libc"][1].split(".")[:2])
        for number in range(minor, OLDEST_GLIBC_MINOR - 1, -1):
            tags.append(f"manylinux_{major}_{number}_{machine}")
            if number in LEGACY_MANYLINUX:
                tags.append(f"{LEGACY_MANYLINUX[number]}_{machine}")
    return [*tags, f"linux_{machine}"]


def supported(host):
    version = tuple(host["version"][:2])
    tags = platforms(host)
    return {*cpython_tags(version, platforms=tags), *compatible_tags(version, f"cp{version[0]}{version[1]}", tags)}


def wheels_not_fitting(names, host):
    """The wheel file names of names that host's Python cannot install."""
    tags = supported(host)
    return [name for name in names if not (set(parse_wheel_filename(name)[3]) & tags)]


def pip_download_options(host):
    """`pip download` options that pick wheels for host's Python and platform."""
    major, minor = host["version"][:2]
    options = ["--only-binary=:all:", "--python-version", f"{major}.{minor}", "--implementation", "cp"]
    options += ["--abi", f"cp{major}{minor}", "--abi", "abi3", "--abi", "none"]
    for platform in platforms(host)[:-1] or platforms(host):
        options += ["--platform", platform]
    return options


def wheel_requirements(names):
    """name==version for each wheel, the name normalised (agent-comms-broker): the
    versions the controller's wheelhouse holds."""
    found = []
    for name in names:
        project, version, _, _ = parse_wheel_filename(name)
        found.append(f"{project}=={version}")
    return sorted(set(found))


def project_requirements(versions, projects):
    """The requirement to fetch for each project ("agent-comms-chat[mcp]"): its version
    in the controller's wheelhouse (`versions`, from wheel_requirements), its extras kept."""
    pinned = dict(version.split("==", 1) for version in versions)
    found = []
    for project in projects:
        name, bracket, extras = project.partition("[")
        if name in pinned:
            found.append(f"{name}{bracket}{extras}=={pinned[name]}")
    return found


class FilterModule:
    def filters(self):
        return {
            "wheels_not_fitting": wheels_not_fitting,
            "pip_download_options": pip_download_options,
            "wheel_requirements": wheel_requirements,
            "project_requirements": project_requirements,
        }
