"""A fleet's network on one machine: network namespaces as its hosts.

``FleetNet`` makes a namespace holding a bridge, and one namespace per member
(a host of the fleet, or its database server) joined to that bridge by a veth
pair, each member with one address of a private /24 the machine's own
interfaces do not use. Nothing is made in the machine's own namespace, so
the fleet's traffic never leaves the namespaces made here.

Cutting a member off (``cut``) sets its veth's bridge end down inside the
bridge's namespace, as a pulled cable would: the member's own side stays up
and learns of nothing but silence. ``mend`` puts it back.

A program joins a member's namespace with ``nsenter --net`` (``command``):
only its network changes, so it sees the machine's files, ``/run/netns`` and
cgroups as any other would. The test process itself stays where it is: what
it says to a member goes over unix sockets, or through sockets made in a
thread that joined that member's namespace (``PersonIn``, ``served_in``).

``close`` removes every namespace made here, killing what still runs in one
first, and returns what it found running or left, so that a test can insist
there was nothing. Should the test process be killed, the next ``FleetNet``
removes the namespaces that process left (their names carry its pid).
"""

from __future__ import annotations

import contextlib
import ipaddress
import os
import queue
import re
import secrets
import signal
import subprocess
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Final

import trio
from fireclaw.supervisor.doctor import subnet_overlaps
from ircperson import Person
from scripted_model import ScriptedModel

NETNS_DIR: Final = Path("/run/netns")
#: Namespaces made here are named ``fleet<pid>-<member>``: the pid tells whose they
#: are (the project's own are ``fireclaw-...``, never touched here).
_NAME_RE: Final = re.compile(r"^fleet(\d+)-")
_BRIDGE: Final = "br0"
_IP_TIMEOUT: Final = 30.0
#: A model server's start and stop, on a loaded machine.
_SERVE_TIMEOUT: Final = 60.0


@dataclass(frozen=True)
class Member:
    """One namespace on the fleet's bridge: ``netns`` under /run/netns, its
    ``address``, and its veth's end on the bridge (``port``, in the bridge's
    namespace)."""

    name: str
    netns: str
    address: ipaddress.IPv4Interface
    port: str


def ip(*args: str) -> str:
    """Run ``ip ARGS``; its output. Fails with ip's own message."""
    done = subprocess.run(["ip", *args], capture_output=True, timeout=_IP_TIMEOUT, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"ip {' '.join(args)}: {done.stderr.strip()}")
    return done.stdout


def pick_subnet() -> ipaddress.IPv4Network:
    """A /24 of 10.0.0.0/8 that no address of this machine's namespace is in (the
    test the swarm's network makes at start), so that a member's address is
    never mistaken for one of the machine's."""
    while True:
        subnet = ipaddress.IPv4Network(
            f"10.{200 + secrets.randbelow(40)}.{secrets.randbelow(256)}.0/24"
        )
        if not subnet_overlaps(subnet):
            return subnet


def netns_pids(netns: str) -> list[int]:
    """The processes running in namespace ``netns``."""
    return [int(p) for p in ip("netns", "pids", netns).split()]


class FleetNet:
    """The bridge's namespace and its members (see the module docstring)."""

    def __init__(self) -> None:
        _remove_left_behind()
        self.prefix = f"fleet{os.getpid()}-{secrets.token_hex(2)}-"
        self.subnet = pick_subnet()
        self.bridge_ns = self.prefix + "br"
        self.members: dict[str, Member] = {}
        self._made: list[str] = []
        self._addresses = self.subnet.hosts()
        next(self._addresses)  # .1 stays free, as a gateway's would be (the bridge has none)
        try:
            self._make_netns(self.bridge_ns)
            ip("-n", self.bridge_ns, "link", "add", _BRIDGE, "type", "bridge")
            ip("-n", self.bridge_ns, "link", "set", _BRIDGE, "up")
        except BaseException:
            self.close()
            raise

    def _make_netns(self, netns: str) -> None:
        self._made.append(netns)  # before: close() removes what a failed add left
        ip("netns", "add", netns)
        ip("-n", netns, "link", "set", "lo", "up")

    def add(self, name: str) -> Member:
        """A new member ``name`` on the bridge, with the next address."""
        netns = self.prefix + name
        address = ipaddress.IPv4Interface(f"{next(self._addresses)}/{self.subnet.prefixlen}")
        port = f"to-{name}"[:15]
        self._make_netns(netns)
        ip("-n", self.bridge_ns, "link", "add", port, "type", "veth",
           "peer", "name", "eth0", "netns", netns)  # fmt: skip
        ip("-n", self.bridge_ns, "link", "set", port, "master", _BRIDGE, "up")
        ip("-n", netns, "addr", "add", str(address), "dev", "eth0")
        ip("-n", netns, "link", "set", "eth0", "up")
        member = Member(name, netns, address, port)
        self.members[name] = member
        return member

    def cut(self, name: str) -> None:
        """Cut ``name`` off the bridge, as a pulled cable would."""
        ip("-n", self.bridge_ns, "link", "set", self.members[name].port, "down")

    def mend(self, name: str) -> None:
        """Put ``name`` back on the bridge."""
        ip("-n", self.bridge_ns, "link", "set", self.members[name].port, "up")

    def command(self, name: str, argv: list[str]) -> list[str]:
        """``argv`` run in member ``name``'s namespace: nsenter joins it, then execs
        ``argv`` in its own place (same pid), so signals reach the program itself."""
        return ["nsenter", f"--net={NETNS_DIR / self.members[name].netns}", "--", *argv]

    def running(self) -> dict[str, list[int]]:
        """What runs in each namespace made here, by namespace; empty ones left out."""
        found = {n: netns_pids(n) for n in self._made if (NETNS_DIR / n).exists()}
        return {netns: pids for netns, pids in found.items() if pids}

    def close(self) -> dict[str, list[str]]:
        """Remove every namespace (killing what still runs in one first): what was
        still running then, and any namespace left after, by kind; nothing on
        success."""
        running = self.running()
        for pids in running.values():
            for pid in pids:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
        for netns in reversed(self._made):
            if (NETNS_DIR / netns).exists():
                with contextlib.suppress(RuntimeError):  # reported below as left
                    ip("netns", "del", netns)
        left = [n for n in self._made if (NETNS_DIR / n).exists()]
        return {
            "processes": [f"{netns}: {pid}" for netns, pids in running.items() for pid in pids],
            "netns": left,
        }


def _remove_left_behind() -> None:
    """Namespaces of test processes that are gone (killed before their clean-up)."""
    if not NETNS_DIR.is_dir():
        return
    for path in NETNS_DIR.iterdir():
        match = _NAME_RE.match(path.name)
        if match and not Path(f"/proc/{match.group(1)}").exists():
            for pid in netns_pids(path.name):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            with contextlib.suppress(RuntimeError):
                ip("netns", "del", path.name)


class PersonIn(Person):
    """Someone on IRC (``ircperson.Person``) whose connection is made in namespace
    ``netns``: their thread joins it before connecting, and is theirs alone."""

    def __init__(self, netns: str, address: tuple[str, int], nick: str) -> None:
        super().__init__(address, nick)
        self._netns = netns

    def _loop(self) -> None:
        from pyroute2.netns import setns

        assert threading.current_thread() is self._thread
        setns(self._netns, flags=0)
        super()._loop()


@contextlib.contextmanager
def served_in(netns: str, model: ScriptedModel) -> Iterator[str]:
    """``model`` served on the loopback of namespace ``netns`` (a host's own model
    server), from a trio run in a thread of its own that joined ``netns``; its
    base URL, as that host reaches it."""
    from pyroute2.netns import setns

    ready: queue.Queue[tuple[str, trio.lowlevel.TrioToken, trio.CancelScope]] = queue.Queue()

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            url = await nursery.start(model.serve)
            ready.put((url, trio.lowlevel.current_trio_token(), nursery.cancel_scope))

    def run() -> None:
        setns(netns, flags=0)  # this thread only, for its whole life
        trio.run(main)

    thread = threading.Thread(target=run, name=f"model-{netns}", daemon=True)
    thread.start()
    url, token, scope = ready.get(timeout=_SERVE_TIMEOUT)
    try:
        yield url
    finally:
        trio.from_thread.run_sync(scope.cancel, trio_token=token)
        thread.join(_SERVE_TIMEOUT)
