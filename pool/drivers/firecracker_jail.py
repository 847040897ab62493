"""Where a Firecracker VM lives on the host: its jail, its ids, the jailer's command line.

Every VM runs under Firecracker's ``jailer`` in a chroot of its own, under
the VM's run directory (``<log dir>/run/<vm id>``, the chroot base, where a
QEMU VM keeps its sockets: what a killed supervisor leaves there is found and
removed as any VM's run directory is)::

    <chroot base>/firecracker/<vm id>/root/
        vmlinux  initramfs.cpio.gz  rootfs.ext4   the image's files, hard links
        disk.raw                                  the VM's own writable root (optional)
        snapshot/vmstate  snapshot/mem            a snapshot, taken or to restore
        run/firecracker.socket                    the API socket

Firecracker is told every path relative to that root, so a clone restored in
another jail finds its disks at the same paths as its template had them: a
Firecracker snapshot cannot rename disks. The jailer also joins the VM's
network namespace (``--netns``), places the VMM in the pool's cgroup for the
VM with its memory limit, and drops to an unprivileged uid of the VM's own
(``uid_for``) with the group ``JAIL_GID`` shared by all jails, which may read
the image's files and snapshots (root-owned, group-readable) and nothing of
another VM.

Everything here is pure or blocking file work (call it from a thread).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import os
import re
import shutil
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from fireclaw.pool.drivers.base import DriverError, VmSpec
from fireclaw.pool.netns import NETNS_DIR, in_fresh_thread

#: The VMM's jailed uids: ``UID_BASE`` plus 24 bits of the VM id's hash, far above
#: any uid a host hands out, so no two VMs share one but by a 1-in-16-million chance.
UID_BASE: Final = 1 << 28
JAIL_GID: Final = UID_BASE - 1
#: Paths inside the jail, as Firecracker is told them.
API_SOCK: Final = "/run/firecracker.socket"
KERNEL: Final = "vmlinux"
INITRD: Final = "initramfs.cpio.gz"
ROOTFS: Final = "rootfs.ext4"
DISK: Final = "disk.raw"
SNAPSHOT_DIR: Final = "snapshot"
VMSTATE: Final = "snapshot/vmstate"
MEMORY: Final = "snapshot/mem"
#: What Firecracker needs above its guest's RAM in the VM's cgroup (its own heap,
#: device queues, the API thread); measured figures for it are not taken here.
OVERHEAD_MIB: Final = 64
#: The jailer's rule for ``--id``.
_JAIL_ID: Final = re.compile(r"[A-Za-z0-9-]{1,64}")
_CGROUP_ROOT: Final = Path("/sys/fs/cgroup")
#: linux/if_tun.h
_TUNSETIFF: Final = 0x400454CA
_TUNSETOWNER: Final = 0x400454CC
_TUNSETGROUP: Final = 0x400454CE
_TUNGETIFF: Final = 0x800454D2
_IFF_PERSIST: Final = 0x0800
_IFF_TAP: Final = 0x0002
_IFF_NO_PI: Final = 0x1000


def uid_for(vm_id: str) -> int:
    """The uid the VMM of ``vm_id`` runs as: its own, stable across restarts of it."""
    digest = hashlib.blake2b(vm_id.encode(), digest_size=3).digest()
    return UID_BASE + int.from_bytes(digest, "big")


@dataclass(frozen=True)
class Jail:
    """One VM's jail: ``root`` is what Firecracker sees as ``/``."""

    vm_id: str
    base: Path  # the chroot base directory
    exec_name: str  # the firecracker binary's file name, the jailer's middle folder
    uid: int
    gid: int = JAIL_GID

    @classmethod
    def for_spec(cls, spec: VmSpec, base: Path, firecracker: str) -> Jail:
        if not _JAIL_ID.fullmatch(spec.vm_id):
            raise DriverError(
                f"{spec.name}: vm id {spec.vm_id!r} is not a jailer id"
                " (letters, digits and '-', at most 64)"
            )
        return cls(spec.vm_id, base, Path(firecracker).name, uid_for(spec.vm_id))

    @property
    def directory(self) -> Path:
        """What the jailer makes and what removing the jail removes."""
        return self.base / self.exec_name / self.vm_id

    @property
    def root(self) -> Path:
        return self.directory / "root"

    @property
    def api_socket(self) -> Path:
        return self.root / API_SOCK.lstrip("/")

    def inside(self, relative: str) -> Path:
        return self.root / relative


def jailer_argv(
    jailer: str,
    firecracker: str,
    jail: Jail,
    *,
    netns: str | None,
    cgroup: Path | None,
    memory_mib: int,
) -> list[str]:
    """The jailer's command line for ``jail``; the VMM stays its process (no daemonize,
    no new pid namespace), so the supervisor's child IS the VMM.

    ``cgroup``: the pool's group for the VM (``<hierarchy>/<parent>/<vm id>``); the
    jailer puts the VMM there and sets its memory limit."""
    argv = [
        jailer,
        "--id", jail.vm_id,
        "--exec-file", firecracker,
        "--uid", str(jail.uid),
        "--gid", str(jail.gid),
        "--chroot-base-dir", str(jail.base),
    ]  # fmt: skip
    if netns is not None:
        argv += ["--netns", str(NETNS_DIR / netns)]
    if cgroup is not None:
        argv += _cgroup_args(cgroup, jail.vm_id, memory_mib + OVERHEAD_MIB)
    # Firecracker logs the body of API requests at its default level, Info: the
    # boot source's holds the guest's token. Warnings and errors still reach the log.
    return [*argv, "--", "--api-sock", API_SOCK, "--level", "Warning"]


def _cgroup_args(cgroup: Path, vm_id: str, limit_mib: int) -> list[str]:
    if cgroup.name != vm_id:
        raise DriverError(f"cgroup {cgroup} is not named for the VM {vm_id}")
    limit = limit_mib << 20
    memory_v1 = _CGROUP_ROOT / "memory"
    if cgroup.is_relative_to(memory_v1):
        parent = cgroup.parent.relative_to(memory_v1)
        version, setting = "1", f"memory.limit_in_bytes={limit}"
    elif cgroup.is_relative_to(_CGROUP_ROOT):
        parent = cgroup.parent.relative_to(_CGROUP_ROOT)
        version, setting = "2", f"memory.max={limit}"
    else:
        raise DriverError(f"cgroup {cgroup} is not under {_CGROUP_ROOT}")
    return [
        "--cgroup-version", version,
        "--parent-cgroup", str(parent),
        "--cgroup", setting,
    ]  # fmt: skip


# --- the jail's files (blocking) ---------------------------------------------------------


def make(jail: Jail, shared: dict[str, Path], own: dict[str, Path]) -> None:
    """A fresh jail root holding ``shared`` (read-only, for every jail) and ``own``
    (this VM's, handed to its uid) under their relative names, and ``snapshot/``.

    A leftover jail of the same id (a crashed supervisor's) is removed first."""
    remove(jail)
    try:
        jail.root.mkdir(parents=True, mode=0o755)
        snapshots = jail.inside(SNAPSHOT_DIR)
        snapshots.mkdir(mode=0o700)
        os.chown(snapshots, jail.uid, jail.gid)
        for name, source in shared.items():
            _place(source, jail.inside(name), owner=None)
        for name, source in own.items():
            _place(source, jail.inside(name), owner=(jail.uid, jail.gid))
    except OSError as exc:
        remove(jail)
        where = exc.filename or jail.root
        raise DriverError(f"jail {jail.root}: {where}: {exc.strerror}") from exc


def _place(source: Path, target: Path, *, owner: tuple[int, int] | None) -> None:
    """``source`` at ``target``: a hard link (no copy of an image's gigabytes), or a
    copy across file systems. Shared files stay root's and must be readable by the
    jails' group; a VM's own file becomes its uid's."""
    target.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.link(source, target)
    except OSError as exc:
        if exc.errno != errno.EXDEV:
            raise
        shutil.copyfile(source, target)
    if owner is not None:
        os.chown(target, *owner)
        return
    st = target.stat()
    if not (st.st_mode & 0o004 or (st.st_gid == JAIL_GID and st.st_mode & 0o040)):
        raise OSError(errno.EACCES, f"not readable by group {JAIL_GID} nor by all", str(source))


def share(path: Path) -> None:
    """Make a file Firecracker wrote in a jail root's and readable by every jail
    (a snapshot a clone restores from), and nobody else's."""
    os.chown(path, 0, JAIL_GID)
    os.chmod(path, 0o640)


def remove(jail: Jail) -> None:
    """Remove the jail and everything in it (links only: the image stays), and
    the folders above it up to the chroot base once they are empty."""
    with contextlib.suppress(FileNotFoundError):
        shutil.rmtree(jail.directory)
    for folder in (jail.directory.parent, jail.base):
        try:
            folder.rmdir()
        except OSError:  # not empty (other jails in a shared base), or gone
            return


def hand_tap(tap: str, netns: str | None, uid: int, gid: int) -> None:
    """Let ``uid``/``gid`` open ``tap``, a persistent tap root made in ``netns``.

    Firecracker opens its tap after the jailer dropped root. ``ip tuntap`` cannot
    change the owner of a tap that exists (it insists on making one), so this
    attaches to it as its maker did and sets the owner; closing leaves it as it
    was, persistent, now the jailed VMM's. Raises OSError."""

    def inside() -> None:
        if netns is not None:
            from pyroute2.netns import setns

            setns(netns, flags=0)  # this fresh thread only; it ends right after
        fd = os.open("/dev/net/tun", os.O_RDWR | os.O_CLOEXEC)
        try:
            fcntl.ioctl(fd, _TUNSETIFF, struct.pack("16sH22x", tap.encode(), _IFF_TAP | _IFF_NO_PI))
            # TUNSETIFF makes a tap that is not there: one that dies with this
            # descriptor, which is not the pool's.
            found = fcntl.ioctl(fd, _TUNGETIFF, bytes(40))
            if not struct.unpack("16sH22x", found)[1] & _IFF_PERSIST:
                raise OSError(errno.ENODEV, f"no tap {tap} in {netns or 'this namespace'}")
            fcntl.ioctl(fd, _TUNSETOWNER, uid)
            fcntl.ioctl(fd, _TUNSETGROUP, gid)
        finally:
            os.close(fd)

    in_fresh_thread(inside)
