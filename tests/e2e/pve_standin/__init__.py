"""Stand-ins for Proxmox VE 8's node tools, for the end-to-end tests only (never deployed):
`pct`, `pveam`, `pvesm` and `pvesh` (the commands the proxmox_lxc role and the
proxmox_pct_remote connection use) and the HTTPS API (what community.proxmox's modules
use), done the way Proxmox's own sources do them, on plain LXC.

Each module holds one part of the node:
- node.py       paths, errors, commands, Proxmox property strings
- storage.py    the node's storages (storage.cfg, volumes, templates) and the appliance index
- config.py     a container's Proxmox config: options, the pending section, hot-plugging
- container.py  a container on LXC: its LXC config, its files, its root file system
- pct.py, pveam.py, pvesm.py, pvesh.py   the commands
- api.py        /api2/json over HTTPS, on the same containers
- cli.py        what /usr/sbin/pct and the others run

What cannot be done here and is only recorded: VLAN tags, the Proxmox firewall's rules
(written as Proxmox writes them, not enforced), and AppArmor (this kernel has none, so a
container without nesting does not fail the way it does on a real node).
"""
