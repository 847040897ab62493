"""The guest image builder: its pure parts directly, and one real image built and booted.

The end-to-end test (``-m image``) builds the real image into a fixed cache
(~/.cache/fireclaw/test-images, so reruns reuse it), boots it under QEMU TCG
with user networking, and plays the host for the real guest daemon inside.
"""

from __future__ import annotations

import bz2
import gzip
import lzma
import os
import shutil
import struct
import subprocess
import time
from collections.abc import Sequence
from pathlib import Path
from typing import BinaryIO

import msgspec
import pytest
import trio
from fireclaw.guest_daemon.protocol import (
    Exited,
    Goodbye,
    GuestMessage,
    Heartbeat,
    Hello,
    HostMessage,
    Output,
    Run,
    Stop,
    Welcome,
    decode_guest,
    encode,
)
from fireclaw.pool.image import (
    BUILDER_VERSION,
    Image,
    ImageError,
    ImageSpec,
    KernelError,
    KeyInputs,
    StepFailed,
    ToolMissing,
    build_image,
    gather_inputs,
    image_key,
    kernel,
    load_image,
    prune,
    prune_images,
    rootfs,
    tools,
)
from fireclaw.pool.image import build as image_build
from fireclaw.pool.image import initramfs as image_initramfs
from fireclaw.pool.image.cpio import Entry, newc
from trio_websocket import WebSocketConnection, WebSocketRequest, serve_websocket

BUSYBOX = shutil.which("busybox")
needs_busybox = pytest.mark.skipif(BUSYBOX is None, reason="busybox is not installed")


# --- synthetic kernels and modules -------------------------------------------------------


def _note(name: bytes, kind: int, desc: bytes) -> bytes:
    def pad(data: bytes) -> bytes:
        return data + b"\0" * (-len(data) % 4)

    return struct.pack("<III", len(name) + 1, len(desc), kind) + pad(name + b"\0") + pad(desc)


def make_elf(
    *, notes: Sequence[tuple[bytes, int, bytes]] = (), sections: dict[str, bytes] | None = None
) -> bytes:
    """A minimal x86-64 ELF with one PT_NOTE segment and the given sections."""
    sections = sections or {}
    notes_blob = b"".join(_note(*note) for note in notes)
    phnum = 1 if notes else 0
    data_at = 64 + 56 * phnum
    body = bytearray(notes_blob)
    names = b"\0"
    headers = [struct.pack("<IIQQQQIIQQ", 0, 0, 0, 0, 0, 0, 0, 0, 0, 0)]
    for name, data in [*sections.items(), (".shstrtab", b"")]:
        if name == ".shstrtab":
            data = names + name.encode() + b"\0"
        offset = data_at + len(body)
        headers.append(
            struct.pack("<IIQQQQIIQQ", len(names), 1, 0, 0, offset, len(data), 0, 0, 1, 0)
        )
        names += name.encode() + b"\0"
        body += data
    body += b"\0" * (-len(body) % 8)
    shoff = data_at + len(body)
    ident = b"\x7fELF\x02\x01\x01" + b"\0" * 9
    header = struct.pack(
        "<16sHHIQQQIHHHHHH", ident, 2, 62, 1, 0, 64 if phnum else 0, shoff, 0, 64, 56, phnum, 64,
        len(headers), len(headers) - 1,
    )  # fmt: skip
    phdr = struct.pack("<IIQQQQQQ", 4, 4, data_at, 0, 0, len(notes_blob), len(notes_blob), 4)
    return header + (phdr if phnum else b"") + bytes(body) + b"".join(headers)


PVH_NOTE = (b"Xen", 18, struct.pack("<Q", 0x1000850))
BANNER = b"Linux version 6.9.0-test (builder@host) (gcc) #1 SMP\n"


def fake_vmlinux() -> bytes:
    return make_elf(notes=[(b"Xen", 6, b"linux\0"), PVH_NOTE], sections={".rodata": BANNER})


def make_bzimage(payload: bytes, *, setup_sects: int = 3, version: int = 0x20F) -> bytes:
    """A bzImage-shaped blob: boot header, some head code, then ``payload``."""
    setup = bytearray((setup_sects + 1) * 512)
    setup[0x1F1] = setup_sects
    setup[0x202:0x206] = b"HdrS"
    struct.pack_into("<H", setup, 0x206, version)
    head = b"\x90" * 0x40  # stands for the decompressor's code
    struct.pack_into("<II", setup, 0x248, len(head), len(payload))
    return bytes(setup) + head + payload + b"\0" * 32


def _sized(compressed: bytes, size: int) -> bytes:
    return compressed + struct.pack("<I", size)


def _compressors() -> list[tuple[str, object]]:
    found: list[tuple[str, object]] = [
        ("gzip", lambda data: gzip.compress(data)),
        ("xz", lambda data: _sized(lzma.compress(data, check=lzma.CHECK_CRC32), len(data))),
        ("bzip2", lambda data: _sized(bz2.compress(data), len(data))),
    ]
    for codec, argv in (("lz4", ["lz4", "-l", "-c", "-q"]), ("zstd", ["zstd", "-c", "-q"])):
        if shutil.which(argv[0]):

            def compress(data: bytes, argv: list[str] = argv) -> bytes:
                out = subprocess.run(argv, input=data, capture_output=True, check=True).stdout
                return _sized(out, len(data))

            found.append((codec, compress))
    return found


@pytest.mark.parametrize(("codec", "compress"), _compressors(), ids=lambda v: str(v)[:5])
def test_bzimage_to_vmlinux(codec: str, compress: object) -> None:
    elf = fake_vmlinux()
    assert callable(compress)
    blob = make_bzimage(compress(elf))
    found, _, size = kernel.bzimage_payload(blob)
    assert (found, size) == (codec, len(elf))
    assert kernel.to_vmlinux(blob) == elf


def test_vmlinux_passes_through_and_junk_is_refused() -> None:
    elf = fake_vmlinux()
    assert kernel.to_vmlinux(elf) is elf
    with pytest.raises(KernelError, match="neither an ELF vmlinux nor a bzImage"):
        kernel.to_vmlinux(b"\0" * 4096, name="junk")
    with pytest.raises(KernelError, match="older than 2.08"):
        kernel.bzimage_payload(make_bzimage(gzip.compress(elf), version=0x206))
    with pytest.raises(KernelError, match="unknown compression"):
        kernel.bzimage_payload(make_bzimage(b"\x42" * 64))


def test_bzimage_size_mismatch_is_an_error() -> None:
    elf = fake_vmlinux()
    lying = _sized(lzma.compress(elf, check=lzma.CHECK_CRC32), len(elf) + 1)
    with pytest.raises(KernelError, match="header says"):
        kernel.to_vmlinux(make_bzimage(lying), name="k")


def test_pvh_note_and_release() -> None:
    elf = fake_vmlinux()
    assert kernel.has_pvh_entry(elf)
    assert kernel.kernel_release(elf) == "6.9.0-test"
    plain = make_elf(notes=[(b"Xen", 6, b"linux\0"), (b"GNU", 18, b"xxxx")])
    assert not kernel.has_pvh_entry(plain)
    with pytest.raises(KernelError, match="no PVH entry note") as info:
        kernel.require_pvh(plain, name="bzImage-x")
    assert "\n" not in str(info.value)
    assert kernel.kernel_release(plain) == ""


def _module(depends: str) -> bytes:
    return make_elf(sections={".modinfo": f"license=GPL\0depends={depends}\0name=x\0".encode()})


def test_module_info_and_load_order() -> None:
    assert kernel.module_info(_module("a,b"))["depends"] == "a,b"
    deps = {"net": ["ring", "virtio", "nf"], "virtio": ["ring"], "nf": ["f"], "blk": ["virtio"]}
    assert kernel.load_order(["mmio", "blk", "net"], deps) == [
        "mmio", "ring", "virtio", "blk", "f", "nf", "net",
    ]  # fmt: skip
    with pytest.raises(KernelError, match="cycle"):
        kernel.load_order(["a"], {"a": ["b"], "b": ["a"]})


@pytest.fixture
def module_tree(tmp_path: Path) -> Path:
    """A lib/modules/RELEASE folder shaped like Debian's cloud kernel's."""
    tree = tmp_path / "6.9.0-test"
    (tree / "kernel" / "drivers").mkdir(parents=True)
    (tree / "kernel" / "drivers" / "virtio_ring.ko").write_bytes(_module(""))
    (tree / "kernel" / "drivers" / "virtio.ko.xz").write_bytes(
        lzma.compress(_module("virtio_ring"))
    )
    (tree / "kernel" / "drivers" / "virtio_blk.ko").write_bytes(_module("virtio,virtio_ring"))
    (tree / "kernel" / "drivers" / "virtio-net.ko").write_bytes(_module("virtio,failover"))
    (tree / "kernel" / "drivers" / "virtio_console.ko").write_bytes(_module("virtio,virtio_ring"))
    (tree / "modules.builtin").write_text("kernel/drivers/virtio_mmio.ko\nkernel/net/failover.ko\n")
    return tree


def test_collect_modules_follows_modinfo(module_tree: Path) -> None:
    tree = module_tree
    got = kernel.collect_modules(tree, ("virtio_mmio", "virtio_blk", "virtio_net"))
    assert [name for name, _ in got] == [
        "virtio_ring.ko",
        "virtio.ko",
        "virtio_blk.ko",
        "virtio_net.ko",
    ]
    assert all(data.startswith(b"\x7fELF") for _, data in got)  # .ko.xz came out plain
    with pytest.raises(KernelError, match="module nope is neither in"):
        kernel.collect_modules(tree, ("nope",))


def test_parse_meta_depends() -> None:
    text = (
        "Package: linux-image-cloud-amd64\nVersion: 6.1.192-2\n"
        "Depends: linux-image-6.1.0-56-cloud-amd64 (= 6.1.192-2)\nDescription: x\n"
    )
    got = kernel.parse_meta_depends(text)
    assert (got.package, got.version) == ("linux-image-6.1.0-56-cloud-amd64", "6.1.192-2")
    assert got.label == "linux-image-6.1.0-56-cloud-amd64=6.1.192-2"
    with pytest.raises(KernelError):
        kernel.parse_meta_depends("Package: x\nDepends: libc6\n")


# --- cpio and initramfs -------------------------------------------------------------------


def _cpio(args: Sequence[str], archive: bytes, cwd: Path | None = None) -> str:
    assert BUSYBOX is not None
    proc = subprocess.run(
        [BUSYBOX, "cpio", *args], input=archive, capture_output=True, cwd=cwd, check=True
    )
    return proc.stdout.decode()


@needs_busybox
def test_cpio_round_trip_through_busybox(tmp_path: Path) -> None:
    archive = newc(
        [
            Entry.directory("bin"),
            Entry.file("bin/tool", b"#!/bin/sh\necho hi\n", 0o755),
            Entry.symlink("bin/sh", "tool"),
            Entry.directory("dev"),
            Entry.char_device("dev/console", 5, 1),
            Entry.file("odd-size", b"abcde"),
        ]
    )
    assert len(archive) % 4 == 0
    assert _cpio(["-t"], archive).split() == [
        "bin", "bin/tool", "bin/sh", "dev", "dev/console", "odd-size",
    ]  # fmt: skip
    listing = _cpio(["-t", "-v"], archive).splitlines()
    assert listing[4].startswith("crw------- 0/0") and listing[4].endswith(" dev/console")
    assert listing[1].startswith("-rwxr-xr-x 0/0")
    _cpio(["-i", "-d", "bin", "bin/tool", "bin/sh", "odd-size"], archive, cwd=tmp_path)
    assert (tmp_path / "bin" / "tool").read_bytes() == b"#!/bin/sh\necho hi\n"
    assert (tmp_path / "bin" / "tool").stat().st_mode & 0o777 == 0o755
    assert os.readlink(tmp_path / "bin" / "sh") == "tool"
    assert (tmp_path / "odd-size").read_bytes() == b"abcde"


def test_cpio_is_deterministic_and_checks_names() -> None:
    entries = [Entry.directory("a"), Entry.file("a/b", b"x")]
    assert newc(entries) == newc(entries)
    with pytest.raises(ValueError):
        newc([Entry.file("/", b"")])
    with pytest.raises(ValueError):
        newc([Entry(name="d", mode=0o040755, data=b"x")])


@needs_busybox
def test_initramfs_layout() -> None:
    modules = [("virtio.ko", b"\x7fELF-a"), ("virtio_blk.ko", b"\x7fELF-b")]
    archive = image_initramfs.initramfs(b"BUSYBOX", modules, init=b"#!/bin/busybox sh\n")
    assert archive == image_initramfs.initramfs(b"BUSYBOX", modules, init=b"#!/bin/busybox sh\n")
    names = _cpio(["-t"], gzip.decompress(archive)).split()
    for name in ("init", "bin/busybox", "bin/sh", "dev/console", "newroot", "proc", "sys"):
        assert name in names
    assert "lib/modules/virtio.ko" in names
    order = _cpio(["-i", "--to-stdout", "lib/modules/load-order"], gzip.decompress(archive))
    assert order == "virtio.ko\nvirtio_blk.ko\n"


@pytest.mark.parametrize("script", ["fireclaw-init.sh", "initramfs-init.sh"])
def test_init_scripts_parse(script: str) -> None:
    text = rootfs.init_script() if script == "fireclaw-init.sh" else image_initramfs.init_script()
    shells = ["sh"] + ([f"{BUSYBOX} sh"] if BUSYBOX else [])
    for shell in shells:
        subprocess.run([*shell.split(), "-n"], input=text, check=True)


# --- the cache key --------------------------------------------------------------------------


def _inputs(**changes: object) -> KeyInputs:
    fields: dict[str, object] = dict(
        builder=BUILDER_VERSION,
        builder_files={"fireclaw-init.sh": "aa", "initramfs-init.sh": "bb"},
        suite="bookworm",
        packages=("busybox-static", "iproute2", "python3"),
        hostname="fireclaw",
        size_mib=None,
        kernel="linux-image-6.1.0-56-cloud-amd64=6.1.192-2",
        modules={},
        guest_daemon={"__main__.py": "11", "daemon.py": "22"},
        wheels=("msgspec==0.22.0", "trio==0.35.0"),
    )
    fields.update(changes)
    return KeyInputs(**fields)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "change",
    [
        {"builder": BUILDER_VERSION + 1},
        {"builder_files": {"fireclaw-init.sh": "ab", "initramfs-init.sh": "bb"}},
        {"suite": "trixie"},
        {"packages": ("busybox-static", "git", "iproute2", "python3")},
        {"hostname": "other"},
        {"size_mib": 512},
        {"kernel": "linux-image-6.1.0-57-cloud-amd64=6.1.193-1"},
        {"kernel": "sha256:00"},
        {"modules": {"virtio.ko": "00"}},
        {"guest_daemon": {"__main__.py": "11", "daemon.py": "23"}},
        {"guest_daemon": {"__main__.py": "11", "daemon.py": "22", "new.py": "33"}},
        {"wheels": ("msgspec==0.22.0", "trio==0.35.1")},
    ],
    ids=lambda change: next(iter(change)),
)
def test_key_changes_with_each_input(change: dict[str, object]) -> None:
    assert image_key(_inputs(**change)) != image_key(_inputs())


def test_key_is_canonical() -> None:
    key = image_key(_inputs())
    assert key == image_key(_inputs())
    assert len(key) == 64
    reordered = {"daemon.py": "22", "__main__.py": "11"}
    assert image_key(_inputs(guest_daemon=reordered)) == key


@pytest.fixture
def daemon_dir(tmp_path: Path) -> Path:
    folder = tmp_path / "guest_daemon"
    folder.mkdir()
    (folder / "__init__.py").write_text("")
    (folder / "__main__.py").write_text("print('hi')\n")
    (folder / "__pycache__").mkdir()
    (folder / "__pycache__" / "x.py").write_text("ignored")
    return folder


PINS = ("msgspec==0.22.0", "trio==0.35.0")


def _key(spec: ImageSpec, daemon: Path, pins: tuple[str, ...] = PINS) -> str:
    return image_key(gather_inputs(spec, daemon_dir=daemon, pins=pins).inputs)


def test_gathered_key_follows_real_inputs(tmp_path: Path, daemon_dir: Path) -> None:
    vmlinux = tmp_path / "vmlinux"
    vmlinux.write_bytes(fake_vmlinux())
    spec = ImageSpec(kernel=str(vmlinux))
    key = _key(spec, daemon_dir)
    assert _key(spec, daemon_dir) == key

    moved = tmp_path / "elsewhere"
    shutil.copy(vmlinux, moved)
    assert _key(ImageSpec(kernel=str(moved)), daemon_dir) == key  # content, not path

    assert _key(ImageSpec(kernel=str(vmlinux), packages=("git", "curl")), daemon_dir) == _key(
        ImageSpec(kernel=str(vmlinux), packages=("curl", "git", "curl")), daemon_dir
    )
    assert _key(ImageSpec(kernel=str(vmlinux), hostname="box"), daemon_dir) != key
    assert _key(spec, daemon_dir, PINS[:1]) != key

    (daemon_dir / "__main__.py").write_text("print('changed')\n")
    changed = _key(spec, daemon_dir)
    assert changed != key
    (daemon_dir / "extra.py").write_text("")
    assert _key(spec, daemon_dir) not in (key, changed)

    vmlinux.write_bytes(fake_vmlinux() + b"\0")
    assert _key(spec, daemon_dir) != key


def test_user_kernel_modules_are_inputs(
    tmp_path: Path, daemon_dir: Path, module_tree: Path
) -> None:
    vmlinux = tmp_path / "vmlinux"
    vmlinux.write_bytes(fake_vmlinux())
    spec = ImageSpec(kernel=str(vmlinux), modules=str(module_tree))
    sources = gather_inputs(spec, daemon_dir=daemon_dir, pins=PINS)
    assert [name for name, _ in sources.modules] == [
        "virtio_ring.ko",
        "virtio.ko",
        "virtio_blk.ko",
        "virtio_net.ko",
        "virtio_console.ko",
    ]
    key = image_key(sources.inputs)
    assert _key(ImageSpec(kernel=str(vmlinux)), daemon_dir) != key
    (module_tree / "kernel" / "drivers" / "virtio_blk.ko").write_bytes(_module("virtio"))
    assert _key(spec, daemon_dir) != key
    with pytest.raises(KernelError, match="not a folder"):
        gather_inputs(
            ImageSpec(kernel=str(vmlinux), modules=str(tmp_path / "nope")),
            daemon_dir=daemon_dir,
            pins=PINS,
        )


def test_gather_debian_kernel_uses_apt_answer(daemon_dir: Path) -> None:
    def apt(version: str) -> kernel.DebianKernel:
        return kernel.DebianKernel("linux-image-6.1.0-56-cloud-amd64", version)

    one = gather_inputs(
        ImageSpec(), daemon_dir=daemon_dir, pins=PINS, debian_kernel=lambda: apt("1")
    )
    two = gather_inputs(
        ImageSpec(), daemon_dir=daemon_dir, pins=PINS, debian_kernel=lambda: apt("2")
    )
    assert one.inputs.kernel == "linux-image-6.1.0-56-cloud-amd64=1"
    assert image_key(one.inputs) != image_key(two.inputs)
    assert set(one.guest_daemon) == {"__init__.py", "__main__.py"}


def test_missing_user_kernel_is_one_line(tmp_path: Path, daemon_dir: Path) -> None:
    with pytest.raises(KernelError, match="No such file") as info:
        gather_inputs(ImageSpec(kernel=str(tmp_path / "nope")), daemon_dir=daemon_dir, pins=PINS)
    assert "\n" not in str(info.value)


def test_real_guest_daemon_sources_are_found() -> None:
    sources = rootfs.guest_daemon_sources(rootfs.guest_daemon_dir())
    assert {"__main__.py", "daemon.py", "protocol.py"} <= set(sources)


def test_wheel_pins_follow_requirements() -> None:
    host = {
        "trio": ("0.35.0", ["attrs>=23", "sniffio", 'exceptiongroup; python_version < "3.11"']),
        "trio-websocket": ("0.12.2", ["trio>=0.11", "wsproto>=0.14"]),
        "wsproto": ("1.3.2", ["h11<1,>=0.16.0"]),
        "h11": ("0.16.0", []),
        "attrs": ("26.1.0", ['pytest; extra == "tests"']),
        "sniffio": ("1.3.1", []),
        "msgspec": ("0.22.0", ['pyyaml; extra == "yaml"']),
    }
    pins = rootfs.wheel_pins(("trio", "trio_websocket", "msgspec", "irctokens"), installed=host.get)
    assert pins == (
        "attrs==26.1.0", "h11==0.16.0", "irctokens==2.0.2", "msgspec==0.22.0",
        "sniffio==1.3.1", "trio==0.35.0", "trio-websocket==0.12.2", "wsproto==1.3.2",
    )  # fmt: skip
    with pytest.raises(ImageError, match="not installed here"):
        rootfs.wheel_pins(("nothing-like-this",), installed=host.get)


def test_host_wheel_pins_cover_the_guest_daemon() -> None:
    names = {pin.split("==")[0] for pin in rootfs.wheel_pins()}
    assert {"trio", "trio-websocket", "msgspec", "wsproto", "h11", "irctokens"} <= names


def test_spec_is_validated() -> None:
    with pytest.raises(ImageError, match="invalid image spec") as info:
        image_build.checked(ImageSpec(hostname="Not_A_Host"))
    assert "\n" not in str(info.value)
    with pytest.raises(ImageError):
        image_build.checked(ImageSpec(packages=("ok", "rm -rf /")))
    with pytest.raises(ImageError):
        image_build.checked(ImageSpec(size_mib=1))
    assert image_build.checked(ImageSpec()) == ImageSpec()


# --- the cache directory --------------------------------------------------------------------


def _fake_image(directory: Path, key: str, built_at: float, spec: ImageSpec) -> None:
    directory.mkdir(parents=True)
    for name in (image_build.VMLINUX, image_build.INITRAMFS, image_build.ROOTFS):
        (directory / name).write_bytes(b"x")
    manifest = image_build.Manifest(
        key=key,
        spec=spec,
        inputs=_inputs(),
        kernel_release="6.9.0-test",
        cmdline=image_build.BASE_CMDLINE,
        modules=(),
        wheels=(),
        sizes={},
        built_at=built_at,
        build_seconds=1.0,
    )
    (directory / image_build.MANIFEST).write_bytes(msgspec.json.encode(manifest))


def test_cached_image_returns_at_once(tmp_path: Path) -> None:
    vmlinux = tmp_path / "vmlinux"
    vmlinux.write_bytes(fake_vmlinux())
    spec = ImageSpec(kernel=str(vmlinux))
    key = image_key(gather_inputs(spec).inputs)
    cache = tmp_path / "cache"
    _fake_image(cache / key[:16], key, 1.0, spec)
    said: list[str] = []
    image = build_image(spec, cache, progress=said.append)
    assert said[-1] == f"cached: {cache / key[:16]}"
    assert image.key == key
    assert image.kernel_release == "6.9.0-test"
    assert image.rootfs == cache / key[:16] / "rootfs.ext4"


def test_an_image_handed_out_is_held_against_pruning(tmp_path: Path) -> None:
    vmlinux = tmp_path / "vmlinux"
    vmlinux.write_bytes(fake_vmlinux())
    spec = ImageSpec(kernel=str(vmlinux))
    key = image_key(gather_inputs(spec).inputs)
    cache = tmp_path / "cache"
    _fake_image(cache / key[:16], key, 1.0, spec)
    os.utime(cache / key[:16], (1.0, 1.0))
    image = build_image(spec, cache, progress=print)
    assert time.time() - image.directory.stat().st_mtime < 60  # its last use: now
    said: list[str] = []
    assert prune_images(cache, "other" * 13, said.append, grace=0) == []
    assert load_image(image.directory) == image and said == []


def test_unwritable_cache_is_one_line(tmp_path: Path) -> None:
    vmlinux = tmp_path / "vmlinux"
    vmlinux.write_bytes(fake_vmlinux())
    blocker = tmp_path / "file"
    blocker.write_text("")
    if os.geteuid() != 0 or not shutil.which("mmdebstrap"):
        pytest.skip("a fresh build needs root and mmdebstrap; without, the error is about them")
    with pytest.raises(ImageError, match="image build failed: Not a directory") as info:
        build_image(ImageSpec(kernel=str(vmlinux)), blocker / "cache", progress=print)
    assert "\n" not in str(info.value)


def test_incomplete_image_is_not_an_image(tmp_path: Path) -> None:
    _fake_image(tmp_path / "img", "k" * 64, 1.0, ImageSpec())
    assert isinstance(load_image(tmp_path / "img"), Image)
    (tmp_path / "img" / image_build.ROOTFS).unlink()
    assert load_image(tmp_path / "img") is None
    (tmp_path / "half").mkdir()
    (tmp_path / "half" / image_build.VMLINUX).write_bytes(b"x")
    assert load_image(tmp_path / "half") is None


def test_prune_keeps_the_newest(tmp_path: Path) -> None:
    for n in range(3):
        _fake_image(tmp_path / f"img{n}", str(n) * 64, float(n), ImageSpec())
    (tmp_path / ".build-deadbeef" / "rootfs").mkdir(parents=True)
    (tmp_path / "not-an-image").mkdir()
    downloads = tmp_path / ".downloads"
    downloads.mkdir()
    used = downloads / "linux-image-6.1.0-56-cloud-amd64_6.1.192-2_amd64.deb"
    old = downloads / "linux-image-6.1.0-55-cloud-amd64_6.1.190-1_amd64.deb"
    used.write_bytes(b"deb")
    old.write_bytes(b"deb")
    removed = prune(tmp_path, keep=1)
    assert sorted(path.name for path in removed) == [".build-deadbeef", "img0", "img1", old.name]
    assert used.exists()
    assert sorted(path.name for path in tmp_path.iterdir() if path.name != ".lock") == [
        ".downloads", "img2", "not-an-image",
    ]  # fmt: skip
    assert prune(tmp_path / "missing", keep=1) == []


# --- host tools and the rootfs pieces -------------------------------------------------------


def test_failed_step_is_one_line() -> None:
    script = "echo 'I: working'; echo 'E: it broke' >&2; echo 'more noise' >&2; exit 3"
    with pytest.raises(StepFailed) as info:
        tools.run(["sh", "-c", script], step="demo")
    assert str(info.value) == "demo: sh exited with 3: E: it broke"
    seen: list[str] = []
    assert tools.run(["sh", "-c", "echo out; echo err >&2"], step="ok", on_line=seen.append) == (
        b"out\n"
    )
    assert seen == ["err"]
    with pytest.raises(ToolMissing, match="apt-get install"):
        tools.require("fireclaw-no-such-tool")


@pytest.mark.skipif(shutil.which("mke2fs") is None, reason="e2fsprogs is not installed")
def test_make_ext4_from_a_directory(tmp_path: Path) -> None:
    tree = tmp_path / "tree"
    (tree / "etc").mkdir(parents=True)
    (tree / "etc" / "hostname").write_text("box\n")
    (tree / "bin").symlink_to("usr/bin")
    content, inodes = rootfs.tree_size(tree)
    assert content >= 4096 and inodes >= 4
    image = tmp_path / "root.ext4"
    rootfs.make_ext4(tree, image, size_mib=rootfs.ext4_size_mib(content), inodes=inodes + 64)
    debugfs = shutil.which("debugfs") or "/usr/sbin/debugfs"
    out = subprocess.run(
        [debugfs, "-R", "cat /etc/hostname", str(image)], capture_output=True, check=True
    )
    assert out.stdout == b"box\n"


# --- end to end: build the real image, boot it, talk to its guest daemon ----------------------

TEST_CACHE = Path.home() / ".cache" / "fireclaw" / "test-images"
TOKEN = "image-t0ken-0123456789"
VM_ID = "vm-image-1"
BOOT_DEADLINE = 60.0
# An orphan is adopted by PID 1 (the init script), which must reap it: its
# /proc entry has to go (bounded wait inside the guest) or it is a zombie.
#: An orphan that lives until it is told to end (a timed one may be gone, and reaped,
#: before a slow guest reads its PPid), then is seen reaped by the init (pid 1).
ORPHAN = """
(sleep 600 & echo $! >/tmp/orphan)
pid=$(cat /tmp/orphan)
grep PPid /proc/$pid/status
kill $pid
i=0
while [ -e /proc/$pid ] && [ $i -lt 400 ]; do sleep 0.05; i=$((i + 1)); done
[ -e /proc/$pid ] || echo reaped
"""
STEP_DEADLINE = 30.0


class Guest:
    """The host's side of the guest daemon's connection."""

    def __init__(self, ws: WebSocketConnection) -> None:
        self.ws = ws

    async def send(self, msg: HostMessage) -> None:
        await self.ws.send_message(encode(msg))

    async def recv(self) -> GuestMessage:
        with trio.fail_after(STEP_DEADLINE):
            while True:
                msg = decode_guest(await self.ws.get_message())
                if not isinstance(msg, Heartbeat):
                    return msg

    async def run(self, req: int, argv: list[str], user: str = "") -> tuple[str, Exited]:
        await self.send(Run(req=req, argv=argv, user=user))
        out = b""
        while True:
            msg = await self.recv()
            if isinstance(msg, Output) and msg.req == req and msg.stream == "stdout":
                out += msg.data
            elif isinstance(msg, Exited) and msg.req == req:
                return out.decode(), msg


def _tsc_khz() -> int | None:
    """The host's TSC rate, which a TCG guest's TSC runs at."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return None
    for line in text.splitlines():
        if line.startswith("cpu MHz"):
            return round(float(line.split(":")[1]) * 1000)
    return None


def _open_for_writing(path: Path) -> BinaryIO:
    return open(path, "wb")


def qemu_argv(image: Image, console: Path, cmdline: str) -> list[str]:
    return [
        "qemu-system-x86_64", "-accel", "tcg", "-M", "microvm", "-m", "512",
        "-nodefaults", "-no-user-config", "-display", "none", "-no-reboot",
        "-serial", f"file:{console}",
        "-kernel", str(image.vmlinux), "-initrd", str(image.initramfs), "-append", cmdline,
        "-drive", f"id=root,file={image.rootfs},format=raw,if=none,readonly=on",
        "-device", "virtio-blk-device,drive=root",
        "-netdev", "user,id=n0", "-device", "virtio-net-device,netdev=n0",
    ]  # fmt: skip


@pytest.mark.image
@pytest.mark.root
@pytest.mark.skipif(os.geteuid() != 0, reason="building an image needs root")
@pytest.mark.skipif(
    not all(shutil.which(tool) for tool in ("mmdebstrap", "mke2fs", "qemu-system-x86_64")),
    reason="needs mmdebstrap, e2fsprogs and qemu-system-x86",
)
async def test_real_image_boots_and_serves_the_guest_daemon(
    nursery: trio.Nursery, tmp_path: Path
) -> None:
    started = time.monotonic()
    image = await trio.to_thread.run_sync(
        lambda: build_image(ImageSpec(), TEST_CACHE, progress=lambda line: print(line))
    )
    print(f"image: {time.monotonic() - started:.1f} s ({image.directory})")

    guests, accepted = trio.open_memory_channel[Guest](1)

    async def handler(request: WebSocketRequest) -> None:
        await guests.send(Guest(await request.accept()))
        await trio.sleep_forever()  # the test owns the connection

    server = await nursery.start(serve_websocket, handler, "127.0.0.1", 0, None)
    # QEMU user networking: the guest reaches the host's loopback as 10.0.2.2.
    cmdline = (
        f"{image.cmdline} fireclaw.url=ws://10.0.2.2:{server.port}/"
        f" fireclaw.vm_id={VM_ID} fireclaw.token={TOKEN}"
        " fireclaw.ip=10.0.2.15/24 fireclaw.gw=10.0.2.2 fireclaw.hostname=imgtest"
    )
    # Under TCG on a busy host the kernel's PIT calibration of the TSC can
    # fail and boot then stalls; the TSC runs at the host's rate, so say it.
    khz = _tsc_khz()
    if khz:
        cmdline += f" tsc_early_khz={khz}"
    console = tmp_path / "console.log"
    boot = time.monotonic()
    with _open_for_writing(tmp_path / "qemu.stderr") as stderr:
        proc = await trio.lowlevel.open_process(
            qemu_argv(image, console, cmdline),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=stderr,
        )

    def console_tail() -> str:
        lines = console.read_text(errors="replace").splitlines() if console.exists() else []
        return "\n".join(lines[-25:])

    try:
        try:
            with trio.fail_after(BOOT_DEADLINE):
                guest = await accepted.receive()
                hello = await guest.recv()
        except trio.TooSlowError:
            pytest.fail(f"no Hello within {BOOT_DEADLINE:.0f} s; console:\n{console_tail()}")
        print(f"boot to Hello under TCG: {time.monotonic() - boot:.1f} s")
        assert isinstance(hello, Hello), hello
        assert (hello.vm_id, hello.token) == (VM_ID, TOKEN)
        now = time.time()
        await guest.send(Welcome(entropy=os.urandom(64), unix_time=now, heartbeat_interval=5.0))

        out, exited = await guest.run(1, ["uname", "-r"])
        assert (out.strip(), exited.code) == (image.kernel_release, 0)
        # The daemon is root; what it runs for a run or an agent runs as `agent`,
        # unless the host names root (`run --user root`).
        out, exited = await guest.run(2, ["id", "-un"])
        assert (out.strip(), exited.code) == ("agent", 0)
        out, exited = await guest.run(20, ["id", "-un"], user="root")
        assert (out.strip(), exited.code) == ("root", 0)
        out, _ = await guest.run(3, ["id", "agent"])
        assert out.startswith("uid=1000(agent) gid=1000(agent)")
        out, _ = await guest.run(4, ["hostname"])
        assert out.strip() == "imgtest"
        out, _ = await guest.run(5, ["date", "+%s"])
        assert abs(int(out) - now) < 60  # FIRECLAW_SET_CLOCK=1: the Welcome set the clock
        out, _ = await guest.run(6, ["sh", "-c", "grep ' / ' /proc/mounts; ip -4 addr show eth0"])
        assert " ro," in out and "10.0.2.15/24" in out
        out, exited = await guest.run(7, ["touch", "/home/agent/x", "/tmp/x"])
        assert exited.code == 0, "read-only root keeps writable tmpfs homes and /tmp"
        out, _ = await guest.run(8, ["sh", "-c", ORPHAN])
        assert out.split() == ["PPid:", "1", "reaped"], out

        await guest.send(Stop(reason="test done"))
        assert isinstance(await guest.recv(), Goodbye)
        with trio.fail_after(STEP_DEADLINE):
            code = await proc.wait()
        assert code == 0, (tmp_path / "qemu.stderr").read_text(errors="replace")
        text = console.read_text(errors="replace")
        assert "reboot: Power down" in text, console_tail()
        print(f"boot to poweroff: {time.monotonic() - boot:.1f} s")
    finally:
        if proc.returncode is None:
            proc.kill()
            with trio.move_on_after(10):
                await proc.wait()


def test_an_image_with_podman_gives_the_agent_subordinate_ids(tmp_path: Path) -> None:
    for folder in ("etc", "home/agent", "usr/bin", "sbin"):
        (tmp_path / folder).mkdir(parents=True)
    rootfs.configure(tmp_path, hostname="fireclaw")
    assert not (tmp_path / "etc" / "subuid").exists()  # no podman: nothing to map
    (tmp_path / "usr" / "bin" / "podman").write_text("")
    (tmp_path / "etc" / "subgid").write_text("other:200000:65536\n")
    rootfs.configure(tmp_path, hostname="fireclaw")
    rootfs.configure(tmp_path, hostname="fireclaw")  # once only, however often
    assert (tmp_path / "etc" / "subuid").read_text() == "agent:100000:65536\n"
    assert (tmp_path / "etc" / "subgid").read_text() == ("other:200000:65536\nagent:100000:65536\n")
