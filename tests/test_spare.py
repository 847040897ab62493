"""A role's next namespace and cgroup, made ahead on the swarm's real network
(needs root): taken whole, made again, and released when the group stops.
That a supervisor killed while holding one leaves nothing the next start does
not sweep is test_qemu_swarm's (the sweep takes every namespace, veth and
cgroup of the instance)."""

from __future__ import annotations

import ipaddress
import os
import secrets
from pathlib import Path

import pytest
import trio
from fireclaw.config import parse_config
from fireclaw.pool import cgroup, netns, network
from fireclaw.pool.drivers.base import ChannelKind, DriverInfo
from fireclaw.pool.network import Network
from fireclaw.pool.runtime import Runtime
from fireclaw.pool.spare import Spare, release_prepared
from fireclaw.supervisor.state import Store

pytestmark = pytest.mark.skipif(
    netns.probe() is not None or not os.path.exists("/usr/sbin/nft"),
    reason=f"no namespaces or no nft: {netns.probe()}",
)

#: Netlink, nft and cgroupfs on a loaded host: far more than a namespace takes.
DEADLINE = 60.0


class PortDriver:
    """A driver whose guests are on a channel device; nothing is started here."""

    name = "port"

    def describe(self) -> DriverInfo:
        return DriverInfo(
            name=self.name, capabilities=frozenset(), channel=ChannelKind.VIRTIO_SERIAL
        )


def exists(ns_name: str) -> bool:
    return (netns.NETNS_DIR / ns_name).exists()


async def test_a_set_is_made_ahead_taken_whole_made_again_and_released(tmp_path: Path) -> None:
    instance = secrets.token_hex(3)
    net = Network(
        instance=instance,
        subnet=ipaddress.IPv4Network(f"10.251.{secrets.randbelow(250)}.0/24"),
        egress=False,
    )
    config = parse_config("version: 1\nroles: {}\n", path=tmp_path / "swarm.yaml")
    rt = Runtime(
        driver=PortDriver(),  # type: ignore[arg-type]
        store=Store.open(tmp_path / "db"),
        state_dir=tmp_path,
        control=config.control,
        stop=config.stop,
        isolate_net=True,
        use_cgroups=cgroup.probe() is None,
        instance=instance,
        network=net,
    )
    await net.open()
    try:
        spare = Spare(rt, "worker")
        assert spare.wanted()
        assert spare.take() is None  # nothing made yet: the VM makes its own
        with trio.fail_after(DEADLINE):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(spare.run, lambda: 300)
                await spare.wait_ready()
                first = spare.take()
                assert first is not None and first.limit_mib == 300
                assert first.vm_id.startswith(f"{instance}-worker-s")
                assert exists(first.ns_name)
                assert first.link.veth in network.host_links(instance)
                if rt.use_cgroups:
                    assert first.cg is not None and first.cg.is_dir()
                assert spare.take() is None  # taken whole, once

                await spare.wait_ready()  # the next one, made in the background
                second = spare.take()
                assert second is not None and second.ns_name != first.ns_name
                await release_prepared(rt, first)  # as the VM's teardown does
                assert not exists(first.ns_name)
                assert first.link.veth not in network.host_links(instance)
                assert first.cg is None or not first.cg.exists()

                await spare.wait_ready()
                third = spare.take()
                assert third is not None
                await release_prepared(rt, third)
                await release_prepared(rt, second)
                await spare.wait_ready()  # left ready when the group stops
                nursery.cancel_scope.cancel()
        # What was ready is gone with the group: no namespace, veth or cgroup left.
        assert not [n for n in netns.leftovers() if n.startswith(netns.PREFIX + instance)]
        assert network.host_links(instance) == [net.bridge]
        assert not [g for g in cgroup.leftovers() if g.name.startswith(instance)]
    finally:
        await net.close()
