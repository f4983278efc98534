"""`agent-chat mcp` for tests: the real command as a subprocess, over stdio or Streamable
HTTP on a loopback port, and the MCP SDK's own client to talk to it."""

import contextlib
import os
import socket
import subprocess
import time
from pathlib import Path

import httpx2
from mcp import Client, StdioServerParameters
from mcp.client.streamable_http import streamable_http_client

from broker_process import BIN, free_port

CHAT = str(BIN / "agent-chat")


def chat_env(broker_url, **variables):
    """The environment of an agent-chat the tests start: this broker, no config file."""
    env = {
        "PATH": f"{BIN}:/usr/bin:/bin",
        "HOME": os.environ.get("HOME", "/root"),
        "AGENT_COMMS_BROKER": broker_url,
        "AGENT_COMMS_CONFIG": os.devnull,
    }
    # Keys and pinned keys under the test's own config directory (conftest sets it), never
    # the user's.
    if os.environ.get("XDG_CONFIG_HOME"):
        env["XDG_CONFIG_HOME"] = os.environ["XDG_CONFIG_HOME"]
    env.update({name: value for name, value in variables.items() if value is not None})
    return env


def stdio_session(broker_url, agent=None, token=None, **variables):
    """An MCP client of `agent-chat mcp` over stdio (enter it with `async with`)."""
    env = chat_env(broker_url, AGENT_COMMS_AGENT_ID=agent, AGENT_COMMS_TOKEN=token, **variables)
    return Client(StdioServerParameters(command=CHAT, args=["mcp"], env=env), read_timeout_seconds=90)


@contextlib.asynccontextmanager
async def http_session(url, token=None, agent=None, verify=True):
    """An MCP client of the Streamable HTTP server at `url` (…/mcp), sending these headers."""
    headers = {}
    if token is not None:
        headers["Authorization"] = f"Bearer {token}"
    if agent is not None:
        headers["X-Agent-ID"] = agent
    async with httpx2.AsyncClient(headers=headers, verify=verify, timeout=httpx2.Timeout(90)) as http:
        async with Client(streamable_http_client(url, http_client=http), read_timeout_seconds=90) as client:
            yield client


class McpHttpProcess:
    """`agent-chat mcp --http 127.0.0.1:PORT`, its output in a log file."""

    def __init__(self, broker_url, log_dir, extra_args=(), ca=None, env=None):
        self.port = free_port()
        self.args = [CHAT, "mcp", "--http", f"127.0.0.1:{self.port}", *extra_args]
        self.env = chat_env(broker_url, AGENT_COMMS_CA=ca, **(env or {}))
        scheme = "https" if "--tls-cert" in extra_args else "http"
        self.url = f"{scheme}://127.0.0.1:{self.port}/mcp"
        self.log_path = Path(log_dir) / f"mcp-{self.port}.log"
        self.process = None

    def start(self, timeout=20):
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(self.args, env=self.env, stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"agent-chat mcp exited with {self.process.returncode}:\n{self.log()}")
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
                return self
            except OSError:
                time.sleep(0.05)
        raise RuntimeError(f"agent-chat mcp did not listen on {self.port}:\n{self.log()}")

    def log(self):
        return self.log_path.read_text(errors="replace")

    def stop(self):
        if self.process and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
