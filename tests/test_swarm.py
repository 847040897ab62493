"""The whole swarm, end to end: a real supervisor process, real guest processes,
real signals and sockets, driven through the CLI and the API like an operator."""

from __future__ import annotations

import os
import pwd
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import tempfile
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest
from swarmctl import (
    BACKOFF_MAX,
    NOTHING,
    PY,
    Swarm,
    gone,
    idle,
    pids,
    role_yaml,
    stored_events,
    swarm_yaml,
)

HERE = Path(__file__).parent


def test_pool_fills_and_run_returns_output_and_exit_codes(make_swarm) -> None:  # type: ignore[no-untyped-def]
    swarm = make_swarm(swarm_yaml(role_yaml("worker", min_idle=2)))
    st = swarm.wait_for("2 idle workers", idle("worker", 2))
    assert {a["name"] for a in st["agents"]} == {"worker-0", "worker-1"}

    out = swarm.cli("run", "--", "echo", "hi")
    assert (out.returncode, out.stdout, out.stderr) == (0, b"hi\n", b"")

    out = swarm.cli("run", "--", "sh", "-c", "echo oops >&2; exit 3")
    assert (out.returncode, out.stderr) == (3, b"oops\n")

    out = swarm.cli("run", "--", "/no/such/binary")
    assert out.returncode == 127

    # Each run used a fresh VM, which was destroyed; the pool is back to two.
    swarm.wait_for("the pool refilled", lambda s: idle("worker", 2)(s) and len(s["agents"]) == 2)
    assert swarm.status()["roles"]["worker"]["failed"] == 0


def test_run_is_the_agent_user_unless_an_operator_asks_for_root(make_swarm) -> None:  # type: ignore[no-untyped-def]
    swarm = make_swarm(swarm_yaml(role_yaml("worker", min_idle=1)))
    swarm.wait_for("an idle worker", idle("worker", 1))
    out = swarm.cli("run", "--", "id", "-u")
    assert out.returncode == 0
    if os.geteuid() == 0:
        assert out.stdout != b"0\n"  # the agent user (nobody on a host without "agent")
        out = swarm.cli("run", "--user", "root", "--", "id", "-u")
        assert (out.returncode, out.stdout) == (0, b"0\n")
    out = swarm.cli("run", "--user", "no-such-user-x", "--", "id")
    assert (out.returncode, out.stderr) == (126, b"no user 'no-such-user-x' in this guest\n")


def test_a_killed_guest_is_replaced_with_backoff(make_swarm) -> None:  # type: ignore[no-untyped-def]
    swarm = make_swarm(swarm_yaml(role_yaml("worker", min_idle=2)))
    swarm.wait_for("2 idle workers", idle("worker", 2))
    before = pids(swarm, "worker")
    os.kill(before["worker-0"], signal.SIGKILL)

    st = swarm.wait_for(
        "worker-0 back with a new pid",
        lambda s: any(
            a["name"] == "worker-0" and a["state"] == "idle" and a["pid"] != before["worker-0"]
            for a in s["agents"]
        ),
    )
    agents = {a["name"]: a for a in st["agents"]}
    assert agents["worker-0"]["restarts"] == 1
    assert agents["worker-1"]["pid"] == before["worker-1"]  # the other one untouched
    crashed = [e for e in swarm.api.get("/events?limit=1000")["events"] if e["kind"] == "crashed"]
    assert len(crashed) == 1
    assert crashed[0]["subject"] == "worker-0"
    assert crashed[0]["detail"]["exit_code"] == -9
    assert crashed[0]["detail"]["restart"] is True
    assert 0 <= crashed[0]["detail"]["delay"] <= 0.05  # backoff base for a first crash


def test_a_crash_loop_ends_failed_and_stops_restarting(make_swarm) -> None:  # type: ignore[no-untyped-def]
    crasher = role_yaml("crasher", min_idle=1, extra='guest_command: ["sh", "-c", "exit 1"]\n')
    swarm = make_swarm(swarm_yaml(role_yaml("worker"), crasher))
    st = swarm.wait_for("crasher failed", lambda s: s["roles"]["crasher"]["failed"] == 1)
    (agent,) = [a for a in st["agents"] if a["role"] == "crasher"]
    assert agent["restarts"] == 3  # max_restarts: 3, then the circuit opens
    assert "not restarted" in agent["reason"]
    assert st["roles"]["crasher"]["degraded"] is True
    assert agent["pid"] is None
    # The breaker holds: for many times the longest backoff, crasher-0 stays failed
    # with no process, while the rest of the swarm goes on.
    st = swarm.wait_for("worker idle", idle("worker", 1))
    for seen in swarm.quiet_for(20 * BACKOFF_MAX):
        assert [
            (a["state"], a["pid"], a["restarts"]) for a in seen["agents"] if a["role"] == "crasher"
        ] == [("failed", None, 3)]
    kinds = [
        e["kind"]
        for e in swarm.api.get("/events?limit=1000")["events"]
        if e["subject"] == "crasher-0"
    ]
    assert kinds == ["crashed"] * 4 + ["failed"]
    degraded = [e for e in swarm.api.get("/events?limit=1000")["events"] if e["kind"] == "degraded"]
    assert [e["subject"] for e in degraded] == ["crasher"]

    # An explicit reset clears it and it is tried again.
    assert swarm.cli("reset", "crasher-0").returncode == 0
    swarm.wait_for(
        "crasher retried",
        lambda s: any(
            a["role"] == "crasher"
            and a["restarts"] > 3
            or a["role"] == "crasher"
            and a["state"] != "failed"
            for a in s["agents"]
        ),
    )


def test_a_second_up_is_refused_and_names_the_holder(make_swarm, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    swarm = make_swarm(swarm_yaml(role_yaml("worker")))
    second = Swarm(tmp_path, swarm.config.read_text())
    out = second.cli("up", "--config", str(swarm.config), timeout=20)
    assert out.returncode == 1
    assert out.stderr.decode().strip() == (
        f"fireclaw-swarm: another fireclaw-swarm (pid {swarm.proc.pid}) is running: "
        f"it holds {swarm.state / 'supervisor.pid'}"
    )
    assert swarm.proc.poll() is None


def test_sighup_touches_only_the_changed_role(make_swarm) -> None:  # type: ignore[no-untyped-def]
    swarm = make_swarm(swarm_yaml(role_yaml("worker", min_idle=2), role_yaml("coder", min_idle=1)))
    swarm.wait_for("pools full", lambda s: idle("worker", 2)(s) and idle("coder", 1)(s))
    workers = pids(swarm, "worker")

    swarm.config.write_text(
        swarm_yaml(role_yaml("worker", min_idle=2), role_yaml("coder", min_idle=3))
    )
    swarm.proc.send_signal(signal.SIGHUP)
    swarm.wait_for("3 idle coders", idle("coder", 3))
    assert pids(swarm, "worker") == workers
    reloaded = [e for e in swarm.api.get("/events?limit=1000")["events"] if e["kind"] == "reloaded"]
    assert reloaded[-1]["detail"]["changed"] == ["coder"]


def test_sighup_with_a_broken_file_keeps_the_old_config(make_swarm) -> None:  # type: ignore[no-untyped-def]
    swarm = make_swarm(swarm_yaml(role_yaml("worker", min_idle=2)))
    swarm.wait_for("2 idle workers", idle("worker", 2))
    workers = pids(swarm, "worker")

    swarm.config.write_text(swarm_yaml(role_yaml("worker", min_idle=-1)))
    swarm.proc.send_signal(signal.SIGHUP)
    st = swarm.wait_for("the reload rejected", lambda s: s["last_reload_error"] is not None)
    assert "worker" in st["last_reload_error"] and "min_idle" in st["last_reload_error"]
    assert "\n" not in st["last_reload_error"]
    assert pids(swarm, "worker") == workers

    # `reload` from the CLI says the same in one line and exits 78.
    out = swarm.cli("reload")
    assert out.returncode == 78
    assert len(out.stderr.decode().strip().splitlines()) == 1
    assert "min_idle" in out.stderr.decode()
    assert swarm.cli("run", "--", "true").returncode == 0  # still serving


def test_sigterm_stops_everything_and_leaves_nothing(make_swarm) -> None:  # type: ignore[no-untyped-def]
    swarm = make_swarm(swarm_yaml(role_yaml("worker", min_idle=3), role_yaml("coder", min_idle=2)))
    st = swarm.wait_for("pools full", lambda s: idle("worker", 3)(s) and idle("coder", 2)(s))
    guest_pids = [a["pid"] for a in st["agents"]]
    isolation = st["isolation"]

    assert swarm.stop(signal.SIGTERM) == 0
    assert all(gone(pid) for pid in guest_pids)
    assert swarm.leftovers() == NOTHING
    if os.geteuid() == 0:
        assert isolation["netns"] and isolation["cgroups"]
    # Guests said goodbye (graceful): each guest daemon's own log ends with the stop
    # it was asked for, and none of them crashed on the way out.
    for name in (a["name"] for a in st["agents"]):
        last = (swarm.state / "logs" / f"{name}.log").read_text().splitlines()[-1]
        assert last.endswith(" INFO stopped: supervisor stopping"), (name, last)
    kinds = [e["kind"] for e in stored_events(swarm.state)]
    assert "crashed" not in kinds


UNPRIVILEGED = "nobody"
PYTHON_VERSION = f"python{sys.version_info.major}.{sys.version_info.minor}"


def _python_for(user: str) -> str | None:
    """An interpreter of this Python version that ``user`` can run (a venv's may sit
    under a home directory only its owner can enter), or None."""
    if shutil.which("runuser") is None:
        return None
    for candidate in (os.path.realpath(sys.executable), f"/usr/bin/{PYTHON_VERSION}"):
        probe = subprocess.run(
            ["runuser", "-u", user, "--", candidate, "-c", "import sys"], capture_output=True
        )
        if probe.returncode == 0:
            return candidate
    return None


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to run a supervisor as another user")
def test_without_root_status_says_isolation_is_off_and_why() -> None:
    python = _python_for(UNPRIVILEGED)
    if python is None:
        pytest.skip(f"no {PYTHON_VERSION} that user {UNPRIVILEGED} may run (or no runuser)")
    user = pwd.getpwnam(UNPRIVILEGED)
    # A directory the unprivileged user can enter, holding a sitecustomize that puts
    # this venv's packages on its path (the venv's own interpreter may be out of reach).
    root = Path(tempfile.mkdtemp(prefix="fireclaw-unpriv-"))
    try:
        root.chmod(0o755)
        site_dir = root / "site"
        site_dir.mkdir()
        (site_dir / "sitecustomize.py").write_text(
            f"import site\nsite.addsitedir({sysconfig.get_paths()['purelib']!r})\n"
        )
        (root / "state").mkdir()
        os.chown(root / "state", user.pw_uid, user.pw_gid)
        env = {"PYTHONPATH": str(site_dir), "HOME": str(root)}
        guest = f'["env", "PYTHONPATH={site_dir}", "{python}", "-m", "fireclaw.guest_daemon"]'
        swarm = Swarm(
            root,
            swarm_yaml(role_yaml("worker", min_idle=2, extra=f"guest_command: {guest}\n")),
            command=[python, "-m", "fireclaw.supervisor.cli"],
            user=UNPRIVILEGED,
            env=env,
        )
        (root / "swarm.yaml").chmod(0o644)
        try:
            swarm.start()
            assert psutil.Process(swarm.proc.pid).uids().real == user.pw_uid  # type: ignore[union-attr]
            st = swarm.wait_for("2 idle workers", idle("worker", 2))
            assert st["isolation"] == {
                "netns": False,
                "netns_why": "not running as root",
                "cgroups": False,
                "cgroups_why": "not running as root",
            }
            out = swarm.cli("status")
            assert out.returncode == 0, out.stderr
            assert (
                "isolation: netns off (not running as root); cgroups off (not running as root)"
                in out.stdout.decode().splitlines()
            )
            # And it is so: the guests run as that user, in the host's own network
            # namespace, in no cgroup of the swarm.
            mine = os.readlink("/proc/self/ns/net")
            for a in st["agents"]:
                guest_proc = psutil.Process(a["pid"])
                assert guest_proc.uids().real == user.pw_uid
                assert os.readlink(f"/proc/{a['pid']}/ns/net") == mine
                assert "fireclaw" not in Path(f"/proc/{a['pid']}/cgroup").read_text()
            assert swarm.stop() == 0
            assert swarm.leftovers() == NOTHING
        finally:
            swarm.close()
    finally:
        shutil.rmtree(root)


@pytest.fixture
def open_dir() -> Iterator[Path]:
    """A directory the unprivileged agent user can look into (pytest's tmp_path
    is private to root), removed afterwards."""
    path = Path(tempfile.mkdtemp(prefix="fireclaw-test-"))
    path.chmod(0o755)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def test_a_queued_task_survives_a_supervisor_kill(make_swarm, open_dir: Path) -> None:  # type: ignore[no-untyped-def]
    # The harness runs as the agent user: the gate is where that user can see it.
    gate = open_dir / "gate"
    harness = (
        'harness: {kind: command, command: ["sh", "-c", '
        f'"while [ ! -e {gate} ]; do sleep 0.05; done; echo done: $FIRECLAW_PROMPT"]}}\n'
    )
    config = swarm_yaml(role_yaml("worker", min_idle=1, extra=harness))
    swarm = make_swarm(config)
    task = swarm.api.post("/tasks", {"role": "worker", "prompt": "survive"})
    swarm.wait_for("the task claimed", lambda s: s["tasks"]["claimed"] == 1)
    swarm.kill9()

    gate.touch()
    swarm.start()
    st = swarm.wait_for("the task done", lambda s: s["tasks"]["done"] == 1)
    row = swarm.api.get(f"/tasks/{task['id']}")
    assert row["state"] == "done"
    assert row["result"].strip() == "done: survive"
    assert row["attempts"] == 1  # one attempt was lost with the killed supervisor
    kinds = [e["kind"] for e in swarm.api.get("/events?limit=1000")["events"]]
    assert "reclaimed" in kinds and "task_requeued" in kinds
    assert st["tasks"]["queued"] == 0

    assert swarm.stop() == 0
    assert swarm.leftovers() == NOTHING


def test_tasks_run_on_promoted_agents(make_swarm) -> None:  # type: ignore[no-untyped-def]
    swarm = make_swarm(swarm_yaml(role_yaml("worker", min_idle=1)))
    out = swarm.cli("task", "worker", "say hello", "--wait", "--timeout", "30")
    assert out.returncode == 0, out.stderr
    assert b"worker-0: say hello" in out.stdout


@pytest.mark.parametrize("mode", ["oversize", "garbage", "offschema", "flood"])
def test_a_hostile_guest_is_killed_and_replaced(make_swarm, mode: str, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    # Each incarnation notes its pid before it becomes the hostile guest.
    started = tmp_path / "evil.pids"
    evil = role_yaml(
        "evil",
        min_idle=1,
        extra=(
            'guest_command: ["sh", "-c", "echo $$ >> \\"$0\\"; exec \\"$@\\"", '
            f'"{started}", "{PY}", "{HERE / "hostile_guest.py"}", "{mode}"]\n'
        ),
    )
    swarm = make_swarm(swarm_yaml(role_yaml("worker", min_idle=2), evil))
    swarm.wait_for("2 idle workers", idle("worker", 2))
    workers = pids(swarm, "worker")

    st = swarm.wait_for(
        "evil-0 restarted",
        lambda s: any(a["name"] == "evil-0" and a["restarts"] >= 1 for a in s["agents"]),
    )
    crashed = [
        e
        for e in swarm.api.get("/events?limit=1000")["events"]
        if e["kind"] == "crashed" and e["subject"] == "evil-0"
    ]
    reason = crashed[0]["detail"]["reason"]
    expected = {
        "oversize": "too large",
        "garbage": "undecodable",
        "offschema": "unknown request",
        "flood": "messages per second",
    }[mode]
    assert expected in reason
    assert pids(swarm, "worker") == workers  # nobody else was disturbed
    assert st["roles"]["worker"]["idle"] == 2
    assert swarm.cli("run", "--role", "worker", "--", "echo", "fine").stdout == b"fine\n"
    # The hostile guest did run, and the one that broke the rules is gone, not
    # merely disconnected: its process was killed.
    first = int(started.read_text().split()[0])
    assert gone(first)


def test_a_second_sigint_stops_now(make_swarm) -> None:  # type: ignore[no-untyped-def]
    deaf = f'guest_command: ["{PY}", "{HERE / "hostile_guest.py"}", "deaf"]\n'
    swarm = make_swarm(swarm_yaml(role_yaml("deaf", min_idle=2, extra=deaf)))
    st = swarm.wait_for("2 deaf guests idle", idle("deaf", 2))
    guest_pids = [a["pid"] for a in st["agents"]]

    swarm.proc.send_signal(signal.SIGINT)
    swarm.wait_notify("STOPPING=1", 10)  # the graceful stop has begun; the guests ignore it
    assert swarm.stop(signal.SIGINT) == 0
    assert "second SIGINT: stopping now" in swarm.tail()
    assert all(gone(pid) for pid in guest_pids)
    assert swarm.leftovers() == NOTHING


def agent(st: dict[str, object], name: str) -> dict[str, object] | None:
    found = [a for a in st["agents"] if a["agent"] == name]  # type: ignore[attr-defined,index]
    return found[0] if found else None


def test_a_named_agent_keeps_its_name_through_crashes_and_restarts(make_swarm) -> None:  # type: ignore[no-untyped-def]
    swarm = make_swarm(swarm_yaml(role_yaml("coder", min_idle=1)))
    out = swarm.cli("invoke", "coder", "alice", "--model", "tiny")
    assert out.returncode == 0, out.stderr
    st = swarm.wait_for(
        "alice active", lambda s: (a := agent(s, "alice")) is not None and a["state"] == "active"
    )
    first = agent(st, "alice")
    assert first is not None
    # The pool refilled behind her: she is no longer one of its idle VMs.
    swarm.wait_for("the pool refilled", idle("coder", 1))
    assert swarm.cli("invoke", "coder", "alice").returncode == 1  # names are unique

    os.kill(first["pid"], signal.SIGKILL)  # type: ignore[arg-type]
    st = swarm.wait_for(
        "alice back",
        lambda s: (
            (a := agent(s, "alice")) is not None
            and a["state"] == "active"
            and a["pid"] != first["pid"]
        ),
    )
    assert agent(st, "alice")["restarts"] == 1  # type: ignore[index]
    kinds = [
        e["kind"]
        for e in swarm.api.get("/events?limit=1000")["events"]
        if e["subject"] == first["name"]
    ]
    assert "agent_back" in kinds

    # A supervisor killed outright brings her back too.
    swarm.kill9()
    swarm.start()
    swarm.wait_for(
        "alice restored", lambda s: (a := agent(s, "alice")) is not None and a["state"] == "active"
    )

    assert swarm.cli("destroy", "alice").returncode == 0
    st = swarm.wait_for("alice gone", lambda s: agent(s, "alice") is None)
    assert swarm.cli("destroy", "alice").returncode == 1
    assert swarm.stop() == 0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def ngircd_pids(state: Path) -> list[int]:
    conf = str(state / "ircd")
    return [
        p.pid
        for p in psutil.process_iter(["name", "cmdline"])
        if p.info["name"] == "ngircd" and any(conf in a for a in p.info["cmdline"] or [])
    ]


def test_the_managed_irc_server_runs_with_the_swarm(make_swarm) -> None:  # type: ignore[no-untyped-def]
    port = free_port()
    swarm = make_swarm(
        swarm_yaml(role_yaml("worker"), irc=f"server: managed\n  managed: {{port: {port}}}")
    )
    st = swarm.status()
    assert st["irc"]["server"] == f"127.0.0.1:{port}"
    assert st["irc"]["managed"]["state"] == "running"
    assert len(ngircd_pids(swarm.state)) == 1
    with socket.create_connection(("127.0.0.1", port), timeout=5) as conn:
        conn.sendall(b"NICK person\r\nUSER person 0 * :A person\r\n")
        assert b" 001 person " in conn.makefile("rb").readline()
    assert swarm.stop() == 0
    assert ngircd_pids(swarm.state) == []


def test_up_says_in_one_line_when_the_irc_port_is_taken(make_swarm) -> None:  # type: ignore[no-untyped-def]
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        swarm = make_swarm(
            swarm_yaml(role_yaml("worker"), irc=f"server: managed\n  managed: {{port: {port}}}"),
            start=False,
        )
        out = swarm.cli("up", "--config", str(swarm.config), timeout=60)
    assert out.returncode == 1
    errors = [
        line for line in out.stderr.decode().splitlines() if line.startswith("fireclaw-swarm:")
    ]
    assert len(errors) == 1 and f"127.0.0.1:{port}" in errors[0] and "in use" in errors[0]
    assert ngircd_pids(swarm.state) == []
