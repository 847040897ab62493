"""Supervision promises end to end (README, "How it supervises"): a real supervisor
on the process backend, guests that exit, fail and refuse to stop.

- Exit code 78 (bad config) is fatal and never restarted.
- A role with more than half of its pool failed is degraded and pauses its refills.
- Stopping a VM is bounded: ask, wait grace_period, SIGTERM, wait term_timeout,
  SIGKILL; the fleet stops within fleet_deadline.
"""

from __future__ import annotations

import signal
import time
from pathlib import Path

from swarmctl import (
    BACKOFF_MAX,
    NOTHING,
    PY,
    gone,
    idle,
    pids,
    role_yaml,
    swarm_yaml,
)

HERE = Path(__file__).parent
CRASH = 'guest_command: ["sh", "-c", "exit 1"]\n'


def test_exit_78_is_fatal_and_never_restarted(make_swarm) -> None:  # type: ignore[no-untyped-def]
    bad = role_yaml("bad", extra='guest_command: ["sh", "-c", "exit 78"]\n')
    swarm = make_swarm(swarm_yaml(role_yaml("worker"), bad))
    st = swarm.wait_for("bad-0 failed", lambda s: s["roles"]["bad"]["failed"] == 1)
    (agent,) = swarm.agents("bad")
    assert (agent["state"], agent["pid"], agent["restarts"]) == ("failed", None, 0)
    assert "not restarted" in agent["reason"] and "78" in agent["reason"], agent["reason"]
    # Given many times the longest backoff in which a restart would have come: none.
    for seen in swarm.quiet_for(20 * BACKOFF_MAX):
        assert [(a["state"], a["restarts"]) for a in seen["agents"] if a["role"] == "bad"] == [
            ("failed", 0)
        ]
    (crashed,) = [e for e in swarm.events("crashed") if e["subject"] == "bad-0"]
    assert crashed["detail"]["exit_code"] == 78
    assert crashed["detail"]["restart"] is False
    assert [e["subject"] for e in swarm.events("failed")] == ["bad-0"]
    assert st["roles"]["worker"]["failed"] == 0


def test_a_degraded_role_pauses_its_refills(make_swarm) -> None:  # type: ignore[no-untyped-def]
    swarm = make_swarm(
        swarm_yaml(role_yaml("worker"), role_yaml("crasher", min_idle=2, extra=CRASH))
    )
    st = swarm.wait_for("crasher degraded", lambda s: s["roles"]["crasher"]["failed"] == 2)
    assert st["roles"]["crasher"]["degraded"] is True
    assert [e["subject"] for e in swarm.events("degraded")] == ["crasher"]

    # More VMs wanted: a healthy role would start two more at once; a degraded one waits.
    out = swarm.cli("scale", "crasher", "4")
    assert out.returncode == 0, out.stderr
    for seen in swarm.quiet_for(20 * BACKOFF_MAX):
        assert sorted(a["name"] for a in seen["agents"] if a["role"] == "crasher") == [
            "crasher-0",
            "crasher-1",
        ]
        assert seen["roles"]["crasher"]["target"] == 4
    # The pause was the degradation: once reset, the role refills to its new target.
    assert swarm.cli("reset", "crasher").returncode == 0
    swarm.wait_for(
        "crasher refilled to 4",
        lambda s: (
            {a["name"] for a in s["agents"] if a["role"] == "crasher"}
            >= {f"crasher-{n}" for n in range(4)}
        ),
    )


def test_a_deaf_guest_is_killed_within_grace_and_term_and_the_fleet_stops_in_time(
    make_swarm,  # type: ignore[no-untyped-def]
) -> None:
    grace, term, fleet = 2.0, 2.0, 30.0
    deaf = f'guest_command: ["{PY}", "{HERE / "hostile_guest.py"}", "deaf"]\n'
    swarm = make_swarm(
        swarm_yaml(
            role_yaml("worker", min_idle=1),
            role_yaml("deaf", min_idle=2, extra=deaf),
            stop=f"grace_period: {grace}\n  term_timeout: {term}\n  fleet_deadline: {fleet}",
        )
    )
    swarm.wait_for("all idle", lambda s: idle("deaf", 2)(s) and idle("worker", 1)(s))
    guests = pids(swarm, "deaf")
    worker = pids(swarm, "worker")

    started = time.monotonic()
    assert swarm.stop(signal.SIGTERM, timeout=2 * fleet + 10) == 0
    took = time.monotonic() - started
    print(f"fleet stop with deaf guests: {took:.2f} s (grace {grace} + term {term})")
    # The deaf guests ignored the Stop and SIGTERM: only SIGKILL ended them, and it
    # came after both waits, well inside the fleet deadline (which did not have to
    # cut anything short).
    assert all(gone(pid) for pid in [*guests.values(), *worker.values()])
    assert grace + term <= took < fleet, took
    assert "fleet did not stop within" not in swarm.tail(400)
    # The well-behaved worker said goodbye in the meantime.
    (last,) = (swarm.state / "logs" / "worker-0.log").read_text().splitlines()[-1:]
    assert last.endswith(" INFO stopped: supervisor stopping"), last
    assert swarm.leftovers() == NOTHING
