"""Run a real ``fireclaw-swarm up`` in a subprocess and drive it like an operator.

Readiness comes from the supervisor's own sd_notify ``READY=1`` on a socket the
test binds; state changes are awaited with the API's status long-poll. Nothing
here sleeps to wait for something.
"""

from __future__ import annotations

import grp
import os
import pwd
import signal
import socket
import subprocess
import sys
import tempfile
import textwrap
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, Final

import msgspec
import psutil
import pytest
from fireclaw.pool import cgroup, netns, network
from fireclaw.pool.runtime import instance_id
from fireclaw.supervisor.client import ApiClient
from fireclaw.supervisor.daemon import DB_NAME
from fireclaw.supervisor.state import Store

FIRECLAW = str(Path(sys.executable).parent / "fireclaw-swarm")
PY = sys.executable

#: The control timings end-to-end tests run with: the default config's heartbeats
#: (a loaded machine must not turn a slow beat into a crash and break a test that
#: counts crashes), and its boot timeout.
HEARTBEAT_INTERVAL: Final = 2.0
HEARTBEAT_TIMEOUT: Final = 10.0
BOOT_TIMEOUT: Final = 30.0
#: How long a test waits for a VM to (re)start: the boot timeout with headroom
#: for a machine shared with other test runs.
WAIT: Final = 3 * BOOT_TIMEOUT
#: Stopping: the guest gets GRACE_PERIOD, then TERM_TIMEOUT after SIGTERM; the
#: whole fleet FLEET_DEADLINE.
GRACE_PERIOD: Final = 5.0
TERM_TIMEOUT: Final = 2.0
FLEET_DEADLINE: Final = 20.0
#: How long a test waits for the supervisor to exit after SIGTERM.
STOP_WAIT: Final = 2 * FLEET_DEADLINE + 10

#: The longest backoff of FAST_RESTART.
BACKOFF_MAX: Final = 0.2

#: A role that boots fast and restarts fast, for tests.
FAST_RESTART = f"""
    restart:
      max_restarts: 3
      window: 600
      stable_after: 600
      backoff: {{base: 0.05, max: {BACKOFF_MAX}}}
"""


#: The echo harness: the agent's name and the prompt, back. The shipped roles ask a
#: model; tests of the supervision machinery need no model server, so their roles
#: say they echo.
ECHO = (
    "harness: {kind: command, timeout: 600, command:"
    """ [sh, -c, 'printf "%s: %s\\n" "$FIRECLAW_AGENT" "$FIRECLAW_PROMPT"']}\n"""
)


def role_yaml(name: str, *, min_idle: int = 1, max_active: int = 4, extra: str = "") -> str:
    """A role of the worker template that restarts fast and echoes (``ECHO``),
    unless ``extra`` gives it a harness of its own."""
    if "harness:" not in extra:
        extra = ECHO + extra
    body = f"""
  {name}:
    template: worker
    pool: {{min_idle: {min_idle}, max_active: {max_active}}}
""" + textwrap.indent(textwrap.dedent(FAST_RESTART) + extra, "    ")
    return body


def swarm_yaml(
    *roles: str,
    control: str = "",
    irc: str = "enabled: false",
    backend: str = "process",
    network: str = "",
    stop: str = "",
) -> str:
    control = control or (
        f"heartbeat_interval: {HEARTBEAT_INTERVAL}\n  heartbeat_timeout: {HEARTBEAT_TIMEOUT}\n"
        f"  boot_timeout: {BOOT_TIMEOUT}"
    )
    return (
        f"version: 1\nbackend: {backend}\n"
        f"irc:\n  {irc}\n"
        + (f"network:\n  {network}\n" if network else "")
        + f"control:\n  {control}\n"
        + "stop:\n  "
        + (
            stop
            or f"grace_period: {GRACE_PERIOD}\n  term_timeout: {TERM_TIMEOUT}\n"
            f"  fleet_deadline: {FLEET_DEADLINE}"
        )
        + "\n"
        "roles:" + "".join(roles) + "\n"
    )


class Swarm:
    """One supervisor on ``root``. ``command`` runs instead of the venv's
    ``fireclaw-swarm`` (with ``env`` added to the environment), as ``user``
    when given."""

    def __init__(
        self,
        root: Path,
        config_text: str,
        *,
        command: list[str] | None = None,
        user: str | None = None,
        env: dict[str, str] | None = None,
    ) -> None:
        self.root = root
        self.command = command or [FIRECLAW]
        self.user = user
        self.env = env or {}
        self.config = root / "swarm.yaml"
        self.state = root / "state"
        self.config.write_text(config_text)
        self.proc: subprocess.Popen[bytes] | None = None
        self.log = root / "supervisor.log"
        self._notify: socket.socket | None = None
        self.baseline = leftovers(self.state)

    def leftovers(self) -> dict[str, list[str]]:
        """What this swarm left behind that was not there before it started."""
        return leftovers(self.state, self.baseline)

    # --- life -------------------------------------------------------------------

    def start(self, *, timeout: float = WAIT, args: Sequence[str] = ()) -> None:
        notify_path = self.root / "notify.sock"
        notify_path.unlink(missing_ok=True)
        self._notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self._notify.bind(str(notify_path))
        env = dict(os.environ, NOTIFY_SOCKET=str(notify_path), **self.env)
        if self.user is not None:
            notify_path.chmod(0o666)  # the supervisor's user must be able to send
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(
                [
                    *self.command,
                    "up",
                    "--config",
                    str(self.config),
                    "--state-dir",
                    str(self.state),
                    *args,
                ],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=log,
                env=env,
                user=self.user,
                group=self.user and grp.getgrgid(pwd.getpwnam(self.user).pw_gid).gr_name,
                extra_groups=[] if self.user else None,
            )
        self.wait_notify("READY=1", timeout)

    def wait_notify(self, field: str, timeout: float) -> str:
        assert self._notify is not None
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0 or (self.proc is not None and self.proc.poll() is not None):
                raise AssertionError(f"no {field} from the supervisor; log:\n{self.tail()}")
            self._notify.settimeout(min(left, 0.5))
            try:
                msg = self._notify.recv(4096).decode()
            except TimeoutError:
                continue
            if field in msg.split("\n"):
                return msg

    def stop(self, sig: int = signal.SIGTERM, timeout: float = STOP_WAIT) -> int:
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            return self.proc.wait(timeout)
        finally:
            if self.proc.poll() is None:
                self.proc.kill()
                self.proc.wait()

    def kill9(self) -> None:
        assert self.proc is not None
        self.proc.kill()
        self.proc.wait()

    def close(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.stop()
        if self._notify is not None:
            self._notify.close()

    def tail(self, n: int = 40) -> str:
        try:
            return "\n".join(self.log.read_text().splitlines()[-n:])
        except FileNotFoundError:
            return "(no log)"

    # --- talking to it --------------------------------------------------------------

    @property
    def api(self) -> ApiClient:
        return ApiClient(self.state / "api.sock")

    def cli(
        self, *args: str, timeout: float = 60, input: bytes | None = None
    ) -> subprocess.CompletedProcess[bytes]:
        return subprocess.run(
            [FIRECLAW, "--state-dir", str(self.state), *args],
            capture_output=True,
            timeout=timeout,
            input=input,
        )

    def status(self) -> dict[str, Any]:
        result: dict[str, Any] = self.api.get("/status")
        return result

    def wait_for(
        self, what: str, pred: Callable[[dict[str, Any]], bool], timeout: float = WAIT
    ) -> dict[str, Any]:
        """Long-poll /status until ``pred(status)`` holds, or fail naming ``what``."""
        deadline = time.monotonic() + timeout
        st = self.status()
        while not pred(st):
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(
                    f"timed out waiting for {what}; last status: {st}\n{self.tail()}"
                )
            st = self.api.get(
                f"/status?since={st['version']}&wait={min(left, 5):.2f}", timeout=left + 5
            )
        return st

    def history(
        self, pred: Callable[[dict[str, Any]], bool], timeout: float = WAIT
    ) -> list[dict[str, Any]]:
        """Every status seen, through the long-poll, until ``pred`` holds (included).

        The long-poll answers on each change, so a state that lasts through at
        least one change is in the list."""
        deadline = time.monotonic() + timeout
        seen = [self.status()]
        while not pred(seen[-1]):
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(
                    f"timed out waiting for {pred}; last status: {seen[-1]}\n{self.tail()}"
                )
            st = self.api.get(
                f"/status?since={seen[-1]['version']}&wait={min(left, 5):.2f}", timeout=left + 5
            )
            if st["version"] != seen[-1]["version"]:
                seen.append(st)
        return seen

    def quiet_for(self, seconds: float) -> list[dict[str, Any]]:
        """Every status seen during ``seconds``: for showing that something does
        NOT happen, given time in which it would have."""
        deadline = time.monotonic() + seconds
        seen = [self.status()]
        while (left := deadline - time.monotonic()) > 0:
            st = self.api.get(
                f"/status?since={seen[-1]['version']}&wait={left:.2f}", timeout=left + 10
            )
            if st["version"] != seen[-1]["version"]:
                seen.append(st)
        return seen

    def events(self, kind: str | None = None) -> list[dict[str, Any]]:
        """The event log (from the API), optionally only events of ``kind``."""
        found: list[dict[str, Any]] = self.api.get("/events?limit=1000")["events"]
        return [e for e in found if kind is None or e["kind"] == kind]

    def agents(self, role: str | None = None, state: str | None = None) -> list[dict[str, Any]]:
        return [
            a
            for a in self.status()["agents"]
            if (role is None or a["role"] == role) and (state is None or a["state"] == state)
        ]


def stored_events(state: Path) -> list[dict[str, Any]]:
    """The event log read from the state database itself, for a swarm that has stopped."""
    store = Store.open(state / DB_NAME)
    try:
        return [msgspec.to_builtins(e) for e in store.events(limit=100_000)]
    finally:
        store.close()


def idle(role: str, n: int) -> Callable[[dict[str, Any]], bool]:
    return lambda st: role in st["roles"] and st["roles"][role]["idle"] == n


#: What a stopped swarm leaves: nothing of any kind.
NOTHING: dict[str, list[str]] = {
    k: [] for k in ("netns", "cgroups", "guest_processes", "sockets", "links", "nft", "disks")
}


def leftovers(state: Path, baseline: dict[str, list[str]] | None = None) -> dict[str, list[str]]:
    """What the swarm of ``state`` left behind (namespaces, cgroups, guest processes,
    sockets and VM run directories), less what was already there in ``baseline``.
    Only what carries this swarm's instance id or names its state dir counts, so
    other swarms on the host are not mistaken for it."""
    now = _everything(state)
    if baseline is None:
        return now
    return {k: [x for x in v if x not in baseline.get(k, [])] for k, v in now.items()}


def _everything(state: Path) -> dict[str, list[str]]:
    mine = instance_id(state)
    procs = []
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            env = Path(f"/proc/{pid}/environ").read_bytes()
        except OSError:
            continue
        if f"FIRECLAW_VM_ID={mine}-".encode() in env:
            procs.append(pid)
            continue
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        except OSError:
            continue
        # A QEMU VM of this swarm: its console log is in the state dir.
        if cmdline.startswith(b"qemu-system") and str(state).encode() in cmdline:
            procs.append(f"qemu:{pid}")
    run_dirs = [str(p) for p in (state / "logs" / "run").glob("*")]
    run_dirs += [str(p) for p in Path(tempfile.gettempdir()).glob(f"fireclaw-{mine}-*")]
    return {
        "netns": netns.leftovers(f"{netns.PREFIX}{mine}-"),
        "cgroups": [str(p) for p in cgroup.leftovers() if p.name.startswith(f"{mine}-")],
        "guest_processes": procs,
        "sockets": [p.name for p in state.glob("*.sock")] + run_dirs,
        "links": network.host_links(mine) if os.geteuid() == 0 else [],
        "nft": [t for t in network.tables() if t.endswith(f"_{mine}")],
        "disks": [p.name for p in (state / "disks").glob("*")],
    }


@pytest.fixture
def make_swarm(tmp_path: Path) -> Iterator[Callable[..., Swarm]]:
    """Makes (and by default starts) swarms on ``tmp_path``; after the test, stops
    them and checks that nothing of them is left."""
    made: list[Swarm] = []
    baseline = leftovers(tmp_path / "state")

    def make(
        config_text: str,
        *,
        start: bool = True,
        root: Path | None = None,
        env: dict[str, str] | None = None,
    ) -> Swarm:
        swarm = Swarm(root or tmp_path, config_text, env=env)
        made.append(swarm)
        if start:
            swarm.start()
        return swarm

    yield make
    for swarm in made:
        swarm.close()
    # Whatever a test did, once its supervisor has stopped nothing of it is left.
    assert leftovers(tmp_path / "state", baseline) == NOTHING


def gone(pid: int) -> bool:
    """The process has exited (a zombie not yet reaped by its parent counts)."""
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def pids(swarm: Swarm, role: str) -> dict[str, int]:
    """VM name to guest pid, for ``role``'s VMs."""
    return {a["name"]: a["pid"] for a in swarm.agents(role)}
