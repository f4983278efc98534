"""The Proxmox firewall's files for a container (/etc/pve/firewall/<vmid>.fw) and for the
cluster (cluster.fw), read and written as pve-firewall's src/PVE/Firewall.pm does:
[OPTIONS] as `key: value` lines, [RULES] as `IN ACCEPT -source ... -p tcp -dport 8080
-log nolog # comment`, a disabled rule starting with '|'. Recorded, not enforced."""

import re
import shlex

from .node import STATE

FIREWALL = STATE / "firewall"
RULE_FLAGS = [("iface", "-i"), ("source", "-source"), ("dest", "-dest"), ("proto", "-p"), ("dport", "-dport"),
              ("sport", "-sport"), ("log", "-log"), ("icmp-type", "-icmp-type")]  # fmt: skip


def path(name):
    return FIREWALL / f"{name}.fw"


def rule_line(rule):
    line = "|" if str(rule.get("enable", "1")) == "0" else ""
    action = f"{rule['macro']}({rule['action']})" if rule.get("macro") else rule["action"]
    line += f"{rule['type'].upper()} {action}"
    for key, flag in RULE_FLAGS:
        if rule.get(key) not in (None, ""):
            line += f" {flag} {rule[key]}"
    if rule.get("comment"):
        line += f" # {rule['comment']}"
    return line


def parse_rule(line):
    rule = {"enable": 0 if line.startswith("|") else 1}
    line, _, comment = line.lstrip("|").partition(" # ")
    words = shlex.split(line)
    rule["type"] = words.pop(0).lower()
    action = words.pop(0)
    macro = re.fullmatch(r"(\w+)\((\w+)\)", action)
    rule["action"] = macro.group(2) if macro else action
    if macro:
        rule["macro"] = macro.group(1)
    flags = {flag: key for key, flag in RULE_FLAGS}
    while words:
        flag, value = words.pop(0), words.pop(0)
        rule[flags[flag]] = value
    if comment:
        rule["comment"] = comment
    return rule


def load(name):
    """({option: value}, [rule, ...]) of a firewall file; empty if there is none."""
    settings, rules, section = {}, [], None
    if path(name).exists():
        for line in path(name).read_text().splitlines():
            if re.fullmatch(r"\[\w+\]", line.strip()):
                section = line.strip()
            elif line.strip() and section == "[OPTIONS]":
                key, _, value = line.partition(":")
                settings[key.strip()] = value.strip()
            elif line.strip() and section == "[RULES]":
                rules.append(parse_rule(line.strip()))
    return settings, rules


def save(name, settings, rules):
    FIREWALL.mkdir(parents=True, exist_ok=True)
    lines = ["[OPTIONS]", "", *(f"{key}: {value}" for key, value in settings.items()), "", "[RULES]", ""]
    path(name).write_text("\n".join(lines + [rule_line(rule) for rule in rules]) + "\n")


def remove(vmid):
    path(vmid).unlink(missing_ok=True)
