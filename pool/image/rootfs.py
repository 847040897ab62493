"""The guest's root filesystem: Debian by mmdebstrap, the guest daemon, an ext4 image.

Steps, each a function so a build can report them one by one:

1. ``debootstrap``: ``mmdebstrap --variant=minbase`` unpacks Debian with the
   spec's packages into a directory, as root, and creates the ``agent`` user.
2. ``install_guest_daemon``: the guest daemon's wheels (pinned to the versions
   this host runs) go to /opt/fireclaw/lib with the host's pip, cross-installed
   for the guest's Python; the daemon's own sources are copied beside them.
3. ``configure``: hostname, hosts, resolv.conf (in /run, so a read-only root
   still takes DNS settings), and /sbin/fireclaw-init, the guest's PID 1.
4. ``make_ext4``: ``mke2fs -d`` writes the directory into an ext4 image; no
   loop mount.
"""

from __future__ import annotations

import importlib.metadata
import math
import os
import re
import shutil
import sys
from collections.abc import Callable, Iterable, Mapping, Sequence
from importlib.resources import files
from pathlib import Path
from typing import Final

from .errors import ImageError
from .tools import run

#: Packages every image has: the guest daemon's Python, the init's busybox
#: (also the initramfs's) and ``ip`` for the network.
REQUIRED_PACKAGES = ("python3", "busybox-static", "iproute2")

#: The Python each suite's ``python3`` is, for cross-installing wheels.
SUITE_PYTHON = {"bookworm": "3.11"}

#: Distributions the guest daemon imports: h11 (the chat harness's HTTP client)
#: comes with trio-websocket, and is named so that it stays.
GUEST_DISTRIBUTIONS = ("trio", "trio-websocket", "msgspec", "irctokens", "h11")
#: Pins for guest distributions this host does not have installed.
FALLBACK_PINS = {"irctokens": "2.0.2"}
#: Wheel platforms the guest's glibc (2.36 on bookworm) runs.
WHEEL_PLATFORMS = ("manylinux_2_28_x86_64", "manylinux2014_x86_64")

AGENT_UID = 1000
PREFIX = "/opt/fireclaw"
INIT_PATH = "/sbin/fireclaw-init"
DAEMON_WRAPPER = f"{PREFIX}/bin/guest-daemon"

_WRAPPER = f"""#!/bin/sh
# The fireclaw guest daemon, with its libraries from {PREFIX}/lib.
PYTHONPATH={PREFIX}/lib
export PYTHONPATH
exec /usr/bin/python3 -m fireclaw.guest_daemon --cmdline /proc/cmdline "$@"
"""


def init_script() -> bytes:
    """/sbin/fireclaw-init: mounts, hostname, network, then runs the daemon as PID 1's child."""
    return files(__package__).joinpath("fireclaw-init.sh").read_bytes()


# --- wheels ---------------------------------------------------------------------------


def normalize(name: str) -> str:
    """A distribution name as PEP 503 compares them."""
    return re.sub(r"[-_.]+", "-", name).lower()


def wheel_pins(
    top: Sequence[str] = GUEST_DISTRIBUTIONS,
    *,
    installed: Callable[[str], tuple[str, Sequence[str]] | None] | None = None,
) -> tuple[str, ...]:
    """``name==version`` for the guest distributions and everything they may need.

    Versions are the ones installed on this host, so the guest runs what the
    host's tests ran. ``installed(name)`` gives (version, requirement strings)
    or None; by default it asks ``importlib.metadata``. Requirements behind an
    ``extra`` are not followed; ones behind other markers are (the pins are
    constraints, so pip still skips what the guest's Python does not need).
    """
    lookup = installed or _installed
    pins: dict[str, str] = {}
    todo = [normalize(name) for name in top]
    while todo:
        name = todo.pop()
        if name in pins:
            continue
        found = lookup(name)
        if found is None:
            if name in FALLBACK_PINS:
                pins[name] = FALLBACK_PINS[name]
            elif name in map(normalize, top):
                raise ImageError(f"{name} is not installed here: the image pins what the host runs")
            continue
        version, requires = found
        pins[name] = version
        for req in requires:
            if re.search(r"\bextra\s*==", req):
                continue
            match = re.match(r"\s*([A-Za-z0-9][A-Za-z0-9._-]*)", req)
            if match:
                todo.append(normalize(match[1]))
    return tuple(f"{name}=={version}" for name, version in sorted(pins.items()))


def _installed(name: str) -> tuple[str, Sequence[str]] | None:
    try:
        dist = importlib.metadata.distribution(name)
    except importlib.metadata.PackageNotFoundError:
        return None
    return dist.version, dist.requires or []


# --- the guest daemon's sources -----------------------------------------------------------


def guest_daemon_dir() -> Path:
    """The folder of the ``fireclaw.guest_daemon`` package this host runs."""
    import fireclaw.guest_daemon

    return Path(fireclaw.guest_daemon.__file__).resolve().parent


def guest_daemon_sources(folder: Path) -> dict[str, bytes]:
    """Relative path -> contents of every ``.py`` file of the guest daemon package."""
    sources = {
        path.relative_to(folder).as_posix(): path.read_bytes()
        for path in sorted(folder.rglob("*.py"))
        if "__pycache__" not in path.parts
    }
    if "__main__.py" not in sources:
        raise ImageError(f"{folder} holds no guest daemon (__main__.py missing)")
    return sources


# --- steps ------------------------------------------------------------------------------


def debootstrap(
    root: Path, *, suite: str, packages: Iterable[str], progress: Callable[[str], None]
) -> None:
    """Unpack a minbase Debian ``suite`` with ``packages`` into ``root`` (must not exist)."""
    include = ",".join(sorted(set(packages)))
    argv = [
        "mmdebstrap",
        "--mode=root",
        "--variant=minbase",
        f"--include={include}",
        # Documentation and translations: nobody reads them in a microVM.
        "--dpkgopt=path-exclude=/usr/share/man/*",
        "--dpkgopt=path-exclude=/usr/share/doc/*",
        "--dpkgopt=path-include=/usr/share/doc/*/copyright",
        "--dpkgopt=path-exclude=/usr/share/locale/*",
        "--dpkgopt=path-exclude=/usr/share/info/*",
        "--customize-hook="
        f'chroot "$1" useradd --uid {AGENT_UID} --user-group --create-home --shell /bin/sh agent',
        suite,
        str(root),
    ]

    def relay(line: str) -> None:
        if line.startswith("I: ") and "customize-hook" not in line:
            progress(f"rootfs: {line[3:]}")

    run(argv, step="mmdebstrap", on_line=relay)


def install_guest_daemon(
    root: Path,
    *,
    pins: Sequence[str],
    top: Sequence[str] = GUEST_DISTRIBUTIONS,
    sources: Mapping[str, bytes],
    python_version: str,
) -> list[str]:
    """Install the wheels and the daemon under /opt/fireclaw; return the wheels installed."""
    lib = root / PREFIX.lstrip("/") / "lib"
    lib.mkdir(parents=True)
    constraints = root.parent / "constraints.txt"
    constraints.write_text("".join(f"{pin}\n" for pin in pins))
    wanted = {normalize(name) for name in top}
    requirements = [pin for pin in pins if pin.split("==")[0] in wanted]
    cross_install(
        lib,
        ["-c", str(constraints), *requirements],
        python_version=python_version,
        step="pip install (guest wheels)",
    )
    constraints.unlink()

    package = lib / "fireclaw" / "guest_daemon"
    for relative, data in sources.items():
        path = package / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
    wrapper = root / DAEMON_WRAPPER.lstrip("/")
    wrapper.parent.mkdir(parents=True, exist_ok=True)
    wrapper.write_text(_WRAPPER)
    wrapper.chmod(0o755)
    compile_in(root, f"{PREFIX}/lib", step="compiling the guest daemon")
    return sorted(_dist_info(lib))


def cross_install(
    target: Path, requirements: Sequence[str], *, python_version: str, step: str
) -> None:
    """``pip install --target`` of wheels for the guest's Python and platform, by the
    host's pip (the guest has none): ``requirements`` are pip's arguments."""
    abi = "cp" + python_version.replace(".", "")
    argv = [sys.executable, "-m", "pip", "install", "--quiet", "--no-compile"]
    argv += ["--disable-pip-version-check", "--no-warn-script-location"]
    argv += ["--target", str(target), "--only-binary=:all:", "--implementation", "cp"]
    argv += ["--python-version", python_version, "--abi", abi]
    for platform in WHEEL_PLATFORMS:
        argv += ["--platform", platform]
    run([*argv, *requirements], step=step)


def compile_in(root: Path, folder: str, *, step: str) -> None:
    """Byte-compile ``folder`` with the guest's own Python: its root may be read-only."""
    run(["chroot", str(root), "python3", "-m", "compileall", "-q", folder], step=step)


def _dist_info(lib: Path) -> Iterable[str]:
    for path in lib.glob("*.dist-info"):
        name, _, version = path.name.removesuffix(".dist-info").partition("-")
        yield f"{normalize(name)}=={version}"


def configure(root: Path, *, hostname: str) -> None:
    """Hostname, hosts, resolv.conf and the init: what makes the tree a fireclaw guest."""
    etc = root / "etc"
    (etc / "hostname").write_text(f"{hostname}\n")
    (etc / "hosts").write_text(
        f"127.0.0.1\tlocalhost\n127.0.1.1\t{hostname}\n::1\tlocalhost ip6-localhost ip6-loopback\n"
    )
    # mmdebstrap copied the host's resolver; the init writes the guest's to /run.
    resolv = etc / "resolv.conf"
    if resolv.exists() or resolv.is_symlink():
        resolv.unlink()
    resolv.symlink_to("/run/resolv.conf")
    init = root / INIT_PATH.lstrip("/")
    init.write_bytes(init_script())
    init.chmod(0o755)
    home = root / "home" / "agent"
    if not home.is_dir():
        raise ImageError("the agent user has no home: useradd did not run")
    if (root / "usr" / "bin" / "podman").exists():
        subordinate_ids(root)


#: The user namespace range rootless podman maps the agent's containers into.
SUBORDINATE_IDS: Final = "agent:100000:65536\n"


def subordinate_ids(root: Path) -> None:
    """Give the agent user subordinate uids and gids, as rootless podman needs
    (an image built with ``--package podman``; its agents get ``podman_run``)."""
    for name in ("subuid", "subgid"):
        path = root / "etc" / name
        text = path.read_text() if path.exists() else ""
        if not any(line.startswith("agent:") for line in text.splitlines()):
            path.write_text(text + SUBORDINATE_IDS)


def tree_size(root: Path) -> tuple[int, int]:
    """(bytes in 4 KiB blocks, inode count) that the files under ``root`` need in ext4."""
    blocks = inodes = 0
    seen: set[tuple[int, int]] = set()
    for dirpath, dirnames, filenames in os.walk(root):
        inodes += 1
        blocks += 1
        links = [name for name in dirnames if os.path.islink(os.path.join(dirpath, name))]
        for name in (*filenames, *links):
            st = os.lstat(os.path.join(dirpath, name))
            if (st.st_dev, st.st_ino) in seen:
                continue
            seen.add((st.st_dev, st.st_ino))
            inodes += 1
            blocks += math.ceil(st.st_size / 4096)
    return blocks * 4096, inodes


def ext4_size_mib(content: int, *, headroom: float = 0.15, extra_mib: int = 64) -> int:
    """Image size for ``content`` bytes: metadata, journal and some room to write."""
    return math.ceil(content * (1 + headroom) / 2**20) + extra_mib


def make_ext4(root: Path, image: Path, *, size_mib: int, inodes: int) -> None:
    """Write the tree under ``root`` into a new ext4 image (no mount, ownership kept)."""
    argv = ["mke2fs", "-q", "-t", "ext4", "-b", "4096", "-m", "0", "-L", "fireclaw-root"]
    argv += ["-N", str(inodes), "-E", "root_owner=0:0", "-d", str(root), "-F", str(image)]
    argv += [f"{size_mib}M"]
    run(argv, step="mke2fs")


def remove_tree(path: Path) -> None:
    """Remove a build tree (a whole Debian root, device nodes included)."""
    if path.is_symlink() or path.is_file():
        path.unlink()
    elif path.exists():
        shutil.rmtree(path)
