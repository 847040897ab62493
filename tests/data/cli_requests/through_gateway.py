"""Run one coding-agent CLI, as its spec starts it, through a real gateway.

    python through_gateway.py CLI UPSTREAM_PORT WORKSPACE OUT PROMPT [BUDGET]

Opens the model gateway (``serve_gateway``, as a VM's) on a free loopback port
in front of the model server at 127.0.0.1:UPSTREAM_PORT, for a VM ``coder-0``
of role ``coder`` whose model is ``smollm2``, with its ledger in
WORKSPACE/ledger.db and, given BUDGET, a limit of that many tokens a day for the
role. Then runs ``SPECS[CLI].invocation(PROMPT, ...)`` with that gateway, as
tests/data/cli_streams/record.py does (its files written, its state dirs made,
stdin from /dev/null, only ``PATH``, ``LANG`` and the spec's environment, plus
the JSON object in ``$EXTRA_ENV`` if set), saves its stdout to OUT, and prints
its exit code, the ledger's rows and the events the spec reads from OUT. The
CLI must be on ``PATH``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import IO

import trio
from fireclaw.config.llm import BudgetSpec
from fireclaw.guest_daemon.clis import SPECS
from fireclaw.pool.gateway import serve_gateway
from fireclaw.pool.gateway_core import ModelRoute, Upstream, Who
from fireclaw.supervisor.budget import Budgets
from fireclaw.supervisor.state import Store

#: Given the gateway's URL: the CLI's argv, environment, directory, stdout and stderr.
Prepare = Callable[[str], tuple[list[str], dict[str, str], str, IO[bytes], IO[bytes]]]
#: Seconds a run may take (a loaded 2-core machine reads prompts at ~20 tokens/s).
RUN_TIMEOUT = 900


def prepare(
    cli: str, workspace: str, prompt: str, gateway: str
) -> tuple[list[str], dict[str, str]]:
    spec = SPECS[cli]
    run = spec.invocation(prompt, workspace=workspace, model="smollm2", gateway=gateway)
    for path in spec.state_env(workspace).values():
        Path(path).mkdir(parents=True, exist_ok=True)
    for name, body in run.files.items():
        Path(name).parent.mkdir(parents=True, exist_ok=True)
        Path(name).write_text(body, encoding="utf-8")
    env = {"PATH": os.environ["PATH"], "LANG": "C.UTF-8", **run.env}
    env.update(json.loads(os.environ.get("EXTRA_ENV") or "{}"))
    return list(run.argv), env


async def run(store: Store, limits: BudgetSpec, port: int, argv_of: Prepare) -> None:
    upstream = Upstream("http", "127.0.0.1", port, "/v1")
    route = ModelRoute(upstream=lambda: upstream, meter=Budgets(limits, store))
    who = Who(vm="coder-0", role="coder", agent="alice", task=1, model="smollm2")
    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    argv, env, cwd, stdout, stderr = argv_of(
        f"http://127.0.0.1:{listeners[0].socket.getsockname()[1]}"
    )
    async with trio.open_nursery() as nursery:
        nursery.start_soon(serve_gateway, listeners[0], who, route)
        started = time.monotonic()
        with trio.move_on_after(RUN_TIMEOUT):
            done = await trio.run_process(
                argv,
                cwd=cwd,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=stdout,
                stderr=stderr,
                check=False,
            )
            print(f"exit {done.returncode} after {time.monotonic() - started:.0f} s")
        nursery.cancel_scope.cancel()


def main(cli: str, port: str, workspace: str, out: str, prompt: str, *budget: str) -> None:
    Path(workspace).mkdir(parents=True, exist_ok=True)
    limits = BudgetSpec(roles={"coder": int(budget[0])}) if budget else BudgetSpec()
    with (
        Store.open(Path(workspace) / "ledger.db") as store,
        open(out, "wb") as stdout,
        open(out + ".err", "wb") as stderr,
    ):

        def argv_of(gateway: str) -> tuple[list[str], dict[str, str], str, IO[bytes], IO[bytes]]:
            argv, env = prepare(cli, workspace, prompt, gateway)
            return argv, env, workspace, stdout, stderr

        trio.run(run, store, limits, int(port), argv_of)
        for call in store.calls():
            print(
                f"ledger: {call.model} prompt {call.prompt_tokens} completion"
                f" {call.completion_tokens} {call.outcome} {call.duration:.1f} s"
            )
    parser = SPECS[cli].parser()
    for event in parser.feed(Path(out).read_bytes()) + parser.close():
        print(repr(event))


if __name__ == "__main__":
    if len(sys.argv) not in (6, 7):
        print(__doc__, file=sys.stderr)
        sys.exit(2)
    main(*sys.argv[1:])
