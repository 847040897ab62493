"""The fleet on one machine: each host a network namespace of its own.

Three real supervisors (``fireclaw-swarm up``, process backend), each run in
its own namespace with its own state dir and its own managed ngircd, linked
to the other hosts' servers by ``cluster.irc`` at their addresses, and its own
model server on its loopback (a test double, ``scripted_model.py``, speaking
real HTTP, served from a thread that joined the namespace); a real
PostgreSQL (``pg.py``) in a namespace of its own, reached over TCP with the
password from a file. The namespaces are joined by veth pairs to a bridge in
yet another namespace (``fleetnet.py``), so a host can be cut off the
network by setting its cable down there, as a pulled cable would.

What is shown: a person on one host's server sees every host's agents in
#agents; 500 tasks queued across the fleet are each run once and done once,
their events and the ledger in PostgreSQL; a host killed with ``kill -9`` while
running tasks has them requeued and done by the others, and, restarted,
finishes none of them again; a host cut off the network likewise, the split
announced in #control, the lead of the overseers moving off it when it led
(the old leader stopping before the new one starts), and, its cable back, it
finishes nothing twice (its claims' epochs are old).

Every wait is for an event, with a deadline from the product's own timings
(``cluster.silent_after``, the heartbeat, the lead retry, the IRC link's
retry) and room for a loaded machine.
"""

from __future__ import annotations

import collections
import contextlib
import datetime
import json
import os
import re
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from fireclaw.supervisor.cluster import HEARTBEAT, LEAD_RETRY
from fireclaw.supervisor.ircd import CONNECT_RETRY
from fireclaw.supervisor.ircd import START_TIMEOUT as IRCD_START
from fireclaw.supervisor.ircd_conf import PING_TIMEOUT, PONG_TIMEOUT
from fireclaw.supervisor.state_pg_db import HOLDER_SILENCE
from fleetnet import FleetNet, PersonIn, served_in
from ircperson import Event, Person
from pg import PgCluster, start_cluster
from scripted_model import ScriptedModel, text
from swarmctl import FIRECLAW, NOTHING, WAIT, Swarm, role_yaml, swarm_yaml
from test_fleet_ops_swarm import _overseer_said
from test_overseer import OPER_NAME, oper_password

pytestmark = [
    pytest.mark.root,
    pytest.mark.skipif(os.geteuid() != 0, reason="network namespaces need root"),
]

HOSTS = ("alpha", "beta", "gamma")
DATABASE = "fleet"
#: Each host's ngircd: clients on loopback, links on its fleet address. The same
#: ports on every host: each has a network of its own.
CLIENT_PORT = 6667
LINK_PORT = 6668
LINK_PASSWORD = "fleet-link-password-0123456789abcdef"
#: The least the config allows: a lost host's tasks move after this long.
SILENT_AFTER = 15.0
TASKS = 500
#: A link comes up within one CONNECT_RETRY of both servers listening; tripled,
#: with the start, for a loaded machine.
LINK_WAIT = 3 * (IRCD_START + CONNECT_RETRY)
#: From a host's loss to its tasks done elsewhere: silence, the next heartbeat
#: round of a surviving host, a VM to run each task in; with room for load.
REQUEUE_WAIT = SILENT_AFTER + 2 * HEARTBEAT + WAIT
#: The lead moves once the database server has dropped the leader's connection
#: (HOLDER_SILENCE, and a keepalive probe) and at another host's next try; its
#: words reach the watcher on that host's server. Tripled, for a loaded machine.
LEAD_WAIT = 3 * (HOLDER_SILENCE + 1 + LEAD_RETRY) + LINK_WAIT
#: A server cut off is known gone once silent for PingTimeout + PongTimeout.
SPLIT_WAIT = 2 * (PING_TIMEOUT + PONG_TIMEOUT)
#: 500 tasks, each in a VM of its own, on two busy cores.
DRAIN_WAIT = 900.0


#: The 500 tasks' role: each task one call of its host's model server, through
#: the host's gateway, which records it in the ledger.
CHAT_ROLE = """
  chat:
    template: worker
    model: scripted
    pool: {min_idle: 2, max_active: 4}
    harness: {kind: chat, tool_mode: native, tools: [], max_steps: 2, max_tokens: 64,
              timeout: 300}
"""


def harness(gate: Path, runs: Path) -> str:
    """Each run appends its prompt to ``runs`` (so that a task run twice shows);
    a prompt starting with "hold" waits for ``gate`` first."""
    script = (
        f'case "$FIRECLAW_PROMPT" in hold*) while [ ! -e {gate} ]; do sleep 0.05; done;; esac; '
        f'echo "$FIRECLAW_PROMPT" >> {runs}; '
        'printf "%s: %s\\n" "$FIRECLAW_AGENT" "$FIRECLAW_PROMPT"'
    )
    return (
        f"harness: {{kind: command, timeout: 600, command: {json.dumps(['sh', '-c', script])}}}\n"
    )


@dataclass
class Fleet:
    """The running fleet: its network, database, hosts, and the files its tasks use."""

    net: FleetNet
    pg: PgCluster
    hosts: dict[str, Swarm]
    gate: Path
    runs: Path
    models: dict[str, ScriptedModel]
    people: list[Person] = field(default_factory=list)

    def sql(self, query: str, *args: object) -> list[tuple[Any, ...]]:
        """Rows of ``query`` on the fleet's database (over the server's unix socket:
        the test process is in none of the fleet's namespaces)."""
        with self.pg.connect(DATABASE) as conn:
            return conn.execute(query, args).fetchall()

    def person(self, host: str, nick: str, *channels: str) -> Person:
        """Someone on ``host``'s server (from inside its namespace), in ``channels``."""
        someone = PersonIn(self.net.members[host].netns, ("127.0.0.1", CLIENT_PORT), nick)
        self.people.append(someone)
        return someone.start(*channels)

    def ran(self) -> collections.Counter[str]:
        """How many times each prompt was run to its end, on any host."""
        return collections.Counter(self.runs.read_text().splitlines())


def host_yaml(
    net: FleetNet, name: str, pg: PgCluster, roles: str, link_file: Path, model_url: str
) -> str:
    peers = "".join(
        f"      - {{name: {other}.fireclaw, address: {member.address.ip}, port: {LINK_PORT},"
        f" password_file: {link_file.name}}}\n"
        for other, member in net.members.items()
        if other in HOSTS and other != name
    )
    return (
        f"models:\n  server: {model_url}\n"
        + swarm_yaml(roles, irc=f"managed: {{port: {CLIENT_PORT}}}")
        + (
            f"cluster:\n  database: '{pg.tcp_dsn(DATABASE)}'\n  host: {name}\n"
            f"  password_file: {pg.password_file}\n  silent_after: {SILENT_AFTER}\n"
            f"  irc:\n    listen: {net.members[name].address.ip}\n    port: {LINK_PORT}\n"
            f"    peers:\n{peers}"
        )
    )


@pytest.fixture
def fleet(tmp_path: Path) -> Iterator[Fleet]:
    """The fleet, started; afterwards every host stopped, the database server
    stopped, and nothing left of any of them: no VM, namespace, process or socket."""
    open_dir = Path(tempfile.mkdtemp(prefix="fireclaw-test-"))
    open_dir.chmod(0o755)  # the agent user runs the harness: it must see the gate
    runs = open_dir / "runs"
    runs.touch(mode=0o666)
    runs.chmod(0o666)
    net = FleetNet()
    pg: PgCluster | None = None
    hosts: dict[str, Swarm] = {}
    made: Fleet | None = None
    models = {name: ScriptedModel([text("done") for _ in range(TASKS)]) for name in HOSTS}
    serving = contextlib.ExitStack()
    try:
        db = net.add("db")
        for name in HOSTS:
            net.add(name)
        pg = start_cluster(listen=db.address, netns=db.netns)
        with pg.connect() as conn:
            conn.execute(f'CREATE DATABASE "{DATABASE}"')
        worker = "model: scripted\n" + harness(open_dir / "gate", runs)
        roles = CHAT_ROLE + role_yaml("worker", min_idle=1, max_active=4, extra=worker)
        for name in HOSTS:
            url = serving.enter_context(served_in(net.members[name].netns, models[name]))
            root = tmp_path / name
            root.mkdir()
            link_file = root / "irc-link"  # relative in swarm.yaml: anchored at its folder
            link_file.write_text(LINK_PASSWORD + "\n")
            link_file.chmod(0o600)
            config = host_yaml(net, name, pg, roles, link_file, url)
            hosts[name] = Swarm(root, config, command=net.command(name, [FIRECLAW]))
        for swarm in hosts.values():
            swarm.start()
        made = Fleet(net, pg, hosts, open_dir / "gate", runs, models)
        yield made
        codes = {name: swarm.stop() for name, swarm in hosts.items()}
        assert codes == {name: 0 for name in hosts}, {n: hosts[n].tail() for n in hosts}
    finally:
        for someone in made.people if made is not None else []:
            someone.stop()
        for swarm in hosts.values():
            swarm.close()
        if pg is not None:
            pg.stop()
        serving.close()
        left = net.close()
        shutil.rmtree(open_dir, ignore_errors=True)
    for name, swarm in hosts.items():
        assert swarm.leftovers() == NOTHING, name
    assert left == {"processes": [], "netns": []}


def in_channel(channel: str, nicks: set[str]) -> Callable[[Event], bool]:
    """A predicate that follows who is in ``channel`` (names, joins, parts, quits),
    true once all of ``nicks`` are."""
    present: set[str] = set()

    def seen(e: Event) -> bool:
        if e.type == "namreply" and e.arguments[1] == channel:
            present.update(n.lstrip("@+") for n in e.arguments[2].split())
        elif e.type == "join" and e.target == channel:
            present.add(e.source.nick)
        elif e.type in ("part", "kick") and e.target == channel:
            present.discard(e.source.nick if e.type == "part" else e.arguments[0])
        elif e.type == "quit":
            present.discard(e.source.nick)
        return nicks <= present

    return seen


def asked(models: dict[str, ScriptedModel]) -> collections.Counter[str]:
    """How many times the hosts' model servers were asked each ``task NNN.`` prompt."""
    return collections.Counter(
        prompt
        for model in models.values()
        for request in model.requests
        for prompt in set(re.findall(r"task \d{3}\.", json.dumps(request["messages"])))
    )


def test_a_person_sees_the_whole_fleet_and_500_tasks_run_once_each(fleet: Fleet) -> None:
    # An agent on each host, named for its host; with the overseers, all in #agents
    # as seen from alpha's server.
    agents = {s.api.post("/agents", {"role": "worker"})["name"] for s in fleet.hosts.values()}
    assert agents == {f"worker-1-{name}" for name in HOSTS}
    everyone = agents | {f"overseer-{name}" for name in HOSTS}
    alice = fleet.person("alpha", "alice", "#agents")
    alice.expect(
        f"every host's agents in #agents: {sorted(everyone)}",
        in_channel("#agents", everyone),
        LINK_WAIT,
    )
    # Every host is in the fleet's hosts table, beating.
    hosts = fleet.sql("SELECT name, now() - heartbeat_at FROM hosts ORDER BY name")
    assert [name for name, _ in hosts] == sorted(HOSTS)
    assert all(age.total_seconds() < SILENT_AFTER for _, age in hosts), hosts
    # ... and an operator on beta's server asking !fleet is told of every host, by
    # the leading overseer, wherever it runs.
    op = fleet.person("beta", "op")
    op.oper(OPER_NAME, oper_password(fleet.hosts["beta"].state))
    op.join("#control")
    op.say("#control", "!fleet")
    for name in HOSTS:
        line = op.expect(f"!fleet's line for {name}", _overseer_said(f"op: {name}: up;"), LINK_WAIT)
        assert "roles " in line.arguments[0] and line.arguments[0].endswith(" s ago")

    started = time.monotonic()
    names = list(fleet.hosts)
    prompts = {
        fleet.hosts[names[i % len(names)]].api.post(
            "/tasks", {"role": "chat", "prompt": f"task {i:03d}."}
        )["id"]: f"task {i:03d}."
        for i in range(TASKS)
    }
    fleet.hosts["alpha"].wait_for(
        f"{TASKS} tasks done",
        lambda s: s["tasks"]["done"] + s["tasks"]["failed"] == TASKS,
        DRAIN_WAIT,
    )
    took = time.monotonic() - started
    rows = fleet.sql("SELECT id, state, host, epoch, result FROM tasks ORDER BY id")
    by_host = collections.Counter(host for _, _, host, _, _ in rows)
    print(f"\n{TASKS} tasks on {len(HOSTS)} hosts in {took:.1f} s"
          f" ({TASKS / took:.1f}/s): {dict(sorted(by_host.items()))}")  # fmt: skip
    assert [r[0] for r in rows] == sorted(prompts)
    assert all((s, e, r.strip()) == ("done", 1, "done") for _, s, _, e, r in rows), rows
    assert set(by_host) == set(HOSTS)
    # Each asked its model once, and done once: by its events and its ledger row,
    # stamped with the host that ran it, all in PostgreSQL.
    assert asked(fleet.models) == {p: 1 for p in prompts.values()}
    assert done_by_event(fleet) == {i: 1 for i in prompts}
    ran_on = {i: host for i, _, host, _, _ in rows}
    calls = fleet.sql("SELECT task, host, role, outcome FROM model_calls ORDER BY task")
    assert calls == [(i, ran_on[i], "chat", "ok") for i in sorted(prompts)]
    events = dict(fleet.sql("SELECT host, count(*) FROM events GROUP BY host"))
    assert set(events) == set(HOSTS)


#: Tasks held running at once: every host's every slot (max_active 4), so that
#: the lost host surely holds some.
HELD = 4 * len(HOSTS)


@dataclass
class Held:
    """The held tasks: by id, the host running each and its prompt."""

    hosts: dict[int, str]
    prompts: dict[int, str]

    def of(self, host: str) -> list[int]:
        return sorted(i for i, h in self.hosts.items() if h == host)


def hold_tasks(fleet: Fleet) -> Held:
    """``HELD`` tasks that wait for the gate, queued through each host in turn, once
    all are claimed."""
    names = list(fleet.hosts)
    ids = [
        fleet.hosts[names[i % len(names)]].api.post(
            "/tasks", {"role": "worker", "prompt": f"hold {i}"}
        )["id"]
        for i in range(HELD)
    ]
    fleet.hosts["alpha"].wait_for(
        f"{HELD} tasks running", lambda s: s["tasks"]["claimed"] == HELD, WAIT
    )
    rows = fleet.sql("SELECT id, host, prompt FROM tasks WHERE state = 'claimed'")
    assert sorted(i for i, _, _ in rows) == ids
    return Held({i: h for i, h, _ in rows}, {i: p for i, _, p in rows})


def leader(fleet: Fleet) -> str:
    """The host whose overseer leads the fleet now, by the events in the database:
    the last to take the lead, unless it said it lost it."""
    rows = fleet.sql(
        "SELECT host, kind FROM events WHERE kind IN ('fleet_lead', 'fleet_lead_lost')"
        " ORDER BY id DESC LIMIT 1"
    )
    assert rows and rows[0][1] == "fleet_lead", rows
    return str(rows[0][0])


def tasks(fleet: Fleet) -> list[tuple[Any, ...]]:
    return fleet.sql("SELECT id, state, host, epoch FROM tasks ORDER BY id")


def done_by_event(fleet: Fleet) -> collections.Counter[int]:
    """How many ``task_done`` events each task has."""
    return collections.Counter(
        json.loads(d)["task_id"]
        for (d,) in fleet.sql("SELECT detail FROM events WHERE kind = 'task_done'")
    )


def last_logged(swarm: Swarm, text: str) -> datetime.datetime:
    """When the supervisor last logged a line with ``text`` (its log's timestamps:
    every host runs on this machine's one clock)."""
    lines = [line for line in swarm.log.read_text().splitlines() if text in line]
    assert lines, f"{text!r} not in {swarm.log}"
    return datetime.datetime.strptime(lines[-1][:23], "%Y-%m-%d %H:%M:%S,%f")


def _taking_lead(e: Event) -> bool:
    return e.type == "pubmsg" and e.arguments[0].endswith(" leads the fleet now")


def _split(host: str) -> Callable[[Event], bool]:
    return lambda e: (
        e.type == "pubmsg"
        and e.source.nick.startswith("overseer-")
        and e.arguments[0].startswith(f"netsplit: IRC server {host}.fireclaw left the network")
    )


def the_lead_moved(fleet: Fleet, lost: str, watchers: dict[str, Person]) -> str:
    """The host that took the lead from ``lost``: its overseer said so in #control,
    heard by the watcher on its server (whatever island of a split it was on)."""
    new = leader(fleet)
    assert new != lost
    said = watchers[new].expect(f"overseer-{new} taking the lead", _taking_lead, LEAD_WAIT)
    assert said.source.nick == f"overseer-{new}"
    return new


def lose_the_leader(fleet: Fleet) -> tuple[str, Held, dict[str, Person]]:
    """The leading host, once it runs some held tasks; the held tasks; someone in
    #control on each other host's server."""
    held = hold_tasks(fleet)
    lost = leader(fleet)
    assert len(held.of(lost)) == 4, held
    others = [h for h in HOSTS if h != lost]
    watchers = {h: fleet.person(h, f"watcher-{h}"[:9], "#control") for h in others}
    # The servers linked: each watcher sees every host's overseer.
    overseers = {f"overseer-{h}" for h in HOSTS}
    for host, watcher in watchers.items():
        watcher.expect(
            f"every overseer in #control from {host}", in_channel("#control", overseers), LINK_WAIT
        )
    return lost, held, watchers


def test_a_host_killed_mid_task_has_its_tasks_done_elsewhere_and_finishes_none_twice(
    fleet: Fleet,
) -> None:
    lost, held, watchers = lose_the_leader(fleet)
    other = next(iter(watchers))
    # Its ngircd lives on (the next start adopts it): no split, only its
    # overseer's quit; the lead moves once the database has let its lock go.
    fleet.hosts[lost].kill9()
    killed = time.monotonic()
    # Past silent_after another host requeues the lost host's tasks (every slot
    # left is busy: they wait in the queue).
    fleet.hosts[other].wait_for(
        f"{lost}'s tasks requeued",
        lambda s: s["tasks"]["queued"] == len(held.of(lost)),
        REQUEUE_WAIT,
    )
    new = the_lead_moved(fleet, lost, watchers)
    fleet.gate.touch()
    fleet.hosts[other].wait_for("every held task done", lambda s: s["tasks"]["done"] == HELD, WAIT)
    took = time.monotonic() - killed
    rows = tasks(fleet)
    print(f"\nkill -9 of {lost}: its {len(held.of(lost))} tasks done elsewhere {took:.1f} s later;"
          f" lead moved to {new} (silent_after {SILENT_AFTER:.0f} s)")  # fmt: skip
    for task_id, state, host, epoch in rows:
        assert state == "done", rows
        if task_id in held.of(lost):
            assert host != lost and epoch == 2, rows
        else:
            assert (host, epoch) == (held.hosts[task_id], 1), rows

    # Back on its state dir: it reclaims what it left, and finishes nothing again.
    fleet.hosts[lost].start()
    fleet.hosts[lost].wait_for("its pool refilled", lambda s: s["roles"]["worker"]["idle"] == 1)
    assert tasks(fleet) == rows
    assert done_by_event(fleet) == {i: 1 for i in held.hosts}
    # Its VMs went with it: none ran its task to the end once the gate opened.
    assert fleet.ran() == {p: 1 for p in held.prompts.values()}


def test_a_host_cut_off_the_network_loses_its_tasks_and_the_lead_and_finishes_none_twice(
    fleet: Fleet,
) -> None:
    lost, held, watchers = lose_the_leader(fleet)
    other, cut_off = next(iter(watchers)), fleet.hosts[lost]
    fleet.net.cut(lost)
    cut = time.monotonic()
    # Every VM finishes its task, the lost host's too: their results cannot
    # reach the database, and the host holds them.
    fleet.gate.touch()
    cut_off.wait_for(
        "its results held",
        lambda s: not s["state"]["writable"] and s["state"]["pending_writes"] >= len(held.of(lost)),
        REQUEUE_WAIT,
    )
    fleet.hosts[other].wait_for(
        "every held task done", lambda s: s["tasks"]["done"] == HELD, REQUEUE_WAIT
    )
    took = time.monotonic() - cut
    rows = tasks(fleet)
    for task_id, state, host, epoch in rows:
        assert state == "done", rows
        if task_id in held.of(lost):
            assert host != lost and epoch == 2, rows
        else:
            assert (host, epoch) == (held.hosts[task_id], 1), rows
    # A server cut off is known gone only once silent past ngircd's ping timeout.
    split = watchers[other].expect("the split in #control", _split(lost), SPLIT_WAIT)
    split_took = time.monotonic() - cut
    new = the_lead_moved(fleet, lost, watchers)
    # Never two leaders: the cut-off one stopped (its lease ran out, its look at
    # the lock unanswered) before the new one took the lead.
    stopped = last_logged(cut_off, f"overseer-{lost} no longer leads the fleet")
    took_lead = last_logged(fleet.hosts[new], f"overseer-{new} leads the fleet now")
    assert stopped < took_lead, (stopped, took_lead)
    print(
        f"\n{lost} cut off: its {len(held.of(lost))} tasks done elsewhere {took:.1f} s later,"
        f" lead moved to {new} {(took_lead - stopped).total_seconds():.1f} s after {lost} stopped"
        f" leading, the split said {split_took:.1f} s later: {split.arguments[0]}"
    )

    # The cable back: the lost host's held results are written at last, and
    # refused, as their claims are older than the ones that finished them.
    fleet.net.mend(lost)
    cut_off.wait_for(
        "its held results refused",
        lambda s: s["state"]["writable"] and s["state"]["pending_writes"] == 0,
        WAIT,
    )
    assert tasks(fleet) == rows
    assert done_by_event(fleet) == {i: 1 for i in held.hosts}
    # Run twice (the cut-off host ran its tasks too: nobody could stop it), finished once.
    ran = {p: 2 if i in held.of(lost) else 1 for i, p in held.prompts.items()}
    assert fleet.ran() == ran
