"""The guest daemon's configuration: where to dial, who it is, its secret.

Lowest precedence first: the environment (``FIRECLAW_CONTROL_URL``,
``FIRECLAW_VM_ID``, ``FIRECLAW_TOKEN``), then a kernel command line read with
``--cmdline FILE`` (``fireclaw.url=``, ``fireclaw.vm_id=``, ``fireclaw.token=``),
then ``--url``, ``--vm-id`` and ``--token``. Instead of a URL to dial, a
virtio-serial port to serve: ``fireclaw.port=NAME`` or ``--port NAME``.
``load_config`` checks all of it and raises ``ConfigError`` with one line
naming what is missing or wrong (never the token itself); the daemon then
exits with ``exits.EX_CONFIG``.

Exceptions::

    GuestDaemonError
    └── ConfigError      bad or missing configuration (exit 78)

This module imports nothing from the host side: it ships into VM images.
"""

from __future__ import annotations

import argparse
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Final, NoReturn
from urllib.parse import urlsplit

import msgspec

from . import users
from .protocol import Name, Token
from .users import RunAs

__all__ = [
    "Config",
    "ConfigError",
    "GuestDaemonError",
    "load_config",
    "parse_cmdline",
]


class GuestDaemonError(Exception):
    """Base of the guest daemon's own errors."""


class ConfigError(GuestDaemonError):
    """Missing or invalid configuration; ``str()`` is one line."""


# --- configuration -------------------------------------------------------------


@dataclass(frozen=True)
class Config:
    url: str  # empty with a port
    vm_id: str
    token: str
    #: The virtio-serial port to serve (the host attaches to it), instead of dialling.
    port: str | None = None
    connect_timeout: float = 30.0
    set_clock: bool = False
    redial: bool = False  # dial again after a lost connection (inside a VM)
    agent_user: RunAs | None = None  # who runs agent work (None: as the daemon)


_ENV: Final = {"url": "FIRECLAW_CONTROL_URL", "vm_id": "FIRECLAW_VM_ID", "token": "FIRECLAW_TOKEN"}
_CMDLINE: Final = {"url": "fireclaw.url", "vm_id": "fireclaw.vm_id", "token": "fireclaw.token"}
_FLAG: Final = {"url": "--url", "vm_id": "--vm-id", "token": "--token"}
_PORT_PARAM: Final = "fireclaw.port"
_PORT_NAME: Final = re.compile(r"[A-Za-z0-9._-]{1,64}")
# A kernel command line word: runs of non-blanks, where "..." may hold blanks.
_CMDLINE_WORD: Final = re.compile(r'(?:[^\s"]+|"[^"]*")+')


class _ArgumentParser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        raise ConfigError(message)


def _parser() -> argparse.ArgumentParser:
    parser = _ArgumentParser(
        prog="python -m fireclaw.guest_daemon",
        description="fireclaw guest daemon: serves the host's control channel inside a VM.",
    )
    parser.add_argument("--url", help=f"control endpoint, ws://HOST:PORT/ (${_ENV['url']})")
    parser.add_argument("--vm-id", help=f"this VM's id (${_ENV['vm_id']})")
    parser.add_argument("--token", help=f"this VM's secret token (${_ENV['token']})")
    parser.add_argument("--port", help="serve this virtio-serial port instead of dialling")
    parser.add_argument(
        "--cmdline",
        metavar="FILE",
        help="read fireclaw.url=, fireclaw.vm_id=, fireclaw.token= from a kernel command line",
    )
    parser.add_argument(
        "--connect-timeout",
        type=float,
        default=30.0,
        metavar="SECONDS",
        help="give up when the host cannot be reached for this long (default 30)",
    )
    return parser


def parse_cmdline(text: str) -> dict[str, str]:
    """The ``key=value`` words of a kernel command line (quotes removed)."""
    params: dict[str, str] = {}
    for word in _CMDLINE_WORD.findall(text):
        key, sep, value = word.replace('"', "").partition("=")
        if sep:
            params[key] = value
    return params


def load_config(argv: Sequence[str], environ: Mapping[str, str]) -> Config:
    """Build the configuration from flags, a kernel command line and the environment.

    Raises ConfigError (one line) when something is missing or invalid.
    """
    args = _parser().parse_args(list(argv))
    values = {field: environ.get(var) or None for field, var in _ENV.items()}
    port: str | None = None
    if args.cmdline:
        try:
            with open(args.cmdline, encoding="utf-8", errors="replace") as file:
                params = parse_cmdline(file.read())
        except OSError as exc:
            raise ConfigError(f"--cmdline {args.cmdline}: {exc.strerror or exc}") from exc
        for field, key in _CMDLINE.items():
            values[field] = params.get(key) or values[field]
        port = params.get(_PORT_PARAM) or None
    for field in _ENV:
        values[field] = getattr(args, field) or values[field]
    port = args.port or port
    if port is not None:
        if not _PORT_NAME.fullmatch(port):
            raise ConfigError(f"invalid port name {port[:64]!r}: 1-64 of letters, digits and ._-")
        values["url"] = values["url"] or ""

    for field, value in values.items():
        if value is None:
            raise ConfigError(
                f"missing {field}: set {_ENV[field]}, pass {_FLAG[field]}"
                f" or put {_CMDLINE[field]}= on the kernel command line"
            )
    url, vm_id, token = values["url"], values["vm_id"], values["token"]
    assert url is not None and vm_id is not None and token is not None
    if port is None:
        _check_url(url)
    try:
        msgspec.convert(vm_id, Name)
    except msgspec.ValidationError:
        raise ConfigError(
            f"invalid vm_id {vm_id!r}: 1-64 of letters, digits and _.-[]{{}}|^`\\"
        ) from None
    try:
        msgspec.convert(token, Token)
    except msgspec.ValidationError:
        # The token is a secret: say what is wrong with it, never what it is.
        raise ConfigError(
            f"invalid token ({len(token)} characters): 16-128 of letters, digits, _ and -"
        ) from None
    timeout = args.connect_timeout
    if not (math.isfinite(timeout) and timeout > 0):
        raise ConfigError(f"invalid --connect-timeout {timeout}: must be a positive number")
    try:
        user = users.agent_user(environ)
    except users.UnknownUser as exc:
        raise ConfigError(f"agent user: {exc} (set {users.ENV_USER} to one that exists)") from None
    return Config(
        url=url,
        vm_id=vm_id,
        token=token,
        port=port,
        connect_timeout=timeout,
        set_clock=environ.get("FIRECLAW_SET_CLOCK") == "1",
        redial=bool(args.cmdline),
        agent_user=user,
    )


def _check_url(url: str) -> None:
    try:
        parts = urlsplit(url)
        valid = parts.scheme in ("ws", "wss") and bool(parts.hostname) and parts.port != 0
    except ValueError as exc:  # a port that is not a number in 0-65535
        raise ConfigError(f"invalid url {url!r}: {exc}") from None
    if not valid:
        raise ConfigError(f"invalid url {url!r}: expected ws://HOST:PORT/ or wss://HOST:PORT/")
