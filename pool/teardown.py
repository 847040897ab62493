"""Releasing what a VM holds: one teardown for every VM the pool starts.

A pool VM's incarnation and a template VM being made hold the same kinds of
things (a VMM, a control listener, a cgroup, a namespace with its tap and
veth, an overlay disk, a registry row), and both let them go through
``release``, on every exit path. ``kill_recorded`` is the same for a VM known
only by its registry row (left by a supervisor that is gone).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
from pathlib import Path
from typing import TYPE_CHECKING

import trio
from fireclaw.pool import cgroup, disks, netns
from fireclaw.pool.drivers.base import VmHandle
from fireclaw.pool.network import Link
from fireclaw.pool.procid import ProcessIdentity, still_running
from fireclaw.pool.store import VmRecord

if TYPE_CHECKING:
    from fireclaw.pool.runtime import Runtime


async def release(
    rt: Runtime,
    name: str,
    handle: VmHandle | None,
    *,
    exited: trio.Event,
    terminate: bool,
    sock: socket.socket | None = None,
    cg: Path | None = None,
    link: Link | None = None,
    ns_name: str | None = None,
    disk: Path | None = None,
) -> None:
    """Stop ``handle``'s VMM and release what the VM ``name`` holds; never raises.

    The VMM is asked to stop (TERM, waiting up to ``stop.term_timeout``) when
    ``terminate`` and it has not ``exited`` yet, then killed with whatever the
    guest left behind, and ``exited`` is set. Then the listener ``sock`` is
    closed, the cgroup removed, the namespace removed (by detaching ``link``
    from the swarm's bridge, or as ``ns_name`` when there is no link), the
    overlay ``disk`` removed and the registry row dropped. Bounded as a whole:
    call it shielded, so a cancelled caller still cleans up."""
    with trio.move_on_after(rt.stop.term_timeout + 10):
        if handle is not None:
            if terminate and not exited.is_set():
                handle.terminate()
                with trio.move_on_after(rt.stop.term_timeout):
                    await handle.wait()
            await handle.kill()  # also takes whatever the guest left behind
            exited.set()
        if sock is not None:
            sock.close()
        if cg is not None:
            with contextlib.suppress(cgroup.CgroupError):
                await trio.to_thread.run_sync(cgroup.remove, cg)
        if link is not None and rt.network is not None:
            with contextlib.suppress(netns.NetnsError):
                await rt.network.detach(link)
        elif ns_name is not None:
            with contextlib.suppress(netns.NetnsError):
                await netns.remove(ns_name)
        if disk is not None:
            disks.remove(disk)
        rt.store.drop_vm(name)


def kill_recorded(rec: VmRecord) -> None:
    """Kill the VMM ``rec`` names if it is still that process (never a pid alone), and
    what runs in its cgroup, and remove its run directory; namespaces, cgroups and
    disks are left to the caller (a teardown, or a restarted supervisor's reclaim)."""
    ident = ProcessIdentity(pid=rec.pid, start_time=rec.start_time, boot_id=rec.boot_id)
    if rec.start_time and still_running(ident):
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(rec.pid, signal.SIGKILL)
    if rec.cgroup:
        with contextlib.suppress(cgroup.CgroupError):
            cgroup.kill_all(Path(rec.cgroup))
    if rec.socket:
        shutil.rmtree(Path(rec.socket).parent, ignore_errors=True)
