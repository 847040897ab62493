"""KVM or TCG: which accelerator QEMU uses on this host, decided by a real boot.

``/dev/kvm`` opening, or even running a tiny test program, proves nothing: on
a nested, paravirtual KVM a stock kernel can hang silently or stop with an
emulation failure. So KVM is chosen only when a probe boot under it reaches
userspace: QEMU ``-M microvm`` boots the image's kernel and initramfs with
``rdinit=/bin/busybox -- sh -c ...``, the shell prints a marker on the serial
console and powers off, and the marker must show up within ``PROBE_DEADLINE``.
Anything else falls back to TCG with a one-line reason saying what happened.

The answer is cached in a small JSON file keyed by the kernel's path and
mtime, the QEMU version and the host kernel's release, so a host is probed
once per kernel and QEMU. A conclusive answer is kept at once: the boot
reached userspace, or QEMU exited or printed an error. A probe that merely ran
out of time is not conclusive (a busy host can be that slow, and one bad
moment must not send every VM to TCG for good): that start uses TCG, and the
next start probes again, until ``PROBE_TIMEOUTS`` timeouts in a row settle
the answer, which bounds what a KVM that hangs silently costs.

Errors::

    AccelError      QEMU itself cannot be run (so neither accelerator can)
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Final, Literal

import msgspec
import trio
from fireclaw.pool.image import Image
from fireclaw.pool.runner import ProgramFailed, run_program

#: How long the probe boot may take to print its marker. A working KVM boots
#: the kernel to userspace in well under a second.
PROBE_DEADLINE: Final = 10.0
#: Probes in a row (one per start) that must run out of time before TCG is kept for good.
PROBE_TIMEOUTS: Final = 3
KVM_DEVICE: Final = Path("/dev/kvm")

# The shell prints 42 computed, so the marker cannot be the kernel echoing its command line.
_MARKER: Final = b"fireclaw-accel-probe-42"
_PROBE_SHELL: Final = 'sh -c "echo fireclaw-accel-probe-$((6*7)); exec /bin/busybox poweroff -f"'


class AccelError(Exception):
    """QEMU cannot be run at all."""


@dataclass(frozen=True)
class Accel:
    name: Literal["kvm", "tcg"]
    reason: str  # one line: why this one


@dataclass(frozen=True)
class ProbeFailure:
    """Why a probe boot did not reach userspace."""

    reason: str  # one line
    # False when the deadline passed with QEMU still running and no error from
    # it: the guest may have been slow on a busy host rather than broken.
    conclusive: bool


def accel_argv(accel: Accel) -> list[str]:
    """QEMU arguments selecting ``accel`` and the CPU model that goes with it."""
    if accel.name == "kvm":
        return ["-accel", "kvm", "-cpu", "host"]
    return ["-accel", "tcg", "-cpu", "max"]


def tsc_khz(cpuinfo: str) -> int | None:
    """The host's CPU clock in kHz from ``/proc/cpuinfo`` text, None if it says none.

    A TCG guest's TSC runs at the host's rate; telling the guest kernel
    (``tsc_early_khz=``) spares it a PIT calibration that can fail on a busy
    host and stall the boot.
    """
    for line in cpuinfo.splitlines():
        if line.startswith("cpu MHz"):
            try:
                mhz = float(line.partition(":")[2])
            except ValueError:
                return None
            return round(mhz * 1000) if mhz > 0 else None
    return None


def host_tsc_khz() -> int | None:
    try:
        return tsc_khz(Path("/proc/cpuinfo").read_text())
    except OSError:
        return None


def probe_cmdline(accel: Accel, *, tsc_khz: int | None) -> str:
    """The probe's kernel command line: kernel parameters, then ``--`` and busybox's
    arguments.

    The kernel hands every word after ``--`` to init and parses none of them, so
    each kernel parameter must come before it.
    """
    params = ["console=ttyS0", "panic=-1", "quiet", "loglevel=1", "rdinit=/bin/busybox"]
    if accel.name == "tcg" and tsc_khz:
        params.append(f"tsc_early_khz={tsc_khz}")  # as the driver does: see tsc_khz
    return f"{' '.join(params)} -- {_PROBE_SHELL}"


def probe_argv(image: Image, qemu: str, accel: Accel) -> list[str]:
    """The probe boot: serial console on stdout, no disks, no network."""
    append = probe_cmdline(accel, tsc_khz=host_tsc_khz() if accel.name == "tcg" else None)
    return [
        qemu, *accel_argv(accel),
        "-M", "microvm,x-option-roms=off,rtc=on", "-m", "128", "-smp", "1",
        "-nodefaults", "-no-user-config", "-display", "none", "-no-reboot",
        "-chardev", "stdio,id=console,signal=off", "-serial", "chardev:console",
        "-kernel", str(image.vmlinux), "-initrd", str(image.initramfs),
        "-append", append,
    ]  # fmt: skip


def _version(qemu: str) -> str:
    """The first line of ``qemu -version``; AccelError (one line) when QEMU cannot be run."""
    try:
        out = run_program([qemu, "-version"], timeout=PROBE_DEADLINE)
    except ProgramFailed as exc:
        raise AccelError(str(exc)) from exc
    lines = out.decode(errors="replace").splitlines()
    if not lines:
        raise AccelError(f"{qemu} -version printed nothing")
    return lines[0].strip()


async def qemu_version(qemu: str) -> str:
    """The first line of ``qemu -version``; AccelError when QEMU cannot be run."""
    return await trio.to_thread.run_sync(_version, qemu)


def installed_version(qemu: str) -> str | None:
    """The first line of ``qemu -version``, without trio; None when it cannot be run."""
    try:
        return _version(qemu)
    except AccelError:
        return None


def _first_error(stderr: bytes, qemu: str, *, warnings: bool = True) -> str | None:
    """QEMU's first error line, without its program-name prefix; its first warning
    when it printed no error and ``warnings`` is true; else None."""
    lines = [line.strip() for line in stderr.decode(errors="replace").splitlines() if line.strip()]
    wanted = [line for line in lines if "warning:" not in line] or (lines if warnings else [])
    if not wanted:
        return None
    line = wanted[0]
    for prefix in (f"{qemu}:", f"{Path(qemu).name}:"):
        line = line.removeprefix(prefix).strip()
    return line[:200]


def _exit_text(code: int) -> str:
    if code < 0:
        with contextlib.suppress(ValueError):
            return f"was killed by {signal.Signals(-code).name}"
    return f"exited with {code}"


async def probe_boot(
    image: Image, qemu: str, accel: Accel, *, deadline: float = PROBE_DEADLINE
) -> ProbeFailure | None:
    """Boot ``image`` under ``accel``; None if it reached userspace, else why not."""
    try:
        proc = await trio.lowlevel.open_process(
            probe_argv(image, qemu, accel),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            start_new_session=True,
        )
    except OSError as exc:
        raise AccelError(f"cannot run {qemu}: {exc.strerror or exc}") from exc
    assert proc.stdout is not None and proc.stderr is not None
    stdout, stderr = proc.stdout, proc.stderr
    console, errors = bytearray(), bytearray()
    seen = False
    waiting = trio.move_on_after(deadline)
    try:
        with waiting:
            async with trio.open_nursery() as nursery:

                async def read_console() -> None:
                    nonlocal seen
                    async for chunk in stdout:
                        console.extend(chunk)
                        del console[: max(0, len(console) - 65536)]
                        if _MARKER in console:
                            seen = True
                            nursery.cancel_scope.cancel()

                async def read_errors() -> None:
                    async for chunk in stderr:
                        if len(errors) < 65536:
                            errors.extend(chunk)

                nursery.start_soon(read_console)
                nursery.start_soon(read_errors)
            if not seen:
                await proc.wait()  # both pipes closed: QEMU is exiting
    finally:
        timed_out = waiting.cancelled_caught
        with trio.CancelScope(shield=True):
            if proc.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
            await proc.wait()
            await stdout.aclose()
            await stderr.aclose()
    if seen:
        return None
    last = console.decode(errors="replace").strip().splitlines()[-1:] or [""]
    shown = f" (last console line: {last[0][:120]})" if last[0] else ""
    if proc.returncode is not None and not timed_out:
        error = _first_error(bytes(errors), qemu)
        if error is not None:
            return ProbeFailure(f"qemu {_exit_text(proc.returncode)}: {error}", conclusive=True)
        return ProbeFailure(
            f"qemu {_exit_text(proc.returncode)} before the probe reached userspace{shown}",
            conclusive=True,
        )
    # A guest KVM cannot run (an emulation failure) stops while QEMU lives on.
    error = _first_error(bytes(errors), qemu, warnings=False)
    if error is not None:
        return ProbeFailure(f"qemu: {error}", conclusive=True)
    if not shown:
        return ProbeFailure(f"no console output within {deadline:g}s", conclusive=False)
    return ProbeFailure(
        f"the kernel did not reach userspace within {deadline:g}s{shown}", conclusive=False
    )


class _Entry(msgspec.Struct, frozen=True, kw_only=True):
    name: Literal["kvm", "tcg"]
    reason: str
    # Inconclusive probes in a row; 0 for a conclusive answer.
    timeouts: int = 0

    @property
    def settled(self) -> bool:
        """Whether this answer stands without another probe."""
        return self.timeouts == 0 or self.timeouts >= PROBE_TIMEOUTS


def _next_entry(previous: _Entry | None, failure: ProbeFailure | None, elapsed: float) -> _Entry:
    """The cache entry after a KVM probe that ended with ``failure`` after ``elapsed``
    seconds, ``previous`` being what the cache held for the same key."""
    if failure is None:
        return _Entry(name="kvm", reason=f"kvm: probe boot reached userspace in {elapsed:.1f}s")
    if failure.conclusive:
        return _Entry(name="tcg", reason=f"kvm: {failure.reason}; using tcg")
    timeouts = (previous.timeouts if previous is not None else 0) + 1
    if timeouts < PROBE_TIMEOUTS:
        again = f"timeout {timeouts} of {PROBE_TIMEOUTS}, probing again at the next start"
        return _Entry(
            name="tcg", reason=f"kvm: {failure.reason}; using tcg ({again})", timeouts=timeouts
        )
    return _Entry(
        name="tcg",
        reason=f"kvm: {failure.reason}; using tcg (timed out {timeouts} starts in a row)",
        timeouts=timeouts,
    )


_cache_decoder: Final = msgspec.json.Decoder(dict[str, _Entry])


def _read_cache(path: Path) -> dict[str, _Entry]:
    try:
        return _cache_decoder.decode(path.read_bytes())
    except (OSError, msgspec.DecodeError):
        return {}  # missing or damaged: probe again


def _write_cache(path: Path, entries: dict[str, _Entry]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}")
    tmp.write_bytes(msgspec.json.encode(entries, order="sorted"))
    os.replace(tmp, path)


def _kvm_unusable() -> Accel | None:
    """TCG, and why, when this host has no KVM device we may use; None when it has."""
    if not KVM_DEVICE.exists():
        return Accel("tcg", f"kvm: {KVM_DEVICE} does not exist; using tcg")
    if not os.access(KVM_DEVICE, os.R_OK | os.W_OK):
        return Accel("tcg", f"kvm: no read/write access to {KVM_DEVICE}; using tcg")
    return None


def known_accel(image: Image, *, cache_path: Path, version: str) -> Accel | None:
    """What ``choose_accel`` would answer for ``image`` under the QEMU whose
    ``-version`` is ``version``, without a probe boot: None when it would probe
    (never probed, or no settled answer in ``cache_path``). Reads one file."""
    unusable = _kvm_unusable()
    if unusable is not None:
        return unusable
    entry = _read_cache(cache_path).get(cache_key(image, version))
    return Accel(entry.name, entry.reason) if entry is not None and entry.settled else None


def cache_key(image: Image, version: str) -> str:
    try:
        mtime = image.vmlinux.stat().st_mtime_ns
    except OSError:
        mtime = 0
    return f"{image.vmlinux}|{mtime}|{version}|{os.uname().release}"


async def choose_accel(
    image: Image, *, cache_path: Path, qemu: str = "qemu-system-x86_64"
) -> Accel:
    """KVM if ``/dev/kvm`` is usable and a probe boot under it works, else TCG.

    Probes once per kernel, QEMU version and host kernel (answers are cached in
    ``cache_path``), or up to ``PROBE_TIMEOUTS`` starts in a row while the probe
    only runs out of time. Raises AccelError when QEMU cannot be run.
    """
    version = await qemu_version(qemu)
    unusable = _kvm_unusable()
    if unusable is not None:
        return unusable
    key = cache_key(image, version)
    cached = await trio.to_thread.run_sync(_read_cache, cache_path)
    previous = cached.get(key)
    if previous is not None and previous.settled:
        return Accel(previous.name, previous.reason)
    started = trio.current_time()
    failure = await probe_boot(image, qemu, Accel("kvm", "probing"))
    entry = _next_entry(previous, failure, trio.current_time() - started)
    cached[key] = entry
    with contextlib.suppress(OSError):  # an unwritable cache only costs another probe
        await trio.to_thread.run_sync(_write_cache, cache_path, cached)
    return Accel(entry.name, entry.reason)
