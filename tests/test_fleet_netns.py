"""The fleet on one machine: each host a network namespace of its own.

Three real supervisors (``fireclaw-swarm up``, process backend), each run in
its own namespace with its own state dir and its own managed ngircd, linked
to the other hosts' servers by ``cluster.irc`` at their addresses; a real
PostgreSQL (``pg.py``) in a namespace of its own, reached over TCP with the
password from a file. The namespaces are joined by veth pairs to a bridge in
yet another namespace (``fleetnet.py``), so a host can be cut off the
network by setting its cable down there, as a pulled cable would.

What is shown: a person on one host's server sees every host's agents in
#agents; 500 tasks queued across the fleet are each run once and done once,
their events and the ledger in PostgreSQL; a host killed with ``kill -9`` while
running tasks has them requeued and done by the others, and, restarted,
finishes none of them again; a host cut off the network likewise, the split
announced in #control, the lead of the overseers moving off it when it led,
and, its cable back, it finishes nothing twice (its claims' epochs are old).

Every wait is for an event, with a deadline from the product's own timings
(``cluster.silent_after``, the heartbeat, the lead retry, the IRC link's
retry) and room for a loaded machine.
"""

from __future__ import annotations

import collections
import json
import os
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
from fleetnet import FleetNet, PersonIn
from ircperson import Event, Person
from pg import PgCluster, start_cluster
from swarmctl import FIRECLAW, NOTHING, WAIT, Swarm, role_yaml, swarm_yaml
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
#: (its keepalives: under 10 s of silence) and another host's next try.
LEAD_WAIT = SILENT_AFTER + 3 * LEAD_RETRY + LINK_WAIT
#: 500 tasks, each in a VM of its own, on two busy cores.
DRAIN_WAIT = 900.0


def harness(gate: Path, runs: Path) -> str:
    """Each run appends its prompt to ``runs`` (so that a task run twice shows);
    a prompt starting with "hold" waits for ``gate`` first."""
    script = (
        f'case "$FIRECLAW_PROMPT" in hold*) while [ ! -e {gate} ]; do sleep 0.05; done;; esac; '
        f'echo "$FIRECLAW_PROMPT" >> {runs}; printf "%s: %s\\n" "$FIRECLAW_AGENT" "$FIRECLAW_PROMPT"'
    )
    return f"harness: {{kind: command, timeout: 600, command: {json.dumps(['sh', '-c', script])}}}\n"


@dataclass
class Fleet:
    """The running fleet: its network, database, hosts, and the files its tasks use."""

    net: FleetNet
    pg: PgCluster
    hosts: dict[str, Swarm]
    gate: Path
    runs: Path
    people: list[Person] = field(default_factory=list)

    def sql(self, query: str, *args: object) -> list[tuple[Any, ...]]:
        """Rows of ``query`` on the fleet's database (over the server's unix socket:
        the test process is in none of the fleet's namespaces)."""
        with self.pg.connect(DATABASE) as conn:
            return conn.execute(query, args).fetchall()

    def person(self, host: str, nick: str, *channels: str, operator: bool = False) -> Person:
        """Someone on ``host``'s server, in ``channels``: an IRC operator if asked."""
        someone = PersonIn(self.net.members[host].netns, ("127.0.0.1", CLIENT_PORT), nick)
        self.people.append(someone)
        someone.start()
        if operator:
            someone.oper(OPER_NAME, oper_password(self.hosts[host].state))
        for channel in channels:
            someone.join(channel)
        return someone

    def ran(self) -> collections.Counter[str]:
        """How many times each prompt was run to its end, on any host."""
        return collections.Counter(self.runs.read_text().splitlines())


def host_yaml(net: FleetNet, name: str, pg: PgCluster, roles: str, link_file: Path) -> str:
    peers = "".join(
        f"      - {{name: {other}.fireclaw, address: {member.address.ip}, port: {LINK_PORT},"
        f" password_file: {link_file.name}}}\n"
        for other, member in net.members.items()
        if other in HOSTS and other != name
    )
    return swarm_yaml(roles, irc=f"managed: {{port: {CLIENT_PORT}}}") + (
        f"cluster:\n  database: '{pg.tcp_dsn(DATABASE)}'\n  host: {name}\n"
        f"  password_file: {pg.password_file}\n  silent_after: {SILENT_AFTER}\n"
        f"  irc:\n    listen: {net.members[name].address.ip}\n    port: {LINK_PORT}\n"
        f"    peers:\n{peers}"
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
    try:
        db = net.add("db")
        for name in HOSTS:
            net.add(name)
        pg = start_cluster(listen=db.address, netns=db.netns)
        with pg.connect() as conn:
            conn.execute(f'CREATE DATABASE "{DATABASE}"')
        roles = role_yaml(
            "worker", min_idle=2, max_active=4, extra=harness(open_dir / "gate", runs)
        )
        for name in HOSTS:
            root = tmp_path / name
            root.mkdir()
            link_file = root / "irc-link"  # relative in swarm.yaml: anchored at its folder
            link_file.write_text(LINK_PASSWORD + "\n")
            link_file.chmod(0o600)
            text = host_yaml(net, name, pg, roles, link_file)
            hosts[name] = Swarm(root, text, command=net.command(name, [FIRECLAW]))
        for swarm in hosts.values():
            swarm.start()
        made = Fleet(net, pg, hosts, open_dir / "gate", runs)
        yield made
        for name, swarm in hosts.items():
            assert swarm.stop() == 0, f"{name}:\n{swarm.tail()}"
    finally:
        for someone in made.people if made is not None else []:
            someone.stop()
        for swarm in hosts.values():
            swarm.close()
        if pg is not None:
            pg.stop()
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


def test_a_person_sees_the_whole_fleet_and_500_tasks_run_once_each(fleet: Fleet) -> None:
    # An agent on each host, named for its host; with the overseers, all in #agents
    # as seen from alpha's server.
    agents = {swarm.api.post("/agents", {"role": "worker"})["name"] for swarm in fleet.hosts.values()}
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

    started = time.monotonic()
    names = list(fleet.hosts)
    ids = [
        fleet.hosts[names[i % len(names)]].api.post(
            "/tasks", {"role": "worker", "prompt": f"task {i}"}
        )["id"]
        for i in range(TASKS)
    ]
    fleet.hosts["alpha"].wait_for(
        f"{TASKS} tasks done",
        lambda s: s["tasks"]["done"] + s["tasks"]["failed"] == TASKS,
        DRAIN_WAIT,
    )
    took = time.monotonic() - started
    rows = fleet.sql("SELECT id, state, host, epoch, attempts FROM tasks ORDER BY id")
    by_host = collections.Counter(host for _, _, host, _, _ in rows)
    print(f"\n{TASKS} tasks on {len(HOSTS)} hosts in {took:.1f} s: {dict(by_host)}")
    assert [r[0] for r in rows] == sorted(ids)
    assert all((state, epoch) == ("done", 1) for _, state, _, epoch, _ in rows), rows
    assert set(by_host) == set(HOSTS)
    done = collections.Counter(
        json.loads(d)["task_id"] for (d,) in fleet.sql("SELECT detail FROM events WHERE kind = 'task_done'")
    )
    assert done == {i: 1 for i in ids}
    assert fleet.ran() == {f"task {i}": 1 for i in range(TASKS)}


#: Tasks held running at once: every host's every slot (max_active 4), so that
#: the lost host surely holds some.
HELD = 4 * len(HOSTS)


def hold_tasks(fleet: Fleet) -> dict[int, str]:
    """``HELD`` tasks that wait for the gate, queued through each host in turn and
    all claimed: task id to the host running it."""
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
    held = dict(fleet.sql("SELECT id, host FROM tasks WHERE state = 'claimed'"))
    assert sorted(held) == ids
    return held


def leader(fleet: Fleet) -> str:
    """The host whose overseer leads the fleet now (its last ``fleet_lead`` event)."""
    rows = fleet.sql(
        "SELECT host, kind FROM events WHERE kind IN ('fleet_lead', 'fleet_lead_lost')"
        " ORDER BY id DESC LIMIT 1"
    )
    assert rows and rows[0][1] == "fleet_lead", rows
    return str(rows[0][0])


def done_once(fleet: Fleet, ids: list[int]) -> collections.Counter[int]:
    """task_done events by task, among ``ids``."""
    return collections.Counter(
        task
        for (d,) in fleet.sql("SELECT detail FROM events WHERE kind = 'task_done'")
        if (task := json.loads(d)["task_id"]) in ids
    )


def test_a_host_killed_mid_task_has_its_tasks_done_elsewhere_and_finishes_none_twice(
    fleet: Fleet,
) -> None:
    held = hold_tasks(fleet)
    lost = leader(fleet)
    lost_tasks = sorted(i for i, h in held.items() if h == lost)
    assert len(lost_tasks) == 4, held
    bob_host = next(h for h in HOSTS if h != lost)
    bob = fleet.person(bob_host, "bob", "#control")

    other = fleet.hosts[bob_host]
    fleet.hosts[lost].kill9()
    killed = time.monotonic()
    # Past silent_after another host requeues the lost host's tasks (every slot
    # left is busy: they wait in the queue).
    other.wait_for(
        f"{lost}'s tasks requeued", lambda s: s["tasks"]["queued"] == len(lost_tasks), REQUEUE_WAIT
    )
    took = bob.expect(
        "another overseer taking the lead",
        lambda e: e.type == "pubmsg" and "leads the fleet now" in e.arguments[0],
        LEAD_WAIT,
    )
    assert took.source.nick != f"overseer-{lost}"
    fleet.gate.touch()
    other.wait_for("every held task done", lambda s: s["tasks"]["done"] == HELD, WAIT)
    rows = fleet.sql("SELECT id, state, host, epoch FROM tasks ORDER BY id")
    print(f"\nkill -9 of {lost} to its {len(lost_tasks)} tasks done elsewhere: {time.monotonic() - killed:.1f} s")
    for task_id, state, host, epoch in rows:
        if task_id in lost_tasks:
            assert host != lost and epoch == 2, rows
        else:
            assert (host, epoch) == (held[task_id], 1), rows

    # Back on the same state dir: it reclaims what it left, and finishes nothing again.
    fleet.hosts[lost].start()
    fleet.hosts[lost].wait_for("its pool refilled", lambda s: s["roles"]["worker"]["idle"] == 2)
    assert fleet.sql("SELECT id, state, host, epoch FROM tasks ORDER BY id") == rows
    assert done_once(fleet, list(held)) == {i: 1 for i in held}
    assert fleet.ran() == {f"hold {i}": 1 for i in range(HELD)}
