"""Benchmark of the model gateway: what it adds to a model call, and tokens per second.

On this machine, with the real managed model server (xllamacpp serving the
bundled SmolLM2-135M, 2 threads) and one gateway on loopback in front of it
(its ledger in a real state database in a temporary directory):

1. Added latency. ``N`` pairs of identical chat completions (``max_tokens: 1``,
   a fixed prompt, so the server's prompt cache makes every call alike), one
   straight to the model server and one through the gateway, interleaved so
   that load on the machine hits both alike. Reported: p50 and p99 of each and
   of the difference per pair. The direct calls are the floor.
2. ``GET /v1/models`` the same way: the gateway's cost without any model work.
3. Tokens per second: one longer completion through the gateway, its
   completion tokens (as the ledger recorded them) over its wall time.

Run: ``.venv/bin/python bench/gateway.py [N]`` (default 40).
"""

from __future__ import annotations

import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import h11
import trio
from fireclaw.config.llm import BudgetSpec, ManagedModelSpec
from fireclaw.pool.gateway import serve_gateway
from fireclaw.pool.gateway_core import ModelRoute, Upstream, Who
from fireclaw.supervisor.budget import Budgets
from fireclaw.supervisor.modelserver import ManagedModelServer
from fireclaw.supervisor.state import Store

PROMPT = {"messages": [{"role": "user", "content": "Say hi"}], "max_tokens": 1}


async def call(port: int, method: str, path: str, body: object = None) -> tuple[float, bytes]:
    data = json.dumps(body).encode() if body is not None else b""
    started = time.perf_counter()
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    async with stream:
        conn = h11.Connection(h11.CLIENT)
        head = [("Host", "bench"), ("Content-Length", str(len(data))), ("Connection", "close")]
        await stream.send_all(
            conn.send(h11.Request(method=method, target=path, headers=head))
            + conn.send(h11.Data(data=data))
            + conn.send(h11.EndOfMessage())
        )
        got = b""
        while True:
            event = conn.next_event()
            if event is h11.NEED_DATA:
                conn.receive_data(await stream.receive_some(65536))
            elif isinstance(event, h11.Response):
                assert event.status_code == 200, event
            elif isinstance(event, h11.Data):
                got += event.data
            elif isinstance(event, h11.EndOfMessage | h11.ConnectionClosed):
                return time.perf_counter() - started, got


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def report(name: str, direct: list[float], gateway: list[float]) -> None:
    added = [g - d for d, g in zip(direct, gateway, strict=True)]
    ms = 1000.0
    print(
        f"{name}: direct p50 {pct(direct, 0.5) * ms:.1f} ms p99 {pct(direct, 0.99) * ms:.1f} ms;"
        f" through the gateway p50 {pct(gateway, 0.5) * ms:.1f} ms"
        f" p99 {pct(gateway, 0.99) * ms:.1f} ms;"
        f" added per call p50 {statistics.median(added) * ms:.2f} ms"
        f" p99 {pct(added, 0.99) * ms:.2f} ms"
    )


async def main(n: int) -> None:
    with tempfile.TemporaryDirectory() as tmp, Store.open(Path(tmp) / "swarm.db") as store:
        server = ManagedModelServer(ManagedModelSpec(threads=2, ctx=2048), None, Path(tmp))
        budgets = Budgets(BudgetSpec(), store)
        async with trio.open_nursery() as nursery:
            url = await nursery.start(server.run)
            host, port = url.removeprefix("http://").removesuffix("/v1").rsplit(":", 1)
            up = Upstream("http", host, int(port), "/v1")
            listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
            who = Who(vm="bench-0", role="bench", model="smollm2")
            nursery.start_soon(
                serve_gateway, listeners[0], who, ModelRoute(upstream=lambda: up, meter=budgets)
            )
            gw = listeners[0].socket.getsockname()[1]
            await call(up.port, "POST", "/v1/chat/completions", PROMPT)  # warm the cache
            for name, method, path, body in (
                ("chat completion, 1 token", "POST", "/v1/chat/completions", PROMPT),
                ("GET /v1/models", "GET", "/v1/models", None),
            ):
                direct, through = [], []
                for _ in range(n):
                    direct.append((await call(up.port, method, path, body))[0])
                    through.append((await call(gw, method, path, body))[0])
                report(name, direct, through)
            long = {"messages": [{"role": "user", "content": "Tell a story."}], "max_tokens": 64}
            seconds, _ = await call(gw, "POST", "/v1/chat/completions", long)
            last = store.calls(limit=10_000)[-1]
            print(
                f"tokens per second through the gateway: {last.completion_tokens / seconds:.1f}"
                f" ({last.completion_tokens} completion tokens in {seconds:.2f} s,"
                f" {last.prompt_tokens} prompt tokens, counts from the server's usage)"
            )
            print(f"ledger rows written: {len(store.calls(limit=10_000))}")
            nursery.cancel_scope.cancel()


if __name__ == "__main__":
    trio.run(main, int(sys.argv[1]) if len(sys.argv) > 1 else 40)
