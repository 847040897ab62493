"""A real PostgreSQL for the tests: Debian's server, started by the test itself.

``pg_cluster`` (one per test session) runs ``initdb`` and ``postgres`` as the
unprivileged user ``nobody`` (both refuse root; a test run that is not root
runs them as itself) in a temporary folder that user owns. The server
listens on a unix socket in that folder only (no TCP) unless the test asks for
TCP on one address (``start_cluster(listen=..., netns=...)``: inside a network
namespace the test made, for clients of one network), and asks for a password
(scram-sha-256), so the store's ``password_file`` is exercised for real.
``pg_dsn`` gives each test a fresh database and drops it afterwards. The
server is stopped, and its folder removed, on every exit path of the session;
``start_cluster``/``PgCluster.stop`` are there for a test that checks exactly
that. Should the test process itself be killed (``kill -9``),
the server gets SIGKILL from the kernel (its parent-death signal) and the
next session removes the folder it left.

The server runs with ``fsync=off``: what these tests check is what a store
sees through its connection, and a crash of the machine is not among it.
"""

from __future__ import annotations

import contextlib
import ctypes
import grp
import ipaddress
import itertools
import os
import pathlib
import pwd
import secrets
import shutil
import signal
import subprocess
import tempfile
import threading
import urllib.parse
from collections.abc import Callable, Iterator
from functools import partial
from typing import Final

import psycopg
import pytest

#: The superuser initdb makes, and the one the stores connect as.
USER: Final = "fireclaw"
#: The server's TCP port when it listens on an address (``start_cluster(listen=)``).
PORT: Final = 5432
#: Deadlines with room for a loaded machine (the server starts in ~1.5 s when idle).
START_TIMEOUT: Final = 120.0
STOP_TIMEOUT: Final = 60.0
_READY: Final = "database system is ready to accept connections"
_PREFIX: Final = "fireclaw-pg-"
_PR_SET_PDEATHSIG: Final = 1
_CLONE_NEWNET: Final = 0x40000000


def server_bin() -> pathlib.Path | None:
    """Debian's newest PostgreSQL server programs (``initdb``, ``postgres``), if any."""
    found = sorted(
        pathlib.Path("/usr/lib/postgresql").glob("*/bin/postgres"),
        key=lambda p: int(p.parent.parent.name) if p.parent.parent.name.isdigit() else 0,
    )
    return found[-1].parent if found else None


class PgCluster:
    """A running server: where it listens, and how to reach it as ``USER``."""

    def __init__(
        self,
        root: pathlib.Path,
        socket_dir: pathlib.Path,
        proc: subprocess.Popen[bytes],
        reader: threading.Thread,
        password_file: pathlib.Path,
        listen: str | None = None,
    ) -> None:
        self.root = root
        #: The address it takes TCP connections on, if any.
        self.listen = listen
        self.socket_dir = socket_dir
        self.proc = proc
        self._reader = reader
        #: The password, in a file only we (root) may read, as ``password_file`` wants it.
        self.password_file = password_file
        self.password = password_file.read_text().strip()
        self._names = itertools.count()

    def dsn(self, dbname: str) -> str:
        """The connection string for ``dbname``, without its password."""
        host = urllib.parse.quote(str(self.socket_dir), safe="")
        return f"postgresql://{USER}@/{dbname}?host={host}"

    def tcp_dsn(self, dbname: str) -> str:
        """The connection string for ``dbname`` over TCP (see ``listen``), without
        its password."""
        assert self.listen is not None, "this server listens on its unix socket only"
        return f"postgresql://{USER}@{self.listen}:{PORT}/{dbname}"

    def connect(self, dbname: str = "postgres") -> psycopg.Connection[tuple[object, ...]]:
        """An autocommit connection as the superuser."""
        return psycopg.connect(self.dsn(dbname), password=self.password, autocommit=True)

    def create_database(self) -> str:
        name = f"t{os.getpid()}_{next(self._names)}"
        with self.connect() as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
        return name

    def drop_database(self, name: str) -> None:
        with self.connect() as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')

    def stop(self) -> None:
        """Fast shutdown (SIGINT: sessions are ended, the server exits), then
        SIGKILL if it does not go; the folder is removed either way."""
        try:
            if self.proc.poll() is None:
                self.proc.send_signal(signal.SIGINT)
                try:
                    self.proc.wait(timeout=STOP_TIMEOUT)
                except subprocess.TimeoutExpired:
                    # Its backends die with it: each watches the postmaster.
                    os.killpg(self.proc.pid, signal.SIGKILL)
                    self.proc.wait(timeout=STOP_TIMEOUT)
            self._reader.join(timeout=STOP_TIMEOUT)
        finally:
            shutil.rmtree(self.root, ignore_errors=True)


def start_cluster(
    *, listen: ipaddress.IPv4Interface | None = None, netns: str | None = None
) -> PgCluster:
    """Make and start a server in a new temporary folder (see the module docstring).
    Skips the test where no PostgreSQL server is installed.

    With ``listen`` it also takes TCP connections on that address (port ``PORT``)
    from the addresses of its network, password required; ``netns`` names the
    network namespace (under ``/run/netns``) it runs in, where that address is."""
    bindir = server_bin()
    if bindir is None:
        pytest.skip("no PostgreSQL server installed (Debian package postgresql)")
    root_user = os.geteuid() == 0
    nobody = pwd.getpwnam("nobody")
    uid, gid = (nobody.pw_uid, nobody.pw_gid) if root_user else (os.getuid(), os.getgid())
    group = grp.getgrgid(gid).gr_name
    as_nobody: dict[str, object] = (
        {"user": uid, "group": gid, "extra_groups": []} if root_user else {}
    )
    _remove_left_behind()
    root = pathlib.Path(tempfile.mkdtemp(prefix=_PREFIX))
    try:
        root.chmod(0o711)  # nobody passes through to its own folder, and sees nothing else
        password = secrets.token_urlsafe(24)
        password_file = root / "password"
        password_file.write_text(password + "\n")
        password_file.chmod(0o600)
        own = root / "nobody"  # the server's folder: data, socket, initdb's password
        for d in (own, own / "socket"):
            d.mkdir(mode=0o700)
            shutil.chown(d, uid, group)
        pwfile = own / "pwfile"
        pwfile.write_text(password + "\n")
        pwfile.chmod(0o600)
        shutil.chown(pwfile, uid, group)
        env = {"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8", "LC_ALL": "C.UTF-8"}
        made = subprocess.run(
            [
                str(bindir / "initdb"),
                "--pgdata", str(own / "data"),
                "--username", USER,
                "--pwfile", str(pwfile),
                "--auth", "scram-sha-256",
                "--encoding", "UTF8",
                "--no-sync",
                "--no-instructions",
            ],  # fmt: skip
            cwd=own,
            env=env,
            capture_output=True,
            timeout=START_TIMEOUT,
            **as_nobody,  # type: ignore[call-overload]
        )
        if made.returncode != 0:
            raise RuntimeError(f"initdb failed: {made.stderr.decode(errors='replace')[-2000:]}")
        pwfile.unlink()
        if listen is not None:
            with open(own / "data" / "pg_hba.conf", "a") as hba:
                hba.write(f"host all {USER} {listen.network} scram-sha-256\n")
        enter = partial(_enter, netns)
        proc = subprocess.Popen(
            [
                str(bindir / "postgres"),
                "-D", str(own / "data"),
                "-k", str(own / "socket"),
                "-c", f"listen_addresses={listen.ip if listen is not None else ''}",
                "-c", f"port={PORT}",
                "-c", "fsync=off",
                "-c", "logging_collector=off",
            ],  # fmt: skip
            cwd=own,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            start_new_session=True,
            preexec_fn=lambda: enter(_as_nobody_dying_with_us if root_user else _dying_with_us),
        )
    except BaseException:
        shutil.rmtree(root, ignore_errors=True)
        raise
    ready = threading.Event()
    log_path = root / "server.log"

    def read_log() -> None:
        # Drains the server's stderr for its whole life (never an undrained pipe),
        # keeping it for a failed start, and says when the server is ready.
        assert proc.stderr is not None
        with open(log_path, "ab") as log:
            for line in proc.stderr:
                log.write(line)
                log.flush()
                if _READY.encode() in line:
                    ready.set()
        ready.set()  # EOF: the server is gone; the caller sees it exit

    reader = threading.Thread(target=read_log, name="postgres-log", daemon=True)
    reader.start()
    address = str(listen.ip) if listen is not None else None
    cluster = PgCluster(root, own / "socket", proc, reader, password_file, address)
    if not ready.wait(timeout=START_TIMEOUT) or proc.poll() is not None:
        log = log_path.read_text(errors="replace")[-2000:]
        cluster.stop()
        raise RuntimeError(f"postgres did not start within {START_TIMEOUT} s:\n{log}")
    return cluster


def _enter(netns: str | None, then: Callable[[], None]) -> None:
    """In the child before exec: join ``netns`` (while still root), then ``then``."""
    if netns is not None:
        fd = os.open(f"/run/netns/{netns}", os.O_RDONLY | os.O_CLOEXEC)
        try:
            if ctypes.CDLL(None, use_errno=True).setns(fd, _CLONE_NEWNET) != 0:
                raise OSError(ctypes.get_errno(), f"setns {netns}")
        finally:
            os.close(fd)
    then()


def _as_nobody_dying_with_us() -> None:
    """In the child before exec: become nobody, then ask for SIGKILL when the
    parent dies (after the uid change, which would clear it)."""
    nobody = pwd.getpwnam("nobody")
    os.setgroups([])
    os.setgid(nobody.pw_gid)
    os.setuid(nobody.pw_uid)
    _dying_with_us()


def _dying_with_us() -> None:
    ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)


def _remove_left_behind() -> None:
    """Folders of servers that are gone (their test process was killed)."""
    for root in pathlib.Path(tempfile.gettempdir()).glob(f"{_PREFIX}*"):
        pidfile = root / "nobody" / "data" / "postmaster.pid"
        try:
            pid = int(pidfile.read_text().split()[0])
        except (OSError, ValueError, IndexError):
            continue  # still starting, or not one of ours to judge
        if not pathlib.Path(f"/proc/{pid}").exists():
            shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="session")
def pg_cluster() -> Iterator[PgCluster]:
    cluster = start_cluster()
    try:
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture
def pg_dsn(pg_cluster: PgCluster) -> Iterator[str]:
    """A fresh, empty database's connection string (no password: see
    ``pg_cluster.password_file``), dropped after the test."""
    name = pg_cluster.create_database()
    try:
        yield pg_cluster.dsn(name)
    finally:
        with contextlib.suppress(psycopg.Error):
            pg_cluster.drop_database(name)
