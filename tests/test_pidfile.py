"""The single-instance lock (pidfile) and process identity (procid)."""

from __future__ import annotations

import fcntl
import os
import pathlib
import subprocess
import sys
from collections.abc import Iterator

import msgspec
import pytest
from fireclaw.pool.procid import (
    ProcessIdentity,
    parse_stat,
    process_identity,
    still_running,
)
from fireclaw.supervisor.pidfile import AlreadyRunning, PidLock, PidLockError

# A child that holds whatever it is told to, says "ready" and then waits for its
# stdin to close: the test decides when it exits, without sleeping.
HOLDER = """
import sys
from fireclaw.supervisor.pidfile import PidLock
lock = PidLock(sys.argv[1])
lock.acquire()
print("ready", flush=True)
sys.stdin.read()
"""

WAITER = """
import sys
print("ready", flush=True)
sys.stdin.read()
"""

TRY_LOCK = """
import sys
from fireclaw.supervisor.pidfile import AlreadyRunning, PidLock
try:
    PidLock(sys.argv[1]).acquire()
except AlreadyRunning as exc:
    print(exc.pid)
    print(exc)
    sys.exit(3)
print("locked")
"""


def spawn(code: str, *args: str, close_fds: bool = True) -> subprocess.Popen[str]:
    proc = subprocess.Popen(
        [sys.executable, "-c", code, *args],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        close_fds=close_fds,
    )
    assert proc.stdout is not None
    assert proc.stdout.readline() == "ready\n"
    return proc


def finish(proc: subprocess.Popen[str]) -> None:
    assert proc.stdin is not None and proc.stdout is not None
    proc.stdin.close()
    proc.stdout.close()
    proc.wait(timeout=10)


@pytest.fixture
def lock_path(tmp_path: pathlib.Path) -> pathlib.Path:
    return tmp_path / "state" / "swarm.pid"


@pytest.fixture
def children() -> Iterator[list[subprocess.Popen[str]]]:
    procs: list[subprocess.Popen[str]] = []
    yield procs
    for proc in procs:
        if proc.poll() is None:
            proc.kill()
        proc.wait(timeout=10)


def try_lock_elsewhere(path: pathlib.Path) -> subprocess.CompletedProcess[str]:
    # The timeout is far above "at once": a blocking flock would hang and fail here.
    return subprocess.run(
        [sys.executable, "-c", TRY_LOCK, str(path)],
        capture_output=True,
        text=True,
        timeout=30,
    )


# --- PidLock ---------------------------------------------------------------


def test_acquire_writes_pid_and_creates_parent(lock_path: pathlib.Path) -> None:
    with PidLock(lock_path) as lock:
        assert lock.held
        assert lock_path.read_text() == f"{os.getpid()}\n"
        assert (lock_path.parent.stat().st_mode & 0o777) == 0o700
    assert not lock.held


def test_stale_longer_pid_is_overwritten(lock_path: pathlib.Path) -> None:
    lock_path.parent.mkdir()
    lock_path.write_text("123456789012\n")
    with PidLock(lock_path):
        assert lock_path.read_text() == f"{os.getpid()}\n"


def test_second_process_fails_at_once_naming_the_holder(
    lock_path: pathlib.Path, children: list[subprocess.Popen[str]]
) -> None:
    holder = spawn(HOLDER, str(lock_path))
    children.append(holder)
    result = try_lock_elsewhere(lock_path)
    assert result.returncode == 3, result.stderr
    pid_line, message = result.stdout.splitlines()
    assert int(pid_line) == holder.pid
    assert message == f"another fireclaw-swarm (pid {holder.pid}) is running: it holds {lock_path}"

    # And in this process too.
    with pytest.raises(AlreadyRunning) as info:
        PidLock(lock_path).acquire()
    assert info.value.pid == holder.pid
    assert info.value.path == lock_path


def test_lock_is_free_after_the_holder_exits_and_file_stays(
    lock_path: pathlib.Path, children: list[subprocess.Popen[str]]
) -> None:
    holder = spawn(HOLDER, str(lock_path))
    children.append(holder)
    inode = lock_path.stat().st_ino
    finish(holder)
    assert lock_path.read_text() == f"{holder.pid}\n"  # left for people to read
    assert lock_path.stat().st_ino == inode
    with PidLock(lock_path):
        assert lock_path.stat().st_ino == inode
        assert lock_path.read_text() == f"{os.getpid()}\n"
    assert lock_path.stat().st_ino == inode


def test_killed_holder_releases_the_lock(
    lock_path: pathlib.Path, children: list[subprocess.Popen[str]]
) -> None:
    holder = spawn(HOLDER, str(lock_path))
    children.append(holder)
    holder.kill()
    holder.wait(timeout=10)
    result = try_lock_elsewhere(lock_path)
    assert result.stdout == "locked\n", result.stderr


def test_release_never_unlinks(lock_path: pathlib.Path) -> None:
    lock = PidLock(lock_path)
    lock.acquire()
    inode = lock_path.stat().st_ino
    lock.release()
    lock.release()  # idempotent
    assert lock_path.exists() and lock_path.stat().st_ino == inode
    lock.acquire()  # reusable
    lock.release()


def test_second_lock_in_the_same_process(lock_path: pathlib.Path) -> None:
    with PidLock(lock_path):
        with pytest.raises(AlreadyRunning) as info:
            PidLock(lock_path).acquire()
        assert info.value.pid == os.getpid()


def test_acquiring_twice_is_an_error(lock_path: pathlib.Path) -> None:
    with PidLock(lock_path) as lock:
        with pytest.raises(PidLockError, match="already locked"):
            lock.acquire()
        assert lock.held


def test_holder_that_wrote_no_pid(lock_path: pathlib.Path) -> None:
    lock_path.parent.mkdir()
    fd = os.open(lock_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        with pytest.raises(AlreadyRunning) as info:
            PidLock(lock_path).acquire()
    finally:
        os.close(fd)
    assert info.value.pid is None
    assert (
        str(info.value) == f"another fireclaw-swarm (pid unknown) is running: it holds {lock_path}"
    )


def test_descriptor_is_not_inherited(
    lock_path: pathlib.Path, children: list[subprocess.Popen[str]]
) -> None:
    lock = PidLock(lock_path)
    lock.acquire()
    # close_fds=False: only O_CLOEXEC keeps the descriptor out of the child.
    child = spawn(WAITER, close_fds=False)
    children.append(child)
    targets = {
        os.readlink(f"/proc/{child.pid}/fd/{fd}") for fd in os.listdir(f"/proc/{child.pid}/fd")
    }
    assert str(lock_path) not in targets
    lock.release()
    assert child.poll() is None
    result = try_lock_elsewhere(lock_path)
    assert result.stdout == "locked\n", result.stderr


def test_unopenable_path_is_a_pidlock_error(tmp_path: pathlib.Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(PidLockError, match="cannot open lock file") as info:
        PidLock(blocker / "swarm.pid").acquire()
    assert not isinstance(info.value, AlreadyRunning)


# --- procid ----------------------------------------------------------------


def boot_id() -> str:
    return pathlib.Path("/proc/sys/kernel/random/boot_id").read_text().strip()


def test_identity_of_a_live_child(children: list[subprocess.Popen[str]]) -> None:
    child = spawn(WAITER)
    children.append(child)
    ident = process_identity(child.pid)
    assert ident is not None
    assert ident.pid == child.pid
    assert ident.boot_id == boot_id()
    assert ident.start_time >= process_identity(os.getpid()).start_time  # type: ignore[union-attr]
    assert process_identity(child.pid) == ident  # stable
    assert still_running(ident)


def test_exited_child_is_not_running_and_is_gone_once_reaped(
    children: list[subprocess.Popen[str]],
) -> None:
    child = spawn(WAITER)
    children.append(child)
    ident = process_identity(child.pid)
    assert ident is not None
    assert child.stdin is not None
    child.stdin.close()
    # Wait for the exit but leave the zombie in place.
    os.waitid(os.P_PID, child.pid, os.WEXITED | os.WNOWAIT)
    assert process_identity(child.pid) is not None
    assert not still_running(ident)
    child.wait(timeout=10)
    assert process_identity(child.pid) is None
    assert not still_running(ident)


def test_recycled_pid_or_other_boot_is_not_the_same_process() -> None:
    me = process_identity(os.getpid())
    assert me is not None and still_running(me)
    assert not still_running(msgspec.structs.replace(me, start_time=me.start_time + 1))
    assert not still_running(msgspec.structs.replace(me, boot_id="0" * 36))


def test_no_such_pid() -> None:
    assert process_identity(0) is None
    assert process_identity(-1) is None
    assert process_identity(2**22 + 1) is None  # above pid_max's hard limit
    assert not still_running(ProcessIdentity(pid=2**22 + 1, start_time=1, boot_id=boot_id()))


def test_comm_with_spaces_and_parens(children: list[subprocess.Popen[str]]) -> None:
    code = (
        "import pathlib, sys\npathlib.Path('/proc/self/comm').write_text('a) b (c) 1 2')\n" + WAITER
    )
    child = spawn(code)
    children.append(child)
    stat = pathlib.Path(f"/proc/{child.pid}/stat").read_text()
    assert "(a) b (c) 1 2)" in stat
    ident = process_identity(child.pid)
    assert ident is not None
    expected = int(stat.rsplit(")", 1)[1].split()[19])
    assert ident.start_time == expected
    assert still_running(ident)


def test_parse_stat() -> None:
    fields = " ".join(str(i) for i in range(4, 53))
    assert parse_stat(f"42 (x) (y) ) z) S {fields}") == ("S", 22)
    with pytest.raises(ValueError):
        parse_stat("42 no parens at all")
    with pytest.raises(ValueError):
        parse_stat("42 (short) S 1 2")
