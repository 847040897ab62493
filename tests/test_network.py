"""The swarm's bridge, per-VM namespaces with tap and veth, and NAT, for real (needs root).

A "world" namespace made by the test stands in for the outside: the host
routes to it over a veth, so egress is shown without any traffic leaving
the machine.
"""

from __future__ import annotations

import ipaddress
import os
import secrets
import socket
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
import trio
from fireclaw.pool import netns, network
from fireclaw.pool.network import GATEWAY, NS_LINK, TAP, Network, NetworkError
from world import CONNECT, Server, World, world_namespace

IP_FORWARD = Path("/proc/sys/net/ipv4/ip_forward")

pytestmark = pytest.mark.skipif(
    netns.probe() is not None or not os.path.exists("/usr/sbin/nft"),
    reason=f"no namespaces or no nft: {netns.probe()}",
)


def ns_run(ns: str | None, *argv: str, timeout: float = 20) -> str:
    prefix = ["nsenter", f"--net=/run/netns/{ns}", "--"] if ns else []
    done = subprocess.run(
        [*prefix, *argv], capture_output=True, text=True, timeout=timeout, check=True
    )
    return done.stdout.strip()


def connect_from(ns: str | None, host: str, port: int, *, timeout: float = 5) -> str:
    return ns_run(ns, sys.executable, "-c", CONNECT, host, str(port), str(timeout))


@pytest.fixture
async def net() -> AsyncIterator[Network]:
    instance = secrets.token_hex(3)
    subnet = ipaddress.IPv4Network(f"10.252.{secrets.randbelow(250)}.0/24")
    forward_before = IP_FORWARD.read_text()  # noqa: ASYNC240 (procfs: never blocks)
    # With another swarm's bridge up (a second test run, say), forwarding is its to keep.
    alone = not any(name.endswith("br") for name in network.host_links())
    n = Network(instance=instance, subnet=subnet, egress=True)
    await n.open()
    try:
        yield n
    finally:
        await n.close()
        assert network.host_links(instance) == []
        assert f"inet {network.table_name(instance)}" not in network.tables()
        # Forwarding goes back to how the host had it once no swarm's bridge needs it;
        # another swarm on the host keeps it on meanwhile, as it should.
        if alone and not any(name.endswith("br") for name in network.host_links()):
            assert IP_FORWARD.read_text() == forward_before  # noqa: ASYNC240


def links_in(ns: str) -> set[str]:
    out = ns_run(ns, "ip", "-o", "link", "show")
    return {line.split(":")[1].strip().split("@")[0] for line in out.splitlines()}


@pytest.fixture
def world() -> Iterator[World]:
    with world_namespace() as w:
        yield w


async def test_a_namespace_gets_a_tap_a_veth_and_reaches_out_through_nat(
    net: Network, world: World
) -> None:
    world_ns, world_addr, host_addr = world.ns, world.address, world.host_address
    ns = f"{netns.PREFIX}{net.instance}-a-{secrets.token_hex(3)}"
    sock, link = await net.attach(ns, 7000)
    try:
        assert sock.getsockname() == (GATEWAY, 7000)
        assert links_in(ns) == {"lo", TAP, NS_LINK}
        # The same tap MAC everywhere: a clone's guest keeps its template's ARP entry.
        assert f"link/ether {network.TAP_MAC} " in ns_run(ns, "ip", "link", "show", TAP)
        assert link.veth in network.host_links(net.instance)
        assert net.bridge in network.host_links(net.instance)
        server = Server(world_ns, world_addr)
        try:
            # The host masquerades the swarm's subnet: the world sees the host.
            said = await trio.to_thread.run_sync(connect_from, ns, world_addr, server.port)
            assert said == f"from {host_addr}"
        finally:
            server.close()
    finally:
        sock.close()
        await net.detach(link)
    assert ns not in netns.leftovers()
    assert link.veth not in network.host_links(net.instance)


def serve_one(sock: socket.socket, line: bytes) -> None:
    """Answer one connection on the listener ``sock`` with ``line``."""
    sock.settimeout(20)
    conn, _ = sock.accept()
    with conn:
        conn.sendall(line)


async def test_vms_reach_neither_each_other_nor_the_host(net: Network, world: World) -> None:
    tag = secrets.token_hex(3)
    sock_a, a = await net.attach(f"{netns.PREFIX}{net.instance}-a-{tag}")
    sock_b, b = await net.attach(f"{netns.PREFIX}{net.instance}-b-{tag}")
    servers = [Server(b.ns_name, "0.0.0.0"), Server(None, net.gateway)]
    outside = Server(world.ns, world.address)
    try:
        assert a.address != b.address
        # Both are reachable where they should be: b's server from inside b, the
        # host's from the host.
        said = await trio.to_thread.run_sync(connect_from, b.ns_name, b.address, servers[0].port)
        assert said == f"from {b.address}"
        said = await trio.to_thread.run_sync(connect_from, None, net.gateway, servers[1].port)
        assert said == f"from {net.gateway}"
        # From a, what it should reach it does: its own listener, and the outside
        # through the same veth and bridge the refused attempts below take.
        async with trio.open_nursery() as nursery:
            nursery.start_soon(trio.to_thread.run_sync, serve_one, sock_a, b"own listener\n")
            said = await trio.to_thread.run_sync(
                connect_from, a.ns_name, GATEWAY, sock_a.getsockname()[1]
            )
        assert said == "own listener"
        said = await trio.to_thread.run_sync(connect_from, a.ns_name, world.address, outside.port)
        assert said == f"from {world.host_address}"
        # And neither of the others.
        for host, server in ((b.address, servers[0]), (net.gateway, servers[1])):
            said = await trio.to_thread.run_sync(
                lambda h=host, s=server: connect_from(a.ns_name, h, s.port, timeout=1.5)
            )
            assert said.startswith("failed:"), (host, said)
    finally:
        for server in [*servers, outside]:
            server.close()
        sock_a.close()
        sock_b.close()
        await net.detach(a)
        await net.detach(b)
    assert not {a.ns_name, b.ns_name} & set(netns.leftovers())


async def test_a_failed_namespace_leaves_nothing(net: Network) -> None:
    ns = f"{netns.PREFIX}{net.instance}-x-{secrets.token_hex(3)}"
    # The host end of its veth cannot be made: a link of that name is in the way.
    blocker = network.veth_name(net.instance, ns)
    await trio.to_thread.run_sync(ns_run, None, "ip", "link", "add", blocker, "type", "bridge")
    try:
        with pytest.raises(NetworkError, match=ns):
            await net.attach(ns)
    finally:
        await trio.to_thread.run_sync(ns_run, None, "ip", "link", "del", blocker)
    assert ns not in netns.leftovers()
    assert network.host_links(net.instance) == [net.bridge]
    # The address it took is free again.
    sock, link = await net.attach(ns)
    sock.close()
    assert link.address == str(net.subnet.network_address + 2)
    await net.detach(link)


async def test_a_subnet_in_use_is_one_line() -> None:
    instance = secrets.token_hex(3)
    subnet = ipaddress.IPv4Network(f"10.253.{secrets.randbelow(250)}.0/24")
    first = Network(instance=instance, subnet=subnet, egress=False)
    await first.open()
    try:
        second = Network(instance=secrets.token_hex(3), subnet=subnet, egress=False)
        with pytest.raises(NetworkError, match=f"network.subnet {subnet} overlaps"):
            await second.open()
        await second.close()
    finally:
        await first.close()


def test_rules_are_text_nft_accepts() -> None:
    rules = network.host_rules("abc123", ipaddress.IPv4Network("10.249.0.0/16"), egress=True)
    assert "masquerade" in rules and 'iifname "fcabc123br" drop' in rules
    no_egress = network.host_rules("abc123", ipaddress.IPv4Network("10.249.0.0/16"), egress=False)
    assert "masquerade" not in no_egress and "accept\n" not in no_egress.split("forward")[1][:200]
    # nft itself accepts every ruleset we load (-c: checked, not applied).
    for text in (rules, no_egress, network.namespace_rules()):
        done = subprocess.run(["nft", "-c", "-f", "-"], input=text.encode(), capture_output=True)
        assert done.returncode == 0, done.stderr


async def test_without_egress_a_vm_reaches_nothing_outside(world: World) -> None:
    instance = secrets.token_hex(3)
    subnet = ipaddress.IPv4Network(f"10.252.{secrets.randbelow(250)}.0/24")
    net = Network(instance=instance, subnet=subnet, egress=False)
    await net.open()
    try:
        sock, link = await net.attach(f"{netns.PREFIX}{instance}-a-{secrets.token_hex(3)}")
        server = Server(world.ns, world.address)
        try:
            said = await trio.to_thread.run_sync(
                lambda: connect_from(link.ns_name, world.address, server.port, timeout=1.5)
            )
            assert said.startswith("failed:"), said
        finally:
            server.close()
            sock.close()
            await net.detach(link)
    finally:
        await net.close()
    assert network.host_links(instance) == []


async def test_forwarding_stays_on_while_another_swarm_needs_it() -> None:
    before = IP_FORWARD.read_text()  # noqa: ASYNC240 (procfs: never blocks)
    nets = [
        Network(
            instance=secrets.token_hex(3),
            subnet=ipaddress.IPv4Network(f"10.252.{secrets.randbelow(125) + 125 * i}.0/24"),
        )
        for i in range(2)
    ]
    try:
        for net in nets:
            await net.open()
        assert IP_FORWARD.read_text().strip() == "1"  # noqa: ASYNC240
        await nets[0].close()
        assert IP_FORWARD.read_text().strip() == "1"  # noqa: ASYNC240
    finally:
        for net in nets:
            await net.close()
    assert IP_FORWARD.read_text() == before  # noqa: ASYNC240


async def test_a_restarted_swarm_keeps_the_links_of_the_vms_it_adopts(world: World) -> None:
    """A second ``Network`` of the same swarm (its supervisor was killed and started
    again) keeps the bridge and the veths it is told to keep: those namespaces still
    reach out, on the same address, and a namespace listens again on its old port.
    The other veths, which no VM is adopted into, are removed; new namespaces get
    addresses the kept ones do not have."""
    instance = secrets.token_hex(3)
    subnet = ipaddress.IPv4Network(f"10.252.{secrets.randbelow(250)}.0/24")
    first = Network(instance=instance, subnet=subnet, egress=True)
    await first.open()
    tag = secrets.token_hex(3)
    kept_ns, gone_ns = (f"{netns.PREFIX}{instance}-{n}-{tag}" for n in ("k", "g"))
    sock_k, kept = await first.attach(kept_ns, 7000)
    sock_g, gone = await first.attach(gone_ns)
    sock_k.close()  # the killed supervisor's listeners die with it
    sock_g.close()
    second = Network(instance=instance, subnet=subnet, egress=True)
    try:
        await second.open([kept])
        links = network.host_links(instance)
        assert second.bridge in links and kept.veth in links
        assert gone.veth not in links
        again = await netns.open_listener(kept_ns, GATEWAY, 7000)
        again.close()
        server = Server(world.ns, world.address)
        try:
            said = await trio.to_thread.run_sync(connect_from, kept_ns, world.address, server.port)
            assert said == f"from {world.host_address}"
        finally:
            server.close()
        sock_n, fresh = await second.attach(f"{netns.PREFIX}{instance}-n-{tag}")
        sock_n.close()
        assert fresh.address != kept.address
        await second.detach(fresh)
        await second.detach(kept)
    finally:
        netns.remove_sync(gone_ns)
        await second.close()
    assert network.host_links(instance) == []
    assert kept_ns not in netns.leftovers() and gone_ns not in netns.leftovers()
