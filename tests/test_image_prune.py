"""``prune_images``: old images go, the current one, young or held ones and other files stay.

Images here are fake: the files and manifest ``load_image`` looks for, with a
few bytes each (one with 3 MiB, to check the reported size).
"""

from __future__ import annotations

import fcntl
import os
import time
from pathlib import Path

import msgspec
import pytest
from fireclaw.pool.image import GRACE_SECONDS, ImageSpec, KeyInputs, Removed, prune_images
from fireclaw.pool.image import build as image_build
from fireclaw.pool.image import rootfs as image_rootfs

NOW = time.time()
OLD = NOW - 24 * 3600
DEB_CURRENT = "linux-image-6.1.0-56-cloud-amd64_6.1.192-2_amd64.deb"
DEB_OLD = "linux-image-6.1.0-55-cloud-amd64_6.1.190-1_amd64.deb"


def _label(deb: str) -> str:
    package, version, _ = deb.split("_")
    return f"{package}={version}"


def fake_image(
    images: Path, key: str, *, used_at: float, kernel: str = _label(DEB_CURRENT), rootfs: int = 1
) -> Path:
    """A whole image as ``build_image`` leaves it, last used at ``used_at``."""
    directory = images / key[:16]
    directory.mkdir(parents=True)
    (directory / image_build.VMLINUX).write_bytes(b"k")
    (directory / image_build.INITRAMFS).write_bytes(b"i")
    (directory / image_build.ROOTFS).write_bytes(os.urandom(rootfs))
    inputs = KeyInputs(
        builder=image_build.BUILDER_VERSION, builder_files={}, suite="bookworm", packages=(),
        hostname="fireclaw", size_mib=None, kernel=kernel, modules={}, guest_daemon={}, wheels=(),
    )  # fmt: skip
    manifest = image_build.Manifest(
        key=key, spec=ImageSpec(), inputs=inputs, kernel_release="6.1.0-test",
        cmdline=image_build.BASE_CMDLINE, modules=(), wheels=(), sizes={}, built_at=used_at,
        build_seconds=1.0,
    )  # fmt: skip
    (directory / image_build.MANIFEST).write_bytes(msgspec.json.encode(manifest))
    os.utime(directory, (used_at, used_at))
    assert image_build.load_image(directory) is not None
    return directory


def old_folder(path: Path) -> Path:
    path.mkdir(parents=True)
    (path / "file").write_bytes(b"x")
    os.utime(path, (OLD, OLD))
    return path


def names(images: Path) -> list[str]:
    return sorted(path.name for path in images.iterdir())


KEEP, OLD1, OLD2, YOUNG = ("a" * 64, "b" * 64, "c" * 64, "d" * 64)


@pytest.fixture
def images(tmp_path: Path) -> Path:
    """A cache with the current image, two old ones, a young one and what else a cache holds."""
    images = tmp_path / "images"
    fake_image(images, KEEP, used_at=OLD)  # current, however old
    fake_image(images, OLD1, used_at=OLD, rootfs=3 << 20, kernel=_label(DEB_OLD))
    fake_image(images, OLD2, used_at=OLD)
    fake_image(images, YOUNG, used_at=NOW - 60)  # another process's, just built
    (images / "accel.json").write_text("{}")
    (images / ".lock").write_bytes(b"")
    old_folder(images / "notes")  # not an image: not ours
    half = old_folder(images / ("e" * 16))  # not a whole image (no rootfs): left alone
    (half / image_build.MANIFEST).write_bytes(b"{}")
    old_folder(images / ".build-ffffffffffffffff" / "rootfs" / "etc")  # a killed build
    old_folder(images / ".old-9999999999999999-0badf00d")  # a killed prune's aside
    downloads = images / ".downloads"
    downloads.mkdir()
    (downloads / DEB_CURRENT).write_bytes(b"deb")
    (downloads / DEB_OLD).write_bytes(b"deb")
    return images


def test_old_images_and_leftovers_go(images: Path) -> None:
    said: list[str] = []
    removed = prune_images(images, KEEP, said.append, now=NOW)
    assert names(images) == sorted(
        [".downloads", ".lock", KEEP[:16], YOUNG[:16], "accel.json", "e" * 16, "notes"]
    )
    assert names(images / ".downloads") == [DEB_CURRENT]
    assert said == [
        "removed leftover .old-9999999999999999-0badf00d (0 MiB)",
        f"removed old image {OLD1[:16]} (3 MiB)",
        f"removed old image {OLD2[:16]} (0 MiB)",
        "removed unfinished build .build-ffffffffffffffff (0 MiB)",
        f"removed kernel package {DEB_OLD} (0 MiB)",
    ]
    assert [item.path for item in removed] == [
        images / ".old-9999999999999999-0badf00d",
        images / OLD1[:16],
        images / OLD2[:16],
        images / ".build-ffffffffffffffff",
        images / ".downloads" / DEB_OLD,
    ]
    assert 3 << 20 <= removed[1].size < 4 << 20
    assert all(isinstance(item, Removed) and item.size > 0 for item in removed)
    # Once more: nothing left to do, and the 16-character name is as good as the key.
    assert prune_images(images, KEEP[:16], said.append, now=NOW) == []
    assert len(said) == 5


def test_grace_is_counted_from_the_last_use(images: Path) -> None:
    later = NOW + GRACE_SECONDS + 1
    said: list[str] = []
    prune_images(images, KEEP, said.append, now=later)
    assert YOUNG[:16] not in names(images)
    assert f"removed old image {YOUNG[:16]} (0 MiB)" in said
    assert KEEP[:16] in names(images)


def test_an_image_in_use_stays(images: Path) -> None:
    # build_image holds each image it hands out with a shared flock; so does this.
    fd = os.open(images / OLD1[:16], os.O_RDONLY | os.O_DIRECTORY)
    try:
        fcntl.flock(fd, fcntl.LOCK_SH)
        said: list[str] = []
        removed = prune_images(images, KEEP, said.append, now=NOW)
        assert [item.path.name for item in removed] == [
            ".old-9999999999999999-0badf00d", OLD2[:16], ".build-ffffffffffffffff",
        ]  # fmt: skip
        assert OLD1[:16] in names(images)
        # Its kernel package stays with it: a rebuild of that image would need it.
        assert names(images / ".downloads") == [DEB_OLD, DEB_CURRENT]
    finally:
        os.close(fd)
    assert [item.path.name for item in prune_images(images, KEEP, said.append, now=NOW)] == [
        OLD1[:16], DEB_OLD,
    ]  # fmt: skip


def test_a_running_build_keeps_its_folder(images: Path) -> None:
    with image_build._locked(images):  # what a build holds from start to rename
        said: list[str] = []
        removed = prune_images(images, KEEP, said.append, now=NOW)
    assert [item.path.name for item in removed] == [
        ".old-9999999999999999-0badf00d", OLD1[:16], OLD2[:16],
    ]  # fmt: skip
    assert ".build-ffffffffffffffff" in names(images)
    assert names(images / ".downloads") == [DEB_OLD, DEB_CURRENT]  # a build may be using one


def test_a_failed_removal_is_one_line_and_the_rest_goes_on(
    images: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    remove_tree = image_rootfs.remove_tree

    def failing(path: Path) -> None:
        if OLD1[:16] in path.name:
            raise PermissionError(13, "Permission denied", str(path))
        remove_tree(path)

    monkeypatch.setattr(image_rootfs, "remove_tree", failing)
    said: list[str] = []
    removed = prune_images(images, KEEP, said.append, now=NOW)
    assert f"could not remove old image {OLD1[:16]}: Permission denied" in said
    assert OLD1[:16] not in [item.path.name for item in removed]
    assert OLD2[:16] in [item.path.name for item in removed]
    # It was renamed aside before the removal failed: never half an image under its name.
    asides = [name for name in names(images) if name.startswith(f".old-{OLD1[:16]}-")]
    assert len(asides) == 1 and OLD1[:16] not in names(images)
    monkeypatch.undo()
    said.clear()
    prune_images(images, KEEP, said.append, now=NOW)
    assert said == [
        f"removed leftover {asides[0]} (3 MiB)",
        f"removed kernel package {DEB_OLD} (0 MiB)",  # the image that needed it is gone now
    ]
    assert not any(name.startswith(".old-") for name in names(images))


def test_no_cache_no_lines(tmp_path: Path) -> None:
    said: list[str] = []
    assert prune_images(tmp_path / "missing", KEEP, said.append) == []
    assert said == []
