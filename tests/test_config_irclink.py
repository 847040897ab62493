"""swarm.yaml's ``cluster.irc``: the IRC link of this host's managed ngircd to
its peers, parsed, anchored, and refused in one line naming the field."""

from __future__ import annotations

import pathlib
from functools import partial
from types import SimpleNamespace

import pytest
from fireclaw.config import ConfigError, IrcLinkSpec, IrcPeerSpec, parse_config
from fireclaw.config.cluster import fleet_nick
from fireclaw.supervisor.controller import SupervisorController

HEAD = "version: 1\nroles: {}\ncluster:\n  database: postgresql://f@db/fleet\n"


def parse(tmp_path: pathlib.Path, section: str, host: str = "alpha") -> IrcLinkSpec | None:
    text = f"{HEAD}  host: {host}\n{section}"
    cluster = parse_config(text, path=tmp_path / "swarm.yaml").cluster
    assert cluster is not None
    return cluster.irc


def refusal(tmp_path: pathlib.Path, section: str, host: str = "alpha") -> str:
    with pytest.raises(ConfigError) as refused:
        parse(tmp_path, section, host)
    message = str(refused.value)
    assert "\n" not in message
    assert message.startswith(f"{tmp_path / 'swarm.yaml'}: cluster")
    return message


def test_no_link_without_the_section(tmp_path: pathlib.Path) -> None:
    assert parse(tmp_path, "") is None


def test_peers_with_their_password_files_anchored_at_the_config(
    tmp_path: pathlib.Path,
) -> None:
    link = parse(
        tmp_path,
        "  irc:\n    listen: 10.250.0.2\n    peers:\n"
        "      - {name: beta.fireclaw, address: 10.250.0.3, password_file: secrets/beta}\n"
        "      - {name: gamma.rack, address: '::1', port: 7000, password_file: /etc/gamma}\n",
    )
    assert link == IrcLinkSpec(
        listen="10.250.0.2",
        peers=(
            IrcPeerSpec(
                name="beta.fireclaw",
                address="10.250.0.3",
                password_file=str(tmp_path.resolve() / "secrets" / "beta"),
            ),
            IrcPeerSpec(name="gamma.rack", address="::1", port=7000, password_file="/etc/gamma"),
        ),
    )
    assert (link.port, link.peers[0].port) == (6668, 6668)
    assert link.server_name_of("alpha") == "alpha.fireclaw"
    named = parse(tmp_path, "  irc: {server_name: irc.alpha.example}\n")
    assert named is not None and named.server_name_of("alpha") == "irc.alpha.example"


def test_an_inline_link_password_is_refused(tmp_path: pathlib.Path) -> None:
    message = refusal(
        tmp_path,
        "  irc:\n    peers:\n      - {name: b.x, address: 127.0.0.1, password_file: f}\n"
        "      - {name: c.x, address: 127.0.0.1, password: hunter2}\n",
    )
    assert "cluster.irc.peers[1].password: a secret is never written in swarm.yaml" in message
    assert "hunter2" not in message


PEER = "{name: beta.fireclaw, address: 127.0.0.1, password_file: f}"


@pytest.mark.parametrize(
    ("section", "field", "words"),
    [
        ("  irc: {peers: [{name: b.x, address: 127.0.0.1}]}", "cluster.irc.peers[0].password_file",
         "required field is missing"),
        (f"  irc: {{peers: [{PEER}, {PEER}]}}", "cluster.irc.peers",
         "'beta.fireclaw' is given twice"),
        ("  irc: {peers: [{name: beta, address: 127.0.0.1, password_file: f}]}",
         "cluster.irc.peers[0].name", "needs a dot"),
        ("  irc: {peers: [{name: b.x, address: db.internal, password_file: f}]}",
         "cluster.irc.peers[0].address", "expected an IP address, got 'db.internal'"),
        ("  irc: {peers: [{name: b_x.y, address: 127.0.0.1, password_file: f}]}",
         "cluster.irc.peers[0].name", "expected a server name"),
        ("  irc: {listen: 0.0.0.0}", "cluster.irc.listen", "every interface"),
        ("  irc: {port: 0}", "cluster.irc.port", ">= 1"),
        ("  irc: {server_name: alpha}", "cluster.irc.server_name", "needs a dot"),
        ("  irc: {peers: [{name: alpha.fireclaw, address: 127.0.0.1, password_file: f}]}",
         "cluster.irc", "'alpha.fireclaw' is this host's own server name"),
        ("  irc: {server_name: me.x, peers: [{name: ME.x, address: 127.0.0.1, password_file: f}]}",
         "cluster.irc", "'me.x' is this host's own server name"),
        ("  irc: {peer: []}", "cluster.irc.peer", "unknown field"),
    ],
)  # fmt: skip
def test_each_mistake_is_one_line_naming_the_field(
    tmp_path: pathlib.Path, section: str, field: str, words: str
) -> None:
    message = refusal(tmp_path, section + "\n")
    assert f"swarm.yaml: {field}: " in message and words in message


def test_a_host_name_that_makes_no_server_name_asks_for_one(tmp_path: pathlib.Path) -> None:
    message = refusal(tmp_path, "  irc: {}\n", host="rack_1")
    assert "swarm.yaml: cluster.irc: server_name: the default 'rack_1.fireclaw'" in message


# --- agents' nicks in the one network ------------------------------------------------


@pytest.mark.parametrize(
    ("nick", "host", "longest", "expected"),
    [
        ("worker-1", "alpha", 30, "worker-1-alpha"),
        ("worker-1", "alpha.rack_1", 30, "worker-1-alpha-rack_1"),
        ("researcher-12", "host-with-a-long-name", 30, "researcher-12-host-with-a-long"),
        ("w-1", "x" * 63, 9, "w-1-xxxxx"),
        ("a-nick-of-twenty-nine-letters", "alpha", 30, "a-nick-of-twenty-nine-letters"),
    ],
)  # fmt: skip
def test_fleet_nick_keeps_the_host_and_fits(
    nick: str, host: str, longest: int, expected: str
) -> None:
    made = fleet_nick(nick, host, longest)
    assert made == expected and len(made) <= max(longest, len(nick))


def test_two_hosts_never_make_the_same_nick() -> None:
    made = {fleet_nick("worker-1", host, 30) for host in ("alpha", "beta", "alpha.rack-2")}
    assert len(made) == 3


def auto_names(tmp_path: pathlib.Path, cluster: str, host: str, taken: list[str]) -> str:
    """The controller's name for a new agent of a stand-in role ``worker-{n}`` on a
    stand-in host (the naming rule alone: no VMs, no store)."""
    config = parse_config(f"version: 1\nroles: {{}}\n{cluster}", path=tmp_path / "swarm.yaml")
    agents = [SimpleNamespace(agent=SimpleNamespace(name=name)) for name in taken]
    group = SimpleNamespace(role=SimpleNamespace(nick=lambda n: f"worker-{n}"))
    controller = SimpleNamespace(
        config=config,
        store=SimpleNamespace(host=host),
        groups={"worker": SimpleNamespace(children=dict(enumerate(agents)))},
    )
    controller._auto_name = partial(SupervisorController._auto_name, controller)
    return SupervisorController._free_agent_name(controller, group)  # type: ignore[arg-type]


def test_the_controller_names_agents_for_their_host_in_a_cluster_only(
    tmp_path: pathlib.Path,
) -> None:
    assert auto_names(tmp_path, "", "alpha", ["worker-1"]) == "worker-2"
    cluster = "cluster: {database: 'postgresql://f@db/fleet', host: alpha}\n"
    assert auto_names(tmp_path, cluster, "alpha", []) == "worker-1-alpha"
    assert auto_names(tmp_path, cluster, "alpha", ["worker-1-alpha"]) == "worker-2-alpha"
