"""One IRC network across the fleet: managed ngircd servers linked by
``cluster.irc``, run by ``ManagedIrcd`` as the supervisor runs them, against
the real ngircd binary on loopback."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import pytest
import trio
from fireclaw.config import IrcLinkSpec, IrcPeerSpec, IrcSpec, ManagedIrcSpec
from fireclaw.supervisor.ircd import CONNECT_RETRY, START_TIMEOUT, IrcdError, ManagedIrcd
from fireclaw.supervisor.ircd_links import LinkBlock, dials, link_event
from ircperson import Person, person
from test_ircd import Events, free_port, ngircd_of

NGIRCD = shutil.which("ngircd", path=os.environ.get("PATH", "") + ":/usr/sbin:/sbin")
pytestmark = pytest.mark.skipif(NGIRCD is None, reason="ngircd is not installed")

#: How long a test waits for a server to start, or for a link to come up (a
#: dialler that found its peer not yet listening tries again after
#: CONNECT_RETRY): the product's own bounds, tripled for a loaded machine.
WAIT = 3 * (START_TIMEOUT + CONNECT_RETRY)
PASSWORD = "link-password-0123456789abcdefghijklmnopqrstuv"


def secret_file(path: Path, value: str) -> Path:
    path.write_text(value + "\n")
    path.chmod(0o600)
    return path


class Host:
    """One host of the fleet as far as IRC goes: its state dir and its ngircd."""

    def __init__(self, root: Path, name: str) -> None:
        self.name = name
        self.server_name = f"{name}.fireclaw"
        self.state_dir = root / name
        self.state_dir.mkdir()
        self.client_port = free_port()
        self.link_port = free_port()
        self.events = Events()
        self.ircd: ManagedIrcd | None = None

    def peer_spec(self, password_file: Path) -> IrcPeerSpec:
        return IrcPeerSpec(
            name=self.server_name,
            address="127.0.0.1",
            port=self.link_port,
            password_file=str(password_file),
        )

    def link_to(self, *peers: IrcPeerSpec) -> ManagedIrcd:
        self.ircd = ManagedIrcd(
            IrcSpec(managed=ManagedIrcSpec(port=self.client_port)),
            self.state_dir,
            self.events,
            link=IrcLinkSpec(port=self.link_port, peers=peers),
            host=self.name,
        )
        return self.ircd

    @property
    def log(self) -> str:
        return (self.state_dir / "logs" / "ircd.log").read_text()


@asynccontextmanager
async def serving(ircd: ManagedIrcd) -> AsyncIterator[trio.CancelScope]:
    """``ircd`` running for the block; cancel the scope it gives to stop it early."""
    async with trio.open_nursery() as nursery:
        with trio.fail_after(WAIT):
            await nursery.start(ircd.run)
        yield nursery.cancel_scope
        nursery.cancel_scope.cancel()


def two_hosts(tmp_path: Path, alpha_password: str, beta_password: str) -> tuple[Host, Host]:
    """alpha and beta, each with its own file for their link (as two machines would)."""
    alpha, beta = Host(tmp_path, "alpha"), Host(tmp_path, "beta")
    a_file = secret_file(alpha.state_dir / "link-beta", alpha_password)
    b_file = secret_file(beta.state_dir / "link-alpha", beta_password)
    alpha.link_to(beta.peer_spec(a_file))
    beta.link_to(alpha.peer_spec(b_file))
    return alpha, beta


async def names_now(someone: Person, channel: str) -> set[str]:
    """Who is in ``channel`` as ``someone``'s server answers NAMES now (the
    answer it gave when ``someone`` joined is set aside first)."""
    for kind in ("namreply", "endofnames"):
        await someone.aexpect(f"{kind} at joining", lambda e, kind=kind: e.type == kind)
    someone.send_raw(f"NAMES {channel}")
    event = await someone.aexpect(f"NAMES of {channel}", lambda e: e.type == "namreply")
    return {n.lstrip("@+") for n in event.arguments[-1].split()}


# --- who dials, and what the config says -------------------------------------------


def test_exactly_one_end_of_each_link_dials() -> None:
    for a, b in [("alpha.fireclaw", "beta.fireclaw"), ("Zed.x", "abc.x"), ("b.x", "B.y")]:
        assert dials(a, b) != dials(b, a)


def test_link_block_repr_hides_the_password() -> None:
    block = LinkBlock(name="b.x", host="127.0.0.1", port=1, password=PASSWORD, connect=True)
    assert PASSWORD not in repr(block)


@pytest.mark.parametrize(
    ("message", "expected"),
    [
        (
            'Server "beta.fireclaw" registered (connection 8, 1 hop - direct link).',
            ("link_up", {"peer": "beta.fireclaw"}),
        ),
        (
            'Server "beta.fireclaw" unregistered (connection 8): Server going down.',
            ("link_down", {"peer": "beta.fireclaw", "reason": "Server going down"}),
        ),
        (
            'Connection 8: Got bad password from server "alpha.fireclaw"!',
            ("link_refused", {"peer": "alpha.fireclaw", "reason": "bad password"}),
        ),
        ('Server "far.x" registered (via near.x, 2 hops).', None),
        (
            'Server "x.y" unregistered (connection 9): a\x1b[2Jb.',
            ("link_down", {"peer": "x.y", "reason": "a?[2Jb"}),
        ),
        ('Server "alpha.fireclaw" (on "vm") ready.', None),
    ],
)  # fmt: skip
def test_link_events_from_ngircd_log_lines(
    message: str, expected: tuple[str, dict[str, str]] | None
) -> None:
    assert link_event(message) == expected


def test_the_generated_config_passes_ngircd_configtest(tmp_path: Path) -> None:
    alpha, beta = two_hosts(tmp_path, PASSWORD, PASSWORD)
    for host in (alpha, beta):
        assert host.ircd is not None
        host.ircd._write_files()  # what run() writes before it starts ngircd
        conf = host.ircd.conf_path
        assert conf.stat().st_mode & 0o077 == 0
        assert NGIRCD is not None
        out = subprocess.run(
            [NGIRCD, "--configtest", "-f", str(conf)], capture_output=True, text=True, timeout=30
        )
        assert out.returncode == 0, out.stdout + out.stderr
        assert [line for line in out.stdout.splitlines() if line.startswith(" - ")] == []
        text = conf.read_text()
        assert f"Name = {host.server_name}\n" in text
        assert f"Ports = {host.client_port}, {host.link_port}\n" in text
        server = text.split("[Server]\n")[1]
        assert f"MyPassword = {PASSWORD}\nPeerPassword = {PASSWORD}\n" in server
        # alpha sorts first: it dials, beta waits.
        assert ("Passive = yes" in server) == (host is beta)


# --- the network -----------------------------------------------------------------------


async def test_two_linked_servers_are_one_network_and_survive_a_split(tmp_path: Path) -> None:
    alpha, beta = two_hosts(tmp_path, PASSWORD, PASSWORD)
    assert alpha.ircd is not None and beta.ircd is not None
    async with serving(alpha.ircd), serving(beta.ircd) as beta_scope:
        with trio.fail_after(WAIT):
            await alpha.events.wait_for("ircd_link_up")
            await beta.events.wait_for("ircd_link_up")
        assert alpha.events.of("ircd_link_up") == [{"peer": "beta.fireclaw"}]
        assert beta.events.of("ircd_link_up") == [{"peer": "alpha.fireclaw"}]
        async with (
            person(alpha.ircd.address, "alice", "#agents") as alice,
            person(beta.ircd.address, "bob", "#agents") as bob,
        ):
            await alice.aexpect(
                "bob joining #agents from beta",
                lambda e: e.type == "join" and e.source.nick == "bob",
                WAIT,
            )
            bob.say("#agents", "hello from beta")
            said = await alice.message_in("#agents")
            assert (said.source.nick, said.arguments[0]) == ("bob", "hello from beta")
            assert await names_now(alice, "#agents") == {"alice", "bob"}

            # beta's server goes away: alice sees bob quit in the netsplit, and alpha
            # goes on serving its own people.
            beta_scope.cancel()
            with trio.fail_after(WAIT):
                await alpha.events.wait_for("ircd_link_down")
            assert alpha.events.of("ircd_link_down")[0]["peer"] == "beta.fireclaw"
            quit_ = await alice.aexpect(
                "bob's netsplit quit", lambda e: e.type == "quit" and e.source.nick == "bob"
            )
            assert "beta.fireclaw" in quit_.arguments[0]
            await bob.astop()
            async with person(alpha.ircd.address, "carol", "#agents"):
                await alice.aexpect(
                    "carol joining on alpha",
                    lambda e: e.type == "join" and e.source.nick == "carol",
                )
        assert alpha.ircd.state == "running"
    for host in (alpha, beta):
        assert host.ircd is not None
        assert ngircd_of(host.ircd.conf_path) == []
        assert not host.ircd.pid_path.exists()
        assert PASSWORD not in host.log
        assert all(PASSWORD not in str(e) for e in host.events.seen)


async def test_a_wrong_link_password_is_refused_naming_the_peer(tmp_path: Path) -> None:
    wrong = "not-the-same-password-" + "x" * 20
    alpha, beta = two_hosts(tmp_path, PASSWORD, wrong)
    assert alpha.ircd is not None and beta.ircd is not None
    async with serving(beta.ircd), serving(alpha.ircd):
        # alpha dials, beta checks what alpha sent against its own file.
        with trio.fail_after(WAIT):
            await beta.events.wait_for("ircd_link_refused")
        assert beta.events.of("ircd_link_refused") == [
            {"peer": "alpha.fireclaw", "reason": "bad password"}
        ]
        refusal = [line for line in beta.log.splitlines() if "bad password" in line]
        assert len(refusal) == 1 and '"alpha.fireclaw"' in refusal[0]
        async with (
            person(alpha.ircd.address, "alice", "#agents") as alice,
            person(beta.ircd.address, "bob", "#agents"),
        ):
            assert await names_now(alice, "#agents") == {"alice"}
        assert alpha.events.of("ircd_link_up") == beta.events.of("ircd_link_up") == []
    for host in (alpha, beta):
        assert PASSWORD not in host.log and wrong not in host.log
        assert all(PASSWORD not in str(e) and wrong not in str(e) for e in host.events.seen)


async def test_an_unusable_link_password_file_fails_the_first_start(tmp_path: Path) -> None:
    alpha = Host(tmp_path, "alpha")
    loose = secret_file(tmp_path / "loose", PASSWORD)
    loose.chmod(0o644)
    ircd = alpha.link_to(
        IrcPeerSpec(name="beta.fireclaw", address="127.0.0.1", password_file=str(loose))
    )
    async with trio.open_nursery() as nursery:
        with trio.fail_after(WAIT), pytest.raises(IrcdError) as info:
            await nursery.start(ircd.run)
    message = str(info.value)
    assert "\n" not in message and PASSWORD not in message
    assert message.startswith(f"cluster.irc.peers beta.fireclaw: {loose}: group or others")
    assert not ircd.conf_path.exists()


def test_the_server_is_named_for_its_host(tmp_path: Path) -> None:
    ircd = Host(tmp_path, "gamma").link_to()
    assert ircd.server_name == "gamma.fireclaw"
    alone = ManagedIrcd(IrcSpec(), tmp_path)
    assert alone.server_name == "irc.fireclaw.local"


async def test_a_host_named_like_its_peer_fails_the_first_start(tmp_path: Path) -> None:
    """swarm.yaml without ``host`` leaves the name to the machine's: checked at start."""
    password_file = secret_file(tmp_path / "link", PASSWORD)
    ircd = Host(tmp_path, "beta").link_to(
        IrcPeerSpec(name="beta.fireclaw", address="127.0.0.1", password_file=str(password_file))
    )
    async with trio.open_nursery() as nursery:
        with trio.fail_after(WAIT), pytest.raises(IrcdError) as info:
            await nursery.start(ircd.run)
    assert str(info.value) == "cluster.irc.peers: 'beta.fireclaw' is this host's own server name"
    assert not ircd.conf_path.exists()


async def test_a_link_comes_back_after_a_peer_server_is_killed_and_restarted(
    tmp_path: Path,
) -> None:
    """beta's ngircd killed: ManagedIrcd restarts it, and alpha (which dials)
    links again within CONNECT_RETRY."""
    alpha, beta = two_hosts(tmp_path, PASSWORD, PASSWORD)
    assert alpha.ircd is not None and beta.ircd is not None
    async with serving(beta.ircd), serving(alpha.ircd):
        with trio.fail_after(WAIT):
            await alpha.events.wait_for("ircd_link_up")
            await beta.events.wait_for("ircd_link_up")
        assert beta.ircd.pid is not None
        os.kill(beta.ircd.pid, signal.SIGKILL)
        with trio.fail_after(WAIT):
            await alpha.events.wait_for("ircd_link_down")
            await beta.events.wait_for("ircd_started", 2)
            await alpha.events.wait_for("ircd_link_up", 2)
            await beta.events.wait_for("ircd_link_up", 2)
        assert alpha.events.of("ircd_link_up") == [{"peer": "beta.fireclaw"}] * 2
        assert beta.events.of("ircd_link_up") == [{"peer": "alpha.fireclaw"}] * 2
