"""fireclaw.supervisor.services: stopping a service a dead supervisor left, by identity.

The processes are real (a Python stand-in run under the name ``ngircd``, so
that the registry and the name-based search treat it as the managed IRC
server), and so is the state database.
"""

from __future__ import annotations

import contextlib
import os
import select
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import psutil
from fireclaw.pool.procid import ProcessIdentity, process_identity, still_running
from fireclaw.supervisor import services
from fireclaw.supervisor.state import ServiceRecord, Store

#: Says it is ready (after ignoring SIGTERM, or starting a helper in its process
#: group, if asked to), then waits for a signal.
_STAND_IN = (
    "import os, signal, sys\n"
    "if '--ignore-term' in sys.argv: signal.signal(signal.SIGTERM, signal.SIG_IGN)\n"
    "if '--helper' in sys.argv:\n"
    "    helper = os.fork()\n"
    "    if helper == 0:\n"
    "        while True: signal.pause()\n"
    "    print(helper, flush=True)\n"
    "print('ready', flush=True)\n"
    "while True: signal.pause()\n"
)


def stand_in(state: Path, *extra: str) -> subprocess.Popen[bytes]:
    """A process whose command line is ``ngircd -c ... -n -f <state>/ircd/ngircd.conf``,
    in its own session like the managed ngircd; returned once it is ready."""
    proc = subprocess.Popen(
        ["ngircd", "-c", _STAND_IN, *extra, "-n", "-f", str(state / "ircd" / "ngircd.conf")],
        executable=sys.executable,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        start_new_session=True,
    )
    assert proc.stdout is not None
    if "--helper" not in extra:
        assert proc.stdout.readline() == b"ready\n"
    return proc


@contextlib.contextmanager
def running(state: Path, *extra: str) -> Iterator[subprocess.Popen[bytes]]:
    proc = stand_in(state, *extra)
    try:
        yield proc
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        assert proc.stdout is not None
        proc.stdout.close()


def identity_of(proc: subprocess.Popen[bytes]) -> ProcessIdentity:
    return identity_of_pid(proc.pid)


def identity_of_pid(pid: int) -> ProcessIdentity:
    ident = process_identity(pid)
    assert ident is not None
    return ident


def test_sigterm_goes_to_its_whole_process_group(tmp_path: Path) -> None:
    with running(tmp_path, "--helper") as proc:
        assert proc.stdout is not None
        helper = identity_of_pid(int(proc.stdout.readline()))
        assert proc.stdout.readline() == b"ready\n"
        ident = identity_of(proc)
        assert services.stop(ident, term_timeout=30) == "terminated"
        assert not still_running(ident)
        assert proc.wait() == -signal.SIGTERM
        # The helper got it too (it is nobody's child now: wait for it by pidfd).
        pidfd = os.pidfd_open(helper.pid)
        try:
            poller = select.poll()
            poller.register(pidfd, select.POLLIN)
            assert poller.poll(30_000), "the helper outlived its group's SIGTERM"
        finally:
            os.close(pidfd)
        assert not still_running(helper)


def test_one_that_ignores_sigterm_is_killed_after_the_wait(tmp_path: Path) -> None:
    with running(tmp_path, "--ignore-term") as proc:
        ident = identity_of(proc)
        assert services.stop(ident, term_timeout=0.2, kill_timeout=30) == "killed"
        assert proc.wait() == -signal.SIGKILL


def test_a_pid_is_never_trusted_alone(tmp_path: Path) -> None:
    with running(tmp_path) as proc:
        ident = identity_of(proc)
        # The same pid, started at another time: some other process now.
        other = ProcessIdentity(
            pid=ident.pid, start_time=ident.start_time + 1, boot_id=ident.boot_id
        )
        assert services.stop(other) == "gone"
        assert (
            services.stop(
                ProcessIdentity(pid=ident.pid, start_time=ident.start_time, boot_id="another boot")
            )
            == "gone"
        )
        assert still_running(ident) and psutil.Process(proc.pid).status() != psutil.STATUS_ZOMBIE
    assert services.stop(ident) == "gone"  # exited and reaped


def test_reclaim_stops_the_row_s_process_and_drops_the_row(tmp_path: Path) -> None:
    with running(tmp_path) as proc, Store.open(tmp_path / "swarm.db") as store:
        ident = identity_of(proc)
        rec = ServiceRecord(
            name="ircd",
            command="ngircd",
            pid=ident.pid,
            start_time=ident.start_time,
            boot_id=ident.boot_id,
        )
        store.put_service(rec)
        store.put_service(ServiceRecord(name="model", command="llama-server"))  # written ahead
        assert services.reclaim(store, rec, term_timeout=30) == "terminated"
        assert not still_running(ident)
        assert [r.name for r in store.services()] == ["model"]
        # A row written ahead names no process: nothing is signalled, the row goes.
        assert services.identity(store.services()[0]) is None
        assert services.reclaim(store, store.services()[0]) == "gone"
        assert store.services() == []
