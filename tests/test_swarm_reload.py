"""Reload (SIGHUP) end to end: a real supervisor on the process backend, its config
file rewritten and the signal sent, the fleet watched through the status long-poll.

What a reload must do (README, "Reloading"): new roles start, removed roles
drain, a changed VM spec replaces the role's VMs one at a time, a changed model
or persona reaches working agents without a restart, and everything else, its
backoff state included, is left alone.
"""

from __future__ import annotations

import signal
import time
from pathlib import Path

from ircperson import Person
from swarmctl import (
    BACKOFF_MAX,
    ECHO,
    WAIT,
    Swarm,
    gone,
    idle,
    pids,
    role_yaml,
    swarm_yaml,
)
from test_swarm import free_port

AGENTS = "#agents"

CRASH = 'guest_command: ["sh", "-c", "exit 1"]\n'


def reload(swarm: Swarm, config_text: str) -> None:
    swarm.config.write_text(config_text)
    assert swarm.proc is not None
    swarm.proc.send_signal(signal.SIGHUP)


def guest_log(swarm: Swarm, vm: str) -> list[str]:
    return (swarm.state / "logs" / f"{vm}.log").read_text().splitlines()


def memory_limit_mib(pid: int) -> int:
    """The memory limit of the cgroup ``pid`` runs in, in MiB."""
    for line in Path(f"/proc/{pid}/cgroup").read_text().splitlines():
        _, controllers, path = line.split(":", 2)
        if "memory" in controllers.split(","):
            limit = Path("/sys/fs/cgroup/memory", path.lstrip("/"), "memory.limit_in_bytes")
            return int(limit.read_text()) // (1024 * 1024)
    raise AssertionError(f"pid {pid} is in no memory cgroup")


def test_a_new_role_starts_and_a_removed_one_drains(make_swarm) -> None:  # type: ignore[no-untyped-def]
    swarm = make_swarm(swarm_yaml(role_yaml("worker", min_idle=1), role_yaml("coder", min_idle=2)))
    swarm.wait_for("pools full", lambda s: idle("worker", 1)(s) and idle("coder", 2)(s))
    workers, coders = pids(swarm, "worker"), pids(swarm, "coder")

    reload(swarm, swarm_yaml(role_yaml("worker", min_idle=1), role_yaml("researcher", min_idle=2)))
    st = swarm.wait_for(
        "researchers up and coders gone",
        lambda s: (
            idle("researcher", 2)(s)
            and "coder" not in s["roles"]
            and not any(a["role"] == "coder" for a in s["agents"])
        ),
    )
    assert {a["name"] for a in st["agents"] if a["role"] == "researcher"} == {
        "researcher-0",
        "researcher-1",
    }
    # The removed role's VMs were drained: asked to stop, each said so, each is gone.
    for vm, pid in coders.items():
        assert gone(pid), vm
        assert guest_log(swarm, vm)[-1].endswith(" INFO stopped: role removed"), vm
    assert pids(swarm, "worker") == workers  # untouched
    (reloaded,) = swarm.events("reloaded")
    assert reloaded["detail"] == {"added": ["researcher"], "removed": ["coder"], "changed": []}
    assert swarm.events("crashed") == []


def test_a_changed_vm_spec_replaces_the_vms_one_at_a_time(make_swarm) -> None:  # type: ignore[no-untyped-def]
    min_idle = 3
    swarm = make_swarm(swarm_yaml(role_yaml("worker", min_idle=min_idle)))
    st = swarm.wait_for("pool full", idle("worker", min_idle))
    old = set(pids(swarm, "worker").values())
    isolated = st["isolation"]["cgroups"]
    if isolated:
        # Each VM's cgroup is sized from the role: memory_mib (the worker template's
        # 512) plus the VMM's own overhead.
        (limit,) = {memory_limit_mib(pid) for pid in old}
        overhead = limit - 512

    reload(
        swarm,
        swarm_yaml(role_yaml("worker", min_idle=min_idle, extra="resources: {memory_mib: 320}\n")),
    )
    seen = swarm.history(
        lambda s: (
            idle("worker", min_idle)(s)
            and not {a["pid"] for a in s["agents"]} & old
            and len(s["agents"]) == min_idle
        )
    )
    # Never fewer than min_idle - 1 idle while the role rolled over: one VM at a time.
    idle_counts = [s["roles"]["worker"]["idle"] for s in seen]
    assert min(idle_counts) >= min_idle - 1, idle_counts
    # And it did roll: old VMs were seen beside new ones on the way.
    left = [len({a["pid"] for a in s["agents"]} & old) for s in seen]
    assert any(0 < n < min_idle for n in left), left
    new = pids(swarm, "worker")
    if isolated:
        assert {memory_limit_mib(pid) for pid in new.values()} == {320 + overhead}
    (reloaded,) = swarm.events("reloaded")
    assert reloaded["detail"]["changed"] == ["worker"]
    assert swarm.events("crashed") == []
    for pid in old:
        assert gone(pid)


#: A harness that answers with the model and persona it was given.
WHOAMI = (
    "harness:\n"
    "  kind: command\n"
    """  command: ["sh", "-c", 'printf "%s / %s\\n" "$FIRECLAW_MODEL" "$FIRECLAW_PERSONA"']\n"""
)


def test_model_and_persona_reach_a_working_agent_without_a_restart(make_swarm) -> None:  # type: ignore[no-untyped-def]
    port = free_port()

    def config(model: str, persona: str) -> str:
        extra = f'model: "{model}"\npersona: "{persona}"\n' + WHOAMI
        return swarm_yaml(
            role_yaml("coder", min_idle=1, extra=extra),
            irc=f"server: managed\n  managed: {{port: {port}}}",
        )

    swarm = make_swarm(config("model-one", "Persona one."))
    op = Person(("127.0.0.1", port), "op").start(AGENTS)
    try:
        assert swarm.cli("invoke", "coder", "alice").returncode == 0
        op.expect(
            "alice joining",
            lambda e: e.type == "join" and e.source.nick == "alice" and e.target == AGENTS,
            timeout=WAIT,
        )
        (before,) = [a for a in swarm.status()["agents"] if a["agent"] == "alice"]
        assert before["state"] == "active"
        op.say(AGENTS, "alice: who are you?")
        op.said(AGENTS, "op: model-one / Persona one.", timeout=WAIT)

        reload(swarm, config("model-two", "Persona two."))
        vm = before["name"]
        swarm.wait_for(
            "alice re-identified",
            lambda s: any(e["subject"] == vm for e in swarm.events("hot_reloaded")),
        )
        # Her harness now runs with the new model and persona...
        op.say(AGENTS, "alice: and now?")
        op.said(AGENTS, "op: model-two / Persona two.", timeout=WAIT)
        assert any(
            line.endswith(" INFO re-identified as alice (role coder, model model-two)")
            for line in guest_log(swarm, vm)
        )
        # ...in the same VM, the same process, never restarted, never off IRC.
        (after,) = [a for a in swarm.status()["agents"] if a["agent"] == "alice"]
        assert (after["name"], after["pid"], after["state"], after["restarts"]) == (
            vm,
            before["pid"],
            "active",
            0,
        )
        assert not [e for e in op.seen if e.type == "quit" and e.source.nick == "alice"]
        assert swarm.events("crashed") == []
    finally:
        op.stop()


def test_a_reload_of_another_role_keeps_backoff_state(make_swarm) -> None:  # type: ignore[no-untyped-def]
    # crasher: fails for good after max_restarts; slow: waits a long backoff after
    # its first crash. Neither may be reset by a reload that does not touch them.
    config = [role_yaml("worker", min_idle=1), role_yaml("crasher", extra=CRASH)]
    slow = (
        """
  slow:
    template: worker
    pool: {min_idle: 1}
    restart: {stable_after: 600, backoff: {base: 3600, max: 3600}}
    """
        + ECHO
        + "    "
        + CRASH
    )
    swarm = make_swarm(swarm_yaml(*config, slow))
    swarm.wait_for(
        "crasher failed and slow in backoff",
        lambda s: s["roles"]["crasher"]["failed"] == 1 and s["roles"]["slow"]["backoff"] == 1,
    )
    (crasher,) = swarm.agents("crasher")
    assert (crasher["state"], crasher["restarts"]) == ("failed", 3)
    (slow_crash,) = [e for e in swarm.events("crashed") if e["subject"] == "slow-0"]
    delay = slow_crash["detail"]["delay"]
    assert delay > 0

    config[0] = role_yaml("worker", min_idle=2)
    reload(swarm, swarm_yaml(*config, slow))
    swarm.wait_for("2 idle workers", idle("worker", 2))
    (reloaded,) = swarm.events("reloaded")
    assert reloaded["detail"]["changed"] == ["worker"]
    # For many times the crasher's longest backoff (and never past the end of slow-0's
    # own delay, drawn with jitter): crasher-0 stays failed, slow-0 keeps waiting.
    remaining = slow_crash["at"] + delay - time.time()
    for seen in swarm.quiet_for(min(20 * BACKOFF_MAX, remaining - 1)):
        states = {a["name"]: (a["state"], a["restarts"]) for a in seen["agents"]}
        assert states["crasher-0"] == ("failed", 3)
        assert states["slow-0"] == ("backoff", 1)
    assert [e["subject"] for e in swarm.events("crashed")].count("slow-0") == 1
