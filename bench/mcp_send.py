"""Scenario: the round trip of one MCP `send` tool call, as an agent's MCP client pays it,
over each transport of `agent-chat mcp`: stdio (a subprocess, as Warp or Claude Code runs
it) and Streamable HTTP on loopback (as an agent on another host reaches CT-950's :8081).
Beside them, in the same run, the floor they stand on: the same post made straight to the
broker (a keep-alive connection, no MCP)."""

import statistics
import time

import anyio

from brokers import Client, running_broker
from mcp_process import McpHttpProcess, http_session, stdio_session

CALLS = 300
WARM_UP = 20


def _percentile(values, share):
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(len(ordered) * share))]


async def _timed_sends(session, calls):
    rounds = []
    for n in range(WARM_UP + calls):
        started = time.perf_counter()
        result = await session.call_tool("send", {"channel": "bench-mcp", "message": f"tool call {n}"})
        elapsed = (time.perf_counter() - started) * 1000
        if result.is_error:
            raise RuntimeError(f"send failed: {result.content}")
        if n >= WARM_UP:
            rounds.append(elapsed)
    return rounds


def run(report, workdir, calls=CALLS):
    with running_broker(workdir, "mcp-send") as broker:
        direct = Client(broker.port)
        floor = []
        for n in range(WARM_UP + calls):
            started = time.perf_counter()
            direct.post_json("/messages/bench-mcp", {"sender": "bench-direct", "message": f"direct {n}"})
            if n >= WARM_UP:
                floor.append((time.perf_counter() - started) * 1000)
        direct.close()

        async def over_stdio():
            async with stdio_session(broker.url, agent="bench-mcp-stdio") as session:
                return await _timed_sends(session, calls)

        stdio = anyio.run(over_stdio)

        server = McpHttpProcess(broker.url, workdir).start()
        try:

            async def over_http():
                async with http_session(server.url, agent="bench-mcp-http") as session:
                    return await _timed_sends(session, calls)

            http = anyio.run(over_http)
        finally:
            server.stop()

    figures = {"direct": floor, "stdio": stdio, "http": http}
    report.details["mcp_send"] = {
        name: {"p50_ms": statistics.median(values), "p99_ms": _percentile(values, 0.99)}
        for name, values in figures.items()
    }
    floor_p50 = statistics.median(floor)
    for name, label in (("http", "Streamable HTTP"), ("stdio", "stdio")):
        values = figures[name]
        report.add(
            f"MCP send tool call over {label} (p50 of {calls})",
            statistics.median(values),
            "ms",
            15,
            at_least=False,
            note=f"p99 {_percentile(values, 0.99):.1f} ms; the post straight to the broker: p50 {floor_p50:.1f} ms",
        )
