"""The HTTP listener for people and monitors: ``http:`` in swarm.yaml.

``serve_http`` reads the tokens, binds the address and serves the app of
supervisor/webapp.py (the dashboard, ``/metrics``, ``/v1``) with hypercorn's
trio worker, in the supervisor's root nursery, until cancelled. Its socket is
closed on every way out; after a ``kill -9`` nothing of it is left, since the
socket dies with the process.

Exceptions::

    HttpServerError     the listener cannot be set up (a token file, the address)
"""

from __future__ import annotations

import logging
import re
import socket
from functools import partial
from pathlib import Path
from typing import Final

import trio
from fireclaw.config.http import DEFAULT_TOKEN_NAME, Access, HttpSpec
from fireclaw.supervisor.metrics import LoopLag, config_models
from fireclaw.supervisor.metrics_events import EventMetrics, follow
from fireclaw.supervisor.secretfile import SecretFileError, ensure_secret, read_secret
from fireclaw.supervisor.web_views import Fleet
from fireclaw.supervisor.webapp import allowed_hosts_for, build_app
from fireclaw.supervisor.webauth import Auth
from hypercorn.config import Config as HyperConfig
from hypercorn.config import Sockets
from hypercorn.trio.run import worker_serve
from hypercorn.utils import wrap_app

__all__ = ["HttpServerError", "read_tokens", "serve_http"]

logger = logging.getLogger(__name__)


class HttpServerError(Exception):
    """The HTTP listener cannot be set up; the message is one line."""


def read_tokens(spec: HttpSpec, state_dir: Path) -> list[tuple[str, Access]]:
    """The tokens ``spec`` names, read from their files; with none named, the one at
    ``<state_dir>/secrets/http-token`` (made at the first start). Blocking."""
    if not spec.tokens:
        path = state_dir / "secrets" / DEFAULT_TOKEN_NAME
        return [(ensure_secret(path, _TOKEN_RE, _TOKEN_WHAT), "read")]
    return [(read_secret(Path(t.file), _TOKEN_RE, _TOKEN_WHAT), t.access) for t in spec.tokens]


_TOKEN_RE: Final = re.compile(r"[A-Za-z0-9._~+/=-]{16,512}")
_TOKEN_WHAT: Final = "a token of 16 to 512 URL-safe characters"


def _bind(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        sock.bind((host, port))
        sock.listen(128)
        sock.setblocking(False)
        sock.set_inheritable(False)
    except OSError as exc:
        sock.close()
        shown = f"[{host}]:{port}" if family == socket.AF_INET6 else f"{host}:{port}"
        raise HttpServerError(f"http.listen {shown}: {exc.strerror or exc}") from exc
    return sock


async def serve_http(
    fleet: Fleet,
    spec: HttpSpec,
    state_dir: Path,
    *,
    task_status: trio.TaskStatus[str] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve the dashboard, ``/metrics`` and ``/v1`` on ``spec.listen`` until cancelled.

    Reads the tokens, binds (port 0: any free port), and reports the URL it
    serves (``http://127.0.0.1:8470``) once it accepts connections. The socket
    is closed on every way out. Raises ``HttpServerError`` (one line) when a
    token file or the address cannot be used.
    """
    try:
        tokens = await trio.to_thread.run_sync(read_tokens, spec, state_dir)
    except SecretFileError as exc:
        raise HttpServerError(f"http: {exc}") from exc
    host, port = spec.address
    auth = Auth(tokens, allow_loopback=spec.allow_loopback_without_token)
    sock = _bind(host, port)
    try:
        port = sock.getsockname()[1]
        shown = f"[{host}]" if ":" in host else host
        url = f"http://{shown}:{port}"
        lag = LoopLag()
        events = EventMetrics(models=lambda: config_models(fleet.config))
        app = build_app(
            fleet,
            auth,
            allowed_hosts=allowed_hosts_for(host, port),
            lag=lag,
            events=events,
            secrets=tuple(token for token, _ in tokens),
        )
        config = HyperConfig()
        config.accesslog = None  # requests are not logged; actions are in the audit trail
        config.errorlog = logger
        config.graceful_timeout = 1.0
        sockets = Sockets(secure_sockets=[], insecure_sockets=[sock], quic_sockets=[])
        async with trio.open_nursery() as nursery:
            nursery.start_soon(lag.run)
            nursery.start_soon(follow, events, fleet.watch())
            await nursery.start(
                partial(
                    worker_serve,
                    # starlette's ASGI types are looser than hypercorn's; the same protocol
                    wrap_app(app, config.wsgi_max_body_size, "asgi"),  # type: ignore[arg-type]
                    config,
                    sockets=sockets,
                    shutdown_trigger=trio.sleep_forever,
                )
            )
            logger.info("http: dashboard, /metrics and /v1 on %s", url)
            task_status.started(url)
    finally:
        sock.close()
