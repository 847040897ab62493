"""``build_image``: inputs -> cache key -> a cached or freshly built image directory.

Every input of an image is hashed into its key (``KeyInputs``): the spec, the
guest daemon's sources, the pinned wheels, the kernel (Debian package version
or the user file's sha256), the init scripts and ``BUILDER_VERSION``. An image
lives in ``<cache_dir>/<key[:16]>/``; a build happens in
``<cache_dir>/.build-<key[:16]>/`` and is renamed into place only once
complete, so a directory under its final name is always a whole image.

A process that ``build_image`` gave an image holds a shared ``flock`` on its
directory until it exits (``_load_held``). ``prune.prune_images`` removes only the
image directories it can lock exclusively, so never one a process uses.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Final, Literal

import msgspec
from fireclaw.guest_daemon.protocol import CliName
from fireclaw.pool.disks import fsync_path
from msgspec import Meta

from . import clis, initramfs, kernel, rootfs
from .errors import ImageError, KernelError
from .tools import require

#: Bump when a change to the builder changes what it builds.
BUILDER_VERSION: Final = 1

DEBIAN_CLOUD: Final = "debian-cloud"

#: Packages beyond ``rootfs.REQUIRED_PACKAGES`` that an image has unless told otherwise.
DEFAULT_PACKAGES: Final = ("ca-certificates",)

#: Kernel arguments the image expects; the VMM adds fireclaw.* and console settings.
BASE_CMDLINE: Final = "console=ttyS0 panic=-1 root=/dev/vda ro"

VMLINUX: Final = "vmlinux"
INITRAMFS: Final = "initramfs.cpio.gz"
ROOTFS: Final = "rootfs.ext4"
MANIFEST: Final = "manifest.json"

Hostname = Annotated[str, Meta(pattern=r"^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$")]
PackageName = Annotated[str, Meta(pattern=r"^[a-z0-9][a-z0-9+.-]+$", max_length=128)]

Progress = Callable[[str], None]


class ImageSpec(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """What to build. ``kernel`` is ``"debian-cloud"`` or the path of a vmlinux or bzImage.

    A user kernel needs PVH (``CONFIG_PVH``) and ext4 built in; its virtio
    drivers (virtio_mmio, virtio_blk, virtio_net) too, unless ``modules``
    names its ``lib/modules/RELEASE`` folder, whose virtio modules the
    initramfs then loads. ``modules`` is ignored for ``"debian-cloud"``.
    ``size_mib`` None sizes the root disk from its content plus headroom.
    """

    suite: Literal["bookworm"] = "bookworm"
    packages: tuple[PackageName, ...] = DEFAULT_PACKAGES
    kernel: Annotated[str, Meta(min_length=1, max_length=4096)] = DEBIAN_CLOUD
    modules: Annotated[str, Meta(min_length=1, max_length=4096)] | None = None
    size_mib: Annotated[int, Meta(ge=64, le=1 << 20)] | None = None
    hostname: Hostname = "fireclaw"
    #: Coding-agent CLIs to install from their registry packages (clis.py).
    clis: tuple[CliName, ...] = ()


class KeyInputs(
    msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True, omit_defaults=True
):
    """Everything an image is made from; its canonical encoding's sha256 is the image key.

    A field with a default is left out of the encoding when it has that value, so
    that adding one keeps the keys of the images that do not use it."""

    builder: int
    builder_files: dict[str, str]  # data file -> sha256
    suite: str
    packages: tuple[str, ...]  # sorted, required ones included
    hostname: str
    size_mib: int | None
    kernel: str  # "linux-image-...=VERSION" or "sha256:HEX"
    modules: dict[str, str]  # a user kernel's module file -> sha256
    guest_daemon: dict[str, str]  # relative path -> sha256
    wheels: tuple[str, ...]  # name==version pins
    clis: tuple[str, ...] = ()  # registry packages: "npm:opencode-ai", "pypi:aider-chat"


class Image(msgspec.Struct, frozen=True, kw_only=True):
    """A built image: the files a VMM boots, and what they were made from."""

    key: str
    directory: Path
    vmlinux: Path
    initramfs: Path
    rootfs: Path
    kernel_release: str
    cmdline: str = BASE_CMDLINE
    clis: tuple[str, ...] = ()  # the coding-agent CLIs installed in it


class Manifest(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """``manifest.json`` in an image directory; written last, before the rename."""

    key: str
    spec: ImageSpec
    inputs: KeyInputs
    kernel_release: str
    cmdline: str
    modules: tuple[str, ...]
    wheels: tuple[str, ...]  # as installed
    sizes: dict[str, int]
    built_at: float
    build_seconds: float
    clis: tuple[str, ...] = ()
    cli_versions: dict[str, str] = {}  # CLI -> version its registry gave


class _StoredInputs(msgspec.Struct, frozen=True):
    kernel: str


class _Stored(msgspec.Struct, frozen=True):
    """What ``load_image`` and ``prune.py`` read of a manifest: fields every builder
    version writes, unknown ones ignored, so old images stay readable and prunable."""

    key: str
    kernel_release: str
    cmdline: str
    built_at: float
    inputs: _StoredInputs
    clis: tuple[str, ...] = ()


_manifest_decoder = msgspec.json.Decoder(_Stored)


def default_cache_dir() -> Path:
    """``$XDG_CACHE_HOME/fireclaw/images`` (``~/.cache/fireclaw/images``)."""
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "fireclaw" / "images"


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def image_key(inputs: KeyInputs) -> str:
    """The sha256 hex of the canonical (sorted-key JSON) encoding of ``inputs``."""
    return _sha256(msgspec.json.encode(inputs, order="sorted"))


def checked(spec: ImageSpec) -> ImageSpec:
    """``spec`` validated against its constraints (a Struct's constructor does not check),
    its CLIs sorted and each named once."""
    try:
        valid = msgspec.convert(msgspec.to_builtins(spec), ImageSpec)
    except msgspec.ValidationError as exc:
        raise ImageError(f"invalid image spec: {exc}") from None
    return msgspec.structs.replace(valid, clis=tuple(sorted(set(valid.clis))))


@dataclass(frozen=True)
class Sources:
    """What ``gather_inputs`` found: the key inputs and the things they hash."""

    inputs: KeyInputs
    kernel: kernel.DebianKernel | Path
    modules: list[tuple[str, bytes]]  # a user kernel's, in load order
    guest_daemon: dict[str, bytes]


def gather_inputs(
    spec: ImageSpec,
    *,
    daemon_dir: Path | None = None,
    pins: tuple[str, ...] | None = None,
    debian_kernel: Callable[[], kernel.DebianKernel] = kernel.resolve_debian_kernel,
) -> Sources:
    """The key inputs of ``spec`` on this host, and where they come from.

    ``daemon_dir``, ``pins`` and ``debian_kernel`` default to this host's guest
    daemon package, its installed wheel versions and apt's current kernel.
    """
    source: kernel.DebianKernel | Path
    modules: list[tuple[str, bytes]] = []
    if spec.kernel == DEBIAN_CLOUD:
        source = debian_kernel()
        kernel_input = source.label
    else:
        source = Path(spec.kernel).expanduser().resolve()
        try:
            kernel_input = "sha256:" + _sha256(source.read_bytes())
        except OSError as exc:
            raise KernelError(f"kernel {spec.kernel}: {exc.strerror or exc}") from None
        if spec.modules is not None:
            folder = Path(spec.modules).expanduser().resolve()
            if not folder.is_dir():
                raise KernelError(f"modules {spec.modules}: not a folder")
            modules = kernel.collect_modules(folder)
    daemon = rootfs.guest_daemon_sources(daemon_dir or rootfs.guest_daemon_dir())
    inputs = KeyInputs(
        builder=BUILDER_VERSION,
        builder_files={
            "fireclaw-init.sh": _sha256(rootfs.init_script()),
            "initramfs-init.sh": _sha256(initramfs.init_script()),
        },
        suite=spec.suite,
        packages=tuple(
            sorted({*rootfs.REQUIRED_PACKAGES, *spec.packages, *clis.runtime_packages(spec.clis)})
        ),
        hostname=spec.hostname,
        size_mib=spec.size_mib,
        kernel=kernel_input,
        modules={name: _sha256(data) for name, data in modules},
        guest_daemon={path: _sha256(data) for path, data in daemon.items()},
        wheels=rootfs.wheel_pins() if pins is None else pins,
        clis=clis.registry_packages(spec.clis),
    )
    return Sources(inputs=inputs, kernel=source, modules=modules, guest_daemon=daemon)


def load_image(directory: Path) -> Image | None:
    """The complete image in ``directory``, or None if there is none."""
    try:
        manifest = _manifest_decoder.decode((directory / MANIFEST).read_bytes())
    except (OSError, msgspec.DecodeError):
        return None
    image = Image(
        key=manifest.key,
        directory=directory,
        vmlinux=directory / VMLINUX,
        initramfs=directory / INITRAMFS,
        rootfs=directory / ROOTFS,
        kernel_release=manifest.kernel_release,
        cmdline=manifest.cmdline,
        clis=manifest.clis,
    )
    if not all(path.is_file() for path in (image.vmlinux, image.initramfs, image.rootfs)):
        return None
    return image


def build_image(spec: ImageSpec, cache_dir: Path, *, progress: Progress) -> Image:
    """The image for ``spec``: from ``cache_dir`` if built before, else built there now.

    Blocking; runs mmdebstrap, pip, apt-get and mke2fs, and needs root for a
    fresh build. Reports each step through ``progress`` (one line each), ending
    with ``cached: PATH`` or ``image ready ...: PATH``. Raises ImageError.
    """
    try:
        return _build_image(spec, cache_dir, progress)
    except OSError as exc:
        where = f" ({exc.filename})" if exc.filename else ""
        raise ImageError(f"image build failed: {exc.strerror or exc}{where}") from exc


def _build_image(spec: ImageSpec, cache_dir: Path, progress: Progress) -> Image:
    spec = checked(spec)
    started = time.monotonic()
    progress("image: resolving inputs")
    sources = gather_inputs(spec)
    key = image_key(sources.inputs)
    final = cache_dir / key[:16]
    cached = _load_held(final)
    if cached is not None and cached.key == key:
        progress(f"cached: {final}")
        return cached

    if os.geteuid() != 0:
        raise ImageError(
            "building an image needs root: mmdebstrap unpacks Debian with real file owners"
        )
    for program in ("mmdebstrap", "mke2fs", "chroot", "dpkg-deb", "apt-get"):
        require(program)
    progress(f"image: building {key[:16]} in {cache_dir}")
    cache_dir.mkdir(parents=True, exist_ok=True)
    with _locked(cache_dir):
        cached = _load_held(final)  # another build may have finished while we waited
        if cached is not None and cached.key == key:
            progress(f"cached: {final}")
            return cached
        _remove_stale_builds(cache_dir)
        work = cache_dir / f".build-{key[:16]}"
        work.mkdir()
        try:
            _build(spec, sources, key, work, cache_dir, progress, started)
            fsync_path(work)
            if final.exists():  # an incomplete leftover under the final name
                rootfs.remove_tree(final)
            held = _open_dir(work)
            fcntl.flock(held, fcntl.LOCK_SH)  # the lock follows the directory's rename
            _keep_held(held)
            os.rename(work, final)
            fsync_path(cache_dir)
        except BaseException:
            rootfs.remove_tree(work)
            raise
    image = load_image(final)
    if image is None:
        raise ImageError(f"{final}: the image vanished right after it was built")
    sizes = ", ".join(
        f"{path.name} {path.stat().st_size / 2**20:.1f} MiB"
        for path in (image.vmlinux, image.initramfs, image.rootfs)
    )
    progress(f"image ready in {time.monotonic() - started:.1f} s ({sizes}): {final}")
    return image


def _build(
    spec: ImageSpec,
    sources: Sources,
    key: str,
    work: Path,
    cache_dir: Path,
    progress: Progress,
    started: float,
) -> None:
    inputs, source = sources.inputs, sources.kernel
    # Kernel first: it is quick, and a bad user kernel should fail before mmdebstrap.
    expected_release = None
    if isinstance(source, kernel.DebianKernel):
        progress(f"kernel: fetching {source.label}")
        deb = kernel.fetch_deb(source, cache_dir / ".downloads")
        vmlinuz, modules_dir = kernel.unpack_deb(deb, work / "kernel-deb")
        data, name = vmlinuz.read_bytes(), vmlinuz.name
        modules = kernel.collect_modules(modules_dir)
        expected_release = modules_dir.name
    else:
        progress(f"kernel: {source}")
        data, name = source.read_bytes(), str(source)
        modules = sources.modules
    elf = kernel.to_vmlinux(data, name=name)
    kernel.require_pvh(elf, name=name)
    release = kernel.kernel_release(elf)
    if expected_release is not None and release != expected_release:
        raise KernelError(f"{name}: kernel says {release!r}, modules are for {expected_release!r}")
    _write(work / VMLINUX, elf)
    rootfs.remove_tree(work / "kernel-deb")
    progress(f"kernel: vmlinux {release} ({len(elf) / 2**20:.1f} MiB, PVH entry present)")

    tree = work / "rootfs"
    packages = ", ".join(inputs.packages)
    progress(f"rootfs: mmdebstrap {spec.suite} with {packages}")
    rootfs.debootstrap(tree, suite=spec.suite, packages=inputs.packages, progress=progress)
    progress(f"rootfs: installing the guest daemon and {len(inputs.wheels)} pinned wheels")
    installed = rootfs.install_guest_daemon(
        tree,
        pins=inputs.wheels,
        sources=sources.guest_daemon,
        python_version=rootfs.SUITE_PYTHON[spec.suite],
    )
    cli_versions = clis.install_clis(
        tree,
        spec.clis,
        python_version=rootfs.SUITE_PYTHON[spec.suite],
        progress=progress,
    )
    rootfs.configure(tree, hostname=spec.hostname)

    busybox = (tree / "bin" / "busybox").read_bytes()
    archive = initramfs.initramfs(busybox, modules, init=initramfs.init_script())
    _write(work / INITRAMFS, archive)
    loaded = ", ".join(name.removesuffix(".ko") for name, _ in modules) or "none"
    progress(f"initramfs: {len(archive) / 2**20:.1f} MiB, modules: {loaded}")

    content, inodes = rootfs.tree_size(tree)
    size_mib = spec.size_mib or rootfs.ext4_size_mib(content)
    if size_mib * 2**20 < content * 1.05:
        raise ImageError(
            f"size_mib {size_mib} is too small: the root filesystem holds {content / 2**20:.0f} MiB"
        )
    progress(f"rootfs: writing {ROOTFS} ({size_mib} MiB, {content / 2**20:.0f} MiB of files)")
    rootfs.make_ext4(tree, work / ROOTFS, size_mib=size_mib, inodes=inodes + max(inodes // 4, 4096))
    fsync_path(work / ROOTFS)
    rootfs.remove_tree(tree)

    manifest = Manifest(
        key=key,
        spec=spec,
        inputs=inputs,
        kernel_release=release,
        cmdline=BASE_CMDLINE,
        modules=tuple(name for name, _ in modules),
        wheels=tuple(installed),
        sizes={
            path.name: path.stat().st_size
            for path in (work / VMLINUX, work / INITRAMFS, work / ROOTFS)
        },
        built_at=time.time(),
        build_seconds=round(time.monotonic() - started, 3),
        clis=spec.clis,
        cli_versions=cli_versions,
    )
    _write(work / MANIFEST, msgspec.json.format(msgspec.json.encode(manifest)) + b"\n")


@contextlib.contextmanager
def _locked(cache_dir: Path) -> Iterator[None]:
    """Hold the cache's build lock (one build or prune at a time per cache)."""
    fd = os.open(cache_dir / ".lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


#: Directory fds this process holds a shared lock on, by (st_dev, st_ino).
_held: dict[tuple[int, int], int] = {}


def _open_dir(directory: Path) -> int:
    return os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)


def _keep_held(fd: int) -> None:
    """Keep ``fd`` (shared-locked) open until the process exits; one per directory."""
    st = os.fstat(fd)
    if (st.st_dev, st.st_ino) in _held:
        os.close(fd)
        return
    _held[st.st_dev, st.st_ino] = fd
    # Touched on every use: a pruner reads the mtime as "last used" for its grace period.
    with contextlib.suppress(OSError):
        os.utime(fd)


def _load_held(directory: Path) -> Image | None:
    """``load_image(directory)``, held in use by this process if it is an image."""
    try:
        fd = _open_dir(directory)
    except OSError:
        return None
    image = None
    try:
        # Blocks only while a pruner removes this very directory; then it is gone.
        fcntl.flock(fd, fcntl.LOCK_SH)
        image = load_image(directory)
        if image is not None and os.stat(directory).st_ino != os.fstat(fd).st_ino:
            image = None  # removed, and made again, while we waited for the lock
    except OSError:
        image = None
    finally:
        if image is None:
            os.close(fd)
    if image is not None:
        _keep_held(fd)
    return image


def _remove_stale_builds(cache_dir: Path) -> list[Path]:
    # Only called with the lock held: no build is running, so any is a crash's.
    stale = sorted(cache_dir.glob(".build-*"))
    for path in stale:
        rootfs.remove_tree(path)
    return stale


def _write(path: Path, data: bytes) -> None:
    with open(path, "wb") as file:
        file.write(data)
        file.flush()
        os.fsync(file.fileno())
