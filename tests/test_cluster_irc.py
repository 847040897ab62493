"""Two real supervisors (``fireclaw-swarm up``, process backend) of one cluster
on this machine, sharing a real PostgreSQL (``pg.py``), each with its managed
ngircd linked to the other's by ``cluster.irc`` in its swarm.yaml: a person on
one host's server sees the other host's overseer, named for its host; when that host stops, the
netsplit is announced in #control and the first host goes on serving; the
link password, from a file, is in no log. One overseer leads the fleet: a
command given once in #control is carried out and answered once, and when the
leading host stops the other's overseer takes the lead and says so. Both on
loopback, distinct ports."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import pytest
import trio
from fireclaw.supervisor.cluster import LEAD_RETRY
from fireclaw.supervisor.ircd import CONNECT_RETRY, START_TIMEOUT
from ircperson import Event, Person, person
from pg import PgCluster
from swarmctl import NOTHING, Swarm, role_yaml, swarm_yaml
from test_ircd import free_port, ngircd_of
from test_overseer import operator

pytestmark = [
    pytest.mark.root,
    pytest.mark.skipif(os.geteuid() != 0, reason="the supervisor's VM plumbing needs root"),
]

#: A link comes up within one CONNECT_RETRY of both servers listening; tripled,
#: with the start, for a loaded machine.
LINK_WAIT = 3 * (START_TIMEOUT + CONNECT_RETRY)
PASSWORD = "fleet-link-password-0123456789abcdef"
#: The other host's overseer tries for the lead every LEAD_RETRY seconds once the
#: leader's connection is gone; its line comes over a link that may be coming up
#: again meanwhile. Tripled, for a loaded machine.
LEAD_WAIT = LINK_WAIT + 3 * LEAD_RETRY


def host_yaml(
    name: str,
    dsn: str,
    pg_password: Path,
    ports: dict[str, tuple[int, int]],
    link_file: Path,
    roles: str = "",
) -> str:
    client_port, link_port = ports[name]
    (peer,) = (p for p in ports if p != name)
    irc = f"managed: {{port: {client_port}}}"
    base = (
        swarm_yaml(roles, irc=irc)
        if roles
        else swarm_yaml(irc=irc).replace("roles:\n", "roles: {}\n")
    )
    return base + (
        f"cluster:\n  database: '{dsn}'\n  host: {name}\n  password_file: {pg_password}\n"
        f"  irc:\n    port: {link_port}\n    peers:\n"
        f"      - {{name: {peer}.fireclaw, address: 127.0.0.1, port: {ports[peer][1]},"
        f" password_file: {link_file.name}}}\n"
    )


def two_hosts(
    tmp_path: Path, pg_cluster: PgCluster, pg_dsn: str, roles: str = ""
) -> tuple[dict[str, tuple[int, int]], dict[str, Swarm]]:
    """alpha and beta, linked, sharing ``pg_dsn``: their ports and their swarms (not started)."""
    ports = {name: (free_port(), free_port()) for name in ("alpha", "beta")}
    swarms = {}
    for name in ports:
        root = tmp_path / name
        root.mkdir()
        link_file = root / "irc-link"  # relative in swarm.yaml: anchored at its folder
        link_file.write_text(PASSWORD + "\n")
        link_file.chmod(0o600)
        text = host_yaml(name, pg_dsn, pg_cluster.password_file, ports, link_file, roles)
        swarms[name] = Swarm(root, text)
    return ports, swarms


async def test_two_supervisors_link_their_servers(
    tmp_path: Path, pg_cluster: PgCluster, pg_dsn: str
) -> None:
    ports, swarms = two_hosts(tmp_path, pg_cluster, pg_dsn)
    try:
        for swarm in swarms.values():
            await trio.to_thread.run_sync(swarm.start)
        async with person(("127.0.0.1", ports["alpha"][0]), "alice", "#control") as alice:
            # overseer-beta is in #control on beta's server: alice sees it join over the
            # link, or finds it there when she joined after the link came up.
            seen = await alice.aexpect(
                "beta's overseer in #control",
                lambda e: (
                    (e.type == "join" and e.source.nick == "overseer-beta")
                    or (e.type == "namreply" and "overseer-beta" in e.arguments[-1].split())
                ),
                LINK_WAIT,
            )
            assert seen is not None
            # beta's host stops: alpha's overseer says so in #control, beta's
            # overseer quits in the netsplit, and alpha goes on serving.
            assert await trio.to_thread.run_sync(swarms["beta"].stop) == 0
            said = await alice.aexpect(
                "the netsplit announced by overseer-alpha",
                lambda e: e.type == "pubmsg" and e.source.nick == "overseer-alpha"
                and "netsplit" in e.arguments[0],
                LINK_WAIT,
            )  # fmt: skip
            assert "IRC server beta.fireclaw left the network" in said.arguments[0]
            await alice.aexpect(
                "beta's overseer quitting",
                lambda e: e.type == "quit" and e.source.nick == "overseer-beta",
            )
            async with person(("127.0.0.1", ports["alpha"][0]), "carol", "#control") as carol:
                await carol.aexpect(
                    "overseer-alpha in #control",
                    lambda e: e.type == "namreply" and "overseer-alpha" in e.arguments[-1].split(),
                )
        assert await trio.to_thread.run_sync(swarms["alpha"].stop) == 0
    finally:
        for swarm in swarms.values():
            swarm.close()
    for name, swarm in swarms.items():
        assert swarm.leftovers() == NOTHING
        conf = swarm.state / "ircd" / "ngircd.conf"
        assert ngircd_of(conf) == []
        text = conf.read_text()
        assert f"Name = {name}.fireclaw\n" in text and f"MyPassword = {PASSWORD}\n" in text
        assert conf.stat().st_mode & 0o077 == 0
        for log in [swarm.log, *(swarm.state / "logs").iterdir()]:
            assert PASSWORD not in log.read_text(errors="replace"), log


def _from_overseer(e: Event) -> bool:
    return e.type == "pubmsg" and e.source.nick.startswith("overseer-")


def _answer_to(nick: str) -> Callable[[Event], bool]:
    """An overseer's answer to ``nick`` in the channel (announcements are not)."""
    return lambda e: _from_overseer(e) and e.arguments[0].startswith(f"{nick}: ")


def _queued(pg_cluster: PgCluster, pg_dsn: str, prompt: str) -> list[tuple[object, ...]]:
    """The tasks in PostgreSQL with ``prompt``: (id, role)."""
    with pg_cluster.connect(pg_dsn.rsplit("/", 1)[1].split("?")[0]) as conn:
        return conn.execute(
            "SELECT id, role FROM tasks WHERE prompt = %s ORDER BY id", (prompt,)
        ).fetchall()


def test_one_overseer_leads_the_fleet_and_another_takes_over_when_its_host_stops(
    tmp_path: Path, pg_cluster: PgCluster, pg_dsn: str
) -> None:
    ports, swarms = two_hosts(
        tmp_path, pg_cluster, pg_dsn, role_yaml("worker", min_idle=0, max_active=1)
    )
    people: list[Person] = []
    try:
        for swarm in swarms.values():
            swarm.start()
        alice = operator(ports["alpha"][0], swarms["alpha"].state, "alice", "#control")
        people.append(alice)
        # Both overseers hear #control before the command: beta's over the link.
        alice.expect(
            "beta's overseer in #control",
            lambda e: (
                (e.type == "join" and e.source.nick == "overseer-beta")
                or (e.type == "namreply" and "overseer-beta" in e.arguments[-1].split())
            ),
            LINK_WAIT,
        )
        alice.say("#control", "!task worker once in the fleet")
        answer = alice.expect("the answer to !task", _answer_to("alice"))
        assert "queued for worker" in answer.arguments[0], answer.arguments
        leader = answer.source.nick.removeprefix("overseer-")
        other = next(name for name in swarms if name != leader)
        # A later command answered by the leader: the other overseer, which heard
        # both, answered neither.
        alice.say("#control", "!status")
        status = alice.expect("the answer to !status", _answer_to("alice"))
        assert status.source.nick == f"overseer-{leader}", status.arguments
        assert "worker:" in status.arguments[0]
        said = [e.source.nick for e in alice.seen if _answer_to("alice")(e)]
        assert f"overseer-{other}" not in said, said
        assert [role for _, role in _queued(pg_cluster, pg_dsn, "once in the fleet")] == ["worker"]

        # The leading host stops: its lock goes with its connection, and the
        # other host's overseer takes the lead within its retry period.
        bob = operator(ports[other][0], swarms[other].state, "bob", "#control")
        people.append(bob)
        assert swarms[leader].stop() == 0
        took = bob.expect(
            f"overseer-{other} taking the lead",
            lambda e: _from_overseer(e) and "leads the fleet now" in e.arguments[0],
            LEAD_WAIT,
        )
        assert took.source.nick == f"overseer-{other}"
        assert took.arguments[0] == f"overseer-{other} leads the fleet now"
        bob.say("#control", "!task worker after the takeover")
        answer = bob.expect("the answer to the second !task", _answer_to("bob"))
        assert answer.source.nick == f"overseer-{other}"
        assert "queued for worker" in answer.arguments[0], answer.arguments
        assert len(_queued(pg_cluster, pg_dsn, "after the takeover")) == 1
        assert swarms[other].stop() == 0
    finally:
        for someone in people:
            someone.stop()
        for swarm in swarms.values():
            swarm.close()
    for swarm in swarms.values():
        assert swarm.leftovers() == NOTHING
        assert ngircd_of(swarm.state / "ircd" / "ngircd.conf") == []
