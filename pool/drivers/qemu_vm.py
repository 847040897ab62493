"""The ``qemu`` driver's VM: one QEMU process, its run directory and what is
done to it over QMP once it runs (pause, resume, snapshot, a workspace).

``QemuDriver`` (``fireclaw.pool.drivers.qemu``) starts, restores and adopts
these; the module docstring there says how the machine, its control port and
its snapshots are laid out.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
from collections.abc import Awaitable, Callable
from functools import partial
from pathlib import Path
from typing import Final, TypeVar

import msgspec
import trio
from fireclaw.pool.accel import Accel
from fireclaw.pool.drivers.adopted import AdoptedProcess
from fireclaw.pool.drivers.base import (
    DriverError,
    Snapshot,
    VmmCommandError,
    VmSpec,
    info_path,
)
from fireclaw.pool.drivers.qemu_argv import (
    CHANNEL_SOCKET,
    MIGRATE_SOCKET,
    QMP_SOCKET,
    WS_EMPTY,
    WS_FILE,
    WS_NODE,
)
from fireclaw.pool.drivers.qemu_migration import (
    SnapshotInfo,
    migrate_to_socket,
    undo_migration,
)
from fireclaw.pool.drivers.vmm import VmmExited, VmmProcess
from fireclaw.pool.image import Image
from fireclaw.pool.qmp import Qmp, QmpFailure, open_qmp

T = TypeVar("T")

#: Cancelling an unfinished snapshot and resuming the VM.
_UNDO_TIMEOUT: Final = 5.0
#: The control port's unix socket, in the VM's run directory.


class QemuVm(VmmProcess):
    """One QEMU process. ``wait``/``kill`` reap it and remove its run directory."""

    vmm_name = "QEMU"

    def __init__(
        self,
        proc: trio.Process | AdoptedProcess,
        spec: VmSpec,
        *,
        qemu: str,
        image: Image,
        accel: Accel,
        cmdline: str,
        run_dir: Path,
        log_offset: int,
        restored: bool = False,
        channel: trio.SocketStream | None = None,
    ) -> None:
        super().__init__(proc, spec)
        #: The control port's connection made before QEMU started, until handed over.
        self._channel = channel
        self._qemu = qemu
        self._image = image
        self._accel = accel
        self._cmdline = cmdline
        self._run_dir = run_dir
        self._log_offset = log_offset
        #: The RAM's file when it is shared (a template): snapshots leave RAM out.
        self._memory_file = spec.memory_file if not restored else None
        self.restored_from: Path | None = None
        self.restore_seconds: float | None = None

    @property
    def qmp_path(self) -> Path:
        return self._run_dir / QMP_SOCKET

    @property
    def control_socket(self) -> Path:
        return self.qmp_path

    @property
    def channel_path(self) -> Path:
        """The unix socket of the guest's control port (QEMU is its server)."""
        return self._run_dir / CHANNEL_SOCKET

    async def open_channel(self) -> trio.abc.Stream:
        """The host's end of the control port: the connection made before QEMU
        started, the first time; a new one after that (QEMU takes one client at
        a time: close the last first). DriverError when QEMU does not take it."""
        channel, self._channel = self._channel, None
        if channel is not None:
            return channel
        try:
            return await trio.open_unix_socket(str(self.channel_path))
        except OSError as exc:
            raise DriverError(
                f"{self._spec.name}: control port {self.channel_path}: {exc.strerror or exc}"
            ) from exc

    async def wait(self) -> int | None:
        """As ``VmmProcess.wait``; also closes the port's connection if it was never
        handed over."""
        try:
            return await super().wait()
        finally:
            channel, self._channel = self._channel, None
            if channel is not None:
                channel.socket.close()

    def release(self) -> None:
        shutil.rmtree(self._run_dir, ignore_errors=True)

    def info(self) -> dict[str, object]:
        return {
            "driver": "qemu",
            "pid": self.pid,
            "netns": self._spec.netns,
            "accel": self._accel.name,
            "qmp": str(self.qmp_path),
            "channel": str(self.channel_path),
            "restored_from": str(self.restored_from) if self.restored_from else None,
            "restore_seconds": self.restore_seconds,
            "adopted": self.adopted,
        }

    # --- QMP ---------------------------------------------------------------------

    async def pause(self) -> None:
        await self._command("pause", lambda qmp: qmp.execute("stop"))

    async def resume(self) -> None:
        await self._command("resume", lambda qmp: qmp.execute("cont"))

    async def snapshot(self, path: Path) -> Snapshot:
        """Pause the VM and write its state to ``path``, absolute (and ``PATH.json``).

        The state is migrated over a unix socket we accept on, so the file is
        known to be whole when QEMU closes the connection after the migration
        completed. (With an ``exec:cat > FILE`` target, QEMU announces completion
        before it closes the pipe, and signals the ``cat`` if it has not exited
        by then: the file may be short.) The file is written aside and renamed.

        The VM stays paused afterwards: ``resume()`` it or kill it. Bound the
        wait with a cancel scope; a snapshot not finished (failed or cancelled)
        is not left behind, its migration is cancelled and the VM runs again.
        """
        if not path.is_absolute():
            raise VmmCommandError(f"{self._spec.name}: snapshot path {path} is not absolute")
        partial_path = path.with_name(f".{path.name}.partial")
        sock_path = self.qmp_path.with_name(MIGRATE_SOCKET)  # in the VM's own run directory
        listener = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        started = trio.current_time()
        try:
            await listener.bind(str(sock_path))
            listener.listen(1)
            version = await self._command(
                "snapshot",
                partial(migrate_to_socket, sock_path, listener, partial_path, self._memory_file),
            )
            seconds = trio.current_time() - started
            size = partial_path.stat().st_size
            info = SnapshotInfo(
                image_key=self._image.key,
                accel=self._accel.name,
                memory_mib=self._spec.memory_mib,
                vcpus=self._spec.vcpus,
                cmdline=self._cmdline,
                qemu_version=version,
                size=size,
                seconds=round(seconds, 3),
                tap=self._spec.tap,
                disk=self._spec.disk is not None,
                memory_file=str(self._memory_file) if self._memory_file else None,
            )
            info_path(path).write_bytes(msgspec.json.encode(info))
            os.replace(partial_path, path)
        except BaseException as exc:
            with trio.CancelScope(shield=True), trio.move_on_after(_UNDO_TIMEOUT):
                with contextlib.suppress(VmmCommandError):
                    await self._command("resume after an unfinished snapshot", undo_migration)
            if isinstance(exc, OSError):
                raise VmmCommandError(
                    f"{self._spec.name}: snapshot {path}: {exc.strerror}"
                ) from exc
            raise
        finally:
            listener.close()
            with contextlib.suppress(FileNotFoundError):
                sock_path.unlink()
            with contextlib.suppress(FileNotFoundError):
                partial_path.unlink()
        return Snapshot(path=path, size=size, seconds=seconds)

    async def attach_workspace(self, path: Path) -> None:
        """Put the image at ``path`` (absolute, ``WORKSPACE_BYTES`` long) under the
        VM's spare disk, in place of its emptiness; once per VM.

        QEMU locks the file, so one workspace is never in two VMs at once."""
        if self._spec.disk is None:
            raise VmmCommandError(f"{self._spec.name}: this VM has no spare disk")

        async def swap(qmp: Qmp) -> None:
            await qmp.execute(
                "blockdev-add", {"driver": "file", "node-name": WS_FILE, "filename": str(path)}
            )
            await qmp.execute(
                "blockdev-reopen",
                {"options": [{"driver": "raw", "node-name": WS_NODE, "file": WS_FILE}]},
            )
            await qmp.execute("blockdev-del", {"node-name": WS_EMPTY})

        await self._command(f"workspace {path.name}", swap)

    async def _command(self, what: str, op: Callable[[Qmp], Awaitable[T]]) -> T:
        try:
            return await self._over_qmp(op)
        except QmpFailure as exc:
            raise VmmCommandError(f"{self._spec.name}: {what}: {exc}") from exc
        except VmmExited:
            raise VmmCommandError(f"{self._spec.name}: {what}: {self.exit_text()}") from None

    async def _over_qmp(self, op: Callable[[Qmp], Awaitable[T]]) -> T:
        """``op`` in a fresh QMP session; raises VmmExited at once if QEMU exits meanwhile."""

        async def session() -> T:
            async with open_qmp(self.qmp_path) as qmp:
                return await op(qmp)

        return await self.while_running(session)

    def exit_text(self) -> str:
        """How QEMU ended, with its last error message when it left one."""
        text = super().exit_text()
        message = self.last_error()
        return f"{text}: {message}" if message else text

    def last_error(self) -> str:
        """QEMU's last ``qemu-system-...: message`` line in this VM's log, or ''."""
        prefix = f"{Path(self._qemu).name}: "
        try:
            with open(self._spec.log_path, "rb") as log:
                size = log.seek(0, os.SEEK_END)
                start = max(self._log_offset, size - 65536)
                log.seek(start)
                text = log.read().decode(errors="replace")
        except OSError:
            return ""
        found = [line.strip() for line in text.splitlines() if prefix in line]
        if not found:
            return ""
        return found[-1].partition(prefix)[2][:200]
