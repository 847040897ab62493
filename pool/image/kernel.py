"""The guest kernel: Debian's cloud kernel or a user's, as a PVH-bootable vmlinux.

QEMU's microvm machine and Firecracker boot an uncompressed ELF ``vmlinux``
through its Xen PVH entry point. Distributions ship a compressed ``bzImage``
(``vmlinuz``) instead; ``to_vmlinux`` takes the compressed payload out of it
(located by the boot header fields ``setup_sects`` at 0x1f1 and
``payload_offset``/``payload_length`` at 0x248) and decompresses it.

Debian's cloud kernel builds the virtio drivers as modules; ``load_order``
and ``module_info`` pick the ones the initramfs must load, dependencies first,
from the modules' own ``.modinfo`` (the package ships no ``modules.dep``:
``depmod`` writes it at install time).
"""

from __future__ import annotations

import bz2
import gzip
import lzma
import re
import shutil
import struct
import zlib
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from fireclaw.pool.runner import ProgramFailed, run_program

from .errors import KernelError, StepFailed
from .tools import require, run

DEBIAN_META_PACKAGE = "linux-image-cloud-amd64"

#: The drivers a guest needs for its root disk, network and control port on virtio-mmio.
#: Their dependencies (virtio, virtio_ring, failover, net_failover) follow.
VIRTIO_MODULES = ("virtio_mmio", "virtio_blk", "virtio_net", "virtio_console")

#: XEN_ELFNOTE_PHYS32_ENTRY: the 32-bit PVH entry point QEMU and Firecracker jump to.
_PVH_NOTE_TYPE = 18
_ELF_MAGIC = b"\x7fELF"
_PT_NOTE = 4

#: bzImage payload magic -> codec name.
_CODECS = (
    (b"\x1f\x8b", "gzip"),
    (b"\xfd7zXZ\x00", "xz"),
    (b"\x5d\x00\x00", "lzma"),
    (b"BZh", "bzip2"),
    (b"\x02\x21\x4c\x18", "lz4"),
    (b"\x28\xb5\x2f\xfd", "zstd"),
    (b"\x89LZO", "lzo"),
)
#: Codecs left to a host program, which reads stdin and writes stdout.
_CODEC_PROGRAMS = {
    "lz4": ["lz4", "-d", "-c"],
    "zstd": ["zstd", "-d", "-c", "-q"],
    "lzo": ["lzop", "-d", "-c"],
}


@dataclass(frozen=True)
class DebianKernel:
    """The versioned kernel package the ``linux-image-cloud-amd64`` meta package names."""

    package: str
    version: str

    @property
    def label(self) -> str:
        return f"{self.package}={self.version}"


# --- finding and fetching Debian's kernel ---------------------------------------------


def parse_meta_depends(text: str) -> DebianKernel:
    """The kernel package and version in ``apt-cache show`` output of the meta package."""
    for line in text.splitlines():
        if not line.startswith("Depends:"):
            continue
        for alternatives in line.removeprefix("Depends:").split(","):
            for term in alternatives.split("|"):
                match = re.fullmatch(r"\s*(linux-image-[^\s(]+)\s*\(\s*=\s*([^\s)]+)\s*\)\s*", term)
                if match:
                    return DebianKernel(match[1], match[2])
    raise KernelError(f"{DEBIAN_META_PACKAGE} depends on no versioned linux-image package")


def resolve_debian_kernel() -> DebianKernel:
    """Ask apt which kernel ``linux-image-cloud-amd64`` currently stands for (no download)."""
    argv = ["apt-cache", "show", "--no-all-versions", DEBIAN_META_PACKAGE]
    try:
        text = run(argv, step=f"looking up {DEBIAN_META_PACKAGE}").decode(errors="replace")
    except StepFailed as exc:
        raise KernelError(f"{exc} (run apt-get update first?)") from exc
    if not text.strip():
        raise KernelError(f"apt knows no {DEBIAN_META_PACKAGE}: run apt-get update first")
    return parse_meta_depends(text)


def fetch_deb(kernel: DebianKernel, downloads: Path) -> Path:
    """The kernel's .deb in ``downloads``, fetched with ``apt-get download`` unless present."""
    pattern = f"{kernel.package}_*.deb"
    wanted = [deb for deb in downloads.glob(pattern) if _deb_version(deb) == kernel.version]
    if wanted:
        return wanted[0]
    downloads.mkdir(parents=True, exist_ok=True)
    partial = downloads / f".partial-{kernel.package}"
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir()
    # apt drops privileges to _apt, who cannot write a root-owned cache: stay root.
    run(
        ["apt-get", "download", "-q", "-o", "APT::Sandbox::User=root", kernel.label],
        step=f"downloading {kernel.label}",
        cwd=partial,
    )
    got = list(partial.glob(pattern))
    if len(got) != 1:
        raise KernelError(f"apt-get download {kernel.label} left {len(got)} .deb files")
    deb = downloads / got[0].name
    got[0].rename(deb)
    partial.rmdir()
    return deb


def _deb_version(deb: Path) -> str:
    # package_version_arch.deb, with the epoch's ':' written as %3a.
    parts = deb.name.split("_")
    return parts[1].replace("%3a", ":") if len(parts) == 3 else ""


def deb_label(deb: Path) -> str:
    """``package=version`` of a downloaded .deb, from its file name."""
    return f"{deb.name.split('_')[0]}={_deb_version(deb)}"


def unpack_deb(deb: Path, dest: Path) -> tuple[Path, Path]:
    """Unpack ``deb`` into ``dest``; return its vmlinuz and its modules directory."""
    run(["dpkg-deb", "-x", str(deb), str(dest)], step=f"unpacking {deb.name}")
    images = sorted((dest / "boot").glob("vmlinuz-*"))
    modules = sorted(path for path in (dest / "lib" / "modules").glob("*") if path.is_dir())
    if len(images) != 1 or len(modules) != 1:
        raise KernelError(f"{deb.name}: expected one boot/vmlinuz-* and one lib/modules/*")
    return images[0], modules[0]


# --- bzImage -> vmlinux ----------------------------------------------------------------


def bzimage_payload(data: bytes) -> tuple[str, bytes, int]:
    """The codec, compressed payload and expected decompressed size of a bzImage.

    The kernel build appends the decompressed size (4 bytes, little-endian) to
    every payload; for gzip those are the gzip trailer's own ISIZE.
    """
    if len(data) < 0x250 or data[0x202:0x206] != b"HdrS":
        raise KernelError("not a bzImage (no HdrS boot header)")
    (version,) = struct.unpack_from("<H", data, 0x206)
    if version < 0x208:
        protocol = f"{version >> 8}.{version & 0xFF}"
        raise KernelError(f"bzImage boot protocol {protocol} is older than 2.08")
    setup_sects = data[0x1F1] or 4
    offset, length = struct.unpack_from("<II", data, 0x248)
    start = (setup_sects + 1) * 512 + offset
    payload = data[start : start + length]
    if length < 8 or len(payload) != length:
        raise KernelError("bzImage payload lies outside the file")
    for magic, codec in _CODECS:
        if payload.startswith(magic):
            (size,) = struct.unpack("<I", payload[-4:])
            return codec, payload, size
    raise KernelError(f"bzImage payload has an unknown compression (magic {payload[:4].hex()})")


def decompress(codec: str, payload: bytes) -> bytes:
    """Decompress a bzImage payload (including its 4-byte size trailer)."""
    try:
        if codec == "gzip":
            return zlib.decompressobj(wbits=31).decompress(payload)
        if codec in ("xz", "lzma"):
            fmt = lzma.FORMAT_XZ if codec == "xz" else lzma.FORMAT_ALONE
            return lzma.LZMADecompressor(format=fmt).decompress(payload)
        if codec == "bzip2":
            return bz2.BZ2Decompressor().decompress(payload)
    except (zlib.error, lzma.LZMAError, OSError, EOFError) as exc:
        raise KernelError(f"cannot decompress the {codec} kernel payload: {exc}") from exc
    argv = _CODEC_PROGRAMS[codec]
    require(argv[0])
    try:
        # The program would read the size trailer as a truncated second frame.
        return run_program(argv, input=payload[:-4], timeout=None)
    except ProgramFailed as exc:
        raise KernelError(f"{argv[0]} cannot decompress the kernel payload: {exc.why}") from exc


def to_vmlinux(data: bytes, *, name: str = "kernel") -> bytes:
    """An ELF vmlinux from a vmlinux (returned as is) or a bzImage (decompressed)."""
    if data.startswith(_ELF_MAGIC):
        return data
    try:
        codec, payload, size = bzimage_payload(data)
    except KernelError as exc:
        raise KernelError(f"{name}: neither an ELF vmlinux nor a bzImage ({exc})") from None
    elf = decompress(codec, payload)
    if len(elf) & 0xFFFFFFFF != size:
        raise KernelError(f"{name}: payload gave {len(elf)} bytes, header says {size}")
    if not elf.startswith(_ELF_MAGIC):
        raise KernelError(f"{name}: the decompressed payload is not an ELF file")
    return elf


# --- ELF: notes, sections, release ------------------------------------------------------

_EHDR = struct.Struct("<16sHHIQQQIHHHHHH")
_PHDR = struct.Struct("<IIQQQQQQ")
_SHDR = struct.Struct("<IIQQQQIIQQ")


def _header(elf: bytes) -> tuple[int, ...]:
    if len(elf) < _EHDR.size or not elf.startswith(_ELF_MAGIC) or elf[4] != 2 or elf[5] != 1:
        raise KernelError("not a 64-bit little-endian ELF file")
    return _EHDR.unpack_from(elf)


def elf_notes(elf: bytes) -> Iterator[tuple[bytes, int, bytes]]:
    """(name, type, descriptor) of each note in the ELF's PT_NOTE segments."""
    header = _header(elf)
    phoff, phentsize, phnum = header[5], header[9], header[10]
    for index in range(phnum):
        p_type, _, offset, _, _, filesz, _, _ = _PHDR.unpack_from(elf, phoff + index * phentsize)
        if p_type != _PT_NOTE:
            continue
        pos, end = offset, offset + filesz
        while pos + 12 <= end:
            namesz, descsz, note_type = struct.unpack_from("<III", elf, pos)
            pos += 12
            name = elf[pos : pos + namesz].rstrip(b"\0")
            pos += (namesz + 3) & ~3
            desc = elf[pos : pos + descsz]
            pos += (descsz + 3) & ~3
            yield name, note_type, desc


def has_pvh_entry(elf: bytes) -> bool:
    """Whether the ELF carries the Xen PVH entry note (XEN_ELFNOTE_PHYS32_ENTRY)."""
    return any(name == b"Xen" and kind == _PVH_NOTE_TYPE for name, kind, _ in elf_notes(elf))


def require_pvh(elf: bytes, *, name: str = "kernel") -> None:
    if not has_pvh_entry(elf):
        raise KernelError(
            f"{name} has no PVH entry note: microvm and Firecracker cannot boot it"
            " (build it with CONFIG_PVH=y)"
        )


def kernel_release(elf: bytes) -> str:
    """The release ``uname -r`` will print, read from the kernel's banner ("" if none)."""
    match = re.search(rb"Linux version (\S+) \(", elf)
    return match[1].decode(errors="replace") if match else ""


def elf_section(elf: bytes, wanted: str) -> bytes | None:
    """The contents of the section named ``wanted``, or None."""
    header = _header(elf)
    shoff, shentsize, shnum, shstrndx = header[6], header[11], header[12], header[13]
    if not shoff or shstrndx >= shnum:
        return None
    sections = [_SHDR.unpack_from(elf, shoff + i * shentsize) for i in range(shnum)]
    names_at = sections[shstrndx][4]
    for sh_name, _, _, _, offset, size, *_ in sections:
        start = names_at + sh_name
        if elf[start : elf.index(b"\0", start)].decode(errors="replace") == wanted:
            return elf[offset : offset + size]
    return None


# --- modules ----------------------------------------------------------------------------


def module_name(path: Path) -> str:
    """``virtio-rng.ko.xz`` -> ``virtio_rng``: how the kernel names a module file."""
    return path.name.split(".ko")[0].replace("-", "_")


def read_module(path: Path) -> bytes:
    """A module's plain ELF bytes (``.ko.xz``, ``.ko.zst`` and ``.ko.gz`` decompressed)."""
    data = path.read_bytes()
    if path.name.endswith(".ko.xz"):
        return lzma.decompress(data)
    if path.name.endswith(".ko.gz"):
        return gzip.decompress(data)
    if path.name.endswith(".ko.zst"):
        require("zstd")
        try:
            return run_program(["zstd", "-d", "-c", "-q"], input=data, timeout=None)
        except ProgramFailed as exc:
            raise KernelError(f"{path}: zstd cannot decompress it") from exc
    return data


def module_info(ko: bytes) -> dict[str, str]:
    """The ``key=value`` pairs of a module's ``.modinfo`` section (last value wins)."""
    section = elf_section(ko, ".modinfo")
    info: dict[str, str] = {}
    for item in (section or b"").split(b"\0"):
        key, sep, value = item.decode(errors="replace").partition("=")
        if sep:
            info[key] = value
    return info


def load_order(wanted: Sequence[str], depends: Mapping[str, Sequence[str]]) -> list[str]:
    """``wanted`` and everything they depend on, each after its dependencies.

    ``depends`` maps a module to the modules it needs (absent: needs nothing).
    Raises KernelError on a dependency cycle.
    """
    order: list[str] = []
    visiting: set[str] = set()

    def visit(name: str) -> None:
        if name in order:
            return
        if name in visiting:
            raise KernelError(f"module dependency cycle through {name}")
        visiting.add(name)
        for dep in depends.get(name, ()):
            visit(dep)
        visiting.discard(name)
        order.append(name)

    for name in wanted:
        visit(name)
    return order


def collect_modules(
    modules_dir: Path, wanted: Sequence[str] = VIRTIO_MODULES
) -> list[tuple[str, bytes]]:
    """(file name, plain ELF) of ``wanted`` and their dependencies, in load order.

    Modules built into the kernel (listed in ``modules.builtin``) are skipped.
    """
    files = {module_name(path): path for path in modules_dir.rglob("*.ko*")}
    builtin_list = modules_dir / "modules.builtin"
    builtin = (
        {module_name(Path(line)) for line in builtin_list.read_text().split()}
        if builtin_list.exists()
        else set()
    )
    loaded: dict[str, bytes] = {}
    depends: dict[str, list[str]] = {}
    todo = list(wanted)
    while todo:
        name = todo.pop()
        if name in loaded or name in builtin:
            continue
        if name not in files:
            raise KernelError(f"module {name} is neither in {modules_dir} nor built in")
        loaded[name] = read_module(files[name])
        deps = [dep for dep in module_info(loaded[name]).get("depends", "").split(",") if dep]
        depends[name] = [dep for dep in deps if dep not in builtin]
        todo.extend(depends[name])
    order = load_order([name for name in wanted if name in loaded], depends)
    return [(f"{name}.ko", loaded[name]) for name in order]
