"""Crash-only restart with the shipped IRC config: managed ngircd on.

A real ``fireclaw-swarm up`` in a subprocess (tests/swarmctl.py), its irc
section taken from the shipped swarm.yaml with only the port changed (6667
may be in use by a parallel test), is killed with SIGKILL. Its ngircd lives
on, holding the port. The next ``up`` on the same state dir must stop that
copy and serve with its own; ``doctor`` must name it and ``gc`` remove it.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml
from fireclaw.pool.procid import ProcessIdentity, process_identity, still_running
from fireclaw.pool.runtime import instance_id
from fireclaw.supervisor import ircd, leftovers, services
from fireclaw.supervisor.state import ServiceRecord, Store
from swarmctl import FIRECLAW, NOTHING, Swarm, idle, role_yaml, swarm_yaml

SHIPPED = Path(__file__).resolve().parent.parent / "swarm.yaml"
BOOT_TIMEOUT = 20.0  # swarmctl's control.boot_timeout
#: Up to READY after a kill -9: stopping the old ngircd (TERM, then KILL), the new
#: one's start, a VM's boot; doubled for a loaded machine.
START_DEADLINE = 2 * (
    services.TERM_TIMEOUT + services.KILL_TIMEOUT + ircd.START_TIMEOUT + BOOT_TIMEOUT
)
IRC_DEADLINE = 3 * ircd.START_TIMEOUT
CLI_DEADLINE = 60.0

NGIRCD = shutil.which("ngircd", path=os.environ.get("PATH", "") + ":/usr/sbin:/sbin")
pytestmark = pytest.mark.skipif(NGIRCD is None, reason="ngircd is not installed")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def shipped_irc(port: int) -> str:
    """The shipped irc section, on ``port``: as flow YAML (JSON) for swarm_yaml."""
    irc = yaml.safe_load(SHIPPED.read_text())["irc"]
    assert irc["enabled"] is True and irc["server"] == "managed"  # what users run
    irc["managed"]["port"] = port
    return json.dumps(irc)


def serves(port: int) -> None:
    """An IRC client registers with the server on ``port`` (or the test fails)."""
    deadline = time.monotonic() + IRC_DEADLINE
    with socket.create_connection(("127.0.0.1", port), timeout=IRC_DEADLINE) as conn:
        conn.sendall(b"NICK person\r\nUSER person 0 * :A person\r\n")
        received = b""
        while b" 001 person " not in received:
            conn.settimeout(max(0.01, deadline - time.monotonic()))
            data = conn.recv(4096)
            assert data, f"closed before 001: {received!r}"
            received += data


def ircd_pid(swarm: Swarm) -> int:
    managed = swarm.status()["irc"]["managed"]
    assert managed["state"] == "running", managed
    pid = managed["pid"]
    assert isinstance(pid, int)
    return pid


@pytest.fixture
def swarm(tmp_path: Path) -> Iterator[Swarm]:
    port = free_port()
    swarm = Swarm(tmp_path, swarm_yaml(role_yaml("worker", min_idle=1), irc=shipped_irc(port)))
    swarm.irc_port = port  # type: ignore[attr-defined]
    try:
        yield swarm
    finally:
        swarm.close()
        # A failed test must not leave a swarm of its own behind (this instance only).
        with contextlib.suppress(Exception):
            leftovers.remove(leftovers.find(swarm.state))


def killed(swarm: Swarm, *, deadline: float = START_DEADLINE) -> ProcessIdentity:
    """Start the swarm, check its ngircd serves, kill -9 the supervisor; the
    identity of the ngircd it leaves running."""
    swarm.start(timeout=deadline)
    swarm.wait_for("an idle worker", idle("worker", 1), timeout=deadline)
    port: int = swarm.irc_port  # type: ignore[attr-defined]
    serves(port)
    ident = process_identity(ircd_pid(swarm))
    assert ident is not None
    swarm.kill9()
    # What the defect was made of: its ngircd outlives it and holds the port.
    assert still_running(ident)
    with Store.open(swarm.state / "swarm.db") as store:
        (row,) = store.services()
    assert (row.name, row.pid, row.start_time, row.boot_id) == (
        "ircd",
        ident.pid,
        ident.start_time,
        ident.boot_id,
    )
    assert row.address == f"127.0.0.1:{port}"
    return ident


def test_after_kill_9_the_next_up_stops_the_old_ngircd_and_serves(swarm: Swarm) -> None:
    old = killed(swarm)
    swarm.start(timeout=START_DEADLINE)  # READY: before, "Address already in use"
    restarted(swarm, old)


def restarted(swarm: Swarm, old: ProcessIdentity) -> None:
    """After the next start: the old ngircd was stopped, a new one serves and is
    the only one registered; a graceful stop then leaves nothing."""
    assert not still_running(old)
    new = process_identity(ircd_pid(swarm))
    assert new is not None and new != old
    serves(swarm.irc_port)  # type: ignore[attr-defined]
    with Store.open(swarm.state / "swarm.db") as store:
        assert [(r.name, r.pid) for r in store.services()] == [("ircd", new.pid)]
        reclaimed = [e for e in store.events(limit=10_000) if e.kind == "reclaimed"]
    ircd_reclaimed = [(e.detail["pid"], e.detail["how"]) for e in reclaimed if e.subject == "ircd"]
    assert ircd_reclaimed == [(old.pid, "terminated")]

    assert swarm.stop() == 0
    assert not still_running(new)
    assert leftovers.find(swarm.state).items() == []  # no process, no registry row
    assert swarm.leftovers() == NOTHING


def test_a_copy_whose_pid_was_never_recorded_is_found_by_its_command_line(
    swarm: Swarm,
) -> None:
    old = killed(swarm)
    # As if the supervisor had died between the row written ahead and the spawn's record.
    with Store.open(swarm.state / "swarm.db") as store:
        (row,) = store.services()
        store.put_service(ServiceRecord(name=row.name, command=row.command, address=row.address))
    swarm.start(timeout=START_DEADLINE)
    assert not still_running(old)
    serves(swarm.irc_port)  # type: ignore[attr-defined]
    removed = f"removed process {old.pid} (ngircd, service ircd of {swarm.state})"
    assert f"{removed}, left by a previous supervisor" in swarm.log.read_text()
    assert swarm.stop() == 0
    assert leftovers.find(swarm.state).items() == []


def test_doctor_names_a_dead_supervisors_ngircd_and_gc_removes_it(
    swarm: Swarm, tmp_path: Path
) -> None:
    old = killed(swarm)
    ngircd_line = f"process {old.pid} (ngircd, service ircd of {swarm.state})"
    row_line = f"registry row service ircd (pid {old.pid})"

    doctor = swarm.cli("doctor", "--config", str(swarm.config), timeout=CLI_DEADLINE)
    out = doctor.stdout.decode()
    assert doctor.returncode == 1, out + doctor.stderr.decode()
    assert "supervisor    not running" in out
    assert f"              {ngircd_line}\n" in out
    assert f"              {row_line}\n" in out

    # Another swarm's doctor knows it by name alone: its command line names the state dir.
    other = subprocess.run(
        [FIRECLAW, "--state-dir", str(tmp_path / "elsewhere"), "doctor"]
        + ["--config", str(swarm.config)],
        capture_output=True,
        timeout=CLI_DEADLINE,
    )
    other_out = other.stdout.decode()
    assert other.returncode == 1, other_out
    assert f"{instance_id(swarm.state)}: supervisor not found," in other_out
    assert f"                {ngircd_line}\n" in other_out

    gc = swarm.cli("gc", "--config", str(swarm.config), timeout=CLI_DEADLINE)
    lines = gc.stdout.decode().splitlines()
    assert gc.returncode == 0, gc.stdout.decode() + gc.stderr.decode()
    assert f"removed {ngircd_line}" in lines
    assert f"removed {row_line}" in lines
    assert not still_running(old)
    with Store.open(swarm.state / "swarm.db") as store:
        assert store.services() == []

    doctor = swarm.cli("doctor", "--config", str(swarm.config), timeout=CLI_DEADLINE)
    out = doctor.stdout.decode()
    assert "leftovers     none" in out, out
    # Clean unless other swarms on this (shared) host have left something.
    others_left = "left over:" in out or "problem" in out
    assert doctor.returncode == (1 if others_left else 0), out


def test_a_foreign_program_on_the_port_is_still_named_as_such(swarm: Swarm) -> None:
    old = killed(swarm)
    assert services.stop(old) == "terminated"  # ours is gone; its row stays behind
    port: int = swarm.irc_port  # type: ignore[attr-defined]
    with socket.socket() as taken:
        taken.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        taken.bind(("127.0.0.1", port))
        taken.listen()
        up = swarm.cli("up", "--config", str(swarm.config), timeout=START_DEADLINE)
        errors = [
            line for line in up.stderr.decode().splitlines() if line.startswith("fireclaw-swarm:")
        ]
        assert up.returncode == 1
        assert len(errors) == 1, errors
        assert f"127.0.0.1:{port} did not start" in errors[0]
        assert "another program" in errors[0] and "has the port" in errors[0]
        # The listener was not ours to touch: it still accepts.
        with socket.create_connection(("127.0.0.1", port), timeout=IRC_DEADLINE):
            pass
    with Store.open(swarm.state / "swarm.db") as store:
        assert store.services() == []  # the stale row was dropped at start


# ---------------------------------------------------------------- real VMs


@pytest.fixture
def qemu_swarm(tmp_path: Path) -> Iterator[Swarm]:
    """The same on the qemu backend, its image from the shared test cache."""
    qemu = pytest.importorskip("test_qemu_swarm")
    if os.geteuid() != 0 or not shutil.which(qemu.QEMU):
        pytest.skip("real VMs need root and qemu-system-x86")
    port = free_port()
    swarm = Swarm(
        tmp_path,
        swarm_yaml(
            role_yaml("worker", min_idle=1, extra="resources: {memory_mib: 256}\n"),
            control=qemu.CONTROL,
            backend="qemu",
            network=qemu.network_yaml(),
            irc=shipped_irc(port),
        ),
    )
    swarm.irc_port = port  # type: ignore[attr-defined]
    swarm.state.mkdir(parents=True)
    qemu.TEST_CACHE.mkdir(parents=True, exist_ok=True)
    (swarm.state / "images").symlink_to(qemu.TEST_CACHE, target_is_directory=True)
    try:
        yield swarm
    finally:
        swarm.close()
        with contextlib.suppress(Exception):
            leftovers.remove(leftovers.find(swarm.state))


@pytest.mark.image
@pytest.mark.root
def test_after_kill_9_on_real_vms_the_next_up_serves_irc_again(qemu_swarm: Swarm) -> None:
    qemu = pytest.importorskip("test_qemu_swarm")
    # An image build (first run), a template boot and a restore under TCG.
    deadline = qemu.START_TIMEOUT + qemu.POOL_TIMEOUT
    old = killed(qemu_swarm, deadline=deadline)
    qemu_swarm.start(timeout=deadline)
    qemu_swarm.wait_for("an idle worker", idle("worker", 1), timeout=qemu.POOL_TIMEOUT)
    restarted(qemu_swarm, old)
