#!/usr/bin/env python3
"""The old entry point, kept so `python3 chat.py ...` and `python3 /opt/agent-comms/chat.py ...`
in existing scripts run agent-chat unchanged."""

import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
# From a checkout of the repository, the package is beside this file.
sys.path.insert(0, os.path.join(HERE, "src"))

try:
    from agent_comms_chat.cli import main
except ImportError:
    # Installed next to a virtualenv (as in /opt/agent-comms/venv), or in a checkout where
    # `make venv` made .venv: run with that Python.
    candidates = [os.path.join(HERE, "venv"), os.path.join(HERE, ".venv"), os.path.join(HERE, "..", ".venv")]
    for venv in candidates:
        python = os.path.join(venv, "bin", "python3")
        # Compare prefixes, not interpreters: on Debian venv/bin/python3 is a symlink to
        # /usr/bin/python3 itself, yet running through it is what activates the venv.
        if os.path.exists(python) and os.path.realpath(sys.prefix) != os.path.realpath(venv):
            os.execv(python, [python, os.path.abspath(__file__), *sys.argv[1:]])
    sys.exit("chat.py: agent-chat is not installed here: pip install ./client (from a checkout), or make venv")

sys.exit(main())
