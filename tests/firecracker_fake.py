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
"""

from __future__ import annotations

import json
import os
import re
import sys
import threading
from pathlib import Path

TESTS = Path(__file__).resolve().parent


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
    os.chdir(root)
    os.execv(exec_file, [str(exec_file), "--id", one, *rest])


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
