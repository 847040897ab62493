"""The pool driving the firecracker driver, checked by contract: no Firecracker runs here.

A real ``RoleGroup`` with its real ``Runtime``, ``Templates``, state store and
network (a bridge, a namespace and a tap per VM) runs a warm pool on the
firecracker driver. What the driver starts is the FAKE ``jailer`` and FAKE
``firecracker`` of the contract tests (tests/firecracker_fake.py): every API
request is checked against Firecracker's spec by ``SpecChecker``, and with
``run-guest`` the fake stands in for the guest too, running the real guest
daemon in the VM's namespace (a process, not a restored VM). So this shows
what the pool does with the driver (a template booted, paused and
snapshotted, clones restored each with a raw disk of its own at the path the
snapshot names, in a jail of its own, everything released at the end), not
that a Firecracker VM boots: none can on these machines.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import sys
from collections.abc import AsyncIterator
from ipaddress import IPv4Network
from pathlib import Path

import psutil
import pytest
import trio
from fireclaw.config import parse_config
from fireclaw.pool import disks, netns
from fireclaw.pool.drivers import Choice, DriverError, VmSpec, choose, open_backend
from fireclaw.pool.drivers import firecracker as fc
from fireclaw.pool.drivers import firecracker_jail as jail_files
from fireclaw.pool.drivers.base import CONTROL_PORT, DiskFormat
from fireclaw.pool.group import RoleGroup
from fireclaw.pool.image import BASE_CMDLINE, Image
from fireclaw.pool.lifecycle import State
from fireclaw.pool.network import GATEWAY, Network
from fireclaw.pool.runs import RunExited, RunOutput, RunStarted, run_command
from fireclaw.pool.runtime import Runtime
from fireclaw.pool.templates import Templates
from fireclaw.supervisor import leftovers
from fireclaw.supervisor.state import Store

sys.path.insert(0, str(Path(__file__).parent))
from firecracker_fake import GUEST_MARK, GUEST_MARK_AT, write_fakes  # noqa: E402
from firecracker_spec import SPEC_PATH, Exchange, read_log  # noqa: E402

MIB = 1 << 20
#: The image's root: large and mostly holes, as mke2fs leaves one.
ROOTFS_BYTES = 128 * MIB
ROOT_DATA_AT = (0, 40 * MIB)
BOOT_TIMEOUT = 60.0  # the swarm's control.boot_timeout: a guest daemon's start, loaded
#: A template (boot, park, snapshot) and two restores, each a few Python starts
#: (fake jailer, fake firecracker, guest daemon) on a loaded 2-core machine.
DEADLINE = BOOT_TIMEOUT * 4

pytestmark = [
    pytest.mark.root,
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root (a namespace, a tap per VM)"),
    pytest.mark.skipif(
        not SPEC_PATH.exists(), reason=f"Firecracker's API spec is not at {SPEC_PATH}"
    ),
]


def fake_image(folder: Path) -> Image:
    """An image whose files are not a real kernel or root filesystem (nothing boots
    them); its root is a sparse file, as the raw copies' source."""
    folder.mkdir()
    for name in ("vmlinux", "initramfs.cpio.gz"):
        (folder / name).write_bytes(b"not a real " + name.encode())
        (folder / name).chmod(0o644)
    rootfs = folder / "rootfs.ext4"
    with open(rootfs, "wb") as f:
        for offset in ROOT_DATA_AT:
            f.seek(offset)
            f.write(b"R" * MIB)
        f.truncate(ROOTFS_BYTES)
    rootfs.chmod(0o644)
    (folder / "manifest.json").write_text(json.dumps({"modules": []}))
    return Image(
        key="e" * 64,
        directory=folder,
        vmlinux=folder / "vmlinux",
        initramfs=folder / "initramfs.cpio.gz",
        rootfs=rootfs,
        kernel_release="6.1.0-firecracker",
        cmdline=BASE_CMDLINE,
    )


class Pool:
    """One role's warm pool on the firecracker driver, and what the test reads of it."""

    def __init__(self, tmp_path: Path) -> None:
        self.tmp_path = tmp_path
        self.logs = tmp_path / "fake-log"
        self.logs.mkdir()
        (self.logs / "run-guest").touch()  # the fake runs the guest daemon
        firecracker, jailer = write_fakes(tmp_path / "bin", self.logs)
        self.image = fake_image(tmp_path / "image")
        self.driver = fc.FirecrackerDriver(
            self.image, firecracker=str(firecracker), jailer=str(jailer)
        )
        config = parse_config(
            f"version: 1\ncontrol: {{boot_timeout: {BOOT_TIMEOUT}}}\n"
            "roles:\n  worker:\n    pool: {min_idle: 2, max_active: 2}\n"
            "    harness: {command: ['true']}\n",  # no model server here
            path=tmp_path / "swarm.yaml",
        )
        self.network = Network(
            instance=secrets.token_hex(3),
            subnet=IPv4Network(f"10.252.{secrets.randbelow(200) + 20}.0/24"),
            egress=False,
        )
        self.rt = Runtime(
            driver=self.driver,
            store=Store.open(tmp_path / "db"),
            state_dir=tmp_path,
            control=config.control,
            stop=config.stop,
            isolate_net=True,
            use_cgroups=False,  # the fake jailer places the VMM in no cgroup
            network=self.network,
            disks_dir=tmp_path / "disks",
            base_disk=self.image.rootfs,
        )
        self.templates = Templates(self.rt, self.driver, tmp_path / "templates")
        self.rt.templates = self.templates
        self.role = config.roles["worker"]
        self.group = RoleGroup(self.role, self.rt, max_attempts=3, scale=None)

    def api_calls(self) -> list[Exchange]:
        return read_log(self.logs / "api.jsonl")

    def idle(self) -> list[fc.FirecrackerVm]:
        vms = []
        for child in self.group.children.values():
            if child.state is State.IDLE and isinstance(child.handle, fc.FirecrackerVm):
                vms.append(child.handle)
        return vms

    async def wait_idle(self, count: int) -> list[fc.FirecrackerVm]:
        while len(self.idle()) < count:
            await self.group.wait_changed()
        return self.idle()


@pytest.fixture
async def pool(tmp_path: Path) -> AsyncIterator[Pool]:
    made = Pool(tmp_path)
    await made.network.open()
    try:
        yield made
    finally:
        with trio.CancelScope(shield=True), trio.fail_after(DEADLINE):
            await made.network.close()


def our_processes(tmp_path: Path) -> list[int]:
    """Processes whose command line names a path of this test (fakes, guest daemons)."""
    found = []
    for proc in psutil.process_iter(["cmdline"]):
        if any(str(tmp_path) in arg for arg in proc.info["cmdline"] or []):
            found.append(proc.pid)
    return found


def calls(exchanges: list[Exchange]) -> list[str]:
    return [f"{e.method} {e.path}" for e in exchanges]


def write_at(path: Path, offset: int, data: bytes) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(data)


def read_at(path: Path, offset: int, size: int) -> bytes:
    with open(path, "rb") as f:
        f.seek(offset)
        return f.read(size)


async def test_the_pool_makes_a_template_and_restores_clones_each_on_its_own_raw_disk_contract(
    pool: Pool,
) -> None:
    tmp_path = pool.tmp_path
    async with trio.open_nursery() as nursery:
        await nursery.start(pool.templates.run, {pool.templates.key_for(pool.role)})
        await nursery.start(pool.group.run)
        with trio.fail_after(DEADLINE):
            first, second = await pool.wait_idle(2)

        # --- a template was made: booted, paused, snapshotted; then two restores ----
        seen = pool.api_calls()
        refused = [(e.method, e.path, e.fault) for e in seen if e.status >= 400]
        assert refused == []
        made = calls(seen)
        assert made.count("PUT /actions") >= 1 and made.count("PUT /snapshot/create") == 1
        assert made.count("PUT /snapshot/load") == 2
        boot_drive = next(e for e in seen if e.path == "/drives/rootfs")
        # The template ran on a raw disk of its own, writable, at the jail's DISK.
        assert boot_drive.body["path_on_host"] == jail_files.DISK
        assert boot_drive.body["is_read_only"] is False
        (template,) = [p for p in (tmp_path / "templates").iterdir() if p.suffix == ".raw"]
        assert pool.driver.describe().disk is DiskFormat.RAW_COPY

        # --- each clone: its own jail, its own raw disk at the same relative path ---
        assert first.jail.root != second.jail.root
        clone_disks = [vm.jail.inside(jail_files.DISK) for vm in (first, second)]
        rows = {r.vm_id: r for r in pool.rt.store.vms()}
        for vm, disk in zip((first, second), clone_disks, strict=True):
            assert vm.restored_from is not None
            assert disk.is_file()
            own = rows[vm.jail.vm_id].disk
            assert own is not None and own.endswith(".raw")
            # The jail's disk IS the pool's disk for the VM (a link, not a copy)...
            assert os.stat(own).st_ino == disk.stat().st_ino
            assert os.stat(own).st_uid == vm.jail.uid  # ...and the jailed VMM's own
            # ...a copy of the template's as it was at the snapshot (what its guest
            # wrote is there), holes kept: little more than its data.
            assert read_at(disk, GUEST_MARK_AT, len(GUEST_MARK)) == GUEST_MARK
            assert disk.stat().st_size == ROOTFS_BYTES
            assert disk.stat().st_blocks * 512 <= (len(ROOT_DATA_AT) + 1) * MIB
            assert read_at(disk, 40 * MIB, 4) == b"RRRR"
        assert len({d.stat().st_ino for d in (*clone_disks, template)}) == 3

        # --- the disks are distinct files: a write to one is not seen in the other ---
        write_at(clone_disks[0], 40 * MIB, b"only in the first clone")
        assert read_at(clone_disks[1], 40 * MIB, 4) == b"RRRR"
        assert read_at(template, 40 * MIB, 4) == b"RRRR"
        assert read_at(pool.image.rootfs, 40 * MIB, 4) == b"RRRR"
        # The image itself was never written, by the template or a clone.
        assert read_at(pool.image.rootfs, GUEST_MARK_AT, len(GUEST_MARK)) == bytes(len(GUEST_MARK))

        # --- the clones' guests serve the pool: a run is claimed and answered -------
        with trio.fail_after(DEADLINE):
            events = [e async for e in run_command(pool.group, ["sh", "-c", "echo from-a-clone"])]
        assert isinstance(events[0], RunStarted)
        out = b"".join(e.data for e in events if isinstance(e, RunOutput))
        assert (out, events[-1]) == (b"from-a-clone\n", RunExited(code=0))
        nursery.cancel_scope.cancel()

    # --- after the VMs stop nothing of them is left ----------------------------------
    assert our_processes(tmp_path) == []
    run = tmp_path / "logs" / "run"
    assert not run.exists() or list(run.iterdir()) == []  # no jail, no API socket
    assert list((tmp_path / "disks").iterdir()) == []  # no VM's disk
    assert pool.rt.store.vms() == []
    vm_ids = {r.vm_id for r in rows.values()}
    assert not {netns.PREFIX + v for v in vm_ids} & set(netns.leftovers())
    assert template.is_file()  # the template outlives its clones


def clone_spec(tmp_path: Path, name: str, disk: Path | None) -> VmSpec:
    return VmSpec(
        vm_id=f"inst1-{name}-a1b2c3",
        name=name,
        role="worker",
        vcpus=1,
        memory_mib=256,
        control_url=f"ws://{GATEWAY}:{CONTROL_PORT}/",
        token="secret-token-of-the-template",
        netns=None,
        cgroup=None,
        log_path=tmp_path / "logs" / f"{name}.log",
        tap="tap0",
        disk=disk,
    )


async def test_each_clone_finds_its_own_disk_where_the_snapshot_names_it_contract(
    tmp_path: Path,
) -> None:
    """The driver alone, against the spec-checking FAKE firecracker: the snapshot
    records the template's disk as ``disk.raw`` in its jail, and a load is only
    taken where a disk is at that path in the clone's own jail, its own file."""
    logs = tmp_path / "fake-log"
    logs.mkdir()
    firecracker, jailer = write_fakes(tmp_path / "bin", logs)
    image = fake_image(tmp_path / "image")
    driver = fc.FirecrackerDriver(image, firecracker=str(firecracker), jailer=str(jailer))
    own = tmp_path / "disks"
    snapshot = tmp_path / "templates" / "worker.snap"
    snapshot.parent.mkdir()
    template_disk = own / "template.raw"
    await disks.create_disk(template_disk, image.rootfs, DiskFormat.RAW_COPY, from_template=False)
    with trio.fail_after(DEADLINE):
        template = await driver.start(clone_spec(tmp_path, "template", template_disk))
        try:
            await template.snapshot(snapshot)
        finally:
            await template.kill()
    clones = []
    try:
        for name in ("worker-0", "worker-1"):
            disk = await disks.create_disk(
                own / f"{name}.raw", template_disk, DiskFormat.RAW_COPY, from_template=True
            )
            with trio.fail_after(DEADLINE):
                clones.append(await driver.restore(clone_spec(tmp_path, name, disk), snapshot))
        seen = read_log(logs / "api.jsonl")
        assert [(e.path, e.status) for e in seen if e.path == "/snapshot/load"] == [
            ("/snapshot/load", 204),
            ("/snapshot/load", 204),
        ]
        inside = [c.jail.inside(jail_files.DISK) for c in clones]
        assert inside[0].parent != inside[1].parent  # a jail each...
        assert [p.relative_to(c.jail.root) for p, c in zip(inside, clones, strict=True)] == [
            Path(jail_files.DISK),
            Path(jail_files.DISK),
        ]  # ...the same relative path in each...
        assert [p.stat().st_ino for p in inside] == [
            (own / "worker-0.raw").stat().st_ino,
            (own / "worker-1.raw").stat().st_ino,
        ]  # ...and behind it the clone's own file
    finally:
        with trio.fail_after(DEADLINE):
            for clone in clones:
                await clone.kill()
    assert not any(c.jail.directory.exists() for c in clones)


async def test_a_clone_whose_disk_is_elsewhere_in_its_jail_is_refused_contract(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A snapshot cannot rename a disk: a clone jailed with its disk at another
    path than the template had is refused by the spec-checking FAKE at load."""
    logs = tmp_path / "fake-log"
    logs.mkdir()
    firecracker, jailer = write_fakes(tmp_path / "bin", logs)
    image = fake_image(tmp_path / "image")
    driver = fc.FirecrackerDriver(image, firecracker=str(firecracker), jailer=str(jailer))
    snapshot = tmp_path / "templates" / "worker.snap"
    snapshot.parent.mkdir()
    template_disk = tmp_path / "disks" / "template.raw"
    await disks.create_disk(template_disk, image.rootfs, DiskFormat.RAW_COPY, from_template=False)
    with trio.fail_after(DEADLINE):
        template = await driver.start(clone_spec(tmp_path, "template", template_disk))
        try:
            await template.snapshot(snapshot)
        finally:
            await template.kill()
    disk = tmp_path / "disks" / "worker-0.raw"
    await disks.create_disk(disk, template_disk, DiskFormat.RAW_COPY, from_template=True)
    monkeypatch.setattr(jail_files, "DISK", "elsewhere.raw")
    spec = clone_spec(tmp_path, "worker-0", disk)
    with trio.fail_after(DEADLINE), pytest.raises(DriverError) as caught:
        await driver.restore(spec, snapshot)
    assert str(caught.value) == (
        "worker-0: restore: HTTP 400: snapshot/load: drive rootfs: disk.raw:"
        " no such file (in the jail)"
    )
    assert not driver.jail_for(spec).directory.exists()


async def test_a_killed_supervisors_clone_disk_and_jail_are_reclaimed_contract(
    tmp_path: Path,
) -> None:
    """A supervisor killed with SIGKILL leaves a VM's raw disk in the state dir's
    disks/ and its jail (holding a link to it) in its run directory: the next
    start's reclaim (``leftovers``) finds and removes both, as it does overlays."""
    logs = tmp_path / "fake-log"
    logs.mkdir()
    firecracker, jailer = write_fakes(tmp_path / "bin", logs)
    image = fake_image(tmp_path / "image")
    driver = fc.FirecrackerDriver(image, firecracker=str(firecracker), jailer=str(jailer))
    disk = tmp_path / leftovers.DISKS_NAME / "inst1-worker-0-a1b2c3.raw"
    await disks.create_disk(disk, image.rootfs, DiskFormat.RAW_COPY, from_template=False)
    spec = clone_spec(tmp_path, "worker-0", disk)
    with trio.fail_after(DEADLINE):
        vm = await driver.start(spec)
    try:
        # Nobody stops it: the supervisor is gone, its VMM and files stay.
        found = await trio.to_thread.run_sync(leftovers.find, tmp_path)
        assert found.disks == [disk]
        assert found.run_dirs == [tmp_path / "logs" / "run" / spec.vm_id]
        removed = await trio.to_thread.run_sync(leftovers.remove, found)
        assert sorted(r.item for r in removed if r.error is None) == sorted(
            [f"disk {disk}", f"run dir {found.run_dirs[0]}"]
        )
        assert not disk.exists() and not vm.jail.directory.exists()
    finally:
        with trio.fail_after(DEADLINE):
            await vm.kill()  # (gc kills the VMM by its registry row, not kept here)


def test_auto_picks_firecracker_first_where_its_host_checks_pass_fake(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With the FAKE firecracker and jailer on PATH (root, KVM device present),
    ``auto`` picks firecracker before qemu; a configured one is taken as is.
    Whether KVM boots the guest is the boot probe's, when it is made ready."""
    if not os.access("/dev/kvm", os.R_OK | os.W_OK):
        pytest.skip("needs /dev/kvm, so that only the binaries decide")
    write_fakes(tmp_path / "bin", tmp_path / "logs")  # found on PATH, never run here
    monkeypatch.setenv("PATH", f"{tmp_path / 'bin'}:{os.environ['PATH']}")
    auto = choose("auto", images=tmp_path, netns_why=None)
    assert auto == Choice(
        "firecracker",
        "auto: firecracker (firecracker and jailer found, KVM, root, network namespaces)",
        auto=True,
    )
    assert choose("firecracker", images=tmp_path, netns_why=None) == Choice(
        "firecracker", "firecracker (configured)", auto=False
    )
    no_netns = choose("auto", images=tmp_path, netns_why="unshare: not permitted")
    assert no_netns.name != "firecracker"


def test_auto_passes_over_firecracker_where_it_is_not_installed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """As on these machines: no firecracker binary, so auto picks qemu (or process)
    and a configured firecracker is refused in the driver's one line."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for tool in ("qemu-system-x86_64", "qemu-img", "nft"):
        found = shutil.which(tool)
        if found is not None:
            (bin_dir / tool).symlink_to(found)
    monkeypatch.setenv("PATH", str(bin_dir))
    auto = choose("auto", images=tmp_path, netns_why=None)
    assert auto.name in ("qemu", "process") and "firecracker" not in auto.reason
    from fireclaw.pool.drivers import BackendUnavailable

    with pytest.raises(BackendUnavailable) as caught:
        choose("firecracker", images=tmp_path, netns_why=None)
    assert str(caught.value) == "firecracker cannot run here: firecracker is not installed"


async def test_a_configured_firecracker_whose_kvm_cannot_boot_the_guest_is_refused_fake(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Found (the FAKE binaries) but its image is not one Firecracker boots: a
    configured firecracker is refused in the driver's one line, auto falls back."""
    if not os.access("/dev/kvm", os.R_OK | os.W_OK):
        pytest.skip("needs /dev/kvm, so that only the image decides")
    from fireclaw.pool.drivers import BackendUnavailable, firecracker_host

    write_fakes(tmp_path / "bin", tmp_path / "logs")
    monkeypatch.setenv("PATH", f"{tmp_path / 'bin'}:{os.environ['PATH']}")
    image = fake_image(tmp_path / "image")
    (image.directory / "manifest.json").write_text(json.dumps({"modules": ["virtio_mmio.ko"]}))

    def built(*args: object, **kwargs: object) -> Image:  # FAKE build: the image above
        return image

    monkeypatch.setattr(firecracker_host, "build_image", built)
    configured = choose("firecracker", images=tmp_path, netns_why=None)
    with trio.fail_after(DEADLINE), pytest.raises(BackendUnavailable) as caught:
        await open_backend(configured, images=tmp_path, netns_why=None, progress=print)
    assert str(caught.value) == (
        "firecracker cannot run here: the image's kernel has virtio_mmio as a module;"
        " Firecracker needs it built in with CONFIG_VIRTIO_MMIO_CMDLINE_DEVICES=y"
    )
