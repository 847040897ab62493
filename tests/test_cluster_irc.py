"""Two real supervisors (``fireclaw-swarm up``, process backend) of one cluster
on this machine, sharing a real PostgreSQL (``pg.py``), each with its managed
ngircd linked to the other's by ``cluster.irc`` in its swarm.yaml: a person on
one host's server sees the other host's overseer, named for its host; when that host stops, the
netsplit is announced in #control and the first host goes on serving; the
link password, from a file, is in no log. Both on loopback, distinct ports."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import trio
from fireclaw.supervisor.ircd import CONNECT_RETRY, START_TIMEOUT
from ircperson import person
from pg import PgCluster
from swarmctl import NOTHING, Swarm, swarm_yaml
from test_ircd import free_port, ngircd_of

pytestmark = [
    pytest.mark.root,
    pytest.mark.skipif(os.geteuid() != 0, reason="the supervisor's VM plumbing needs root"),
]

#: A link comes up within one CONNECT_RETRY of both servers listening; tripled,
#: with the start, for a loaded machine.
LINK_WAIT = 3 * (START_TIMEOUT + CONNECT_RETRY)
PASSWORD = "fleet-link-password-0123456789abcdef"


def host_yaml(
    name: str, dsn: str, pg_password: Path, ports: dict[str, tuple[int, int]], link_file: Path
) -> str:
    client_port, link_port = ports[name]
    (peer,) = (p for p in ports if p != name)
    irc = f"managed: {{port: {client_port}}}"
    return swarm_yaml(irc=irc).replace("roles:\n", "roles: {}\n") + (
        f"cluster:\n  database: '{dsn}'\n  host: {name}\n  password_file: {pg_password}\n"
        f"  irc:\n    port: {link_port}\n    peers:\n"
        f"      - {{name: {peer}.fireclaw, address: 127.0.0.1, port: {ports[peer][1]},"
        f" password_file: {link_file.name}}}\n"
    )


async def test_two_supervisors_link_their_servers(
    tmp_path: Path, pg_cluster: PgCluster, pg_dsn: str
) -> None:
    ports = {name: (free_port(), free_port()) for name in ("alpha", "beta")}
    swarms = {}
    for name in ports:
        root = tmp_path / name
        root.mkdir()
        link_file = root / "irc-link"  # relative in swarm.yaml: anchored at its folder
        link_file.write_text(PASSWORD + "\n")
        link_file.chmod(0o600)
        text = host_yaml(name, pg_dsn, pg_cluster.password_file, ports, link_file)
        swarms[name] = Swarm(root, text)
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
