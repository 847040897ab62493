"""A network namespace and a cgroup made ahead for a role's next VM.

Making a VM's namespace (its tap, its veth on the bridge, its rules) takes
tens of milliseconds of netlink and nft work, more on a busy host; done when
a clone is claimed, it delays the replacement's restore by as much. So each
role whose VMs run on the swarm's network, with guests that dial nothing (a
channel device: the namespace needs no listener), keeps one ``Prepared`` set
ready: the VM that starts next takes it (``Spare.take``) and the group makes
the next one in the background (``Spare.run``).

What is prepared is named like any VM's (``<instance>-<role>-s<tag>``), so a
supervisor killed while holding one leaves nothing its next start does not
sweep (``supervisor.leftovers`` removes every namespace, veth and cgroup of
the instance that no adopted VM holds). A set not taken is released when the
group stops.
"""

from __future__ import annotations

import contextlib
import logging
import secrets
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Final

import trio
from fireclaw.pool import cgroup, netns
from fireclaw.pool.drivers.base import ChannelKind
from fireclaw.pool.network import Link, NetworkError
from fireclaw.pool.runtime import Runtime
from fireclaw.pool.templates import retry_delay

log = logging.getLogger("fireclaw.pool")

#: What making a set may raise; the VM that would have taken it makes its own.
_ERRORS: Final = (NetworkError, netns.NetnsError, cgroup.CgroupError, OSError)


@dataclass(frozen=True)
class Prepared:
    """One VM's namespace, its link on the bridge and its cgroup, made ahead."""

    vm_id: str
    ns_name: str
    link: Link
    cg: Path | None
    limit_mib: int  # the cgroup's memory limit


class Spare:
    """One ``Prepared`` set for the next VM of ``role``, made again once taken."""

    def __init__(self, rt: Runtime, role: str) -> None:
        self.rt = rt
        self.role = role
        self._ready: Prepared | None = None
        self._taken = trio.Event()
        self._made = trio.Event()
        self._failures = 0

    def wanted(self) -> bool:
        """Whether this swarm's VMs can use one."""
        return (
            self.rt.network is not None
            and self.rt.isolate_net
            and self.rt.driver.describe().channel is not ChannelKind.DIALLED
        )

    def take(self) -> Prepared | None:
        """The set made ahead, now the caller's to use and release (its cgroup's
        limit may be an older one of the role's); None when there is none."""
        ready, self._ready = self._ready, None
        self._taken.set()
        return ready

    async def wait_ready(self) -> None:
        """Return once a set is ready to take (at once if one is)."""
        while self._ready is None:
            await self._made.wait()

    async def run(self, limit_mib: Callable[[], int]) -> None:
        """Keep one set ready, its cgroup limited to ``limit_mib()`` MiB, until
        cancelled; release the one left then. A failure to make one is logged
        and tried again after a backoff delay (the VMs make their own meanwhile)."""
        try:
            while True:
                if self._ready is None:
                    try:
                        self._ready = await self._make(limit_mib())
                        self._failures = 0
                        self._made.set()
                        self._made = trio.Event()
                    except _ERRORS as exc:
                        self._failures += 1
                        delay = retry_delay(self._failures, self.rt.uniform)
                        log.warning(
                            "%s: no namespace made ahead: %s; again in %.1f s",
                            self.role,
                            exc,
                            delay,
                        )
                        await trio.sleep(delay)
                        continue
                self._taken = trio.Event()
                await self._taken.wait()
        finally:
            ready, self._ready = self._ready, None
            if ready is not None:
                with trio.CancelScope(shield=True):
                    await release_prepared(self.rt, ready)

    async def _make(self, limit: int) -> Prepared:
        assert self.rt.network is not None
        vm_id = f"{self.rt.instance}-{self.role}-s{secrets.token_hex(3)}"
        ns_name = netns.PREFIX + vm_id
        cg = cgroup.path_for(vm_id) if self.rt.use_cgroups else None
        _, link = await self.rt.network.attach(ns_name, listen=False)
        try:
            if cg is not None:
                cg = await trio.to_thread.run_sync(cgroup.create, vm_id, limit)
        except BaseException:
            with trio.CancelScope(shield=True):
                await release_prepared(
                    self.rt, Prepared(vm_id=vm_id, ns_name=ns_name, link=link, cg=cg, limit_mib=0)
                )
            raise
        return Prepared(vm_id=vm_id, ns_name=ns_name, link=link, cg=cg, limit_mib=limit)


async def release_prepared(rt: Runtime, prepared: Prepared) -> None:
    """Remove a set nobody took; never raises."""
    if prepared.cg is not None:
        with contextlib.suppress(cgroup.CgroupError):
            await trio.to_thread.run_sync(cgroup.remove, prepared.cg)
    if rt.network is not None:
        with contextlib.suppress(netns.NetnsError, NetworkError):
            await rt.network.detach(prepared.link)
