"""The control API: HTTP/1.1 with JSON bodies over a unix socket.

The CLI talks to a running supervisor only through ``<state_dir>/api.sock``. The
socket is created with mode 0600: whoever can open it controls the swarm. The
server is a thin adapter (STYLE.md 3): h11 parses and frames HTTP
(supervisor/api_http.py), each route validates its input with a msgspec Struct
(supervisor/api_requests.py) and calls one ``Controller`` method (the supervisor
implements it), and the answer goes back as JSON.

Routes::

    GET  /health                      {"ok": true, "pid": N}   (answered here, no controller call)
    GET  /status[?since=V&wait=S]     controller.status(), after a change past version V
    POST /run     {"role", "argv", "user"?}   controller.run(): an ndjson stream, see below
    POST /tasks   {"role", "prompt"}  controller.submit_task()
    POST /answers {"name", "text"}    controller.answer(): resume a task waiting for input
    GET  /tasks[?state=S]             {"tasks": controller.list_tasks(S)}
    GET  /tasks/<id>                  controller.get_task(id)
    POST /scale   {"role", "n"}       controller.scale()
    POST /reset   {"name"}            controller.reset()
    POST /agents  {"role", "name"?, "model"?}   controller.invoke()    a named agent
    POST /agents/<name> {"model"?, "persona"?}  controller.retune()
    DELETE /agents/<name>             controller.destroy()
    POST /agents/<name>/stop (no body or {})  controller.cancel(): end its current turn
    POST /reload  (no body or {})     controller.reload()
    GET  /events[?after=N&limit=N]    {"events": controller.events(after, limit)}
    GET  /usage[?by=B&since=T&key=K]  controller.usage(): the model-call ledger summed per B
                                      (agent, role, task, model or vm) since unix time T
    POST /down    {"leave_vms"?}      controller.down(): stop the fleet, or hand it over
    GET  /hosts                       {"hosts": controller.hosts_status()}: a cluster's hosts
    POST /hosts/<name>/drain (no body or {})    controller.drain(name, True)
    POST /hosts/<name>/undrain (no body or {})  controller.drain(name, False)
    GET  /openapi.json                this API as an OpenAPI 3.1 document (supervisor/openapi.py)

Every error is ``{"error": "<one line>"}`` with its status: 400 bad JSON, wrong
field types, unknown fields or query parameters; 404 unknown route; 405 wrong
method (with ``Allow``); 408 request not received within the idle timeout; 413
body over ``MAX_BODY_BYTES``; 431 request head too large; a ``ControllerError``'s
own status; 507 when the state disk refuses what the request needs written or
read (full, read-only, failing: ``StateUnwritable``), to be tried again once
it has room; 500 for anything unexpected (logged; the server keeps serving).

One request per connection: every response says ``Connection: close``.

``POST /run`` answers ``200`` with ``Content-Type: application/x-ndjson``, chunked.
The controller's ``run`` gives the pool's typed run events (``pool/runs.py``);
each becomes its line (``api_run.py``), written and flushed before the next event
is taken, and the run's exit code (or why its VM was lost) is the last line. The
response head is only sent with the first line, so a ``ControllerError`` or
``PoolError`` raised before the first event (an unknown role; no VM ready: 503)
is an ordinary error response with its status; a ``ControllerError`` raised
later becomes a last line ``{"error": "..."}``.

A client that goes away mid-run cancels the run: the events are taken inside a
cancel scope, which is cancelled when the client's end of the socket reaches EOF
(a client that half-closes its side counts as gone) or when a write to it fails
or stalls for the idle timeout; the events' iterator is then closed, which ends
the command (the pool retires its VM).

Exceptions::

    ControllerError     raised by a Controller: the request is refused (status + one line)
    StreamClosed        a /run line written after its client went away (api_http.py)
    ApiServerError      the socket cannot be set up (serve_api; api_http.py)
"""

from __future__ import annotations

import contextlib
import logging
import os
import pathlib
import re
from collections.abc import AsyncGenerator, Awaitable, Callable
from dataclasses import dataclass
from typing import Final, Protocol

import h11
import msgspec
import trio
from fireclaw.pool.group import PoolError
from fireclaw.pool.runs import RunEvent
from fireclaw.supervisor.api_http import (
    IDLE_TIMEOUT,
    MAX_HEAD_BYTES,
    ClientGone,
    HttpError,
    NdjsonWriter,
    Request,
    StreamClosed,
    cancel_on_disconnect,
    error_body,
    linger,
    listen,
    one_line,
    read_request,
    respond,
    unlink_if_ours,
)
from fireclaw.supervisor.api_requests import (
    ANSWER_DECODER,
    DOWN_DECODER,
    EMPTY_DECODER,
    INVOKE_DECODER,
    MAX_EVENTS_LIMIT,
    MAX_STATUS_WAIT,
    RESET_DECODER,
    RETUNE_DECODER,
    RUN_DECODER,
    SCALE_DECODER,
    TASK_DECODER,
    TASK_STATES,
    USAGE_BY,
    decode_body,
    int_param,
    query_params,
)
from fireclaw.supervisor.api_run import RunLines
from fireclaw.supervisor.state import StateUnwritable

__all__ = [
    "Controller",
    "ControllerError",
    "serve_api",
]

logger = logging.getLogger(__name__)


_ENCODER: Final = msgspec.json.Encoder()


class ControllerError(Exception):
    """A request the controller refuses; ``message`` is one line, ``status`` an HTTP status."""

    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.message = message
        self.status = status


class Controller(Protocol):
    """What the API needs from the supervisor. Raise ``ControllerError`` to refuse a request."""

    async def status(self, since: int | None = None, wait: float = 0.0) -> dict[str, object]:
        """The fleet. With ``since`` (a ``version`` from an earlier answer), first wait up
        to ``wait`` seconds for anything to change after it: a long poll."""
        ...

    def run(
        self, role: str | None, argv: list[str], user: str = ""
    ) -> AsyncGenerator[RunEvent, None]:
        """``argv`` run as ``user`` in a VM of ``role`` (None: the first role): the
        run's events. It may raise ``ControllerError`` at once, and ``PoolError``
        before its first event."""
        ...

    async def submit_task(self, role: str, prompt: str) -> dict[str, object]: ...

    async def get_task(self, task_id: int) -> dict[str, object]: ...

    async def answer(self, name: str, text: str) -> dict[str, object]:
        """Queue the task waiting for input that ``name`` names (``task-N``, or the
        agent that asked) again, to resume its CLI session with ``text``."""
        ...

    async def list_tasks(self, state: str | None) -> list[dict[str, object]]: ...

    async def scale(self, role: str, n: int) -> dict[str, object]: ...

    async def reset(self, name: str) -> dict[str, object]: ...

    async def reload(self) -> dict[str, object]: ...

    async def invoke(
        self, role: str, name: str | None = None, model: str | None = None
    ) -> dict[str, object]: ...

    async def retune(
        self, name: str, *, model: str | None = None, persona: str | None = None
    ) -> dict[str, object]: ...

    async def destroy(self, name: str) -> dict[str, object]: ...

    async def cancel(self, name: str, reason: str) -> dict[str, object]:
        """End the current turn(s) of the agent (or task-running VM) ``name``."""
        ...

    async def events(self, after: int, limit: int) -> list[dict[str, object]]: ...

    async def usage(self, by: str, since: int, key: str | None) -> dict[str, object]: ...

    async def down(self, leave_vms: bool = False) -> dict[str, object]: ...

    def hosts_status(self) -> list[dict[str, object]] | None:
        """A cluster's hosts (state, roles with their load, tasks, heartbeat
        age); None for one host."""
        ...

    async def drain(self, host: str, draining: bool) -> dict[str, object]:
        """Tell a cluster's host to drain (or to stop draining)."""
        ...


# ---------------------------------------------------------------- the server

_Handler = Callable[[Request, "re.Match[str]"], Awaitable[object]]


@dataclass(frozen=True)
class _Streamed:
    """A route that writes its own answer, as it goes, instead of returning a body."""

    serve: Callable[[h11.Connection, trio.SocketStream, Request], Awaitable[None]]


class _ApiServer:
    def __init__(self, controller: Controller, idle_timeout: float) -> None:
        self._controller = controller
        self._timeout = idle_timeout
        self._routes: list[tuple[re.Pattern[str], dict[str, _Handler | _Streamed]]] = [
            (re.compile(r"/health"), {"GET": self._health}),
            (re.compile(r"/status"), {"GET": self._status}),
            (re.compile(r"/run"), {"POST": _Streamed(self._run)}),
            (re.compile(r"/tasks"), {"GET": self._list_tasks, "POST": self._submit_task}),
            (re.compile(r"/tasks/(?P<id>[^/]+)"), {"GET": self._get_task}),
            (re.compile(r"/answers"), {"POST": self._answer}),
            (re.compile(r"/scale"), {"POST": self._scale}),
            (re.compile(r"/reset"), {"POST": self._reset}),
            (re.compile(r"/agents"), {"POST": self._invoke}),
            (
                re.compile(r"/agents/(?P<name>[^/]+)"),
                {"POST": self._retune, "DELETE": self._destroy},
            ),
            (re.compile(r"/agents/(?P<name>[^/]+)/stop"), {"POST": self._cancel}),
            (re.compile(r"/reload"), {"POST": self._reload}),
            (re.compile(r"/events"), {"GET": self._events}),
            (re.compile(r"/usage"), {"GET": self._usage}),
            (re.compile(r"/down"), {"POST": self._down}),
            (re.compile(r"/hosts"), {"GET": self._hosts}),
            (re.compile(r"/hosts/(?P<name>[^/]+)/drain"), {"POST": self._drain}),
            (re.compile(r"/hosts/(?P<name>[^/]+)/undrain"), {"POST": self._undrain}),
            (re.compile(r"/openapi\.json"), {"GET": self._openapi}),
        ]

    async def handle(self, stream: trio.SocketStream) -> None:
        """Serve one connection. Never raises except for cancellation."""
        conn = h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_HEAD_BYTES)
        try:
            await self._exchange(conn, stream)
        except ClientGone as exc:
            logger.debug("api: %s", exc)
            return
        except Exception:
            logger.exception("api: unexpected error while serving a connection")
            return
        await linger(stream)

    async def _exchange(self, conn: h11.Connection, stream: trio.SocketStream) -> None:
        request: Request | None = None
        with trio.move_on_after(self._timeout) as read_scope:
            try:
                request = await read_request(conn, stream, self._timeout)
            except HttpError as exc:
                await respond(conn, stream, exc.status, error_body(exc.message), self._timeout)
                return
        if read_scope.cancelled_caught:
            message = f"request not received within {self._timeout:g} s"
            await respond(conn, stream, 408, error_body(message), self._timeout)
            return
        if request is None:
            return
        try:
            handler, match = self._route(request)
        except HttpError as exc:
            await respond(
                conn, stream, exc.status, error_body(exc.message), self._timeout, allow=exc.allow
            )
            return
        if isinstance(handler, _Streamed):
            await handler.serve(conn, stream, request)
            return
        status, body = await self._call(handler, request, match)
        await respond(conn, stream, status, body, self._timeout)

    def _route(self, request: Request) -> tuple[_Handler | _Streamed, re.Match[str]]:
        for pattern, methods in self._routes:
            match = pattern.fullmatch(request.path)
            if match is None:
                continue
            handler = methods.get(request.method)
            if handler is None:
                allow = ", ".join(sorted(methods))
                raise HttpError(
                    405,
                    f"{request.method} not allowed on {request.path} (use {allow})",
                    allow=allow,
                )
            return handler, match
        raise HttpError(404, f"no such endpoint: {request.path}")

    async def _call(
        self, handler: _Handler, request: Request, match: re.Match[str]
    ) -> tuple[int, bytes]:
        """Run a handler and encode its answer; every failure becomes an error answer."""
        try:
            return 200, _ENCODER.encode(await handler(request, match))
        except HttpError as exc:
            return exc.status, error_body(exc.message)
        except ControllerError as exc:
            status = exc.status if 400 <= exc.status <= 599 else 500
            return status, error_body(exc.message)
        except StateUnwritable as exc:
            return 507, error_body(f"the state disk is {exc.why}: request not served ({exc.path})")
        except Exception as exc:
            logger.exception("api: %s %s failed", request.method, request.path)
            return 500, error_body(f"internal error: {type(exc).__name__}: {exc}")

    # -- routes

    async def _health(self, request: Request, match: re.Match[str]) -> object:
        query_params(request, frozenset())
        return {"ok": True, "pid": os.getpid()}

    async def _status(self, request: Request, match: re.Match[str]) -> object:
        query = query_params(request, frozenset({"since", "wait"}))
        if "since" not in query:
            return await self._controller.status()
        since = int_param(query, "since", 0, 0, 2**63 - 1)
        try:
            wait = float(query.get("wait", "10"))
        except ValueError:
            raise HttpError(400, f"wait: expected seconds, got {query['wait']!r}") from None
        if not 0 <= wait <= MAX_STATUS_WAIT:
            raise HttpError(400, f"wait: expected 0..{MAX_STATUS_WAIT:g} seconds, got {wait:g}")
        return await self._controller.status(since, wait)

    async def _submit_task(self, request: Request, match: re.Match[str]) -> object:
        query_params(request, frozenset())
        body = decode_body(TASK_DECODER, request.body)
        return await self._controller.submit_task(body.role, body.prompt)

    async def _list_tasks(self, request: Request, match: re.Match[str]) -> object:
        state = query_params(request, frozenset({"state"})).get("state") or None
        if state is not None and state not in TASK_STATES:
            allowed = ", ".join(sorted(TASK_STATES))
            raise HttpError(400, f"query parameter state must be one of {allowed}")
        return {"tasks": await self._controller.list_tasks(state)}

    async def _get_task(self, request: Request, match: re.Match[str]) -> object:
        query_params(request, frozenset())
        raw = match.group("id")
        if not raw.isascii() or not raw.isdigit() or len(raw) > 18:
            raise HttpError(400, f"task id must be a positive integer, not {raw!r}")
        return await self._controller.get_task(int(raw))

    async def _answer(self, request: Request, match: re.Match[str]) -> object:
        query_params(request, frozenset())
        body = decode_body(ANSWER_DECODER, request.body)
        return await self._controller.answer(body.name, body.text)

    async def _scale(self, request: Request, match: re.Match[str]) -> object:
        query_params(request, frozenset())
        body = decode_body(SCALE_DECODER, request.body)
        return await self._controller.scale(body.role, body.n)

    async def _reset(self, request: Request, match: re.Match[str]) -> object:
        query_params(request, frozenset())
        body = decode_body(RESET_DECODER, request.body)
        return await self._controller.reset(body.name)

    async def _invoke(self, request: Request, match: re.Match[str]) -> object:
        query_params(request, frozenset())
        body = decode_body(INVOKE_DECODER, request.body)
        return await self._controller.invoke(body.role, body.name, body.model)

    async def _retune(self, request: Request, match: re.Match[str]) -> object:
        query_params(request, frozenset())
        body = decode_body(RETUNE_DECODER, request.body)
        if body.model is None and body.persona is None:
            raise HttpError(400, "give a model, a persona or both")
        return await self._controller.retune(match["name"], model=body.model, persona=body.persona)

    async def _destroy(self, request: Request, match: re.Match[str]) -> object:
        query_params(request, frozenset())
        return await self._controller.destroy(match["name"])

    async def _cancel(self, request: Request, match: re.Match[str]) -> object:
        query_params(request, frozenset())
        decode_body(EMPTY_DECODER, request.body, optional=True)
        return await self._controller.cancel(match["name"], "stopped through the API")

    async def _reload(self, request: Request, match: re.Match[str]) -> object:
        query_params(request, frozenset())
        decode_body(EMPTY_DECODER, request.body, optional=True)
        return await self._controller.reload()

    async def _events(self, request: Request, match: re.Match[str]) -> object:
        query = query_params(request, frozenset({"after", "limit"}))
        after = int_param(query, "after", 0, 0, 2**63 - 1)
        limit = int_param(query, "limit", 100, 1, MAX_EVENTS_LIMIT)
        return {"events": await self._controller.events(after, limit)}

    async def _usage(self, request: Request, match: re.Match[str]) -> object:
        query = query_params(request, frozenset({"by", "since", "key"}))
        by = query.get("by", "agent")
        if by not in USAGE_BY:
            raise HttpError(400, f"query parameter by must be one of: {', '.join(USAGE_BY)}")
        since = int_param(query, "since", 0, 0, 2**63 - 1)
        key = query.get("key")
        if key is not None and not 1 <= len(key) <= 200:
            raise HttpError(400, "query parameter key must be 1 to 200 characters")
        return await self._controller.usage(by, since, key)

    async def _openapi(self, request: Request, match: re.Match[str]) -> object:
        from fireclaw.supervisor.openapi import document  # built on first use

        query_params(request, frozenset())
        return document()

    async def _down(self, request: Request, match: re.Match[str]) -> object:
        query_params(request, frozenset())
        body = decode_body(DOWN_DECODER, request.body, optional=True)
        return await self._controller.down(body.leave_vms)

    async def _hosts(self, request: Request, match: re.Match[str]) -> object:
        query_params(request, frozenset())
        return {"hosts": self._controller.hosts_status()}

    async def _drain(self, request: Request, match: re.Match[str]) -> object:
        query_params(request, frozenset())
        decode_body(EMPTY_DECODER, request.body, optional=True)
        return await self._controller.drain(match["name"], True)

    async def _undrain(self, request: Request, match: re.Match[str]) -> object:
        query_params(request, frozenset())
        decode_body(EMPTY_DECODER, request.body, optional=True)
        return await self._controller.drain(match["name"], False)

    # -- /run

    async def _run(self, conn: h11.Connection, stream: trio.SocketStream, request: Request) -> None:
        try:
            query_params(request, frozenset())
            body = decode_body(RUN_DECODER, request.body)
        except HttpError as exc:
            await respond(conn, stream, exc.status, error_body(exc.message), self._timeout)
            return

        run_scope = trio.CancelScope()
        writer = NdjsonWriter(conn, stream, run_scope, self._timeout)
        lines = RunLines()
        failure: tuple[int, str] | None = None
        with run_scope:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(cancel_on_disconnect, stream, run_scope)
                try:
                    events = self._controller.run(body.role, list(body.argv), user=body.user)
                    async with contextlib.aclosing(events):
                        async for event in events:
                            for line in lines.lines(event):
                                await writer.emit(line)
                            if lines.last is not None:
                                break  # the run is over
                    if lines.last is None:
                        failure = (500, "internal error: the run ended without its exit code")
                except ControllerError as exc:
                    status = exc.status if 400 <= exc.status <= 599 else 500
                    failure = (status, exc.message)
                except PoolError as exc:
                    failure = (503, str(exc))  # no VM for it: try again later
                except StreamClosed:
                    pass
                except Exception as exc:
                    logger.exception("api: POST /run failed")
                    failure = (500, f"internal error: {type(exc).__name__}: {exc}")
                finally:
                    nursery.cancel_scope.cancel()
        if run_scope.cancelled_caught or writer.gone or (lines.last is None and failure is None):
            raise ClientGone("client of POST /run went away; the run was cancelled")

        if failure is not None and not writer.started:
            await respond(conn, stream, failure[0], error_body(failure[1]), self._timeout)
            return
        last = lines.last
        if failure is not None:
            last = {"error": one_line(failure[1]) or "error"}
        assert last is not None
        try:
            await writer.finish(last)
        except StreamClosed as exc:
            raise ClientGone("client of POST /run went away at the end") from exc


async def serve_api(
    path: pathlib.Path,
    controller: Controller,
    *,
    idle_timeout: float = IDLE_TIMEOUT,
    task_status: trio.TaskStatus[pathlib.Path] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve the control API on a unix socket at ``path`` until cancelled.

    Replaces a stale socket at ``path``, reports ``path`` through ``task_status``
    once it accepts connections, serves each connection in its own task, and
    removes the socket when it stops. Raises ``ApiServerError`` if the socket
    cannot be set up.
    """
    sock, inode = await listen(path)
    server = _ApiServer(controller, idle_timeout)
    try:
        listener = trio.SocketListener(sock)
        async with trio.open_nursery() as nursery:
            await nursery.start(trio.serve_listeners, server.handle, [listener])
            logger.info("api: listening on %s", path)
            task_status.started(path)
    finally:
        unlink_if_ours(path, inode)
        sock.close()
