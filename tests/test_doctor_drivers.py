"""``fireclaw-swarm doctor`` on the VMM drivers: each one's own ``describe()``.

``describe_here`` makes every driver of this build as a start would, over the
guest image in the image cache, and asks it; what a start checks before it
makes a driver (programs, root, namespaces) comes first. The doctor prints one
row per driver from that, and a configured backend that cannot run is a
problem. Images here are fakes of a built one (``test_image_prune``): no VM is
booted, as the doctor boots none.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import msgspec
import pytest
from fireclaw.pool.accel import KVM_DEVICE, cache_key, installed_version
from fireclaw.pool.drivers import (
    ACCEL_CACHE,
    AVAILABLE,
    QEMU,
    Capability,
    DriverInfo,
    describe_here,
)
from fireclaw.pool.image import load_image
from fireclaw.supervisor.doctor import driver_line
from test_doctor_irc import doctor
from test_image_prune import fake_image

KEY = "d" * 64
NOT_BUILT = "its guest image is not built and probed here yet: a start does both"


def _kvm_usable() -> bool:
    return KVM_DEVICE.exists() and os.access(KVM_DEVICE, os.R_OK | os.W_OK)


def _by_name(infos: list[DriverInfo]) -> dict[str, DriverInfo]:
    return {info.name: info for info in infos}


def _settle_probe(images: Path, image_dir: Path, accel: str) -> None:
    """The boot probe's cache as a start leaves it after a conclusive probe."""
    image = load_image(image_dir)
    version = installed_version(QEMU)
    assert image is not None and version is not None
    entry = {"name": accel, "reason": f"kvm: settled by the test; using {accel}"}
    (images / ACCEL_CACHE).write_bytes(msgspec.json.encode({cache_key(image, version): entry}))


# --- what each driver says of itself ----------------------------------------------------


def test_every_driver_is_described_in_the_order_auto_tries_them(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With no program on PATH and no image: qemu and firecracker say which
    program is missing; qemu, not made, lacks everything until a start builds
    its image; the process driver runs and says what it lacks itself."""
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    infos = describe_here(tmp_path / "images", None)
    assert [info.name for info in infos] == list(AVAILABLE)
    found = _by_name(infos)
    assert found["firecracker"].unavailable == "firecracker is not installed"
    assert found["qemu"].unavailable == f"{QEMU} is not installed"
    assert found["qemu"].capabilities == frozenset()
    assert set(found["qemu"].lacking.values()) == {NOT_BUILT}
    process = found["process"]
    assert process.unavailable is None
    assert process.capabilities == frozenset()
    assert process.why_not(Capability.SNAPSHOT) == (
        "the process driver cannot snapshot: a host process has no VM state to save or restore"
    )


@pytest.mark.parametrize("cached", [False, True], ids=["no image", "image cached"])
def test_without_network_namespaces_qemu_says_so(tmp_path: Path, cached: bool) -> None:
    """What a start checks before it makes the driver comes first, whether the
    driver could be made or not."""
    if shutil.which(QEMU) is None or shutil.which("nft") is None or os.geteuid() != 0:
        pytest.skip(f"needs root, {QEMU} and nft, so that namespaces are what is missing")
    images = tmp_path / "images"
    if cached:
        _settle_probe(images, fake_image(images, KEY, used_at=1.0), "tcg")
    found = _by_name(describe_here(images, "unshare: Operation not permitted"))
    qemu = found["qemu"]
    assert qemu.unavailable == "no network namespaces: unshare: Operation not permitted"
    assert qemu.capabilities == (frozenset(Capability) if cached else frozenset())


@pytest.mark.skipif(shutil.which(QEMU) is None, reason=f"{QEMU} is not installed")
def test_with_an_image_and_a_settled_probe_each_driver_describes_itself(tmp_path: Path) -> None:
    """qemu and firecracker are then made over the cached image and answer for
    themselves: their own capabilities, the image in their template key."""
    images = tmp_path / "images"
    image_dir = fake_image(images, KEY, used_at=1.0)
    _settle_probe(images, image_dir, "tcg")
    found = _by_name(describe_here(images, None))
    qemu = found["qemu"]
    assert qemu.capabilities == frozenset(Capability)
    assert qemu.key_inputs["image"] == KEY
    assert qemu.key_inputs["accel"] == "tcg"
    assert qemu.root_disk == image_dir / "rootfs.ext4"
    firecracker = found["firecracker"]
    assert firecracker.capabilities == {Capability.SNAPSHOT, Capability.PAUSE}
    assert firecracker.key_inputs["image"] == KEY
    if shutil.which("firecracker") is None:
        assert firecracker.unavailable == "firecracker is not installed"
    else:  # pragma: no cover - no firecracker on the machines this runs on
        assert firecracker.unavailable is not None


@pytest.mark.skipif(not _kvm_usable(), reason="without KVM the accelerator needs no probe")
@pytest.mark.skipif(shutil.which(QEMU) is None, reason=f"{QEMU} is not installed")
def test_an_image_never_probed_leaves_qemu_not_made(tmp_path: Path) -> None:
    """Where KVM could be used, qemu's accelerator is known only after a probe
    boot, which doctor does not run: the driver is not made yet."""
    images = tmp_path / "images"
    fake_image(images, KEY, used_at=1.0)
    qemu = _by_name(describe_here(images, None))["qemu"]
    assert qemu.capabilities == frozenset()
    assert set(qemu.lacking.values()) == {NOT_BUILT}


def test_firecracker_installed_is_available_until_its_image_says_otherwise(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Where the (FAKE) binaries, KVM and root are found, nothing the host shows
    stands in firecracker's way; with no image built yet it can do nothing so
    far, and doctor says why."""
    if os.geteuid() != 0 or not _kvm_usable():
        pytest.skip("needs root and KVM, so that only the binaries decide")
    from firecracker_fake import write_fakes

    bin_dir = tmp_path / "bin"
    write_fakes(bin_dir, tmp_path / "logs")  # only found on PATH, never run here
    monkeypatch.setenv("PATH", f"{bin_dir}:{os.environ['PATH']}")
    found = _by_name(describe_here(tmp_path / "images", None))
    assert found["firecracker"].unavailable is None
    assert set(found["firecracker"].lacking.values()) == {NOT_BUILT}


# --- how doctor words it ----------------------------------------------------------------


def test_a_driver_line_says_no_and_why_or_yes_and_what_it_can_do() -> None:
    everything = frozenset(Capability)
    assert driver_line(DriverInfo(name="q", capabilities=everything)) == (
        "yes; snapshot, pause, workspace"
    )
    assert (
        driver_line(DriverInfo(name="q", capabilities=everything, unavailable="x is missing"))
        == "no: x is missing"
    )
    some = DriverInfo(
        name="f",
        capabilities=frozenset({Capability.SNAPSHOT, Capability.PAUSE}),
        lacking={Capability.WORKSPACE: "no spare drive"},
    )
    assert driver_line(some) == "yes; snapshot, pause; not workspace (no spare drive)"
    several = DriverInfo(
        name="p",
        capabilities=frozenset(),
        lacking={Capability.SNAPSHOT: "a", Capability.PAUSE: "b", Capability.WORKSPACE: "c"},
    )
    assert driver_line(several) == "yes; not snapshot, pause, workspace"


def test_doctor_prints_each_drivers_own_answer_and_a_configured_one_that_cannot_run(
    tmp_path: Path,
) -> None:
    """The real command, with nothing on its PATH: no QEMU, no Firecracker."""
    config = tmp_path / "swarm.yaml"
    config.write_text(f"version: 1\nbackend: qemu\nstate_dir: {tmp_path / 'state'}\nroles: {{}}\n")
    done = doctor(config, env={**os.environ, "PATH": str(tmp_path / "empty")})
    lines = done.stdout.splitlines()
    assert done.returncode == 1, done.stdout + done.stderr
    rows = [line for line in lines if line.split(" ", 1)[0] in AVAILABLE]
    assert rows == [
        "firecracker   no: firecracker is not installed",
        f"qemu          no: {QEMU} is not installed",
        "process       yes; not snapshot, pause, workspace",
    ], done.stdout
    assert f"problem       backend: qemu cannot run here: {QEMU} is not installed" in lines
