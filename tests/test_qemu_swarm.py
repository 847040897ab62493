"""The swarm on real VMs: a real supervisor with ``backend: qemu`` (and ``auto``),
real QEMU microVMs under TCG (or KVM where a boot probe shows it works), the
real guest image, driven through the CLI and the API like an operator.

The image comes from the cache the other image tests share
(~/.cache/fireclaw/test-images), or is built into it: the state dir's
``images`` folder is a link there. Nothing here sleeps to wait for something.
"""

from __future__ import annotations

import json
import os
import queue
import secrets
import shutil
import signal
import statistics
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest
import trio
from fireclaw.pool.templates import RETRY_BASE
from ircd import ircd_server
from ircperson import Person
from swarmctl import NOTHING, Swarm, leftovers, role_yaml, swarm_yaml
from test_overseer import AGENTS, irc_yaml, joined, operator, overseer_in_channel
from test_overseer import CONTROL as CONTROL_CHANNEL
from test_swarm import free_port
from world import CONNECT, Server, world_namespace

TEST_CACHE = Path.home() / ".cache" / "fireclaw" / "test-images"
QEMU = "qemu-system-x86_64"
#: A first image build (about a minute) happens before READY=1.
START_TIMEOUT = 600.0
#: Booting the template and restoring three clones under TCG on a loaded 2-core host.
POOL_TIMEOUT = 300.0
#: TCG on a possibly loaded 2-core host.
BOOT_TIMEOUT = 90.0
CONTROL = f"heartbeat_interval: 1\n  heartbeat_timeout: 20\n  boot_timeout: {BOOT_TIMEOUT:g}"
#: A `run` claims a VM (bounded by the boot timeout) and then runs in it under TCG.
RUN_TIMEOUT = 3 * BOOT_TIMEOUT
#: A TCG guest's connection out through two NATs: a python3 to start in the guest
#: and a handshake through emulated virtio. The refused connection is given as long,
#: so that "not reached" cannot be a "reached, slowly".
REACH_TIMEOUT = 30.0
RANDOM = "hostname; head -c 16 /dev/urandom | od -An -tx1"

pytestmark = [
    pytest.mark.image,
    pytest.mark.root,
    pytest.mark.skipif(os.geteuid() != 0, reason="VMs run in network namespaces: needs root"),
    pytest.mark.skipif(
        not all(shutil.which(t) for t in ("mmdebstrap", "mke2fs", QEMU, "nsenter")),
        reason="needs mmdebstrap, e2fsprogs, qemu-system-x86 and util-linux",
    ),
]


@pytest.fixture
def make_swarm(tmp_path: Path) -> Iterator[Any]:
    made: list[Swarm] = []
    baseline = leftovers(tmp_path / "state")

    def make(config_text: str, *, no_templates: bool = False) -> Swarm:
        swarm = Swarm(tmp_path, config_text)
        swarm.state.mkdir(parents=True, exist_ok=True)
        TEST_CACHE.mkdir(parents=True, exist_ok=True)
        (swarm.state / "images").symlink_to(TEST_CACHE, target_is_directory=True)
        if no_templates:
            (swarm.state / "templates").write_text("a file where the folder should be\n")
        made.append(swarm)
        swarm.start(timeout=START_TIMEOUT)
        return swarm

    yield make
    for swarm in made:
        swarm.close()
    # Whatever a test did, once its supervisor has stopped no QEMU, namespace,
    # cgroup or run directory of it is left.
    assert leftovers(tmp_path / "state", baseline) == NOTHING


def network_yaml() -> str:
    """A subnet of its own for each test swarm: swarms on one host need their own."""
    return f"subnet: 10.{240 + secrets.randbelow(8)}.{secrets.randbelow(256)}.0/24"


def events(swarm: Swarm, kind: str) -> list[dict[str, Any]]:
    found: list[dict[str, Any]] = swarm.api.get("/events?limit=1000")["events"]
    return [e for e in found if e["kind"] == kind]


def events_all(swarm: Swarm) -> list[dict[str, Any]]:
    found: list[dict[str, Any]] = swarm.api.get("/events?limit=1000")["events"]
    return found


def idle_pids(swarm: Swarm, role: str) -> dict[str, int]:
    return {a["name"]: a["pid"] for a in swarm.agents(role, "idle")}


def test_a_warm_pool_of_snapshot_clones(make_swarm: Any, tmp_path: Path) -> None:
    extra = "resources: {memory_mib: 256}\n"
    swarm: Swarm = make_swarm(
        swarm_yaml(
            role_yaml("worker", min_idle=3, extra=extra),
            control=CONTROL,
            backend="qemu",
            network=network_yaml(),
        )
    )
    st = swarm.status()
    assert st["backend"].startswith(("qemu (tcg: ", "qemu (kvm: ")), st["backend"]
    print(f"backend: {st['backend']}")

    st = swarm.wait_for(
        "3 idle clones", lambda s: s["roles"]["worker"]["idle"] == 3, timeout=POOL_TIMEOUT
    )
    # The template was made once, and the three pool VMs were restored from it.
    made = events(swarm, "template_made")
    assert len(made) == 1, made
    snaps = list((swarm.state / "templates").glob("*.snap"))
    assert [p.name for p in snaps] == [f"{made[0]['subject'].removeprefix('template-')}.snap"]
    assert st["roles"]["worker"]["start"].startswith("restored from snapshot template")
    restored = events(swarm, "restored")
    assert {e["subject"] for e in restored} == {"worker-0", "worker-1", "worker-2"}
    assert all(a["started_as"].startswith("restored ") for a in st["agents"])
    detail = made[0]["detail"]
    to_connected = [e["detail"]["seconds"] for e in restored]
    print(
        f"template: booted and parked in {detail['boot_seconds']:.2f} s,"
        f" snapshot {detail['size'] / 2**20:.1f} MiB in {detail['snapshot_seconds']:.2f} s,"
        f" {detail['seconds']:.2f} s in all"
    )
    p50 = statistics.median(to_connected)
    vmm = statistics.median(e["detail"]["vmm_seconds"] for e in restored)
    print(f"restore to connected, p50 of {len(to_connected)}: {p50:.3f} s (QEMU {vmm:.3f} s)")

    # Three runs, three clones: each has its own name and its own randomness.
    hostnames, randoms = set(), set()
    for _ in range(3):
        out = swarm.cli("run", "--", "sh", "-c", RANDOM, timeout=RUN_TIMEOUT)
        assert out.returncode == 0, out.stderr
        name, random_line = out.stdout.decode().splitlines()
        assert name.startswith("worker-")
        assert len(random_line.split()) == 16
        hostnames.add(name)
        randoms.add(random_line)
    assert len(hostnames) == 3, hostnames
    assert len(randoms) == 3, randoms

    # Egress: a clone reaches the outside (a namespace the host routes to), NATed
    # twice, so the outside sees the host; the host's own services it does not reach.
    bridge_ip = st["network"]["gateway"]
    with world_namespace() as world:
        outside, host_service = Server(world.ns, world.address), Server(None, bridge_ip)
        try:
            for host, port, expected in (
                (world.address, outside.port, f"from {world.host_address}"),
                (bridge_ip, host_service.port, "failed: TimeoutError"),
            ):
                out = swarm.cli(
                    "run",
                    "--",
                    "python3",
                    "-c",
                    CONNECT,
                    host,
                    str(port),
                    str(REACH_TIMEOUT),
                    timeout=RUN_TIMEOUT + REACH_TIMEOUT,
                )
                assert out.returncode == 0, out.stderr
                assert out.stdout.decode().strip() == expected, host
        finally:
            outside.close()
            host_service.close()

    swarm.wait_for(
        "the pool refilled", lambda s: s["roles"]["worker"]["idle"] == 3, timeout=POOL_TIMEOUT
    )
    took = []
    for _ in range(3):
        started = time.monotonic()
        out = swarm.cli("run", "--", "true", timeout=RUN_TIMEOUT)
        took.append(time.monotonic() - started)
        assert out.returncode == 0, out.stderr
        swarm.wait_for(
            "the pool refilled", lambda s: s["roles"]["worker"]["idle"] == 3, timeout=POOL_TIMEOUT
        )
    print(f"run -- true from the warm pool, end to end: p50 {statistics.median(took):.3f} s")

    # kill -9 of one clone's QEMU: that VM is replaced per policy (restored again).
    before = idle_pids(swarm, "worker")
    victim = min(before)
    qemu = psutil.Process(before[victim])
    assert qemu.name() == QEMU
    qemu.kill()
    swarm.wait_for(
        f"{victim} back with a new QEMU",
        lambda s: any(
            a["name"] == victim and a["state"] == "idle" and a["pid"] not in (None, before[victim])
            for a in s["agents"]
        ),
        timeout=POOL_TIMEOUT,
    )
    crashed = [e for e in events(swarm, "crashed") if e["subject"] == victim]
    assert crashed, [(e["kind"], e["subject"]) for e in events_all(swarm)][-40:]
    assert crashed[-1]["detail"]["restart"] is True
    assert crashed[-1]["detail"]["exit_code"] == -signal.SIGKILL
    assert events(swarm, "restored")[-1]["subject"] == victim
    assert len(events(swarm, "template_made")) == 1  # the template is not made again

    # The guests' token is on their kernel command line: the console (the VMs'
    # logs) does not echo it.
    (record,) = [p for p in (swarm.state / "templates").glob("*.json") if p.suffixes == [".json"]]
    token = json.loads(record.read_text())["token"]
    for log in (swarm.state / "logs").glob("*.log"):
        assert token not in log.read_text(errors="replace"), log.name

    assert swarm.stop(signal.SIGTERM) == 0
    # The template stays for the next start; nothing per VM does.
    assert len(list((swarm.state / "templates").glob("*.snap"))) == 1
    assert not any((swarm.state / "logs" / "run").glob("*"))


def test_auto_picks_qemu_here(make_swarm: Any) -> None:
    swarm: Swarm = make_swarm(
        swarm_yaml(
            role_yaml("worker", min_idle=0), control=CONTROL, backend="auto", network=network_yaml()
        )
    )
    backend = swarm.status()["backend"]
    print(f"backend: {backend}")
    assert backend.startswith(("auto: qemu (tcg: ", "auto: qemu (kvm: ")), backend
    assert swarm.stop(signal.SIGTERM) == 0


def test_without_a_template_the_pool_cold_boots_and_says_so(make_swarm: Any) -> None:
    swarm: Swarm = make_swarm(
        swarm_yaml(
            role_yaml("worker", min_idle=1, extra="resources: {memory_mib: 256}\n"),
            control=CONTROL,
            backend="qemu",
            network=network_yaml(),
        ),
        no_templates=True,
    )
    st = swarm.wait_for(
        "1 idle VM", lambda s: s["roles"]["worker"]["idle"] == 1, timeout=POOL_TIMEOUT
    )
    start = st["roles"]["worker"]["start"]
    assert start.startswith("cold boot (no snapshot template: "), start
    assert "\n" not in start
    assert [a["started_as"] for a in st["agents"]] == ["booted"]
    # And the template is retried meanwhile: a second attempt comes after the delay
    # the first failure announced, and fails the same way.
    swarm.wait_for(
        "a second template attempt",
        lambda s: any(e["detail"]["attempt"] == 2 for e in events(swarm, "template_failed")),
        timeout=2 * RETRY_BASE + POOL_TIMEOUT,
    )
    first, second = events(swarm, "template_failed")[:2]
    (retry,) = [e for e in events(swarm, "template_retry") if e["detail"]["attempt"] == 2]
    assert first["detail"]["attempt"] == 1 and second["detail"]["attempt"] == 2
    assert retry["detail"]["delay"] == first["detail"]["retry_in"]
    assert first["id"] < retry["id"] < second["id"]
    assert second["detail"]["reason"] == first["detail"]["reason"]
    out = swarm.cli("run", "--", "hostname", timeout=RUN_TIMEOUT)
    assert (out.returncode, out.stdout) == (0, b"worker-0\n"), out.stderr
    assert swarm.stop(signal.SIGTERM) == 0


#: Keeps what it is told in MEMORY.md, in the directory it runs in, and says how
#: long MEMORY.md is and where it is.
MEMORY_HARNESS = """\
resources: {memory_mib: 256}
harness:
  kind: command
  command:
    - sh
    - -c
    - 'echo "$FIRECLAW_PROMPT" >> MEMORY.md && echo "$(wc -l < MEMORY.md) lines in $(pwd)"'
"""


def test_a_named_agent_keeps_its_workspace_across_vms(make_swarm: Any) -> None:
    port = free_port()
    swarm: Swarm = make_swarm(
        swarm_yaml(
            role_yaml("worker", min_idle=1, extra=MEMORY_HARNESS),
            control=CONTROL,
            backend="qemu",
            network=network_yaml(),
            irc=irc_yaml(port),
        )
    )
    swarm.wait_for("1 idle VM", lambda s: s["roles"]["worker"]["idle"] == 1, timeout=POOL_TIMEOUT)
    op = operator(port, swarm.state, "op", CONTROL_CHANNEL, AGENTS)
    try:
        overseer_in_channel(op)
        op.say(CONTROL_CHANNEL, "!invoke worker alice")
        joined(op, "alice", AGENTS)
        # MEMORY.md starts with three lines; the harness runs on the workspace disk.
        op.say(AGENTS, "alice: the sky is green")
        op.said(AGENTS, "op: 4 lines in /workspace", timeout=RUN_TIMEOUT)

        # Her VM dies: a new one (restored from the pool's template) becomes alice
        # again, with the same disk under it.
        (agent,) = [a for a in swarm.status()["agents"] if a["agent"] == "alice"]
        psutil.Process(agent["pid"]).kill()
        joined(op, "alice", AGENTS)
        op.say(AGENTS, "alice: grass is blue")
        op.said(AGENTS, "op: 5 lines in /workspace", timeout=RUN_TIMEOUT)

        op.say(CONTROL_CHANNEL, "!destroy alice")
        op.said(CONTROL_CHANNEL, "op: alice is gone", timeout=RUN_TIMEOUT)
    finally:
        op.stop()
    assert swarm.stop(signal.SIGTERM) == 0
    # Destroyed, not forgotten: the workspace stays, with what she wrote in it.
    image = swarm.state / "workspaces" / "alice.ext4"
    memory = subprocess.run(
        ["debugfs", "-R", "cat /MEMORY.md", str(image)], capture_output=True, check=True
    ).stdout.decode()
    assert memory.splitlines()[0] == "# MEMORY.md of alice"
    assert memory.splitlines()[-2:] == ["the sky is green", "grass is blue"]


def test_a_killed_supervisor_leaves_what_the_next_start_reclaims(make_swarm: Any) -> None:
    swarm: Swarm = make_swarm(
        swarm_yaml(
            role_yaml("worker", min_idle=1, extra="resources: {memory_mib: 256}\n"),
            control=CONTROL,
            backend="qemu",
            network=network_yaml(),
        )
    )
    st = swarm.wait_for(
        "1 idle VM", lambda s: s["roles"]["worker"]["idle"] == 1, timeout=POOL_TIMEOUT
    )
    (before,) = [a["pid"] for a in st["agents"]]
    swarm.kill9()
    # Its QEMU, namespace, veth, bridge, rules and overlay outlive it...
    left = swarm.leftovers()
    for kind in ("guest_processes", "netns", "links", "nft", "disks"):
        assert left[kind], (kind, left)
    # ... and doctor says so, naming each.
    doctor = swarm.cli("doctor", "--config", str(swarm.config))
    assert doctor.returncode == 1, doctor.stdout
    report = doctor.stdout.decode()
    assert "not running" in report and "fireclaw-swarm gc" in report
    for name in left["netns"] + left["links"] + left["disks"]:
        assert name in report, (name, report)

    # Its VM dies while no supervisor runs: the next start reclaims what is left
    # of it (nothing can be adopted) and the pool comes back with a new VM.
    qemu = psutil.Process(before)
    qemu.kill()
    qemu.wait(timeout=30)
    swarm.start(timeout=START_TIMEOUT)
    st = swarm.wait_for(
        "1 idle VM", lambda s: s["roles"]["worker"]["idle"] == 1, timeout=POOL_TIMEOUT
    )
    assert [a["pid"] for a in st["agents"]] != [before]
    assert "worker-0" in {e["subject"] for e in events(swarm, "reclaimed")}
    assert not events(swarm, "adopted")
    assert swarm.stop(signal.SIGTERM) == 0


#: A harness that takes a while: the supervisor is killed while it runs.
SLOW_HARNESS = """resources: {memory_mib: 256}
harness:
  kind: command
  command: [sh, -c, 'sleep 8; echo "finished $FIRECLAW_PROMPT"']
"""


@pytest.fixture
def ircd() -> Iterator[tuple[str, int]]:
    """A real ngircd (``tests/ircd.py``) that outlives the supervisors of a test,
    run by trio in a thread of its own for these synchronous tests."""
    started: queue.Queue[tuple[str, int] | BaseException] = queue.Queue()
    done = threading.Event()

    async def serve() -> None:
        try:
            async with ircd_server() as server:
                started.put(server.address)
                await trio.to_thread.run_sync(done.wait)
        except Exception as exc:
            started.put(exc)

    thread = threading.Thread(target=trio.run, args=(serve,), name="ngircd")
    thread.start()
    try:
        address = started.get(timeout=60)
        if isinstance(address, BaseException):
            raise address
        yield address
    finally:
        done.set()
        thread.join(timeout=60)


def test_a_restarted_supervisor_adopts_the_vms_that_still_run(
    make_swarm: Any, ircd: tuple[str, int]
) -> None:
    host, port = ircd
    swarm: Swarm = make_swarm(
        swarm_yaml(
            role_yaml("worker", min_idle=1, extra=SLOW_HARNESS),
            control=CONTROL,
            backend="qemu",
            network=network_yaml(),
            irc=f'server: "{host}:{port}"\n  operators: ["op!*@127.0.0.1"]',
        )
    )
    swarm.wait_for("1 idle VM", lambda s: s["roles"]["worker"]["idle"] == 1, timeout=POOL_TIMEOUT)
    op = Person(ircd, "op").start(AGENTS)
    try:
        adopted_with_an_agent_on_irc(swarm, op)
    finally:
        op.stop()


def adopted_with_an_agent_on_irc(swarm: Swarm, op: Person) -> None:
    out = swarm.cli("invoke", "worker", "alice", timeout=POOL_TIMEOUT)
    assert out.returncode == 0, out.stderr
    joined(op, "alice", AGENTS)
    swarm.wait_for(
        "alice active and the pool refilled",
        lambda s: (
            s["roles"]["worker"]["idle"] == 1
            and any(a["agent"] == "alice" and a["state"] == "active" for a in s["agents"])
        ),
        timeout=POOL_TIMEOUT,
    )
    out = swarm.cli("task", "worker", "the job")
    assert out.returncode == 0, out.stderr
    task_id = int(out.stdout)

    def runner(st: dict[str, Any]) -> dict[str, Any] | None:
        """The VM running the task: promoted under its own name."""
        found = [a for a in st["agents"] if a["agent"] == a["name"] and a["state"] == "active"]
        return found[0] if found else None

    st = swarm.wait_for(
        "the task running and the pool refilled",
        lambda s: s["roles"]["worker"]["idle"] == 1 and runner(s) is not None,
        timeout=POOL_TIMEOUT,
    )
    assert swarm.api.get(f"/tasks/{task_id}")["state"] == "claimed"
    before = {a["name"]: (a["pid"], a["agent"], a["state"]) for a in st["agents"]}
    assert len(before) == 3, before

    # The supervisor dies mid-task; its VMs run on. Alice's IRC connection went
    # through it: she drops off IRC.
    swarm.kill9()
    assert all(psutil.pid_exists(pid) for pid, _, _ in before.values())
    op.expect("alice quitting", lambda e: e.type == "quit" and e.source.nick == "alice")

    # The next one adopts all three: the same QEMU processes, alice back as
    # herself, the idle VM idle, and the task finished once by the VM that had it.
    swarm.start(timeout=START_TIMEOUT)
    alice = next(name for name, (_, agent, _) in before.items() if agent == "alice")
    idle_vm = next(name for name, (_, _, state) in before.items() if state == "idle")
    st = swarm.wait_for(
        "alice and the idle VM adopted",
        lambda s: (
            any(
                a["name"] == alice
                and a["pid"] == before[alice][0]
                and a["agent"] == "alice"
                and a["state"] == "active"
                for a in s["agents"]
            )
            and any(
                a["name"] == idle_vm and a["pid"] == before[idle_vm][0] and a["state"] == "idle"
                for a in s["agents"]
            )
        ),
        timeout=POOL_TIMEOUT,
    )
    task = swarm.api.get(f"/tasks/{task_id}")
    deadline = time.monotonic() + POOL_TIMEOUT
    while task["state"] == "claimed" and time.monotonic() < deadline:
        st = swarm.api.get(f"/status?since={st['version']}&wait=5", timeout=15)
        task = swarm.api.get(f"/tasks/{task_id}")
    assert task["state"] == "done", (task, swarm.tail())
    assert (task["attempts"], task["exit_code"], task["result"]) == (0, 0, "finished the job\n")
    done = [e for e in events(swarm, "task_done") if e["detail"]["task_id"] == task_id]
    assert len(done) == 1, done  # one result, from the VM that ran it
    assert not [e for e in events(swarm, "task_requeued") if e["detail"]["task_id"] == task_id]
    adopted = {e["subject"]: e["detail"] for e in events(swarm, "adopted")}
    assert set(adopted) == set(before), adopted
    assert adopted[alice]["agent"] == "alice"
    runner_name = next(n for n, (_, agent, _) in before.items() if agent == n)
    assert adopted[runner_name]["tasks"] == [task_id]
    assert not events(swarm, "reclaimed")
    # Her IRC client dials the forwarder again, in her namespace on the same port:
    # she is back under her name and answers, from the same VM.
    op.expect(
        "alice back on IRC",
        lambda e: e.type == "join" and e.source.nick == "alice" and e.target == AGENTS,
        timeout=POOL_TIMEOUT,
    )
    op.say(AGENTS, "alice: are you there")
    op.said(AGENTS, "op: finished are you there", timeout=POOL_TIMEOUT)
    print(
        "adopted after a kill -9: "
        + ", ".join(f"{name} in {d['seconds']:.2f} s" for name, d in sorted(adopted.items()))
    )
    # The runner is retired once its task is done; alice stays, the pool is whole.
    swarm.wait_for(
        "the runner retired",
        lambda s: (
            runner_name not in {a["name"] for a in s["agents"]}
            and s["roles"]["worker"]["idle"] == 1
        ),
        timeout=POOL_TIMEOUT,
    )
    # An adopted QEMU is not the supervisor's child: when it dies, how it exited is
    # unknowable, and the record says so. It is replaced like any crashed VM.
    psutil.Process(before[idle_vm][0]).kill()
    swarm.wait_for(
        f"{idle_vm} replaced",
        lambda s: any(
            a["name"] == idle_vm and a["state"] == "idle" and a["pid"] != before[idle_vm][0]
            for a in s["agents"]
        ),
        timeout=POOL_TIMEOUT,
    )
    crashed = [e for e in events(swarm, "crashed") if e["subject"] == idle_vm]
    assert crashed and crashed[-1]["detail"]["exit_code"] is None, crashed
    assert "unknowable" in crashed[-1]["detail"]["reason"], crashed
    assert swarm.stop(signal.SIGTERM) == 0


def test_a_vm_that_cannot_be_adopted_is_reclaimed_and_its_task_run_again(
    make_swarm: Any,
) -> None:
    swarm: Swarm = make_swarm(
        swarm_yaml(
            role_yaml("worker", min_idle=1, extra=SLOW_HARNESS),
            control=CONTROL,
            backend="qemu",
            network=network_yaml(),
        )
    )
    swarm.wait_for("1 idle VM", lambda s: s["roles"]["worker"]["idle"] == 1, timeout=POOL_TIMEOUT)
    out = swarm.cli("task", "worker", "the job")
    assert out.returncode == 0, out.stderr
    task_id = int(out.stdout)
    st = swarm.wait_for(
        "the task running and the pool refilled",
        lambda s: (
            s["roles"]["worker"]["idle"] == 1
            and any(a["agent"] == a["name"] and a["state"] == "active" for a in s["agents"])
        ),
        timeout=POOL_TIMEOUT,
    )
    (runner,) = [a for a in st["agents"] if a["state"] == "active"]
    (idle_vm,) = [a for a in st["agents"] if a["state"] == "idle"]
    swarm.kill9()
    # The runner's QEMU hangs (stopped) while no supervisor runs: it will not answer
    # on QMP, so it cannot be adopted. The idle VM is fine.
    hung = psutil.Process(runner["pid"])
    hung.suspend()
    try:
        swarm.start(timeout=START_TIMEOUT)
        swarm.wait_for(
            "the idle VM adopted",
            lambda s: any(
                a["name"] == idle_vm["name"] and a["pid"] == idle_vm["pid"] and a["state"] == "idle"
                for a in s["agents"]
            ),
            timeout=POOL_TIMEOUT,
        )
        failed = swarm.wait_for(
            "the runner not adopted",
            lambda s: any(e["subject"] == runner["name"] for e in events(swarm, "adopt_failed")),
            timeout=POOL_TIMEOUT,
        )
        assert failed
    finally:
        if hung.is_running() and hung.status() == psutil.STATUS_STOPPED:
            hung.resume()
    (why,) = [e for e in events(swarm, "adopt_failed") if e["subject"] == runner["name"]]
    assert "QMP" in why["detail"]["reason"], why
    # Reclaimed: that QEMU is gone, and the task went back to the queue and ran again.
    hung.wait(timeout=30)
    task = swarm.api.get(f"/tasks/{task_id}")
    st = swarm.status()
    deadline = time.monotonic() + POOL_TIMEOUT
    while task["state"] != "done" and time.monotonic() < deadline:
        st = swarm.api.get(f"/status?since={st['version']}&wait=5", timeout=15)
        task = swarm.api.get(f"/tasks/{task_id}")
    assert (task["state"], task["attempts"], task["result"]) == ("done", 1, "finished the job\n")
    requeued = [e for e in events(swarm, "task_requeued") if e["detail"]["task_id"] == task_id]
    assert len(requeued) == 1, requeued
    assert swarm.stop(signal.SIGTERM) == 0


def test_up_handover_takes_the_vms_over_without_stopping_them(make_swarm: Any) -> None:
    """An upgrade: ``up --handover`` asks the running supervisor to leave its VMs
    running and exit, takes its lock and adopts them: the same QEMU processes,
    the named agent as itself, the task in flight finished once."""
    swarm: Swarm = make_swarm(
        swarm_yaml(
            role_yaml("worker", min_idle=1, extra=SLOW_HARNESS),
            control=CONTROL,
            backend="qemu",
            network=network_yaml(),
        )
    )
    swarm.wait_for("1 idle VM", lambda s: s["roles"]["worker"]["idle"] == 1, timeout=POOL_TIMEOUT)
    out = swarm.cli("invoke", "worker", "alice", timeout=POOL_TIMEOUT)
    assert out.returncode == 0, out.stderr
    out = swarm.cli("task", "worker", "the job")
    assert out.returncode == 0, out.stderr
    task_id = int(out.stdout)
    st = swarm.wait_for(
        "alice active, the task running and the pool refilled",
        lambda s: (
            s["roles"]["worker"]["idle"] == 1
            and s["roles"]["worker"]["active"] == 2
            and swarm.api.get(f"/tasks/{task_id}")["state"] == "claimed"
        ),
        timeout=POOL_TIMEOUT,
    )
    before = {a["name"]: a["pid"] for a in st["agents"]}
    assert len(before) == 3 and all(before.values()), before
    old = swarm.proc
    assert old is not None

    swarm.start(timeout=START_TIMEOUT, args=["--handover"])
    assert old.wait(timeout=60) == 0  # it exited by itself, leaving the VMs

    def adopted(s: dict[str, Any]) -> bool:
        """The same three QEMU processes, each back in the state it was in."""
        now = {a["name"]: (a["pid"], a["state"], a["agent"]) for a in s["agents"]}
        pids = {n: now.get(n, (0, "", ""))[0] for n in before}
        states = sorted((now[n][1], now[n][2] == "alice") for n in before if n in now)
        return pids == before and states == [("active", False), ("active", True), ("idle", False)]

    st = swarm.wait_for("every VM adopted as it was", adopted, timeout=POOL_TIMEOUT)
    deadline = time.monotonic() + POOL_TIMEOUT
    task = swarm.api.get(f"/tasks/{task_id}")
    while task["state"] == "claimed" and time.monotonic() < deadline:
        st = swarm.api.get(f"/status?since={st['version']}&wait=5", timeout=15)
        task = swarm.api.get(f"/tasks/{task_id}")
    assert task["state"] == "done", (task, swarm.tail())
    assert (task["attempts"], task["result"]) == (0, "finished the job\n")
    assert [e["detail"]["vms"] for e in events(swarm, "handing_over")] == [3]
    assert {e["subject"] for e in events(swarm, "adopted")} == set(before)
    assert not events(swarm, "reclaimed")
    assert not [e for e in events(swarm, "task_requeued") if e["detail"]["task_id"] == task_id]
    assert swarm.stop(signal.SIGTERM) == 0
