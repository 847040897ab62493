"""The firecracker driver, checked by contract against Firecracker's API spec (v1.16.1).

No Firecracker runs here (it is not installable on these machines, and their
KVM boots no stock guest kernel). Every request the driver sends goes to a
FAKE ``firecracker`` (tests/firecracker_fake.py, started by a FAKE
``jailer``) that serves ``tests/firecracker_spec.SpecChecker``: method, path
and body checked against the spec's schemas, calls checked against
Firecracker's order rules, answered as the spec says. The checker is shown
to fail on requests that break the spec, made on purpose.
"""

from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import msgspec
import pytest
import trio
import trio.testing
from fireclaw.pool.drivers import (
    BackendUnavailable,
    Choice,
    DriverError,
    Running,
    VmSpec,
    choose,
    open_backend,
)
from fireclaw.pool.drivers import firecracker as fc
from fireclaw.pool.drivers import firecracker_api as api
from fireclaw.pool.drivers.base import VmmCommandError
from fireclaw.pool.drivers.firecracker_host import why_image_unfit
from fireclaw.pool.drivers.firecracker_http import ApiClient, connect, exchange
from fireclaw.pool.drivers.firecracker_jail import (
    JAIL_GID,
    UID_BASE,
    Jail,
    hand_tap,
    jailer_argv,
    uid_for,
)
from fireclaw.pool.image import BASE_CMDLINE, Image
from fireclaw.pool.network import GATEWAY
from fireclaw.pool.procid import process_identity
from fireclaw.supervisor import leftovers

sys.path.insert(0, str(Path(__file__).parent))
from firecracker_fake import write_fakes  # noqa: E402
from firecracker_spec import SPEC_PATH, Exchange, SpecChecker, load_spec, read_log  # noqa: E402
from test_doctor_irc import doctor  # noqa: E402

needs_spec = pytest.mark.skipif(
    not SPEC_PATH.exists(), reason=f"Firecracker's API spec is not at {SPEC_PATH}"
)
#: Two Python starts (fake jailer, fake firecracker) and a YAML load before the first
#: answer: on a loaded machine, well past the driver's own start-up timeout.
DEADLINE = fc.STARTUP_TIMEOUT * 6
CLI_DEADLINE = 60.0  # seconds; a program run here takes well under one


@pytest.fixture
def image(tmp_path: Path) -> Image:
    folder = tmp_path / "image"
    folder.mkdir()
    for name in ("vmlinux", "initramfs.cpio.gz", "rootfs.ext4"):
        (folder / name).write_bytes(b"not a real " + name.encode())
        (folder / name).chmod(0o644)
    (folder / "manifest.json").write_text(json.dumps({"modules": []}))
    return Image(
        key="f" * 64,
        directory=folder,
        vmlinux=folder / "vmlinux",
        initramfs=folder / "initramfs.cpio.gz",
        rootfs=folder / "rootfs.ext4",
        kernel_release="6.1.0-firecracker",
        cmdline=BASE_CMDLINE,
    )


@pytest.fixture
def logs(tmp_path: Path) -> Path:
    folder = tmp_path / "fake-log"
    folder.mkdir()
    return folder


@pytest.fixture
def driver(tmp_path: Path, image: Image, logs: Path) -> fc.FirecrackerDriver:
    firecracker, jailer = write_fakes(tmp_path / "bin", logs)
    return fc.FirecrackerDriver(image, firecracker=str(firecracker), jailer=str(jailer))


def vm_spec(tmp_path: Path, name: str = "worker-0", tap: str = "tap0") -> VmSpec:
    return VmSpec(
        vm_id=f"inst1-{name}-a1b2c3",
        name=name,
        role="worker",
        vcpus=2,
        memory_mib=256,
        control_url=f"ws://{GATEWAY}:7000/",
        token="secret-token",
        netns=None,
        cgroup=None,
        log_path=tmp_path / "logs" / f"{name}.log",
        tap=tap,
    )


def answered(logs: Path) -> list[Exchange]:
    return read_log(logs / "api.jsonl")


def calls(exchanges: list[Exchange]) -> list[str]:
    return [f"{e.method} {e.path}" for e in exchanges]


def assert_all_accepted(exchanges: list[Exchange]) -> None:
    refused = [(e.method, e.path, e.fault) for e in exchanges if e.status >= 400]
    assert refused == []


# --- the driver's requests, checked by the spec-checking fake -----------------------------


@needs_spec
async def test_boot_sequence_passes_the_spec_checker_contract(
    tmp_path: Path, driver: fc.FirecrackerDriver, logs: Path
) -> None:
    spec = vm_spec(tmp_path)
    with trio.fail_after(DEADLINE):
        vm = await driver.start(spec)
    try:
        seen = answered(logs)
        assert_all_accepted(seen)
        assert calls(seen) == [
            "PUT /machine-config",
            "PUT /boot-source",
            "PUT /drives/rootfs",
            "PUT /network-interfaces/eth0",
            "PUT /entropy",
            "PUT /mmds/config",
            "PUT /mmds",
            "PUT /actions",
        ]
        boot = seen[1].body
        # The files are named inside the jail, where the checker found them.
        assert (boot["kernel_image_path"], boot["initrd_path"]) == ("vmlinux", "initramfs.cpio.gz")
        assert f"fireclaw.url=ws://{GATEWAY}:7000/" in boot["boot_args"]
        assert f"fireclaw.vm_id={spec.vm_id}" in boot["boot_args"]
        assert seen[2].body["is_read_only"] is True  # the image's root, shared
        assert seen[3].body == {"iface_id": "eth0", "host_dev_name": "tap0"}
        assert seen[6].body == {
            "fireclaw": {"vm_id": spec.vm_id, "name": "worker-0", "role": "worker"}
        }
        assert "secret-token" not in json.dumps(seen[6].body)  # MMDS is readable by any guest user
        jailer = json.loads((logs / "jailer.json").read_text())
        assert jailer["problems"] == []
        assert jailer["options"]["id"] == [spec.vm_id]
        assert jailer["options"]["uid"] == [str(uid_for(spec.vm_id))]
        assert jailer["options"]["gid"] == [str(JAIL_GID)]
        assert jailer["rest"] == ["--api-sock", "/run/firecracker.socket", "--level", "Warning"]
        # Too long for a socket address: reached through a descriptor of its folder.
        assert len(bytes(vm.client.socket_path)) > 107
        # The shared image files are hard links, not copies.
        assert vm.jail.inside("vmlinux").stat().st_ino == driver.image.vmlinux.stat().st_ino
    finally:
        with trio.fail_after(DEADLINE):
            await vm.kill()
    assert not vm.jail.directory.exists()
    assert list((tmp_path / "logs" / "run").iterdir()) == []  # the VM's run dir too


@needs_spec
async def test_a_jail_left_by_a_killed_supervisor_is_found_and_removed_by_gc(
    tmp_path: Path, driver: fc.FirecrackerDriver
) -> None:
    spec = vm_spec(tmp_path)  # the state dir is tmp_path: the log dir is its logs/
    with trio.fail_after(DEADLINE):
        vm = await driver.start(spec)
    try:
        # The supervisor is gone (not asked to stop it): the VMM runs on, its jail stays.
        found = await trio.to_thread.run_sync(leftovers.find, tmp_path)
        assert found.run_dirs == [tmp_path / "logs" / "run" / spec.vm_id]
        # (gc kills the VMM by its registry row, not kept here: it is killed below.)
        removed = await trio.to_thread.run_sync(leftovers.remove, found)
        assert [(r.item, r.error) for r in removed] == [(f"run dir {found.run_dirs[0]}", None)]
        assert not vm.jail.directory.exists()
    finally:
        with trio.fail_after(DEADLINE):
            await vm.kill()


@needs_spec
async def test_snapshot_create_and_restore_with_network_overrides_pass_the_spec_checker_contract(
    tmp_path: Path, driver: fc.FirecrackerDriver, logs: Path
) -> None:
    template = vm_spec(tmp_path, "tpl")
    snapshot = tmp_path / "snapshots" / "worker"
    snapshot.parent.mkdir()
    with trio.fail_after(DEADLINE):
        vm = await driver.start(template)
        try:
            taken_snapshot = await vm.snapshot(snapshot)
        finally:
            await vm.kill()
    assert taken_snapshot.path == snapshot
    assert taken_snapshot.size == snapshot.stat().st_size + 4096  # the fake's memory file
    taken = answered(logs)
    assert_all_accepted(taken)
    assert calls(taken)[-2:] == ["PATCH /vm", "PUT /snapshot/create"]
    assert taken[-2].body == {"state": "Paused"}
    for path in (snapshot, snapshot.with_name("worker.mem")):
        st = path.stat()
        assert (stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid) == (0o640, 0, JAIL_GID)
    info = json.loads(snapshot.with_name("worker.json").read_text())
    assert (info["memory_mib"], info["vcpus"], info["tap"]) == (256, 2, "tap0")
    assert not vm.jail.directory.exists()

    (logs / "api.jsonl").unlink()
    clone_spec = vm_spec(tmp_path, "worker-1", tap="tap7")
    with trio.fail_after(DEADLINE):
        clone = await driver.restore(clone_spec, snapshot)
    try:
        restored = answered(logs)
        assert_all_accepted(restored)
        assert calls(restored) == ["PUT /snapshot/load", "PUT /mmds", "PATCH /vm"]
        load = restored[0].body
        assert load["network_overrides"] == [{"iface_id": "eth0", "host_dev_name": "tap7"}]
        assert load["mem_backend"] == {"backend_type": "File", "backend_path": "snapshot/mem"}
        assert restored[1].body["fireclaw"]["name"] == "worker-1"  # the clone's own identity
        assert restored[2].body == {"state": "Resumed"}
        assert clone.restored_from == snapshot
        assert clone.jail.root != vm.jail.root
    finally:
        with trio.fail_after(DEADLINE):
            await clone.kill()
    assert snapshot.exists()  # the template's snapshot outlives its clones


async def test_a_firecracker_that_never_answers_is_killed_at_the_startup_timeout(
    tmp_path: Path, image: Image, logs: Path, autojump_clock: trio.testing.MockClock
) -> None:
    _, jailer = write_fakes(tmp_path / "bin", logs)
    hung = tmp_path / "hung" / "firecracker"  # binds no API socket, ever
    hung.parent.mkdir()
    hung.write_text("#!/bin/sh\nexec sleep 3600\n")
    hung.chmod(0o755)
    driver = fc.FirecrackerDriver(image, firecracker=str(hung), jailer=str(jailer))
    spec = vm_spec(tmp_path)
    started = trio.current_time()
    with pytest.raises(DriverError) as caught:
        await driver.start(spec)
    assert str(caught.value) == "worker-0: Firecracker did not answer within 10s"
    assert trio.current_time() - started == fc.STARTUP_TIMEOUT
    assert not driver.jail_for(spec).directory.exists()
    # Whether the fake jailer got as far as writing its record before the kill is
    # up to the machine's load (the clock jumps while it starts): its arguments are
    # checked by the boot tests, where it runs to the end.


async def test_a_vmm_that_exits_at_start_is_reported_at_once(tmp_path: Path, image: Image) -> None:
    failing = tmp_path / "bin" / "jailer"  # a jailer that refuses, as on a bad option
    failing.parent.mkdir()
    failing.write_text("#!/bin/sh\necho 'jailer: cannot create the chroot' >&2\nexit 3\n")
    failing.chmod(0o755)
    driver = fc.FirecrackerDriver(
        image, firecracker="/nonexistent/firecracker", jailer=str(failing)
    )
    spec = vm_spec(tmp_path)
    with trio.fail_after(DEADLINE), pytest.raises(DriverError) as caught:
        await driver.start(spec)
    assert str(caught.value) == (
        f"worker-0: start: Firecracker exited with code 3 (its log: {spec.log_path})"
    )
    assert "cannot create the chroot" in spec.log_path.read_text()
    assert not driver.jail_for(spec).directory.exists()


@needs_spec
async def test_a_refused_snapshot_leaves_no_files_and_the_vm_running_contract(
    tmp_path: Path, driver: fc.FirecrackerDriver, logs: Path
) -> None:
    (logs / "inject-fault").write_text("/snapshot/create")
    snapshot = tmp_path / "worker"
    with trio.fail_after(DEADLINE):
        vm = await driver.start(vm_spec(tmp_path))
        try:
            with pytest.raises(VmmCommandError, match="snapshot: HTTP 400: Internal error"):
                await vm.snapshot(snapshot)
        finally:
            await vm.kill()
    seen = answered(logs)
    assert calls(seen)[-3:] == ["PATCH /vm", "PUT /snapshot/create", "PATCH /vm"]
    assert (seen[-3].body, seen[-1].body) == ({"state": "Paused"}, {"state": "Resumed"})
    assert not snapshot.exists() and not snapshot.with_name("worker.mem").exists()
    assert not snapshot.with_name("worker.json").exists()


@needs_spec
async def test_stop_and_adopt_speak_the_spec_contract(
    tmp_path: Path, driver: fc.FirecrackerDriver, logs: Path
) -> None:
    spec = vm_spec(tmp_path)
    with trio.fail_after(DEADLINE):
        vm = await driver.start(spec)
        ident = process_identity(vm.pid)
        assert ident is not None
        running = Running(
            pid=ident.pid,
            start_time=ident.start_time,
            boot_id=ident.boot_id,
            control_socket=vm.client.socket_path,
        )
        adopted = await driver.adopt(spec, running)
        assert adopted.info()["adopted"] is True
        await adopted.ask_to_stop()
        assert await vm.wait() == 0  # the fake exits after Ctrl+Alt+Del, as Firecracker does
        assert await adopted.wait() is None  # not our child: its status is unknowable
    seen = answered(logs)
    assert_all_accepted(seen)
    assert calls(seen)[-2:] == ["GET /", "PUT /actions"]
    assert not vm.jail.directory.exists()


@needs_spec
async def test_a_refused_start_kills_the_vmm_and_leaves_no_jail_contract(
    tmp_path: Path, driver: fc.FirecrackerDriver, logs: Path
) -> None:
    spec = vm_spec(tmp_path)
    (logs / "inject-fault").write_text("/network-interfaces/eth0")
    jail = driver.jail_for(spec)
    with trio.fail_after(DEADLINE), pytest.raises(DriverError) as caught:
        await driver.start(spec)
    assert str(caught.value) == (
        "worker-0: start: HTTP 400: Internal error (injected by the test) second line"
    )
    assert calls(answered(logs))[-1] == "PUT /network-interfaces/eth0"
    assert not jail.directory.exists()


async def test_a_spec_firecracker_refuses_is_not_sent(
    tmp_path: Path, driver: fc.FirecrackerDriver, logs: Path
) -> None:
    spec = VmSpec(**{**vm_spec(tmp_path).__dict__, "vcpus": 64})
    with pytest.raises(DriverError, match=r"machine-config: .*<= 32 - at `\$.vcpu_count`"):
        await driver.start(spec)
    assert not (logs / "jailer.json").exists()


# --- the checker catches what breaks the spec --------------------------------------------


@needs_spec
async def test_spec_checker_catches_a_wrong_field_contract(
    tmp_path: Path, driver: fc.FirecrackerDriver, logs: Path
) -> None:
    spec = vm_spec(tmp_path)
    with trio.fail_after(DEADLINE):
        vm = await driver.start(spec)
        try:
            raw = ApiClient(vm.client.socket_path, api.Phase.RUNNING)
            wrong = b'{"network_interfaces": ["eth0"], "ipv4_addr": "169.254.169.254"}'
            bad = api.Request("PUT", "/mmds/config", wrong, api.Kind.METADATA)
            with pytest.raises(api.ApiFault) as caught:
                await raw.call(bad)
        finally:
            await vm.kill()
    assert caught.value.status == 400
    assert caught.value.message == "body: unknown field 'ipv4_addr'"
    assert answered(logs)[-1].status == 400


@needs_spec
async def test_spec_checker_catches_calls_out_of_order_contract(
    tmp_path: Path, driver: fc.FirecrackerDriver, logs: Path
) -> None:
    spec = vm_spec(tmp_path)
    with trio.fail_after(DEADLINE):
        vm = await driver.start(spec)
        try:
            # Sent past the driver's own order table, straight onto the socket.
            for request in (
                api.instance_start(),
                api.resume(),
                api.snapshot_create(
                    api.SnapshotCreateParams(snapshot_path="snapshot/s", mem_file_path="snapshot/m")
                ),
                api.boot_source(api.BootSource(kernel_image_path="vmlinux")),
            ):
                stream = await connect(vm.client.socket_path)
                async with stream:
                    status, body = await exchange(stream, request)
                assert status == 400, request.path
                assert api.fault_message(status, body)
        finally:
            await vm.kill()
    faults = [e.fault for e in answered(logs)[-4:]]
    assert "already running" in faults[0]
    assert "Resumed" in faults[1]
    assert "paused" in faults[2]
    assert "pre-boot only" in faults[3]


@needs_spec
def test_spec_checker_refuses_a_load_after_configuration_and_bad_bodies_contract() -> None:
    checker = SpecChecker(load_spec())
    load = api.snapshot_load(
        api.SnapshotLoadParams(
            snapshot_path="s", mem_backend=api.MemoryBackend(backend_type="File", backend_path="m")
        )
    )
    assert checker.handle("PUT", "/entropy", b"{}")[0] == 204
    status, body = checker.handle(load.method, load.path, load.body)
    assert status == 400 and b"after configuring" in body
    for method, path, raw, why in (
        ("PUT", "/machine-config", b'{"vcpu_count": 2, "mem_size_mib": "256"}', "integer"),
        ("PUT", "/machine-config", b'{"vcpu_count": 64, "mem_size_mib": 256}', "maximum"),
        ("PUT", "/actions", b'{"action_type": "Reboot"}', "not one of"),
        (
            "PUT",
            "/drives/root",
            b'{"drive_id": "other", "is_root_device": false}',
            "does not match",
        ),
        ("PUT", "/boot-source", b'{"boot_args": "x"}', "kernel_image_path"),
        ("PUT", "/boot-source", b'{"kernel_image_path": "k", "kernel_args": "x"}', "kernel_args"),
        ("PUT", "/mmds/config", b'{"network_interfaces": "eth0"}', "expected array"),
        ("POST", "/actions", b"{}", "method"),
        ("PUT", "/nothing", b"{}", "invalid path"),
    ):
        status, answer = checker.handle(method, path, raw)
        assert status == 400, (path, raw)
        assert why in json.loads(answer)["fault_message"], (path, raw)


@needs_spec
def test_every_request_the_api_builds_matches_the_spec_contract() -> None:
    checker = SpecChecker(load_spec())
    drive = api.Drive(
        drive_id="root",
        is_root_device=True,
        path_on_host="r",
        is_read_only=False,
        cache_type="Writeback",
        io_engine="Async",
    )
    built = [
        api.boot_source(api.BootSource(kernel_image_path="k", boot_args="a", initrd_path="i")),
        api.drive(drive),
        api.network_interface(
            api.NetworkInterface(
                iface_id="eth0", host_dev_name="tap0", guest_mac="06:00:00:00:00:01", mtu=1500
            )
        ),
        api.machine_config(
            api.MachineConfiguration(
                vcpu_count=2, mem_size_mib=256, smt=False, track_dirty_pages=True
            )
        ),
        api.entropy(api.EntropyDevice()),
        api.mmds_config(
            api.MmdsConfig(
                network_interfaces=("eth0",), version="V2", ipv4_address="169.254.169.254"
            )
        ),
        api.mmds({"any": {"thing": [1, 2]}}),
        api.instance_start(),
        api.send_ctrl_alt_del(),
        api.pause(),
        api.resume(),
        api.snapshot_create(
            api.SnapshotCreateParams(snapshot_path="s", mem_file_path="m", snapshot_type="Full")
        ),
        api.snapshot_load(
            api.SnapshotLoadParams(
                snapshot_path="s",
                mem_backend=api.MemoryBackend(backend_type="File", backend_path="m"),
                resume_vm=True,
                network_overrides=(api.NetworkOverride(iface_id="eth0", host_dev_name="t"),),
            )
        ),
        api.describe(),
    ]
    for request in built:
        checker.check_request(request.method, request.path, request.body)


# --- the order table and the answers, without sockets ------------------------------------


def test_order_table_refuses_calls_before_they_are_sent() -> None:
    fresh = api.FirecrackerApi()
    with pytest.raises(api.OutOfOrder, match="before a boot source"):
        fresh.prepare(api.instance_start())
    fresh.prepare(api.entropy(api.EntropyDevice()))
    fresh.receive(204, b"")
    with pytest.raises(api.OutOfOrder, match="configuring"):
        fresh.prepare(
            api.snapshot_load(
                api.SnapshotLoadParams(
                    snapshot_path="s",
                    mem_backend=api.MemoryBackend(backend_type="File", backend_path="m"),
                )
            )
        )
    fresh.prepare(api.boot_source(api.BootSource(kernel_image_path="k")))
    with pytest.raises(api.OutOfOrder, match="unanswered"):
        fresh.prepare(api.instance_start())
    fresh.receive(204, b"")
    fresh.prepare(api.instance_start())
    fresh.receive(204, b"")
    assert (fresh.phase, fresh.booted_from) == (api.Phase.RUNNING, "boot source")
    for refused in (api.instance_start(), api.resume(), api.entropy(api.EntropyDevice())):
        with pytest.raises(api.OutOfOrder):
            fresh.prepare(refused)
    create = api.snapshot_create(api.SnapshotCreateParams(snapshot_path="s", mem_file_path="m"))
    with pytest.raises(api.OutOfOrder, match="running"):
        fresh.prepare(create)
    fresh.prepare(api.pause())
    fresh.receive(204, b"")
    fresh.prepare(create)
    fresh.receive(204, b"")
    assert fresh.phase is api.Phase.PAUSED


def test_a_fault_is_one_line_and_leaves_the_phase() -> None:
    calls_ = api.FirecrackerApi()
    calls_.prepare(api.boot_source(api.BootSource(kernel_image_path="k")))
    body = msgspec.json.encode(
        {"fault_message": "Boot source error:\nNo such file\r\n\0(os error 2)"}
    )
    with pytest.raises(api.ApiFault) as caught:
        calls_.receive(400, body)
    assert str(caught.value) == "HTTP 400: Boot source error: No such file (os error 2)"
    assert calls_.phase is api.Phase.FRESH
    calls_.prepare(api.boot_source(api.BootSource(kernel_image_path="k")))
    with pytest.raises(api.ApiFault, match="HTTP 500: <html>"):
        calls_.receive(500, b"<html>" + b"x" * 100_000)
    calls_.prepare(api.boot_source(api.BootSource(kernel_image_path="k")))
    with pytest.raises(api.ApiFault, match=r"no fault message \(HTTP 400\)"):
        calls_.receive(400, b'{"fault_message": ""}')
    with pytest.raises(api.ApiError, match="instance info"):
        api.instance_info(b'{"id": "x"}')


def test_bodies_refuse_what_the_spec_refuses() -> None:
    with pytest.raises(msgspec.ValidationError):
        msgspec.convert({"vcpu_count": 0, "mem_size_mib": 1}, api.MachineConfiguration)
    with pytest.raises(msgspec.ValidationError):
        msgspec.convert({"iface_id": "eth0/../x", "host_dev_name": "t"}, api.NetworkInterface)


# --- the jail, and where the backend is chosen --------------------------------------------


def test_jailer_argv_places_the_vmm_in_the_pools_cgroup(tmp_path: Path) -> None:
    spec = vm_spec(tmp_path)
    jail = Jail.for_spec(spec, tmp_path / "jail", "/usr/bin/firecracker")
    assert (
        jail.api_socket
        == tmp_path / "jail/firecracker" / spec.vm_id / "root/run/firecracker.socket"
    )
    assert UID_BASE <= jail.uid < UID_BASE + (1 << 24)
    assert uid_for(spec.vm_id) == jail.uid != uid_for("inst1-worker-1-a1b2c3")
    argv = jailer_argv(
        "jailer",
        "/usr/bin/firecracker",
        jail,
        netns="fc-ns-1",
        cgroup=Path(f"/sys/fs/cgroup/memory/fireclaw/{spec.vm_id}"),
        memory_mib=256,
    )
    text = " ".join(argv)
    assert "--netns /run/netns/fc-ns-1" in text or "--netns /var/run/netns/fc-ns-1" in text
    assert "--cgroup-version 1 --parent-cgroup fireclaw --cgroup memory.limit_in_bytes=" in text
    v2 = jailer_argv(
        "jailer",
        "fc",
        jail,
        netns=None,
        cgroup=Path(f"/sys/fs/cgroup/fireclaw/{spec.vm_id}"),
        memory_mib=256,
    )
    assert "--cgroup-version 2" in " ".join(v2) and "memory.max=" in " ".join(v2)
    with pytest.raises(DriverError, match="not named for the VM"):
        jailer_argv(
            "jailer", "fc", jail, netns=None, cgroup=Path("/sys/fs/cgroup/x/y"), memory_mib=1
        )
    bad = VmSpec(**{**vm_spec(tmp_path).__dict__, "vm_id": "has_underscore"})
    with pytest.raises(DriverError, match="not a jailer id"):
        Jail.for_spec(bad, tmp_path, "firecracker")


def test_an_image_with_virtio_mmio_as_a_module_is_unfit(image: Image) -> None:
    assert why_image_unfit(image) is None
    (image.directory / "manifest.json").write_text(json.dumps({"modules": ["virtio_mmio.ko"]}))
    why = why_image_unfit(image)
    assert why is not None and "CONFIG_VIRTIO_MMIO_CMDLINE_DEVICES=y" in why


def test_backend_firecracker_is_refused_in_one_line_without_the_binary(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    with pytest.raises(BackendUnavailable) as caught:
        choose("firecracker", images=tmp_path, netns_why=None)
    assert str(caught.value) == "firecracker cannot run here: firecracker is not installed"
    auto = choose("auto", images=tmp_path, netns_why=None)
    assert auto.name != "firecracker"


@pytest.mark.skipif(shutil.which("firecracker") is not None, reason="firecracker is installed")
def test_doctor_says_why_firecracker_cannot_run_here(tmp_path: Path) -> None:
    config = tmp_path / "swarm.yaml"
    config.write_text("version: 1\nbackend: firecracker\nroles: {}\n")
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:/usr/sbin:/usr/bin:/sbin:/bin"}
    done = doctor(config, env)
    assert done.returncode == 1, done.stdout + done.stderr
    lines = done.stdout.splitlines()
    assert "firecracker   no: firecracker is not installed" in lines
    assert (
        "problem       backend: firecracker cannot run here: firecracker is not installed" in lines
    )


@pytest.mark.root
@pytest.mark.skipif(os.geteuid() != 0, reason="needs root (a network namespace and a tap)")
def test_the_pools_tap_is_handed_to_the_jailed_uid(tmp_path: Path) -> None:
    ns = f"fctest-{os.getpid()}"
    subprocess.run(["ip", "netns", "add", ns], check=True, timeout=CLI_DEADLINE)
    try:
        subprocess.run(
            ["ip", "-n", ns, "tuntap", "add", "dev", "tap0", "mode", "tap"],
            check=True,
            timeout=CLI_DEADLINE,
        )
        uid = uid_for("inst1-worker-0-a1b2c3")
        hand_tap("tap0", ns, uid, JAIL_GID)
        owner = subprocess.run(
            ["ip", "netns", "exec", ns, "cat", "/sys/class/net/tap0/owner",
             "/sys/class/net/tap0/group"],
            capture_output=True, text=True, check=True, timeout=CLI_DEADLINE,
        )  # fmt: skip
        assert owner.stdout.split() == [str(uid), str(JAIL_GID)]
        with pytest.raises(OSError, match="no tap tap-missing-0"):
            hand_tap("tap-missing-0", ns, uid, JAIL_GID)  # and none is left made
        listed = subprocess.run(
            ["ip", "-n", ns, "-o", "link"], capture_output=True, text=True, timeout=CLI_DEADLINE
        )
        assert "tap-missing-0" not in listed.stdout
    finally:
        subprocess.run(["ip", "netns", "del", ns], check=False, timeout=CLI_DEADLINE)


async def test_a_firecracker_that_cannot_be_made_ready_falls_back_under_auto_only(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))  # no firecracker, no qemu
    picked = Choice("firecracker", "auto: firecracker (found, KVM, root)", auto=True)
    backend = await open_backend(picked, images=tmp_path, netns_why=None, progress=print)
    assert backend.driver.name == "process"
    assert backend.reason == (
        "auto: process (not firecracker: firecracker cannot run here: firecracker is not installed)"
    )
    configured = Choice("firecracker", "firecracker (configured)", auto=False)
    with pytest.raises(BackendUnavailable) as caught:
        await open_backend(configured, images=tmp_path, netns_why=None, progress=print)
    assert str(caught.value) == "firecracker cannot run here: firecracker is not installed"
