"""The node's API (/api2/json) over the same containers, storages and firewall files as the
commands: the routes community.proxmox's modules and the role's API tasks call, with the
permission each needs as pve-container, pve-manager and pve-firewall declare it, checked
against the ACLs of an API token (PVEAPIToken=USER@REALM!NAME=SECRET).

`pvesh` (pvesh.py) runs the same routes as root@pam, which may do anything. The HTTPS
server (serve()) is what the tests point the role's API method at.

Tasks run to their end before the call answers; their UPID then reports `stopped` with
`OK` or the error, as /nodes/{node}/tasks/{upid}/status does once a task has ended."""

import hashlib
import itertools
import json
import os
import re
import ssl
import subprocess
import tempfile
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qsl, urlsplit

from . import firewall, pct, storage
from .config import is_interface, is_mount_point
from .container import Container
from .node import NODE, STATE, ParameterError, PveError, split_list

VERSION = {"version": "8.4.1", "release": "8.4", "repoid": "2a5fa54a8503f96d"}
ACCESS = STATE / "api-access.json"  # {"tokens": {"USER@REALM!NAME": {"secret": ..., "acl": {path: [privileges]}}}}
TASKS = STATE / "tasks"
TASK_NUMBERS = itertools.count(1)
# The node's tools a task runs, as the API's workers run pve-container's code.
TOOLS = {"pct": "/usr/sbin/pct", "pveam": "/usr/sbin/pveam"}
INTEGER_OPTIONS = {"cores", "memory", "swap", "onboot", "protection", "unprivileged", "cpuunits", "console", "tty"}


class ApiError(Exception):
    def __init__(self, status, message, errors=None):
        super().__init__(message)
        self.status, self.errors = status, errors


# -- who may do what ----------------------------------------------------------------------


class Caller:
    """root@pam (pvesh) may do anything; a token only what its ACLs grant, on the path or
    any path above it (Proxmox's ACLs propagate down by default)."""

    def __init__(self, name=None, acl=None):
        self.name, self.acl = name, acl

    @property
    def root(self):
        return self.name is None

    def allowed(self, path, privileges, any_of=False):
        if self.root:
            return True
        granted = set()
        parts = path.strip("/").split("/")
        for depth in range(len(parts) + 1):
            granted |= set(self.acl.get("/" + "/".join(parts[:depth]), []))
        check = any if any_of else all
        return check(privilege in granted for privilege in privileges)

    def check(self, path, *privileges, any_of=False):
        if not self.allowed(path, privileges, any_of):
            raise ApiError(403, f"Permission check failed ({path}, {'|'.join(privileges)})")

    def check_root(self, what):
        if not self.root:
            raise ApiError(403, f"{what} is only allowed for root@pam")


def caller_of(header):
    """The token an `Authorization: PVEAPIToken=USER@REALM!NAME=SECRET` header names."""
    match = re.fullmatch(r"PVEAPIToken=([^!=\s]+![^=\s]+)=(\S+)", header or "")
    tokens = json.loads(ACCESS.read_text())["tokens"] if ACCESS.exists() else {}
    if not match or match.group(1) not in tokens or tokens[match.group(1)]["secret"] != match.group(2):
        raise ApiError(401, "authentication failure")
    return Caller(match.group(1), tokens[match.group(1)]["acl"])


def check_options(caller, vmid, values, delete=(), unprivileged=True):
    """PVE::LXC::check_ct_modify_config_perm: the privilege each option needs."""
    path = f"/vms/{vmid}"
    for key in [*values, *delete]:
        value = values.get(key, "")
        if key in ("cores", "cpulimit", "cpuunits"):
            caller.check(path, "VM.Config.CPU")
        elif key in ("memory", "swap"):
            caller.check(path, "VM.Config.Memory")
        elif key == "rootfs" or is_mount_point(key):
            caller.check(path, "VM.Config.Disk")
            volume = split_list(value).get("", "")
            if volume.startswith("/"):
                caller.check_root(f"mount point type bind ({key})")
            elif re.fullmatch(r"[\w.\-]+:\d+(\.\d+)?", volume):
                caller.check(f"/storage/{volume.split(':')[0]}", "Datastore.AllocateSpace")
        elif is_interface(key):
            caller.check(path, "VM.Config.Network")
            net = split_list(value)
            if net.get("bridge"):
                zone = f"/sdn/zones/localnetwork/{net['bridge']}" + (f"/{net['tag']}" if net.get("tag") else "")
                caller.check(zone, "SDN.Use")
        elif key in ("hostname", "nameserver", "searchdomain"):
            caller.check(path, "VM.Config.Network")
        elif key == "features":
            if not unprivileged:
                caller.check_root("changing feature flags for privileged container")
            if set(split_list(value)) - {"nesting"}:
                caller.check_root("changing feature flags (except nesting)")
            caller.check(path, "VM.Allocate")
        elif key in ("dev0", "hookscript") or key.startswith("lxc."):
            caller.check_root(key)
        else:
            caller.check(path, "VM.Config.Options")


# -- tasks ------------------------------------------------------------------------------


def task(kind, vmid, caller, command, cleanup=None):
    """Starts a node command as a Proxmox task and answers its UPID at once, as the API
    does: the task runs on (its output and outcome kept for /tasks/), and its status is
    `running` until it ends, then `stopped` with `OK` or its error's first line."""
    started = time.time()
    user = caller.name or "root@pam"
    upid = f"UPID:{NODE}:{os.getpid():08X}:{next(TASK_NUMBERS):08X}:{int(started):08X}:{kind}:{vmid}:{user}:"
    TASKS.mkdir(parents=True, exist_ok=True)
    record = TASKS / hashlib.sha1(upid.encode()).hexdigest()
    record.write_text(json.dumps({"status": None, "log": ""}))

    def work():
        try:
            result = subprocess.run(command, capture_output=True, text=True, timeout=900)
        finally:
            if cleanup:
                cleanup()
        lines = (result.stderr or "").strip().splitlines()
        status = "OK" if result.returncode == 0 else (lines[0] if lines else f"exit code {result.returncode}")
        record.write_text(json.dumps({"status": status, "log": result.stdout + result.stderr}))

    threading.Thread(target=work).start()
    return upid


def task_record(upid):
    path = TASKS / hashlib.sha1(upid.encode()).hexdigest()
    if not path.exists():
        raise ApiError(500, f"no such task '{upid}'")
    return json.loads(path.read_text())


def arguments(params, skip=()):
    """API parameters as pct's command-line options."""
    argv = []
    for key, value in params.items():
        if key not in skip:
            argv += [f"--{key}={value}"]
    return argv


def typed(values):
    return {key: int(value) if key in INTEGER_OPTIONS and value.isdigit() else value for key, value in values.items()}


def container(vmid, caller, *privileges):
    ct = Container(vmid)
    caller.check(f"/vms/{vmid}", *privileges)
    if not ct.exists():
        raise ApiError(500, f"Configuration file 'nodes/{NODE}/lxc/{vmid}.conf' does not exist")
    return ct


# -- routes -----------------------------------------------------------------------------


def get_version(caller, params):
    return VERSION


def get_nodes(caller, params):
    return [{"node": NODE, "status": "online", "type": "node"}]


def get_resources(caller, params):
    found = []
    for conf in sorted(Container(100).dir.parent.glob("*/pct.conf")):
        ct = Container(conf.parent.name)
        if caller.allowed(f"/vms/{ct.vmid}", ["VM.Audit"]):
            found.append({
                "id": f"lxc/{ct.vmid}", "vmid": int(ct.vmid), "type": "lxc", "node": NODE,
                "name": ct.values.get("hostname", ""), "status": ct.state(),
            })  # fmt: skip
    return found


def get_storages(caller, params):
    content = params.get("content")
    found = []
    for name, config in sorted(storage.storages().items()):
        if content not in (None, *config["content"]):
            continue
        if caller.allowed(f"/storage/{name}", ["Datastore.Audit", "Datastore.AllocateSpace"], any_of=True):
            total, used, available = storage.usage()
            found.append({
                "storage": name, "type": config["type"], "content": ",".join(sorted(config["content"])),
                "active": 1, "enabled": 1, "total": total, "used": used, "avail": available,
            })  # fmt: skip
    return found


def get_content(caller, params, name):
    caller.check(f"/storage/{name}", "Datastore.Audit", "Datastore.AllocateSpace", any_of=True)
    config = storage.storage(name)
    found = []
    if "vztmpl" in config["content"]:
        directory = storage.template_dir(name)
        for path in sorted(directory.glob("*")) if directory.exists() else []:
            found.append({"volid": f"{name}:vztmpl/{path.name}", "content": "vztmpl", "size": path.stat().st_size})
    return found


def get_aplinfo(caller, params):
    return [{"section": section, "template": template, "type": "lxc"} for section, template in storage.index()]


def post_aplinfo(caller, params):
    caller.check(f"/storage/{params['storage']}", "Datastore.AllocateTemplate")
    if params["template"] not in [template for _, template in storage.index()]:
        raise ApiError(400, "Parameter verification failed.", {"template": "no such template"})
    return task(
        "download", params["template"], caller, [TOOLS["pveam"], "download", params["storage"], params["template"]]
    )


def post_lxc(caller, params):
    vmid = params["vmid"]
    caller.check(f"/vms/{vmid}", "VM.Allocate")
    unprivileged = params.get("unprivileged", "0") == "1"
    if not unprivileged:
        caller.check("/", "Sys.Modify")
    template = params["ostemplate"]
    caller.check(f"/storage/{template.split(':')[0]}", "Datastore.AllocateSpace", "Datastore.Audit", any_of=True)
    options = {key: value for key, value in params.items() if key not in ("vmid", "ostemplate", "ssh-public-keys")}
    check_options(caller, vmid, options, unprivileged=unprivileged)
    command = [TOOLS["pct"], "create", vmid, template, *arguments(options)]
    keys = None
    if params.get("ssh-public-keys"):
        keys = tempfile.NamedTemporaryFile("w", suffix=".pub", delete=False)
        keys.write(params["ssh-public-keys"])
        keys.close()
        command += ["--ssh-public-keys", keys.name]
    return task("vzcreate", vmid, caller, command, cleanup=keys and (lambda: os.unlink(keys.name)))


def get_config(caller, params, vmid):
    config = container(vmid, caller, "VM.Audit").config()
    values = config.current if params.get("current") == "1" else config.merged()
    return typed(values) | {"digest": hashlib.sha1(json.dumps(values, sort_keys=True).encode()).hexdigest()}


def put_config(caller, params, vmid):
    ct = container(vmid, caller)
    values = {key: value for key, value in params.items() if key not in ("vmid", "node", "digest", "delete")}
    delete = [key for key in params.get("delete", "").split(",") if key]
    check_options(caller, vmid, values, delete, unprivileged=ct.unprivileged)
    pct.pct_set(vmid, *arguments(values), *([f"--delete={','.join(delete)}"] if delete else []))


def get_pending(caller, params, vmid):
    config = container(vmid, caller, "VM.Audit").config()
    rows = []
    for key in sorted(set(config.current) | set(config.pending)):
        row = {"key": key}
        if key in config.current:
            row["value"] = config.current[key]
        if key in config.pending:
            row["pending"] = config.pending[key]
        if key in config.delete:
            row["delete"] = 1
        rows.append(row)
    return rows


def get_status(caller, params, vmid):
    ct = container(vmid, caller, "VM.Audit")
    return {"vmid": int(vmid), "status": ct.state(), "name": ct.values.get("hostname", ""), "type": "lxc"}


def post_status(caller, params, vmid, action):
    container(vmid, caller, "VM.PowerMgmt")
    timeout = [f"--timeout={params['timeout']}"] if params.get("timeout") else []
    if action == "shutdown" and params.get("forceStop") == "1":
        action = "stop"
    return task(f"vz{action}", vmid, caller, [TOOLS["pct"], action, vmid, *timeout])


def delete_lxc(caller, params, vmid):
    container(vmid, caller, "VM.Allocate")
    flags = [f"--{key}={params[key]}" for key in ("purge", "force") if key in params]
    return task("vzdestroy", vmid, caller, [TOOLS["pct"], "destroy", vmid, *flags])


def get_interfaces(caller, params, vmid):
    return container(vmid, caller, "VM.Audit").interfaces()


def get_task_status(caller, params, upid):
    record = task_record(upid)
    if record["status"] is None:
        return {"upid": upid, "status": "running", "node": NODE}
    return {"upid": upid, "status": "stopped", "exitstatus": record["status"], "node": NODE}


def get_task_log(caller, params, upid):
    lines = task_record(upid)["log"].splitlines()
    return [{"n": number, "t": line} for number, line in enumerate(lines, 1)]


def firewall_options(caller, params, vmid=None):
    if vmid is None:
        caller.check("/", "Sys.Audit")
        return firewall.load("cluster")[0]
    container(vmid, caller, "VM.Audit")
    return firewall.load(vmid)[0]


def put_firewall_options(caller, params, vmid):
    container(vmid, caller, "VM.Config.Network")
    settings, rules = firewall.load(vmid)
    for key in [key for key in params.get("delete", "").split(",") if key]:
        settings.pop(key, None)
    settings.update({key: value for key, value in params.items() if key not in ("delete", "digest")})
    firewall.save(vmid, settings, rules)


def get_rules(caller, params, vmid, pos=None):
    container(vmid, caller, "VM.Audit")
    rules = [rule | {"pos": number} for number, rule in enumerate(firewall.load(vmid)[1])]
    return rules if pos is None else rules[int(pos)]


def post_rule(caller, params, vmid):
    """pve-firewall's create_rule: a new rule is disabled unless `enable 1`, and goes
    first unless `pos` says where."""
    container(vmid, caller, "VM.Config.Network")
    missing = {key: "property is missing and it is not optional" for key in ("type", "action") if key not in params}
    if missing:
        raise ApiError(400, "Parameter verification failed.", missing)
    settings, rules = firewall.load(vmid)
    rule = {key: value for key, value in params.items() if key not in ("pos", "digest")}
    rule.setdefault("enable", 0)
    rules.insert(int(params.get("pos", 0)), rule)
    firewall.save(vmid, settings, rules)


def delete_rule(caller, params, vmid, pos):
    container(vmid, caller, "VM.Config.Network")
    settings, rules = firewall.load(vmid)
    del rules[int(pos)]
    firewall.save(vmid, settings, rules)


VMID = r"(\d+)"
ROUTES = [
    ("GET", r"/version", get_version),
    ("GET", r"/nodes", get_nodes),
    ("GET", r"/cluster/resources", get_resources),
    ("GET", r"/cluster/firewall/options", firewall_options),
    ("GET", r"/nodes/[^/]+/storage", get_storages),
    ("GET", r"/nodes/[^/]+/storage/([^/]+)/content", get_content),
    ("GET", r"/nodes/[^/]+/aplinfo", get_aplinfo),
    ("POST", r"/nodes/[^/]+/aplinfo", post_aplinfo),
    ("POST", r"/nodes/[^/]+/lxc", post_lxc),
    ("DELETE", rf"/nodes/[^/]+/lxc/{VMID}", delete_lxc),
    ("GET", rf"/nodes/[^/]+/lxc/{VMID}/config", get_config),
    ("PUT", rf"/nodes/[^/]+/lxc/{VMID}/config", put_config),
    ("GET", rf"/nodes/[^/]+/lxc/{VMID}/pending", get_pending),
    ("GET", rf"/nodes/[^/]+/lxc/{VMID}/status/current", get_status),
    ("POST", rf"/nodes/[^/]+/lxc/{VMID}/status/(start|stop|shutdown|reboot)", post_status),
    ("GET", rf"/nodes/[^/]+/lxc/{VMID}/interfaces", get_interfaces),
    ("GET", rf"/nodes/[^/]+/lxc/{VMID}/firewall/options", firewall_options),
    ("PUT", rf"/nodes/[^/]+/lxc/{VMID}/firewall/options", put_firewall_options),
    ("GET", rf"/nodes/[^/]+/lxc/{VMID}/firewall/rules", get_rules),
    ("POST", rf"/nodes/[^/]+/lxc/{VMID}/firewall/rules", post_rule),
    ("GET", rf"/nodes/[^/]+/lxc/{VMID}/firewall/rules/(\d+)", get_rules),
    ("DELETE", rf"/nodes/[^/]+/lxc/{VMID}/firewall/rules/(\d+)", delete_rule),
    ("GET", r"/nodes/[^/]+/tasks/([^/]+)/status", get_task_status),
    ("GET", r"/nodes/[^/]+/tasks/([^/]+)/log", get_task_log),
]


def call(caller, method, path, params):
    """The data a route answers, or ApiError as the API reports it."""
    for route_method, pattern, handler in ROUTES:
        match = re.fullmatch(pattern, path.rstrip("/") or "/")
        if match and route_method == method:
            try:
                return handler(caller, params, *match.groups())
            except ParameterError as error:
                raise ApiError(400, "Parameter verification failed.", error.errors) from error
            except PveError as error:
                raise ApiError(500, str(error).splitlines()[0]) from error
    raise ApiError(501, f"Method '{method} {path}' not implemented")


# -- HTTPS ------------------------------------------------------------------------------


class Handler(BaseHTTPRequestHandler):
    def answer(self):
        url = urlsplit(self.path)
        if not url.path.startswith("/api2/json/"):
            return self.reply(404, {"data": None}, "Not Found")
        params = dict(parse_qsl(url.query))
        length = int(self.headers.get("Content-Length") or 0)
        if length:
            body = self.rfile.read(length).decode()
            pairs = parse_qsl(body, keep_blank_values=True)
            for key, value in pairs:  # a list arrives as the key repeated; Proxmox joins lists
                params[key] = f"{params[key]};{value}" if key in params and key == "tags" else value
        try:
            caller = caller_of(self.headers.get("Authorization"))
            data = call(caller, self.command, url.path.removeprefix("/api2/json"), params)
            self.reply(200, {"data": data})
        except ApiError as error:
            body = {"data": None} | ({"errors": error.errors} if error.errors else {})
            self.reply(error.status, body, str(error))

    def reply(self, status, body, reason=None):
        payload = json.dumps(body).encode()
        self.send_response(status, reason)
        self.send_header("Content-Type", "application/json;charset=UTF-8")
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)

    do_GET = do_POST = do_PUT = do_DELETE = answer

    def log_message(self, format, *args):
        print(f"{self.address_string()} {format % args}", flush=True)


def serve(address, certificate, key):
    """The API on address ('127.0.0.1', port) over HTTPS until killed."""
    server = ThreadingHTTPServer(address, Handler)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(certificate, key)
    server.socket = context.wrap_socket(server.socket, server_side=True)
    server.serve_forever()
