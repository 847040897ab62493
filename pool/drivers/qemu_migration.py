"""QEMU snapshots as migrations, and the other QMP conversations the driver holds.

A snapshot pauses the VM and migrates its device state (and its RAM, unless
that is a shared file) to a file: QEMU 7.2 has no ``file:`` migration, so it
migrates to a unix socket we accept on (``migrate_to_socket``), and the file
is known to be whole when QEMU closes that connection. ``PATH.json`` beside
it (``SnapshotInfo``) says what a clone must be started with. A clone is a
QEMU started with ``-incoming defer`` that inherits the snapshot file and
loads it over QMP (``migrate_in``).

Each function here is one conversation over an open ``Qmp`` session.
"""

from __future__ import annotations

import contextlib
import math
import os
from pathlib import Path
from typing import Final, Literal

import msgspec
import trio
from fireclaw.pool.disks import fsync_path
from fireclaw.pool.drivers.base import load_info
from fireclaw.pool.qmp import Qmp, QmpError, QmpFailure
from fireclaw.pool.steps import mark

#: Migration of a paused VM to a local file: no reason to throttle it (QEMU's default
#: is 128 MiB/s).
_MIGRATE_BANDWIDTH: Final = 64 << 30
_MIGRATION_ENDED: Final = frozenset({"completed", "failed", "cancelled"})


class SnapshotInfo(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """``PATH.json`` beside a snapshot: what a clone must be started with."""

    image_key: str
    accel: Literal["kvm", "tcg"]
    memory_mib: int
    vcpus: int
    cmdline: str
    qemu_version: tuple[int, int, int]
    size: int
    seconds: float
    tap: str | None = None  # the tap the guest was on (None: user networking)
    disk: bool = False  # on its own overlay: a clone's overlay must sit on that one
    memory_file: str | None = None  # the RAM, not in the snapshot: clones map it privately


_info_decoder: Final = msgspec.json.Decoder(SnapshotInfo)


def load_snapshot_info(snapshot: Path) -> SnapshotInfo:
    """What ``snapshot`` was taken with; DriverError if it or its ``.json`` is missing."""
    return load_info(snapshot, _info_decoder)


async def _events_on(qmp: Qmp) -> None:
    await qmp.execute(
        "migrate-set-capabilities", {"capabilities": [{"capability": "events", "state": True}]}
    )


async def _migration_done(qmp: Qmp) -> None:
    event = await qmp.wait_event("MIGRATION", lambda e: e.data.get("status") in _MIGRATION_ENDED)
    status = event.data.get("status")
    if status != "completed":
        found = await qmp.execute("query-migrate")
        desc = found.get("error-desc") if isinstance(found, dict) else None
        raise QmpError("MigrationFailed", str(desc or f"migration {status}"), command="migrate")


async def _ignore_shared(qmp: Qmp) -> None:
    """Leave shared (file-backed) RAM out of the migration: it is the file itself."""
    await qmp.execute(
        "migrate-set-capabilities",
        {"capabilities": [{"capability": "x-ignore-shared", "state": True}]},
    )


async def migrate_to_socket(
    sock_path: Path,
    listener: trio.socket.SocketType,
    target: Path,
    memory_file: Path | None,
    qmp: Qmp,
) -> tuple[int, int, int]:
    await qmp.execute("stop")
    await _events_on(qmp)
    if memory_file is not None:
        await _ignore_shared(qmp)
    await qmp.execute("migrate-set-parameters", {"max-bandwidth": _MIGRATE_BANDWIDTH})
    await qmp.execute("migrate", {"uri": f"unix:{sock_path}"})
    failed: list[str] = []
    error: QmpFailure | None = None
    async with trio.open_nursery() as nursery:
        nursery.start_soon(_receive_state, listener, target, failed)
        try:
            await _migration_done(qmp)
        except QmpFailure as exc:  # carried out by hand: the nursery would wrap it
            error = exc
            nursery.cancel_scope.cancel()
    if error is not None:
        raise error
    if failed:
        raise OSError(failed[0])
    if memory_file is not None:
        # The RAM is the file: on disk before the snapshot is called whole.
        await trio.to_thread.run_sync(fsync_path, memory_file)
    return qmp.greeting.version


async def _receive_state(listener: trio.socket.SocketType, target: Path, failed: list[str]) -> None:
    """Accept QEMU's one migration connection and write what it sends to ``target``
    until it closes the connection; then sync the file. Errors go to ``failed``."""
    try:
        conn, _ = await listener.accept()
        stream = trio.SocketStream(conn)
        # Guest memory (the token included): readable by root only.
        fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        async with stream, await trio.open_file(fd, "wb") as out:
            while chunk := await stream.receive_some(1 << 20):
                await out.write(chunk)
            await out.flush()
            await trio.to_thread.run_sync(os.fsync, out.fileno())
    except (OSError, trio.BrokenResourceError) as exc:
        failed.append(f"writing {target.name}: {exc}")


async def undo_migration(qmp: Qmp) -> None:
    """Cancel a migration under way, if any, and let the guest run again."""
    with contextlib.suppress(QmpError):
        await qmp.execute("migrate_cancel")
    await qmp.execute("cont")


async def migrate_in(
    source_fd: int, ignore_shared: bool, startup: trio.CancelScope, qmp: Qmp
) -> float:
    """Load the snapshot QEMU inherited as ``source_fd`` (no shell, no ``cat``), then
    run; in the same QMP session as the check that QEMU is up, which lifts the
    ``startup`` deadline. Returns the seconds the restore took after that."""
    await query_status(qmp)
    mark("qmp answered")
    startup.deadline = math.inf
    started = trio.current_time()
    await _events_on(qmp)
    if ignore_shared:
        await _ignore_shared(qmp)
    await qmp.execute("migrate-incoming", {"uri": f"fd:{source_fd}"})
    await _migration_done(qmp)
    mark("state loaded")
    await qmp.execute("cont")
    mark("running")
    return trio.current_time() - started


async def query_status(qmp: Qmp) -> None:
    await qmp.execute("query-status")


async def run_state(qmp: Qmp) -> str:
    """QEMU's run state: ``running``, ``paused``, ``inmigrate``, ..."""
    found = await qmp.execute("query-status")
    status = found.get("status") if isinstance(found, dict) else None
    return str(status)
