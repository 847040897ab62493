"""The overseer on a real IRC server: a real supervisor with its managed ngircd,
and operators played by an independent IRC library."""

from __future__ import annotations

import json
import os
import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest
from fireclaw.pool.forward import VM_SOURCE
from ircperson import Event, Person
from swarmctl import PY, WAIT, Swarm, idle, role_yaml, swarm_yaml
from test_swarm import NOTHING, free_port, ngircd_pids

CONTROL = "#control"


#: The managed server's operator, as swarm.yaml ships it.
OPER_NAME = "fireclaw"
#: Commands per sender in these swarms: a burst that is never refilled within a test
#: (one command per 100 minutes), so a limit shows whatever the machine's speed.
RATE = "{per_minute: 0.01, burst: 15}"


def irc_yaml(port: int, *, operators: str | None = None, rate: str = RATE, extra: str = "") -> str:
    """The ``irc:`` body of a test swarm: the managed server on ``port`` with the
    shipped operator masks and authentication unless ``operators``/``extra`` say else."""
    masks = f"  operators: {operators}\n" if operators is not None else ""
    return (
        f"server: managed\n  managed: {{port: {port}}}\n{masks}"
        f"  command_rate: {rate}\n"
        "  restart: {backoff: {base: 0.1, max: 0.5}}" + extra
    )


def oper_password(state: Path) -> str:
    """What an operator reads from the root-only file the supervisor made."""
    return (state / "secrets" / f"irc-operator-{OPER_NAME}").read_text().strip()


def operator(port: int, state: Path, nick: str, *channels: str) -> Person:
    """Someone who connects, does ``/OPER`` with the password file's content and
    joins ``channels``: an operator the overseer obeys."""
    person = Person(("127.0.0.1", port), nick).start()
    try:
        person.oper(OPER_NAME, oper_password(state))
        for channel in channels:
            person.join(channel)
    except BaseException:
        person.stop()
        raise
    return person


def start_swarm(tmp_path: Path, irc: str | None = None) -> Swarm:
    port = free_port()
    swarm = Swarm(tmp_path, swarm_yaml(role_yaml("worker", min_idle=1), irc=irc or irc_yaml(port)))
    swarm.irc_port = port  # type: ignore[attr-defined]
    swarm.start()
    return swarm


@pytest.fixture
def swarm(tmp_path: Path) -> Iterator[Swarm]:
    swarm = start_swarm(tmp_path)
    try:
        yield swarm
    finally:
        swarm.close()
        assert ngircd_pids(swarm.state) == []
        assert swarm.leftovers() == NOTHING


@pytest.fixture
def op(swarm: Swarm) -> Iterator[Person]:
    person = operator(swarm.irc_port, swarm.state, "op", CONTROL)  # type: ignore[attr-defined]
    try:
        yield person
    finally:
        person.stop()


def in_channel(person: Person, nick: str, channel: str, timeout: float = 60) -> None:
    """``nick`` is (or comes) into ``channel``: listed by NAMES, or seen joining."""
    person.do("names", channel)
    person.expect(
        f"{nick} in {channel}",
        lambda e: (
            (
                e.type == "namreply"
                and e.arguments[1] == channel
                and nick in e.arguments[-1].replace("@", "").split()
            )
            or (e.type == "join" and e.source.nick == nick and e.target == channel)
        ),
        timeout=timeout,
    )


def overseer_in_channel(person: Person) -> None:
    in_channel(person, "overseer", CONTROL)


def refusals(swarm: Swarm) -> list[dict[str, Any]]:
    return [e for e in swarm.api.get("/events?limit=1000")["events"] if e["kind"] == "refused"]


def test_scale_from_irc(swarm: Swarm, op: Person) -> None:
    overseer_in_channel(op)
    op.say(CONTROL, "!scale worker 3")
    op.said(CONTROL, "op: worker: keeping 3 idle")
    swarm.wait_for("3 idle workers", idle("worker", 3))
    op.say(CONTROL, "!status")
    op.said(CONTROL, "worker: 3 idle, 0 active")


def test_a_task_from_irc_is_announced_when_done(swarm: Swarm, op: Person) -> None:
    overseer_in_channel(op)
    op.say(CONTROL, "!task worker write a haiku")
    queued = op.said(CONTROL, "queued for worker")
    task_id = queued.arguments[0].split("task ")[1].split()[0]
    op.said(CONTROL, f"task {task_id} (worker) done: worker-0: write a haiku")


#: Every command that changes or reveals something, as an intruder would try them.
INTRUSIONS = (
    "!scale worker 4",
    "!invoke worker eve",
    "!task worker id > /tmp/owned",
    "!destroy worker-0",
    "!reload",
    "!reset worker-0",
    "!model worker-0 evil",
    "!persona worker-0 obey eve",
    "!status",
    "!list",
    "!templates",
    "!help",
)

#: A stdlib-only IRC client (the project's venv may not be readable by nobody):
#: registers, joins #control, says each command and waits for the overseer's
#: answer to it, then one private message; prints the answers as JSON.
INTRUDER = r"""
import json, socket, sys, time
port, nick, limit = int(sys.argv[1]), sys.argv[2], float(sys.argv[3])
commands = sys.argv[4:]
end = time.monotonic() + limit
sock = socket.create_connection(("127.0.0.1", port), timeout=limit)
pending = b""

def send(line):
    sock.sendall(line.encode() + b"\r\n")

def until(wanted):
    global pending
    while True:
        while b"\r\n" not in pending:
            sock.settimeout(max(0.01, end - time.monotonic()))
            data = sock.recv(4096)
            if not data:
                raise SystemExit("the server closed the connection")
            pending += data
        raw, pending = pending.split(b"\r\n", 1)
        line = raw.decode("utf-8", "replace")
        if line.startswith("PING"):
            send("PONG" + line[4:])
        elif wanted(line):
            return line

send(f"NICK {nick}")
send(f"USER {nick} 0 * :{nick}")
until(lambda line: f" 001 {nick} " in line)
send("JOIN #control")
names = until(lambda line: f" 353 {nick} " in line)
assert "overseer" in names.split(":")[-1].replace("@", "").split(), names
answers = []

def answer(to):
    line = until(lambda line: line.startswith(":overseer!") and f" PRIVMSG {to} :" in line)
    return line.split(" :", 1)[1]

for command in commands:
    send(f"PRIVMSG #control :{command}")
    answers.append(answer("#control"))
send(f"PRIVMSG overseer :{commands[0]}")
answers.append(answer(nick))
send("QUIT :done")
print(json.dumps(answers))
"""


def sizes(status: dict[str, Any]) -> dict[str, tuple[int, int, int]]:
    """Each role's pool as commands set it: target, min_idle, max_active."""
    return {
        name: (role["target"], role["min_idle"], role["max_active"])
        for name, role in status["roles"].items()
    }


@pytest.mark.skipif(os.geteuid() != 0, reason="runs a client as the user nobody")
def test_a_local_user_with_the_shipped_masks_commands_nothing(swarm: Swarm, op: Person) -> None:
    """The shipped allowlist matches every local process; that alone obeys nobody."""
    overseer_in_channel(op)
    before = swarm.status()
    limit = 90.0  # seconds for the whole exchange: far above the ~10 s it takes
    port = swarm.irc_port  # type: ignore[attr-defined]
    nobody = ["runuser", "-u", "nobody", "--", "/usr/bin/python3", "-c", INTRUDER]
    out = subprocess.run(
        [*nobody, str(port), "eve", str(limit), *INTRUSIONS],
        capture_output=True,
        text=True,
        timeout=limit + 30,
        cwd="/",
    )
    assert out.returncode == 0, out.stderr
    answers = json.loads(out.stdout)
    refusal = "sorry, only the swarm's IRC operators may give me orders (/OPER first)"
    assert answers == [f"eve: {refusal}"] * len(INTRUSIONS) + [refusal]
    after = swarm.status()
    # What the intrusions asked to change (pool sizes, agents), not how many VMs
    # happen to be starting: a VM replaced meanwhile on a busy machine is no order.
    assert sizes(after) == sizes(before)
    assert [a["agent"] for a in after["agents"]] == [a["agent"] for a in before["agents"]]
    assert swarm.api.get("/tasks")["tasks"] == []
    refused = refusals(swarm)
    assert len(refused) == len(INTRUSIONS) + 1
    assert {e["detail"]["why"] for e in refused} == {"not operator"}
    assert all(e["detail"]["mask"].endswith("@127.0.0.1") for e in refused)
    commands = [e for e in swarm.api.get("/events?limit=1000")["events"] if e["kind"] == "command"]
    assert commands == []
    # The password nobody would need: root's alone.
    secret = swarm.state / "secrets" / f"irc-operator-{OPER_NAME}"
    assert (secret.stat().st_uid, secret.stat().st_mode & 0o777) == (0, 0o600)
    assert secret.parent.stat().st_mode & 0o777 == 0o700


def test_someone_who_is_no_irc_operator_is_refused_and_nothing_changes(
    swarm: Swarm, op: Person
) -> None:
    overseer_in_channel(op)
    mallory = Person(("127.0.0.1", swarm.irc_port), "mallory").start(CONTROL)  # type: ignore[attr-defined]
    try:
        before = swarm.status()["roles"]["worker"]["target"]
        mallory.say(CONTROL, "!scale worker 5")
        mallory.said(CONTROL, "mallory: sorry, only the swarm's IRC operators may give me orders")
        # A wrong password does not help, and a private attempt is refused the same way.
        mallory.do("oper", OPER_NAME, "guessed")
        mallory.expect("OPER refused", lambda e: e.type == "passwdmismatch")
        mallory.say("overseer", "!destroy worker-0")
        mallory.said("mallory", "sorry, only the swarm's IRC operators")
    finally:
        mallory.stop()
    assert swarm.status()["roles"]["worker"]["target"] == before
    refused = refusals(swarm)
    assert [e["subject"] for e in refused] == ["mallory", "mallory"]
    assert refused[0]["detail"]["mask"].startswith("mallory!")


def test_an_operators_nick_taken_over_after_a_quit_is_refused(swarm: Swarm, op: Person) -> None:
    overseer_in_channel(op)
    op.say(CONTROL, "!status")
    op.said(CONTROL, "op: worker: 1 idle")  # obeyed, and now known as an operator
    op.stop()
    # Same nick, same user name, same address: only the /OPER is missing.
    impostor = Person(("127.0.0.1", swarm.irc_port), "op").start(CONTROL)  # type: ignore[attr-defined]
    try:
        overseer_in_channel(impostor)
        impostor.say(CONTROL, "!scale worker 4")
        impostor.said(CONTROL, "op: sorry, only the swarm's IRC operators may give me orders")
    finally:
        impostor.stop()
    assert swarm.status()["roles"]["worker"]["target"] == 1
    assert [e["detail"]["why"] for e in refusals(swarm)] == ["not operator"]


def test_the_password_stays_out_of_logs_events_and_guests(swarm: Swarm, op: Person) -> None:
    overseer_in_channel(op)
    op.say(CONTROL, "!invoke worker alice")
    op.said(CONTROL, "op: alice is up")
    password = oper_password(swarm.state).encode()
    holders = {
        swarm.state / "secrets" / f"irc-operator-{OPER_NAME}",
        swarm.state / "ircd" / "ngircd.conf",
    }
    leaks = [
        str(path)
        for path in [*swarm.state.rglob("*"), swarm.log]
        if path.is_file() and path not in holders and password in path.read_bytes()
    ]
    assert leaks == []
    for agent in swarm.status()["agents"]:  # what each guest was started with
        proc = psutil.Process(agent["pid"])
        assert password.decode() not in " ".join(proc.cmdline())
        assert password.decode() not in "".join(proc.environ().values())


def test_commands_are_rate_limited_per_sender(swarm: Swarm, op: Person) -> None:
    """A burst of 15 that is not refilled within the test: the 16th is refused
    however fast or slow the machine is, and another operator is still obeyed."""
    overseer_in_channel(op)
    for _ in range(16):
        op.say(CONTROL, "!help status")
    op.said(CONTROL, "op: too many commands; give me a moment")
    for _ in range(15):
        op.said(CONTROL, "op: !status: one line per role")
    other = operator(swarm.irc_port, swarm.state, "op2", CONTROL)  # type: ignore[attr-defined]
    try:
        other.say(CONTROL, "!status")
        other.said(CONTROL, "op2: worker: 1 idle")
    finally:
        other.stop()


def test_an_operator_outside_the_channel_is_obeyed_in_private(swarm: Swarm, op: Person) -> None:
    overseer_in_channel(op)
    away = operator(swarm.irc_port, swarm.state, "away")  # type: ignore[attr-defined]
    try:
        for _ in range(2):  # asked about each time: nobody in the channel sees it leave
            away.say("overseer", "!status")
            away.said("away", "worker: 1 idle")
    finally:
        away.stop()
    assert refusals(swarm) == []


def test_hostmask_operators_only_when_asked_for_and_with_a_warning(tmp_path: Path) -> None:
    port = free_port()
    swarm = start_swarm(tmp_path, irc_yaml(port, extra="\n  operator_auth: hostmask"))
    try:
        plain = Person(("127.0.0.1", port), "op").start(CONTROL)
        try:
            overseer_in_channel(plain)
            plain.say(CONTROL, "!status")
            plain.said(CONTROL, "op: worker: 1 idle")
        finally:
            plain.stop()
    finally:
        swarm.close()
    warnings = [
        line
        for line in swarm.log.read_text().splitlines()
        if "irc.operator_auth is hostmask: anyone who can connect" in line
    ]
    assert len(warnings) == 1, swarm.log.read_text()


def test_help_and_usage_lines(swarm: Swarm, op: Person) -> None:
    overseer_in_channel(op)
    op.say(CONTROL, "!scale worker lots")
    op.said(CONTROL, "op: 'lots' is not a number from 0 to 1000 (usage: !scale ROLE N)")
    op.say(CONTROL, "!help")
    op.said(CONTROL, "op: !invoke ROLE [NAME] [model=M]: bring up a named agent of ROLE")


def test_crashes_are_announced(swarm: Swarm, op: Person) -> None:
    overseer_in_channel(op)
    swarm.wait_for("an idle worker", idle("worker", 1))  # the overseer may be up first
    (vm,) = swarm.agents("worker", "idle")
    os.kill(vm["pid"], signal.SIGKILL)
    op.said(CONTROL, "worker-0 crashed (VMM exited with code -9); restarting in")


def test_the_overseer_comes_back_after_the_irc_server_dies(swarm: Swarm) -> None:
    (pid,) = ngircd_pids(swarm.state)
    first = Person(("127.0.0.1", swarm.irc_port), "op").start(CONTROL)  # type: ignore[attr-defined]
    overseer_in_channel(first)
    first.stop()
    os.kill(pid, signal.SIGKILL)
    st = swarm.wait_for(
        "ngircd restarted",
        lambda s: (
            s["irc"]["managed"]["state"] == "running" and s["irc"]["managed"]["restarts"] >= 1
        ),
    )
    assert st["irc"]["managed"]["restarts"] == 1
    again = operator(swarm.irc_port, swarm.state, "op", CONTROL)  # type: ignore[attr-defined]
    try:
        overseer_in_channel(again)  # no operator action brought it back
        again.say(CONTROL, "!status")
        again.said(CONTROL, "worker: 1 idle")
    finally:
        again.stop()


AGENTS = "#agents"
PINGPONG = (
    'harness: {kind: command, command: ["sh", "-c", '
    '"if [ \\"$FIRECLAW_AGENT\\" = alice ]; then echo \\"bob: ping\\"; '
    'else echo \\"alice: pong\\"; fi"]}\n'
)
SMUGGLER = (
    'harness: {kind: command, command: ["sh", "-c", '
    '"printf \\"fine\\\\r\\\\nQUIT :gotcha\\\\r\\\\nJOIN #evil\\\\n\\""]}\n'
)


def agent_swarm(tmp_path: Path, harness: str = "") -> Swarm:
    port = free_port()
    roles = role_yaml("worker", min_idle=1) + role_yaml("coder", min_idle=1, extra=harness)
    swarm = Swarm(tmp_path, swarm_yaml(roles, irc=irc_yaml(port)))
    swarm.irc_port = port  # type: ignore[attr-defined]
    swarm.start()
    return swarm


def joined(person: Person, nick: str, channel: str) -> Event:
    return person.expect(
        f"{nick} joining {channel}",
        lambda e: e.type == "join" and e.source.nick == nick and e.target == channel,
        timeout=WAIT,  # a VM's boot and promotion, on a loaded machine
    )


def test_an_invoked_agent_joins_answers_and_quits_when_destroyed(tmp_path: Path) -> None:
    swarm = agent_swarm(tmp_path)
    op = operator(swarm.irc_port, swarm.state, "op", CONTROL, AGENTS)  # type: ignore[attr-defined]
    try:
        overseer_in_channel(op)
        op.say(CONTROL, "!invoke coder alice")
        arrival = joined(op, "alice", AGENTS)
        op.said(CONTROL, "op: alice is up: a coder agent on coder-")
        if os.geteuid() == 0:  # through her namespace's forwarder: never 127.0.0.1
            assert arrival.source.host == VM_SOURCE
        op.say(AGENTS, "alice: what is your name?")
        op.said(AGENTS, "op: alice: what is your name?")
        op.say("alice", "and in private?")
        op.said("op", "alice: and in private?")
        op.say(CONTROL, "!destroy alice")
        quit_ = op.expect("alice quitting", lambda e: e.type == "quit" and e.source.nick == "alice")
        assert "stopping" in quit_.arguments[0]
        op.said(CONTROL, "op: alice is gone")
    finally:
        op.stop()
        swarm.close()
    assert swarm.leftovers() == NOTHING


def test_what_an_agent_says_never_becomes_a_command(tmp_path: Path) -> None:
    swarm = agent_swarm(tmp_path, SMUGGLER)
    op = operator(swarm.irc_port, swarm.state, "op", CONTROL, AGENTS)  # type: ignore[attr-defined]
    try:
        op.say(CONTROL, "!invoke coder mallet")
        joined(op, "mallet", AGENTS)
        op.say(AGENTS, "mallet: go")
        op.said(AGENTS, "op: fine")
        op.said(AGENTS, "QUIT :gotcha")  # arrives as text, in the channel
        op.said(AGENTS, "JOIN #evil")
        op.do("names", "#evil")
        names = op.expect(
            "#evil names",
            lambda e: (
                (e.type == "namreply" and e.arguments[1] == "#evil")
                or (e.type == "endofnames" and e.arguments[0] == "#evil")
            ),
        )
        assert names.type == "endofnames"  # no member listed first: nobody joined #evil
        assert not [e for e in op.seen if e.type == "quit" and e.source.nick == "mallet"]
    finally:
        op.stop()
        swarm.close()


def test_two_agents_stop_answering_each_other(tmp_path: Path) -> None:
    swarm = agent_swarm(tmp_path, PINGPONG)
    op = operator(swarm.irc_port, swarm.state, "op", CONTROL, AGENTS)  # type: ignore[attr-defined]
    try:
        op.say(CONTROL, "!invoke coder alice")
        joined(op, "alice", AGENTS)
        op.say(CONTROL, "!invoke coder bob")
        joined(op, "bob", AGENTS)
        op.say(AGENTS, "alice: start")
        op.said(AGENTS, "bob: ping")  # alice to bob (for op)
        op.said(AGENTS, "alice: pong")  # bob answers alice
        op.said(AGENTS, "bob: ping")  # alice answers bob; now both are cooling down
        op.say(AGENTS, "bob: marker")  # a person is always answered
        op.said(AGENTS, "op: alice: pong")
        said = [
            (e.source.nick, e.arguments[0])
            for e in op.seen
            if e.type == "pubmsg" and e.target == AGENTS and e.source.nick in ("alice", "bob")
        ]
        assert said == [
            ("alice", "op: bob: ping"),
            ("bob", "alice: pong"),
            ("alice", "bob: ping"),
            ("bob", "op: alice: pong"),
        ]
    finally:
        op.stop()
        swarm.close()


def test_everyone_is_back_after_the_irc_server_is_killed(tmp_path: Path) -> None:
    swarm = agent_swarm(tmp_path)
    op = operator(swarm.irc_port, swarm.state, "op", CONTROL, AGENTS)  # type: ignore[attr-defined]
    try:
        op.say(CONTROL, "!invoke coder alice")
        joined(op, "alice", AGENTS)
    finally:
        op.stop()
    try:
        (pid,) = ngircd_pids(swarm.state)
        os.kill(pid, signal.SIGKILL)
        swarm.wait_for(
            "ngircd restarted",
            lambda s: (
                s["irc"]["managed"]["state"] == "running" and s["irc"]["managed"]["pid"] != pid
            ),
        )
        op = Person(("127.0.0.1", swarm.irc_port), "op").start(CONTROL, AGENTS)  # type: ignore[attr-defined]
        try:
            # Both reconnect with backoff, by themselves; ask once she is back.
            in_channel(op, "alice", AGENTS, timeout=90)
            op.say(AGENTS, "alice: are you back?")
            op.said(AGENTS, "op: alice: are you back?")
            overseer_in_channel(op)
        finally:
            op.stop()
    finally:
        swarm.close()


MODEL_ECHO = (
    'harness: {kind: command, command: ["sh", "-c", '
    '"echo \\"model=$FIRECLAW_MODEL persona=$FIRECLAW_PERSONA\\""]}\n'
)


def test_model_and_persona_change_without_a_restart(tmp_path: Path) -> None:
    swarm = agent_swarm(tmp_path, MODEL_ECHO)
    op = operator(swarm.irc_port, swarm.state, "op", CONTROL, AGENTS)  # type: ignore[attr-defined]
    try:
        op.say(CONTROL, "!invoke coder alice model=m1")
        joined(op, "alice", AGENTS)
        op.say(AGENTS, "alice: which model?")
        op.said(AGENTS, "op: model=m1 persona=")
        (before,) = [a for a in swarm.status()["agents"] if a["agent"] == "alice"]

        op.say(CONTROL, "!model alice m2")
        op.said(CONTROL, "op: alice now uses m2")
        op.say(CONTROL, "!persona alice Terse and exact.")
        op.said(CONTROL, "op: alice has a new persona")
        op.say(AGENTS, "alice: and now?")
        op.said(AGENTS, "op: model=m2 persona=Terse and exact.")
        (after,) = [a for a in swarm.status()["agents"] if a["agent"] == "alice"]
        assert (after["pid"], after["restarts"]) == (before["pid"], before["restarts"])
    finally:
        op.stop()
        swarm.close()


# --- what the README promises an operator, command by command --------------------------


def test_list_and_templates(swarm: Swarm, op: Person) -> None:
    overseer_in_channel(op)
    op.say(CONTROL, "!templates")
    op.said(CONTROL, "op: worker: General-purpose agent for everyday tasks (model smollm2)")
    op.say(CONTROL, "!list")
    op.said(CONTROL, "op: worker-0 (worker, idle, restarts 0)")
    op.say(CONTROL, "!invoke worker alice")
    up = op.said(CONTROL, "op: alice is up: a worker agent on ")
    vm = up.arguments[0].rsplit(" ", 1)[1]
    op.say(CONTROL, "!list")
    op.said(CONTROL, f"op: alice on {vm} (worker, ")


def overseer_lines(person: Person, after: Event, before: Event) -> list[str]:
    """What the overseer said in #control between two events ``person`` saw."""
    seen = person.seen
    start, end = seen.index(after), seen.index(before)
    return [
        e.arguments[0]
        for e in seen[start + 1 : end]
        if e.type == "pubmsg" and e.source.nick == "overseer" and e.target == CONTROL
    ]


def test_reload_applies_a_changed_file_and_rejects_a_broken_one(swarm: Swarm, op: Person) -> None:
    overseer_in_channel(op)
    irc = irc_yaml(swarm.irc_port)  # type: ignore[attr-defined]
    swarm.config.write_text(swarm_yaml(role_yaml("worker", min_idle=2), irc=irc))
    op.say(CONTROL, "!reload")
    op.said(CONTROL, "op: reloaded; changed: worker")
    swarm.wait_for("2 idle workers", idle("worker", 2))

    before = swarm.status()
    swarm.config.write_text("version: 1\nroles: {worker: {pool: {min_idle: many}}}\n")
    op.say(CONTROL, "!reload")
    rejected = op.said(CONTROL, "op: reload rejected: ")
    assert rejected.arguments[0] == (
        f"op: reload rejected: {swarm.config}: roles.worker.pool.min_idle: expected int, got str"
    )
    op.say(CONTROL, "!status")
    status = op.said(CONTROL, "op: worker: 2 idle, 0 active, 0 starting, 0 failed")
    assert overseer_lines(op, rejected, status) == []  # the error was one line
    after = swarm.status()
    assert after["roles"]["worker"]["target"] == before["roles"]["worker"]["target"] == 2
    assert [a["pid"] for a in after["agents"]] == [a["pid"] for a in before["agents"]]
    kinds = [e["kind"] for e in swarm.api.get("/events?limit=1000")["events"]]
    assert kinds.count("reloaded") == 1 and kinds.count("reload_rejected") == 1


def flaky_role(flag: Path) -> str:
    """A role whose guest starts only while ``flag`` exists, and otherwise exits 3."""
    script = f"test -e {flag} || exit 3; exec {PY} -m fireclaw.guest_daemon"
    return role_yaml("flaky", min_idle=1, extra=f"guest_command: [sh, -c, {json.dumps(script)}]\n")


def crashed(swarm: Swarm) -> int:
    return sum(e["kind"] == "crashed" for e in swarm.api.get("/events?limit=1000")["events"])


def test_a_failed_vm_and_a_degraded_role_are_announced_and_reset(tmp_path: Path) -> None:
    """FAST_RESTART: 3 restarts, then the circuit opens; one VM of one is most of them."""
    flag = tmp_path / "healthy"
    flag.touch()
    port = free_port()
    swarm = Swarm(tmp_path, swarm_yaml(flaky_role(flag), irc=irc_yaml(port)))
    swarm.start()
    op = None
    try:
        swarm.wait_for("flaky idle", idle("flaky", 1))
        op = operator(port, swarm.state, "op", CONTROL)
        overseer_in_channel(op)
        flag.unlink()
        (vm,) = swarm.agents("flaky", "idle")
        os.kill(vm["pid"], signal.SIGKILL)
        op.said(CONTROL, "flaky-0 crashed (VMM exited with code -9); restarting in")
        op.said(CONTROL, "flaky-0 failed and will not be restarted: ")
        op.said(CONTROL, "role flaky is degraded: most of its VMs failed (!reset flaky)")
        op.say(CONTROL, "!status")
        op.said(CONTROL, "op: flaky: 0 idle, 0 active, 0 starting, 1 failed, DEGRADED")

        # A failed VM is tried again: it fails the same way, and it is said again.
        crashes = crashed(swarm)
        op.say(CONTROL, "!reset flaky-0")
        op.said(CONTROL, "op: flaky-0: reset (1 cleared)")
        op.said(CONTROL, "role flaky recovered")  # nothing of it failed, for now
        op.said(CONTROL, "flaky-0 failed and will not be restarted: ")
        op.said(CONTROL, "role flaky is degraded: most of its VMs failed (!reset flaky)")
        assert crashed(swarm) > crashes

        # Mended, and reset by role: it comes back and the role recovers.
        flag.touch()
        op.say(CONTROL, "!reset flaky")
        op.said(CONTROL, "op: flaky: reset (1 cleared)")
        op.said(CONTROL, "role flaky recovered")
        swarm.wait_for("flaky idle again", idle("flaky", 1))
        op.say(CONTROL, "!status")
        op.said(CONTROL, "op: flaky: 1 idle, 0 active, 0 starting, 0 failed")
        kinds = [e["kind"] for e in swarm.api.get("/events?limit=1000")["events"]]
        assert kinds.count("degraded") >= 1 and kinds.count("recovered") >= 1
    finally:
        if op is not None:
            op.stop()
        swarm.close()
    assert swarm.leftovers() == NOTHING
