"""FAKE ``jailer`` and ``firecracker`` executables, for the firecracker contract tests only.

Neither runs a VM. ``write_fakes(bin_dir, log_dir)`` writes two small scripts
that call ``main`` here:

- the fake jailer checks its command line as the real one would (the id, the
  exec file, uid/gid, the chroot base; the chroot root must exist, holding
  what the VM will be told about), records it in ``log_dir/jailer.json``,
  and execs the fake firecracker with its own arguments, in the jail root as
  its working directory (the real jailer would chroot there; files are named
  relative to it either way);
- the fake firecracker serves ``tests/firecracker_spec.SpecChecker`` on the
  ``--api-sock`` path inside that root, logs every exchange to
  ``log_dir/api.jsonl``, and exits after a SendCtrlAltDel, as Firecracker
  does when its guest shuts down. A test may have it refuse one path
  (``log_dir/inject-fault``) to see how the driver takes a refusal.

With ``log_dir/run-guest`` present (the pool's tests), the fake jailer also
joins the ``--netns`` it is given, and the fake firecracker stands in for
the guest as well: at InstanceStart it writes ``GUEST_MARK`` into each
writable drive (as a guest writes to its root disk) and runs the real guest
daemon as its child, with the boot source's kernel command line as ``--cmdline`` (so it
dials the URL, with the vm id and token, the pool gave the VM), stops and
continues it with pause and resume, keeps that command line in the snapshot
it writes, and after a snapshot/load and resume runs the guest daemon again
with the template's command line: a clone says Hello as its template did,
from its own namespace. It is a process, not a restored VM: it keeps none of
the template's memory.
"""

from __future__ import annotations

import ctypes
import json
import os
import re
import signal
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

TESTS = Path(__file__).resolve().parent
#: What the fake guest writes into each writable drive at boot, and where.
GUEST_MARK = b"written by the guest at boot"
GUEST_MARK_AT = 64 << 20


def write_fakes(bin_dir: Path, log_dir: Path) -> tuple[Path, Path]:
    """(fake firecracker, fake jailer) executables in ``bin_dir``."""
    bin_dir.mkdir(parents=True, exist_ok=True)
    made = []
    for role in ("firecracker", "jailer"):
        script = bin_dir / role
        script.write_text(
            f"#!{sys.executable}\n"
            f"# FAKE {role}: a stand-in for the contract tests; it runs no VM.\n"
            "import sys\n"
            f"sys.path.insert(0, {str(TESTS)!r})\n"
            "from firecracker_fake import main\n"
            f"main({role!r}, {str(log_dir)!r}, sys.argv[1:])\n"
        )
        script.chmod(0o755)
        made.append(script)
    return made[0], made[1]


def _jailer(log_dir: Path, argv: list[str]) -> None:
    split = argv.index("--")
    own, rest = argv[:split], argv[split + 1 :]
    opts: dict[str, list[str]] = {}
    for name, value in zip(own[::2], own[1::2], strict=True):
        opts.setdefault(name.removeprefix("--"), []).append(value)
    one = opts.get("id", [""])[0]
    problems = []
    if not re.fullmatch(r"[A-Za-z0-9-]{1,64}", one):
        problems.append(f"bad --id {one!r}")
    exec_file = Path(opts.get("exec-file", [""])[0])
    if "firecracker" not in exec_file.name or not os.access(exec_file, os.X_OK):
        problems.append(f"bad --exec-file {exec_file}")
    for key in ("uid", "gid"):
        if not opts.get(key, [""])[0].isdigit():
            problems.append(f"bad --{key}")
    root = Path(opts.get("chroot-base-dir", ["/srv/jailer"])[0]) / exec_file.name / one / "root"
    if not root.is_dir():
        problems.append(f"no chroot root {root}")
    record = {"argv": argv, "options": opts, "rest": rest, "problems": problems}
    (log_dir / "jailer.json").write_text(json.dumps(record))
    if problems:
        print("fake jailer:", "; ".join(problems), file=sys.stderr)
        sys.exit(1)
    if (log_dir / "run-guest").exists() and "netns" in opts:
        _join_netns(opts["netns"][0])
    os.chdir(root)
    os.execv(exec_file, [str(exec_file), "--id", one, *rest])


def _join_netns(path: str) -> None:
    """Enter the network namespace at ``path``, as the real jailer does (setns)."""
    libc = ctypes.CDLL(None, use_errno=True)
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        if libc.setns(fd, 0x40000000) != 0:  # CLONE_NEWNET
            raise OSError(ctypes.get_errno(), f"setns {path}")
    finally:
        os.close(fd)


class _Guest:
    """The guest daemon as the fake firecracker's child, in place of a guest kernel."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.cmdline = ""
        self.writable: list[str] = []
        self.proc: subprocess.Popen[bytes] | None = None

    def wrap(self, judge: Any) -> Any:
        def handle(method: str, path: str, raw: bytes) -> tuple[int, bytes]:
            status, answer = judge(method, path, raw)
            if status < 300:
                self.after(path, json.loads(raw) if raw else None)
            return status, answer

        return handle

    def after(self, path: str, body: Any) -> None:
        if path == "/boot-source":
            self.cmdline = body.get("boot_args", "")
        elif path.startswith("/drives/") and not body.get("is_read_only"):
            self.writable.append(body["path_on_host"])
        elif path == "/actions" and body["action_type"] == "InstanceStart":
            for drive in self.writable:
                with open(self.root / drive, "r+b") as disk:
                    disk.seek(GUEST_MARK_AT)
                    disk.write(GUEST_MARK)
            self.start()
        elif path == "/actions" and self.proc is not None:  # SendCtrlAltDel: it powers off
            self.proc.kill()
        elif path == "/snapshot/create":
            # Kept in the snapshot, before the answer: the driver moves the file next.
            state_file = self.root / body["snapshot_path"]
            state = json.loads(state_file.read_text())
            state_file.write_text(json.dumps({**state, "fake_guest_cmdline": self.cmdline}))
        elif path == "/snapshot/load":
            state = json.loads((self.root / body["snapshot_path"]).read_text())
            self.cmdline = state["fake_guest_cmdline"]
        elif path == "/vm" and self.proc is None:
            self.start()  # the first resume after a load
        elif path == "/vm" and self.proc is not None:
            paused = body["state"] == "Paused"
            self.proc.send_signal(signal.SIGSTOP if paused else signal.SIGCONT)

    def start(self) -> None:
        line = self.root / "fake-guest.cmdline"
        line.write_text(self.cmdline)
        argv = [sys.executable, "-m", "fireclaw.guest_daemon", "--cmdline", str(line)]
        # Its output goes to the VM's log, as a console's; it dies with the VMM, as a
        # guest does (also when the VMM is killed).
        self.proc = subprocess.Popen(argv, preexec_fn=_die_with_parent)
        signal.signal(signal.SIGTERM, self._vmm_stopped)

    def _vmm_stopped(self, signum: int, frame: Any) -> None:
        """SIGTERM to the VMM: its guest goes first, then the VMM ends as it would."""
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait()
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        os.kill(os.getpid(), signal.SIGTERM)


def _die_with_parent() -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


def _firecracker(log_dir: Path, argv: list[str]) -> None:
    from firecracker_spec import Exchange, SpecChecker, load_spec, serve

    api_sock = argv[argv.index("--api-sock") + 1]
    root = Path.cwd()
    checker = SpecChecker(load_spec(), root=root)
    inject = log_dir / "inject-fault"  # a test's way to have one call refused
    if inject.exists():
        refused_path = inject.read_text().strip()
        judge = checker.handle

        def handle(method: str, path: str, raw: bytes) -> tuple[int, bytes]:
            if path == refused_path:
                fault = "Internal error (injected by the test)\nsecond line"
                checker.exchanges.append(Exchange(method, path, None, 400, fault))
                return 400, json.dumps({"fault_message": fault}).encode()
            return judge(method, path, raw)

        checker.handle = handle  # type: ignore[method-assign]
    if (log_dir / "run-guest").exists():
        checker.handle = _Guest(root).wrap(checker.handle)  # type: ignore[method-assign]
    print("fake firecracker: serving the spec checker", flush=True)

    def on_exchange(exchange: object) -> None:
        body = getattr(exchange, "body", None)
        if getattr(exchange, "status", 0) == 204 and body == {"action_type": "SendCtrlAltDel"}:
            threading.Timer(0, os._exit, (0,)).start()  # after the answer is sent

    serve(Path(api_sock.lstrip("/")), checker, log_dir / "api.jsonl", on_exchange)


def main(role: str, log_dir: str, argv: list[str]) -> None:
    if role == "jailer":
        _jailer(Path(log_dir), argv)
    else:
        _firecracker(Path(log_dir), argv)
