"""Memory of a gunicorn process tree as the issue counts it: the proportional set size
(PSS, /proc/PID/smaps_rollup) summed over the master and its workers. PSS splits each
shared page among the processes that map it, so pages the workers share with the master
after the fork are counted once, not once per process as RSS would."""

import subprocess


def children(pid):
    out = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True)
    return [int(child) for child in out.stdout.split()]


def pss_kb(pid):
    with open(f"/proc/{pid}/smaps_rollup") as rollup:
        for line in rollup:
            if line.startswith("Pss:"):
                return int(line.split()[1])
    raise OSError(f"no Pss in /proc/{pid}/smaps_rollup")


def pss_by_process(master):
    """{pid: PSS in MB} for the master and each of its workers."""
    found = {}
    for pid in [master, *children(master)]:
        try:
            found[pid] = pss_kb(pid) / 1024
        except OSError:
            continue  # a worker that ended between listing and reading
    return found


def pss_mb(master):
    return sum(pss_by_process(master).values())
