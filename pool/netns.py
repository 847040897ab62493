"""Per-VM network namespaces, each holding that VM's own control listener when
its guest dials one.

A VM can only reach the listener inside its namespace, so the namespace is its
identity. The supervisor creates the namespace and opens the listening socket
inside it from a fresh OS thread: ``unshare(CLONE_NEWNET)`` moves only the
calling thread, the socket keeps the namespace it was created in, and the
thread then ends, so no thread of the supervisor is ever left in the wrong
namespace (trio's worker threads are reused, so they are never used for this).

Namespaces are bind-mounted under ``/run/netns`` like ``ip netns add`` does,
named ``<PREFIX><vm id>``, so ``ip netns`` shows them and leftovers after a
crash can be found and removed.

Errors::

    NetnsError          creating, configuring or removing a namespace failed
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import socket
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Final, TypeVar

import trio

PREFIX: Final = "fireclaw-"
NETNS_DIR: Final = Path("/run/netns")
_CLONE_NEWNET: Final = 0x40000000

T = TypeVar("T")


class NetnsError(Exception):
    """A network namespace could not be created, configured or removed."""


def _libc() -> ctypes.CDLL:
    return ctypes.CDLL(None, use_errno=True)


def in_fresh_thread(fn: Callable[[], T]) -> T:
    """Run ``fn`` in a new OS thread that exits afterwards, and return its result."""
    result: list[T] = []
    error: list[BaseException] = []

    def target() -> None:
        try:
            result.append(fn())
        except BaseException as exc:  # handed to the caller below
            error.append(exc)

    thread = threading.Thread(target=target, name="fireclaw-netns", daemon=True)
    thread.start()
    thread.join()
    if error:
        raise error[0]
    return result[0]


def enter_new(name: str) -> None:
    """Move the calling thread (a fresh one: see ``in_fresh_thread``) into a new
    namespace, mounted as ``name``, with its loopback up."""
    # Imported here: pyroute2 is heavy and only needed with namespaces.
    from pyroute2 import IPRoute
    from pyroute2.netns import attach

    libc = _libc()
    if libc.unshare(_CLONE_NEWNET) != 0:
        err = ctypes.get_errno()
        raise NetnsError(f"unshare(CLONE_NEWNET) for {name}: {os.strerror(err)}")
    try:
        attach(name, "thread-self")
    except OSError as exc:
        raise NetnsError(f"mounting namespace {name}: {exc}") from exc
    try:
        with IPRoute() as ipr:
            (lo,) = ipr.link_lookup(ifname="lo")
            ipr.link("set", index=lo, state="up")
    except Exception as exc:
        _remove(name)
        raise NetnsError(f"configuring namespace {name}: {exc}") from exc


def listen(host: str, port: int = 0, *, backlog: int = 4) -> socket.socket:
    """A TCP listener on ``host:port`` in the calling thread's namespace."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        # A supervisor adopting a VM listens again where its killed predecessor
        # did: that one's closed connections may still be in TIME_WAIT there.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        sock.listen(backlog)
    except OSError:
        sock.close()
        raise
    return sock


def _create_with_listener(name: str) -> socket.socket:
    enter_new(name)
    try:
        return listen("127.0.0.1")
    except OSError as exc:
        _remove(name)
        raise NetnsError(f"configuring namespace {name}: {exc}") from exc


def _listener_in(name: str, host: str, port: int) -> socket.socket:
    # Imported here: pyroute2 is heavy and only needed with namespaces.
    from pyroute2.netns import setns

    try:
        setns(name, flags=0)  # this fresh thread only; it ends right after
    except OSError as exc:
        raise NetnsError(f"entering namespace {name}: {exc}") from exc
    try:
        return listen(host, port, backlog=8)
    except OSError as exc:
        raise NetnsError(f"listening on {host}:{port} in namespace {name}: {exc}") from exc


def _remove(name: str) -> None:
    path = NETNS_DIR / name
    libc = _libc()
    # MNT_DETACH: a socket or process still inside keeps the namespace alive, but the
    # name is gone at once and the namespace dies with its last user.
    if libc.umount2(str(path).encode(), 2) != 0:
        err = ctypes.get_errno()
        if err not in (errno.EINVAL, errno.ENOENT):
            raise NetnsError(f"unmounting {path}: {os.strerror(err)}")
    with contextlib.suppress(FileNotFoundError):
        path.unlink()


async def create(name: str) -> None:
    """Create namespace ``name`` with loopback up, and no listener in it."""
    await trio.to_thread.run_sync(in_fresh_thread, lambda: enter_new(name))


async def create_with_listener(name: str) -> socket.socket:
    """Create namespace ``name`` with loopback up and a listener on 127.0.0.1 in it."""
    return await trio.to_thread.run_sync(in_fresh_thread, lambda: _create_with_listener(name))


async def open_listener(name: str, host: str = "127.0.0.1", port: int = 0) -> socket.socket:
    """Another listener on ``host:port`` (a free port for 0) inside the existing
    namespace ``name``."""
    return await trio.to_thread.run_sync(in_fresh_thread, lambda: _listener_in(name, host, port))


async def remove(name: str) -> None:
    await trio.to_thread.run_sync(_remove, name)


def leftovers(prefix: str = PREFIX) -> list[str]:
    """Names of namespaces this project created that still exist."""
    try:
        return sorted(p.name for p in NETNS_DIR.iterdir() if p.name.startswith(prefix))
    except FileNotFoundError:
        return []


def remove_sync(name: str) -> None:
    _remove(name)


def probe() -> str | None:
    """Return None if namespaces work here, else one line saying why not."""
    if os.geteuid() != 0:
        return "not running as root"
    name = f"{PREFIX}probe-{os.getpid()}"
    try:
        sock = in_fresh_thread(lambda: _create_with_listener(name))
    except (NetnsError, OSError) as exc:
        return str(exc)
    sock.close()
    try:
        _remove(name)
    except NetnsError as exc:
        return str(exc)
    return None
