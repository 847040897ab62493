"""A VM's own raw disk (``DiskFormat.RAW_COPY``): a reflink or sparse copy, on real files.

The copies are made of real sparse files on the file system the tests run
on; where it shares extents (XFS, btrfs) the reflink is checked, elsewhere
the sparse copy, whose holes must stay holes (``st_blocks`` counts only
what the source had data in).
"""

from __future__ import annotations

import errno
import fcntl
import os
import stat
from pathlib import Path

import pytest
from fireclaw.pool import disk_copy, disks
from fireclaw.pool.disk_copy import FICLONE, CopyKind, copy_raw
from fireclaw.pool.drivers.base import DiskFormat

MIB = 1 << 20
#: A disk image as mke2fs leaves one: large, mostly holes, data here and there.
SIZE = 256 * MIB
DATA_AT = (0, 17 * MIB, 200 * MIB + 4096)
DATA = os.urandom(MIB)


def sparse_disk(path: Path) -> Path:
    with open(path, "wb") as f:
        for offset in DATA_AT:
            f.seek(offset)
            f.write(DATA)
        f.truncate(SIZE)
    path.chmod(0o644)
    return path


def reflinks_here(folder: Path) -> bool:
    """Whether the file system under ``folder`` shares extents (FICLONE)."""
    a, b = folder / ".probe-a", folder / ".probe-b"
    a.write_bytes(b"x" * 4096)
    try:
        with open(a, "rb") as src, open(b, "wb") as dst:
            fcntl.ioctl(dst.fileno(), FICLONE, src.fileno())
        return True
    except OSError:
        return False
    finally:
        a.unlink()
        b.unlink(missing_ok=True)


def assert_same_bytes(a: Path, b: Path) -> None:
    assert a.stat().st_size == b.stat().st_size
    with open(a, "rb") as fa, open(b, "rb") as fb:
        for offset in DATA_AT:
            fa.seek(offset)
            fb.seek(offset)
            assert fa.read(MIB) == fb.read(MIB) == DATA
        fb.seek(100 * MIB)  # a hole of the source reads as zeros in the copy
        assert fb.read(4096) == bytes(4096)


def test_a_sparse_copy_keeps_the_holes_and_every_byte(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    source = sparse_disk(tmp_path / "rootfs.ext4")
    # No reflink, as on ext4: the sparse copy is what is left.
    monkeypatch.setattr(disk_copy, "FICLONE", 0)  # an ioctl no file system knows: ENOTTY
    target = tmp_path / "disks" / "vm-1.raw"
    assert copy_raw(target, source) is CopyKind.SPARSE
    assert_same_bytes(source, target)
    st = target.stat()
    # Data in three places of 1 MiB (the third straddles a block): holes everywhere else.
    assert st.st_blocks * 512 <= 4 * MIB + 64 * 1024, st.st_blocks
    assert st.st_blocks * 512 <= source.stat().st_blocks * 512 + 64 * 1024
    assert stat.S_IMODE(st.st_mode) == 0o600  # it will hold what the guest writes


def test_a_sparse_copy_through_user_space_where_copy_file_range_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    source = sparse_disk(tmp_path / "rootfs.ext4")
    monkeypatch.setattr(disk_copy, "FICLONE", 0)

    def refused(*args: object) -> int:
        raise OSError(errno.EXDEV, "Invalid cross-device link")

    monkeypatch.setattr(os, "copy_file_range", refused)
    target = tmp_path / "vm-1.raw"
    assert copy_raw(target, source) is CopyKind.SPARSE
    assert_same_bytes(source, target)
    assert target.stat().st_blocks * 512 <= 4 * MIB + 64 * 1024


def test_the_file_systems_own_reflink_where_it_shares_extents(tmp_path: Path) -> None:
    source = sparse_disk(tmp_path / "rootfs.ext4")
    target = tmp_path / "vm-1.raw"
    kind = copy_raw(target, source)
    assert_same_bytes(source, target)
    if reflinks_here(tmp_path):
        assert kind is CopyKind.REFLINK
    else:  # ext4 here: FICLONE is refused and the sparse copy is made instead
        assert kind is CopyKind.SPARSE
        assert target.stat().st_blocks * 512 <= 4 * MIB + 64 * 1024


def test_the_copy_is_a_file_of_its_own(tmp_path: Path) -> None:
    source = sparse_disk(tmp_path / "rootfs.ext4")
    target = tmp_path / "vm-1.raw"
    copy_raw(target, source)
    assert target.stat().st_ino != source.stat().st_ino
    with open(target, "r+b") as f:
        f.seek(17 * MIB)
        f.write(b"written by the guest")
    with open(source, "rb") as f:
        f.seek(17 * MIB)
        assert f.read(MIB) == DATA  # the image is never written


def test_a_copy_never_overwrites_and_a_failed_one_leaves_nothing(tmp_path: Path) -> None:
    source = sparse_disk(tmp_path / "rootfs.ext4")
    taken = tmp_path / "vm-1.raw"
    taken.write_bytes(b"another VM's disk")
    with pytest.raises(FileExistsError):
        copy_raw(taken, source)
    assert taken.read_bytes() == b"another VM's disk"
    with pytest.raises(FileNotFoundError):
        copy_raw(tmp_path / "vm-2.raw", tmp_path / "missing.ext4")
    assert not (tmp_path / "vm-2.raw").exists()


async def test_create_disk_makes_what_the_driver_takes_in_one_line_on_failure(
    tmp_path: Path,
) -> None:
    source = sparse_disk(tmp_path / "rootfs.ext4")
    made = await disks.create_disk(
        tmp_path / "disks" / "vm-1.raw", source, DiskFormat.RAW_COPY, from_template=False
    )
    assert_same_bytes(source, made)
    assert disks.leftovers(tmp_path / "disks") == [made]
    with pytest.raises(disks.DiskError) as caught:
        await disks.create_disk(made, source, DiskFormat.RAW_COPY, from_template=False)
    assert str(caught.value) == "raw disk vm-1.raw: File exists"
    assert disks.sweep(tmp_path / "disks") == [made]
    assert not made.exists()
