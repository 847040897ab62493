"""Per-VM overlay disks and named agents' workspace images, made with the real tools."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest
from fireclaw.guest_daemon import workspace as guest
from fireclaw.pool import disks, workspaces

pytestmark = pytest.mark.skipif(
    not all(shutil.which(t) for t in ("qemu-img", "mke2fs", "debugfs")),
    reason="needs qemu-utils and e2fsprogs",
)


def info(path: Path) -> dict[str, object]:
    done = subprocess.run(
        ["qemu-img", "info", "--output=json", "-U", str(path)], capture_output=True, check=True
    )
    found: dict[str, object] = json.loads(done.stdout)
    return found


def debugfs(image: Path, request: str) -> str:
    done = subprocess.run(["debugfs", "-R", request, str(image)], capture_output=True, check=True)
    return done.stdout.decode()


async def test_an_overlay_sits_on_its_backing_file_and_goes_with_sweep(tmp_path: Path) -> None:
    base = tmp_path / "rootfs.ext4"
    base.write_bytes(b"\0" * (1 << 20))
    # As a template's overlay on the image, and a clone's on the template's.
    first = await disks.create_overlay(tmp_path / "templates" / "t.qcow2", base, "raw")
    second = await disks.create_overlay(tmp_path / "disks" / "vm-2.qcow2", first, "qcow2")
    third = await disks.create_overlay(tmp_path / "disks" / "vm-3.qcow2", base, "raw")
    assert info(first)["backing-filename"] == str(base)
    assert info(second)["backing-filename"] == str(first)
    assert info(second)["format"] == "qcow2"
    assert first.stat().st_mode & 0o777 == 0o600
    assert disks.leftovers(tmp_path / "disks") == [second, third]
    assert disks.sweep(tmp_path / "disks") == [second, third]
    assert disks.leftovers(tmp_path / "disks") == []


async def test_overlays_on_one_backing_are_copies_of_one_blank_made_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """qemu-img runs once per backing file; every later overlay on it is a copy made
    without starting a process, and is an overlay on that backing all the same."""
    base = tmp_path / "rootfs.ext4"
    base.write_bytes(b"\0" * (1 << 20))
    first = await disks.create_overlay(tmp_path / "disks" / "vm-1.qcow2", base, "raw")
    monkeypatch.setattr(disks, "QEMU_IMG", str(tmp_path / "no-qemu-img-here"))
    second = await disks.create_overlay(tmp_path / "disks" / "vm-2.qcow2", base, "raw")
    assert info(second)["backing-filename"] == str(base)
    assert info(second)["virtual-size"] == 1 << 20
    assert second.read_bytes() == first.read_bytes()
    assert second.stat().st_mode & 0o777 == 0o600
    # The same backing reached through a link: the same blank, naming the file itself.
    (tmp_path / "link").symlink_to(tmp_path, target_is_directory=True)
    third = await disks.create_overlay(
        tmp_path / "disks" / "vm-4.qcow2", tmp_path / "link" / "rootfs.ext4", "raw"
    )
    assert info(third)["backing-filename"] == str(base.resolve())
    # Another backing needs its own blank: that one cannot be made now.
    other = tmp_path / "other.ext4"
    other.write_bytes(b"\0" * (2 << 20))
    with pytest.raises(disks.DiskError, match="^overlay vm-3.qcow2: "):
        await disks.create_overlay(tmp_path / "disks" / "vm-3.qcow2", other, "raw")
    assert not (tmp_path / "disks" / "vm-3.qcow2").exists()
    # The blank lives beside its backing file, not among the VMs' overlays.
    assert disks.blank_path(base, "raw").parent == tmp_path
    assert disks.blank_path(base, "raw").is_file()
    assert disks.sweep(tmp_path / "disks") == [first, second, third]
    assert list((tmp_path / "disks").iterdir()) == []


def _resident(path: Path) -> int:
    """Bytes of ``path`` in the page cache, as fincore(1) counts them."""
    done = subprocess.run(
        ["fincore", "--bytes", "--noheadings", "--output", "RES", str(path)],
        capture_output=True,
        check=True,
    )
    return int(done.stdout)


@pytest.mark.skipif(shutil.which("fincore") is None, reason="needs fincore (util-linux)")
def test_preread_puts_a_template_s_files_in_the_page_cache(tmp_path: Path) -> None:
    files = [tmp_path / "t.snap", tmp_path / "t.mem"]
    for n, path in enumerate(files):
        path.write_bytes(os.urandom((n + 1) << 20))
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)  # clean pages: the kernel may drop them when told
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)
    if any(_resident(path) for path in files):
        pytest.skip("the kernel kept the pages cached (DONTNEED is advice)")
    gone = tmp_path / "gone.qcow2"  # passed over
    assert disks.preread([*files, gone]) == 3 << 20
    assert [_resident(path) for path in files] == [1 << 20, 2 << 20]


async def test_an_overlay_on_a_missing_file_is_one_line_and_leaves_nothing(
    tmp_path: Path,
) -> None:
    target = tmp_path / "disks" / "vm.qcow2"
    with pytest.raises(disks.DiskError, match=r"^overlay vm.qcow2: .*") as caught:
        await disks.create_overlay(target, tmp_path / "missing.ext4", "raw")
    assert "\n" not in str(caught.value)
    assert not target.exists()


async def test_a_workspace_holds_memory_md_owned_by_the_agent(tmp_path: Path) -> None:
    path = await workspaces.ensure(tmp_path / "ws", "alice", 16 << 20)
    assert path == tmp_path / "ws" / "alice.ext4"
    assert path.stat().st_size == 16 << 20
    assert debugfs(path, "cat /MEMORY.md") == workspaces.first_memory("alice")
    stat = debugfs(path, "stat /MEMORY.md")
    if os.geteuid() == 0:  # only root can hand the file to the agent's uid
        assert f"User:  {workspaces.AGENT_UID}" in stat
    # Made once: a second ensure keeps what is there.
    before = path.stat().st_mtime_ns
    assert await workspaces.ensure(tmp_path / "ws", "alice", 16 << 20) == path
    assert path.stat().st_mtime_ns == before
    assert [p.name for p in (tmp_path / "ws").iterdir()] == ["alice.ext4"]


@pytest.mark.parametrize("name", ["../x", "a/b", "", ".hidden", "-rf", "x" * 65])
def test_a_name_that_cannot_be_a_file_is_refused(tmp_path: Path, name: str) -> None:
    with pytest.raises(workspaces.WorkspaceError, match="cannot name a workspace file"):
        workspaces.path_for(tmp_path, name)


def test_the_guest_finds_its_workspace_by_serial(tmp_path: Path) -> None:
    for dev, serial in (("vda", ""), ("vdb", guest.SERIAL), ("vdc", "other")):
        (tmp_path / dev).mkdir()
        (tmp_path / dev / "serial").write_text(serial + "\n")
    assert guest.find_device(tmp_path) == Path("/dev/vdb")
    (tmp_path / "vdb" / "serial").write_text("x\n")
    assert guest.find_device(tmp_path) is None
    mounts = tmp_path / "mounts"
    mounts.write_text("/dev/vda / ext4 rw 0 0\n/dev/vdb /workspace ext4 rw 0 0\n")
    assert guest.is_mounted("/workspace", mounts)
    assert not guest.is_mounted("/work", mounts)
