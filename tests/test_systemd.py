"""What a running supervisor tells systemd, read off a real notify socket.

The README promises ``READY=1``, ``RELOADING=1``, ``STOPPING=1``, ``STATUS=``
and ``WATCHDOG=1`` sent by the supervisor itself: a real ``fireclaw-swarm up``
runs with ``$NOTIFY_SOCKET`` (and ``$WATCHDOG_USEC``) pointing at the test,
as systemd would start it.
"""

from __future__ import annotations

import signal
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from swarmctl import Swarm, role_yaml, swarm_yaml

#: The watchdog timeout the test asks for; the supervisor pings at half of it.
WATCHDOG_SECONDS = 2.0
#: Generous for a loaded machine: several watchdog periods.
DEADLINE = 30.0


@pytest.fixture
def swarm(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Swarm]:
    monkeypatch.setenv("WATCHDOG_USEC", str(int(WATCHDOG_SECONDS * 1_000_000)))
    monkeypatch.delenv("WATCHDOG_PID", raising=False)
    swarm = Swarm(tmp_path, swarm_yaml(role_yaml("worker", min_idle=1)))
    try:
        yield swarm
    finally:
        swarm.close()


def _fields(message: str) -> dict[str, str]:
    return dict(line.split("=", 1) for line in message.split("\n") if "=" in line)


def test_ready_status_watchdog_reloading_and_stopping(swarm: Swarm) -> None:
    swarm.start()
    # Readiness came (start() waited for READY=1); the status line follows it.
    status = _fields(swarm.wait_notify("STATUS=" + _status_of(swarm), DEADLINE))
    assert "idle" in status["STATUS"]

    # The watchdog is pinged again and again from the running loop.
    first = time.monotonic()
    swarm.wait_notify("WATCHDOG=1", DEADLINE)
    swarm.wait_notify("WATCHDOG=1", DEADLINE)
    assert time.monotonic() - first < DEADLINE

    # A reload says RELOADING=1 with the monotonic time systemd needs, then READY=1.
    assert swarm.proc is not None
    before = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    swarm.proc.send_signal(signal.SIGHUP)
    reloading = _fields(swarm.wait_notify("RELOADING=1", DEADLINE))
    after = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    assert before <= int(reloading["MONOTONIC_USEC"]) <= after
    swarm.wait_notify("READY=1", DEADLINE)

    # A file that does not load: still READY (it keeps running), and the status says why.
    swarm.config.write_text("version: 1\nroles: {worker: {pool: {min_idle: -1}}}\n")
    swarm.proc.send_signal(signal.SIGHUP)
    swarm.wait_notify("RELOADING=1", DEADLINE)
    rejected = _fields(swarm.wait_notify("READY=1", DEADLINE))
    assert rejected["STATUS"].startswith("reload rejected: ")
    assert "roles.worker.pool.min_idle" in rejected["STATUS"]

    # A graceful stop says STOPPING=1 before the fleet goes.
    swarm.proc.send_signal(signal.SIGTERM)
    swarm.wait_notify("STOPPING=1", DEADLINE)
    assert swarm.stop() == 0


def _status_of(swarm: Swarm) -> str:
    """The status line the supervisor shows for its fleet as it is now."""
    roles = swarm.wait_for("the pool filled", lambda st: st["roles"]["worker"]["idle"] == 1)
    assert roles["roles"]["worker"]["failed"] == 0
    return "1 idle, 0 active, 0 failed"
