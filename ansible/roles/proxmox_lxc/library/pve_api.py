#!/usr/bin/python
"""One call of the Proxmox VE API with an API token, for what community.proxmox's modules
do not cover (a container's pending changes, storages by content, the appliance index,
firewall options and rules, interfaces) or do coarsely (a config update that sends only
what differs). The token's secret is a no_log parameter, so it never shows in output."""

import json
from urllib.error import HTTPError, URLError
from urllib.parse import quote, urlencode

from ansible.module_utils.basic import AnsibleModule
from ansible.module_utils.urls import open_url

DOCUMENTATION = r"""
module: pve_api
short_description: Call the Proxmox VE API (/api2/json) with an API token
options:
  api_host: {type: str, required: true, description: The node's address.}
  api_port: {type: int, default: 8006, description: The API's port.}
  api_user: {type: str, required: true, description: The token's user, such as ansible@pve.}
  api_token_id: {type: str, required: true, description: The token's name.}
  api_token_secret: {type: str, required: true, no_log: true, description: The token's secret.}
  validate_certs: {type: bool, default: false, description: Verify the node's certificate.}
  method: {type: str, default: GET, choices: [GET, POST, PUT, DELETE], description: The HTTP method.}
  path: {type: str, required: true, description: The path below /api2/json, such as /nodes/pve/lxc/950/config.}
  params: {type: dict, default: {}, description: Query parameters (GET, DELETE) or form fields (POST, PUT).}
  missing_ok:
    type: bool
    default: false
    description: "Return data: null instead of failing when the container does not exist."
"""

RETURN = r"""
data: {description: What the API answered (its "data"), type: raw, returned: always}
"""


def call(module):
    params = module.params
    path = params["path"] if params["path"].startswith("/") else "/" + params["path"]
    url = f"https://{params['api_host']}:{params['api_port']}/api2/json{quote(path)}"
    fields = {key: value for key, value in params["params"].items() if value is not None}
    body = None
    if params["method"] in ("GET", "DELETE") and fields:
        url += "?" + urlencode(fields)
    elif fields:
        body = urlencode(fields)
    headers = {
        "Authorization": f"PVEAPIToken={params['api_user']}!{params['api_token_id']}={params['api_token_secret']}",
        "Content-Type": "application/x-www-form-urlencoded",
    }
    try:
        response = open_url(
            url,
            data=body,
            headers=headers,
            method=params["method"],
            validate_certs=params["validate_certs"],
            timeout=60,
        )
        return json.loads(response.read() or b"{}").get("data")
    except HTTPError as error:
        try:
            answer = json.loads(error.read() or b"{}")
        except ValueError:
            answer = {}
        message = f"{params['method']} {path}: {error.code} {error.reason}"
        if answer.get("errors"):
            message += " (" + "; ".join(f"{key}: {text}" for key, text in sorted(answer["errors"].items())) + ")"
        if params["missing_ok"] and "does not exist" in str(error.reason):
            return None
        module.fail_json(msg=message, status=error.code)
    except URLError as error:
        module.fail_json(msg=f"{params['method']} {url}: the node's API cannot be reached: {error.reason}")


def main():
    module = AnsibleModule(
        argument_spec={
            "api_host": {"type": "str", "required": True},
            "api_port": {"type": "int", "default": 8006},
            "api_user": {"type": "str", "required": True},
            "api_token_id": {"type": "str", "required": True},
            "api_token_secret": {"type": "str", "required": True, "no_log": True},
            "validate_certs": {"type": "bool", "default": False},
            "method": {"type": "str", "default": "GET", "choices": ["GET", "POST", "PUT", "DELETE"]},
            "path": {"type": "str", "required": True},
            "params": {"type": "dict", "default": {}},
            "missing_ok": {"type": "bool", "default": False},
        },
        supports_check_mode=True,
    )
    if module.check_mode and module.params["method"] != "GET":
        module.exit_json(changed=True, data=None)
    data = call(module)
    module.exit_json(changed=module.params["method"] != "GET", data=data)


if __name__ == "__main__":
    main()
