"""The coding-agent CLIs an image is built with (``image build --with aider,opencode``).

Each CLI comes from the registry package its spec in
``fireclaw.guest_daemon.clis`` names (``npm:NAME`` or ``pypi:NAME``):

- npm packages are installed by the host's npm into the root filesystem
  (``npm install --global --prefix ROOT/usr``: the package under
  /usr/lib/node_modules, its program in /usr/bin, on the guest's PATH), and
  the image gets Debian's ``nodejs`` to run them;
- PyPI packages are cross-installed by the host's pip for the guest's Python,
  as the guest daemon's wheels are, into /opt/fireclaw/clis/NAME, with a
  wrapper in /usr/bin that runs the package's console script.

The registry packages are part of the image's key (``registry_packages``);
their versions are what the registry had at build time, and the manifest
records them, and which CLIs the image has, so that a role whose CLI the
image lacks is refused with the fix (``fireclaw-swarm image build --with``).
"""

from __future__ import annotations

import configparser
import json
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Final

from fireclaw.guest_daemon.clis import SPECS

from .errors import ImageError
from .rootfs import compile_in, cross_install
from .tools import require, run

#: Debian packages the image needs to run a CLI from each registry.
RUNTIME_PACKAGES: Final = {"npm": ("nodejs",), "pypi": ()}
#: Where a PyPI CLI's distributions go in the image.
PYPI_PREFIX: Final = "/opt/fireclaw/clis"

_WRAPPER: Final = """#!/bin/sh
# {program} from the PyPI package {package}, installed in {lib}.
PYTHONPATH={lib}
export PYTHONPATH
exec /usr/bin/python3 -c 'import sys; from {module} import {function}; sys.exit({function}())' "$@"
"""


def registry_packages(clis: Iterable[str]) -> tuple[str, ...]:
    """The registry packages of ``clis``, sorted: ``npm:opencode-ai``, ``pypi:aider-chat``."""
    return tuple(sorted(SPECS[name].package for name in clis))


def runtime_packages(clis: Iterable[str]) -> tuple[str, ...]:
    """The Debian packages the image needs to run ``clis``."""
    registries = {SPECS[name].package.split(":", 1)[0] for name in clis}
    return tuple(sorted({pkg for reg in registries for pkg in RUNTIME_PACKAGES[reg]}))


def install_clis(
    root: Path, clis: Iterable[str], *, python_version: str, progress: Callable[[str], None]
) -> dict[str, str]:
    """Install ``clis`` into the root filesystem at ``root``: CLI -> version installed."""
    versions: dict[str, str] = {}
    npm = [name for name in clis if SPECS[name].package.startswith("npm:")]
    pypi = [name for name in clis if SPECS[name].package.startswith("pypi:")]
    if npm:
        require("npm")
        packages = [SPECS[name].package.removeprefix("npm:") for name in npm]
        progress(f"clis: npm install {' '.join(packages)}")
        argv = ["npm", "install", "--global", "--prefix", str(root / "usr")]
        argv += ["--no-fund", "--no-audit", "--no-update-notifier", *packages]
        run(argv, step="npm install (clis)")
        for name, package in zip(npm, packages, strict=True):
            versions[name] = _npm_version(root / "usr" / "lib" / "node_modules" / package)
    for name in pypi:
        package = SPECS[name].package.removeprefix("pypi:")
        progress(f"clis: pip install {package} for the guest's Python {python_version}")
        versions[name] = _install_pypi(root, name, package, python_version)
    for name in sorted(versions):
        progress(f"clis: {name} {versions[name]}")
    return versions


def _npm_version(folder: Path) -> str:
    try:
        version = json.loads((folder / "package.json").read_text())["version"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ImageError(f"npm installed no readable {folder}/package.json: {exc}") from None
    return str(version)


def _install_pypi(root: Path, name: str, package: str, python_version: str) -> str:
    lib = f"{PYPI_PREFIX}/{name}"
    target = root / lib.lstrip("/")
    step = f"pip install ({package})"
    cross_install(target, [package], python_version=python_version, step=step)
    compile_in(root, lib, step=f"compiling {package}")
    dist = _dist_info(target, package)
    version = dist.name.removesuffix(".dist-info").rsplit("-", 1)[1]
    program = SPECS[name].program
    scripts = configparser.ConfigParser(interpolation=None)
    scripts.read(dist / "entry_points.txt")
    try:
        module, function = scripts["console_scripts"][program].split(":", 1)
    except KeyError:
        raise ImageError(f"{package} {version} has no console script {program!r}") from None
    wrapper = root / "usr" / "bin" / program
    wrapper.write_text(
        _WRAPPER.format(
            program=program, package=package, lib=lib, module=module, function=function.strip()
        )
    )
    wrapper.chmod(0o755)
    return version


def _dist_info(target: Path, package: str) -> Path:
    wanted = package.replace("-", "_").lower()
    for dist in target.glob("*.dist-info"):
        if dist.name.lower().startswith(wanted + "-"):
            return dist
    raise ImageError(f"pip installed no {package} into {target}")
