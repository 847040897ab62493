"""The HTTP listener's app: the dashboard, ``/metrics`` and ``/v1`` over the fleet.

A starlette app (``build_app``) that reads the fleet through the same
``Controller`` the unix-socket API uses (supervisor/api.py), so both always
agree; supervisor/web.py serves it. What it shows of the fleet is made in
supervisor/web_views.py, how it reads requests and words refusals in
supervisor/web_requests.py.

Routes::

    GET  /login, POST /login, POST /logout    the login form (no token needed)
    GET  /                                    the dashboard (static/index.html)
    GET  /static/<file>                       its script and stylesheets
    GET  /metrics                             Prometheus text format (supervisor/metrics.py)
    GET  /v1/health | roles | agents | agents/{name} | tasks | events | hosts
    GET  /v1/stream                           server-sent events: a fresh view on each change
    GET  /v1/usage                            tokens per role over time (supervisor/usage_series.py)
    GET  /v1/chat                             what #agents said lately (supervisor/chatlog.py)
    GET  /v1/openapi.json                     this API (supervisor/web_openapi.py)
    POST /v1/roles/{role}/scale  {"n"}        operators only
    POST /v1/agents  {"role", "name"?}        operators only: invoke a named agent
    DELETE /v1/agents/{name}                  operators only: destroy it

Everything but the login page answers 401 without a token or a session
(supervisor/webauth.py says who gets in); every action is recorded in the
audit trail as an ``http_command`` event. Every answer carries the secure
headers below: a CSP that allows no inline script, no framing, no Referer to
other sites. No secret ever goes into an answer: the fleet's views carry
none, and the tokens stay in the ``Auth`` object.
"""

from __future__ import annotations

import html
import math
import time
import urllib.parse
from collections.abc import Callable
from importlib import resources
from typing import Final

import msgspec
import trio
from fireclaw.pool.task_states import TASK_STATES
from fireclaw.supervisor.api import ControllerError
from fireclaw.supervisor.chatlog import redact
from fireclaw.supervisor.metrics import LoopLag
from fireclaw.supervisor.metrics_events import EventMetrics
from fireclaw.supervisor.usage_series import MAX_BUCKETS, usage_series
from fireclaw.supervisor.web_requests import (
    answering,
    decode_body,
    error,
    http_error,
    int_param,
    only,
    own_origin,
    same_site,
)
from fireclaw.supervisor.web_views import MAX_EVENTS_LIMIT, Fleet, fleet_view, views
from fireclaw.supervisor.webauth import (
    COOKIE,
    CSRF_HEADER,
    SESSION_TTL,
    Auth,
    Principal,
    is_loopback,
)
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import (
    HTMLResponse,
    JSONResponse,
    RedirectResponse,
    Response,
    StreamingResponse,
)
from starlette.routing import Route
from starlette.types import ASGIApp, Message, Receive, Scope, Send

__all__ = [
    "PUBLIC",
    "SECURE_HEADERS",
    "allowed_hosts_for",
    "build_app",
]

#: What every answer says about itself: scripts and styles only from files we
#: serve, nothing framed, no Referer to other sites, nothing cached.
SECURE_HEADERS: Final = {
    "content-security-policy": (
        "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:;"
        " connect-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'"
    ),
    "x-content-type-options": "nosniff",
    "x-frame-options": "DENY",
    # same-origin, not no-referrer: with no-referrer a browser sends "Origin: null" on
    # our own form posts, which the CSRF check must refuse.
    "referrer-policy": "same-origin",
    "cross-origin-opener-policy": "same-origin",
    "cross-origin-resource-policy": "same-origin",
    "cache-control": "no-store",
}
#: Answered without a token: the login form and what it shows.
PUBLIC: Final = frozenset({"/login", "/logout", "/static/login.css"})
STATIC_FILES: Final = {
    "dashboard.js": "text/javascript; charset=utf-8",
    "dashboard.css": "text/css; charset=utf-8",
    "login.css": "text/css; charset=utf-8",
}
#: Lines of #agents one answer holds at most (the overseer keeps as many).
CHAT_LINES: Final = 200
#: The longest a reader of #agents may wait for a new line in one request.
CHAT_MAX_WAIT: Final = 30
#: The longest window the usage chart may ask for: 7 days (each bucket's read of
#: the ledger covers the rest of the window, so a longer one costs more).
_MAX_USAGE_WINDOW: Final = 7 * 86400
_MAX_FORM_BYTES: Final = 4096
_TASK_STATES: Final = TASK_STATES


def _static(name: str) -> str:
    return resources.files("fireclaw.supervisor").joinpath("static", name).read_text("utf-8")


class _ScaleBody(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    n: int


class _InvokeBody(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    role: str
    name: str | None = None


class _Web:
    def __init__(
        self,
        fleet: Fleet,
        auth: Auth,
        *,
        allowed_hosts: frozenset[str] | None,
        lag: LoopLag,
        events: EventMetrics | None = None,
        secrets: tuple[str, ...] = (),
        clock: Callable[[], float] = trio.current_time,
    ) -> None:
        self.fleet = fleet
        self.auth = auth
        self.allowed_hosts = allowed_hosts
        self.lag = lag
        self.event_metrics = events
        self.secrets = secrets
        self.clock = clock

    # --- the gate --------------------------------------------------------------------

    def who(self, request: Request) -> Principal | None:
        return self.auth.authenticate(
            authorization=request.headers.get("authorization"),
            cookie=request.cookies.get(COOKIE),
            peer=request.client.host if request.client else None,
            now=self.clock(),
        )

    def gate(self, app: ASGIApp) -> ASGIApp:
        """``app`` behind the host check, authentication and CSRF, with secure headers."""

        async def gated(scope: Scope, receive: Receive, send: Send) -> None:
            if scope["type"] != "http":
                await app(scope, receive, send)
                return

            async def secured(message: Message) -> None:
                if message["type"] == "http.response.start":
                    headers = list(message.get("headers", []))
                    headers += [(k.encode(), v.encode()) for k, v in SECURE_HEADERS.items()]
                    message = {**message, "headers": headers}
                await send(message)

            request = Request(scope)
            refusal = self._refuse(request)
            if refusal is not None:
                await refusal(scope, receive, secured)
                return
            await app(scope, receive, secured)

        return gated

    def _refuse(self, request: Request) -> Response | None:
        host = request.headers.get("host", "")
        if self.allowed_hosts is not None and host.lower() not in self.allowed_hosts:
            # A page of another site that made its name resolve to us (DNS rebinding).
            return error(421, f"unknown host {host[:100]!r}")
        if request.url.path in PUBLIC:
            return None
        who = self.who(request)
        if who is None:
            return error(401, "log in at /login or send Authorization: Bearer <token>")
        request.scope["fireclaw.who"] = who
        if request.method not in ("GET", "HEAD"):
            why = self.auth.may_post(
                who,
                csrf=request.headers.get(CSRF_HEADER),
                origin=request.headers.get("origin"),
                own_origin=own_origin(request),
            )
            if why is not None:
                return error(403, why)
        return None

    # --- pages -----------------------------------------------------------------------

    async def login_page(self, request: Request) -> Response:
        if request.method == "GET":
            return HTMLResponse(_static("login.html").replace("{{error}}", ""))
        if not same_site(request):
            return error(403, "cross-site request refused")
        wait = self.auth.login_wait(self.clock())
        if wait > 0:
            return error(429, f"too many failed logins: try again in {math.ceil(wait)} s")
        raw = await request.body()
        if len(raw) > _MAX_FORM_BYTES:
            return error(413, "login form too large")
        # The form is one urlencoded field; parsed here, without a multipart parser.
        fields = urllib.parse.parse_qs(raw.decode("ascii", "replace"), max_num_fields=4)
        made = self.auth.login((fields.get("token") or [""])[0], self.clock())
        if made is None:
            page = _static("login.html").replace(
                "{{error}}", '<p class="error" role="alert">That token is not valid.</p>'
            )
            return HTMLResponse(page, 401)
        sid, _ = made
        self.fleet.event("http_login", "http", who=made[1].label, access=made[1].access)
        response = RedirectResponse("/", 303)
        # Not Secure: the listener speaks plain HTTP (loopback, or behind a proxy
        # that adds TLS); HttpOnly and SameSite=Strict keep it from scripts and other sites.
        response.set_cookie(
            COOKIE, sid, max_age=int(SESSION_TTL), httponly=True, samesite="strict", path="/"
        )
        return response

    async def logout(self, request: Request) -> Response:
        if not same_site(request):
            return error(403, "cross-site request refused")
        sid = request.cookies.get(COOKIE)
        if sid:
            self.auth.logout(sid)
        response = RedirectResponse("/login", 303)
        response.delete_cookie(COOKIE, path="/")
        return response

    async def index(self, request: Request) -> Response:
        who: Principal = request.scope["fireclaw.who"]
        page = (
            _static("index.html")
            .replace("{{csrf}}", html.escape(who.csrf or "", quote=True))
            .replace("{{access}}", html.escape(who.access, quote=True))
        )
        return HTMLResponse(page)

    async def static(self, request: Request) -> Response:
        name = request.path_params["name"]
        media = STATIC_FILES.get(name)
        if media is None:
            return error(404, f"no such file: {name[:100]}")
        return Response(_static(name), media_type=media)

    # --- reading ---------------------------------------------------------------------

    async def health(self, request: Request) -> Response:
        only(request)
        status = await self.fleet.status()
        return JSONResponse(
            {"ok": not status.get("stopping"), "version": status["version"], "pid": status["pid"]}
        )

    async def roles(self, request: Request) -> Response:
        only(request)
        view = fleet_view(await self.fleet.status(), self.fleet.config)
        return JSONResponse({"roles": view["roles"]})

    async def agents(self, request: Request) -> Response:
        only(request, "role", "state")
        view = fleet_view(await self.fleet.status(), self.fleet.config)
        agents = [
            a
            for a in view["agents"]
            if request.query_params.get("role") in (None, a["role"])
            and request.query_params.get("state") in (None, a["state"])
        ]
        return JSONResponse({"agents": agents})

    async def agent(self, request: Request) -> Response:
        only(request)
        name = request.path_params["name"]
        view = fleet_view(await self.fleet.status(), self.fleet.config)
        for a in view["agents"]:
            if name in (a["name"], a["agent"]):
                return JSONResponse(a)
        return error(404, f"no VM or agent named {name[:64]!r}")

    async def hosts(self, request: Request) -> Response:
        only(request)
        return JSONResponse({"hosts": self.fleet.hosts_status()})

    async def tasks(self, request: Request) -> Response:
        only(request, "state")
        state = request.query_params.get("state") or None
        if state is not None and state not in _TASK_STATES:
            raise ControllerError(f"query parameter state must be one of {', '.join(_TASK_STATES)}")
        return JSONResponse({"tasks": await self.fleet.list_tasks(state)})

    async def events(self, request: Request) -> Response:
        only(request, "after", "limit")
        after = int_param(request, "after", 0, 0, 2**63 - 1)
        limit = int_param(request, "limit", 100, 1, MAX_EVENTS_LIMIT)
        return JSONResponse({"events": await self.fleet.events(after, limit)})

    async def usage(self, request: Request) -> Response:
        only(request, "window", "buckets")
        window = int_param(request, "window", 3600, 60, _MAX_USAGE_WINDOW)
        buckets = int_param(request, "buckets", 30, 1, MAX_BUCKETS)
        return JSONResponse(await usage_series(self.fleet, time.time(), window, buckets))

    async def chat(self, request: Request) -> Response:
        """The newest lines of the agents' channel after ``after``; none when the
        swarm is not on IRC. With ``wait``, a long poll: the answer comes once
        there is a line after ``after``, or after ``wait`` seconds. Redacted again
        with the listener's own tokens, which the overseer does not know."""
        only(request, "after", "limit", "wait")
        after = int_param(request, "after", 0, 0, 2**63 - 1)
        limit = int_param(request, "limit", CHAT_LINES, 1, CHAT_LINES)
        wait = int_param(request, "wait", 0, 0, CHAT_MAX_WAIT)
        overseer = self.fleet.overseer
        if overseer is None:
            return JSONResponse({"channel": None, "last": 0, "lines": []})
        with trio.move_on_after(wait):
            await overseer.wait_said(after)
        log = overseer.agents_log
        lines = [
            {
                "id": line.id,
                "at": line.at,
                "nick": redact(line.nick, self.secrets),
                "text": redact(line.text, self.secrets),
                "action": line.action,
            }
            for line in log.after(after, limit)
        ]
        return JSONResponse({"channel": log.channel, "last": log.last_id, "lines": lines})

    async def openapi(self, request: Request) -> Response:
        from fireclaw.supervisor.web_openapi import document  # built on first use

        return JSONResponse(document())

    async def metrics(self, request: Request) -> Response:
        from fireclaw.supervisor.metrics import CONTENT_TYPE, scrape

        body = await scrape(self.fleet, self.lag, self.event_metrics)
        return Response(body, media_type=CONTENT_TYPE)

    async def stream(self, request: Request) -> Response:
        """Server-sent events: a ``view`` (fleet, queue, newest events) at once and
        after every change, at most one per ``STREAM_MIN_INTERVAL``."""
        only(request)
        return StreamingResponse(
            views(self.fleet), media_type="text/event-stream", headers={"x-accel-buffering": "no"}
        )

    # --- acting (operators) ----------------------------------------------------------

    def _audit(self, request: Request, command: str) -> None:
        who: Principal = request.scope["fireclaw.who"]
        self.fleet.event("http_command", "http", who=who.label, via=who.via, command=command)

    async def scale(self, request: Request) -> Response:
        only(request)
        role = request.path_params["role"]
        body = await decode_body(request, _ScaleBody)
        self._audit(request, f"scale {role} {body.n}")
        return JSONResponse(await self.fleet.scale(role, body.n))

    async def invoke(self, request: Request) -> Response:
        only(request)
        body = await decode_body(request, _InvokeBody)
        self._audit(request, f"invoke {body.role} {body.name or ''}".strip())
        return JSONResponse(await self.fleet.invoke(body.role, body.name))

    async def destroy(self, request: Request) -> Response:
        only(request)
        name = request.path_params["name"]
        self._audit(request, f"destroy {name}")
        return JSONResponse(await self.fleet.destroy(name))


def build_app(
    fleet: Fleet,
    auth: Auth,
    *,
    allowed_hosts: frozenset[str] | None = None,
    lag: LoopLag | None = None,
    events: EventMetrics | None = None,
    secrets: tuple[str, ...] = (),
) -> ASGIApp:
    """The listener's ASGI app over ``fleet``; ``allowed_hosts`` (lowercase
    ``host:port``) refuses any other ``Host``, None accepts any. ``/metrics``
    adds the families of ``events`` when given; ``secrets`` (the listener's
    tokens) are redacted from what others said in #agents."""
    web = _Web(
        fleet,
        auth,
        allowed_hosts=allowed_hosts,
        lag=lag or LoopLag(),
        events=events,
        secrets=secrets,
    )
    a = answering
    routes = [
        Route("/login", a(web.login_page), methods=["GET", "POST"]),
        Route("/logout", a(web.logout), methods=["POST"]),
        Route("/", a(web.index), methods=["GET"]),
        Route("/static/{name}", a(web.static), methods=["GET"]),
        Route("/metrics", a(web.metrics), methods=["GET"]),
        Route("/v1/health", a(web.health), methods=["GET"]),
        Route("/v1/roles", a(web.roles), methods=["GET"]),
        Route("/v1/roles/{role}/scale", a(web.scale), methods=["POST"]),
        Route("/v1/agents", a(web.agents), methods=["GET"]),
        Route("/v1/agents", a(web.invoke), methods=["POST"]),
        Route("/v1/agents/{name}", a(web.agent), methods=["GET"]),
        Route("/v1/agents/{name}", a(web.destroy), methods=["DELETE"]),
        Route("/v1/hosts", a(web.hosts), methods=["GET"]),
        Route("/v1/tasks", a(web.tasks), methods=["GET"]),
        Route("/v1/events", a(web.events), methods=["GET"]),
        Route("/v1/stream", a(web.stream), methods=["GET"]),
        Route("/v1/usage", a(web.usage), methods=["GET"]),
        Route("/v1/chat", a(web.chat), methods=["GET"]),
        Route("/v1/openapi.json", a(web.openapi), methods=["GET"]),
    ]
    return web.gate(Starlette(routes=routes, exception_handlers={HTTPException: http_error}))


def allowed_hosts_for(host: str, port: int) -> frozenset[str] | None:
    """The ``Host`` values a loopback listener answers; None (any) for other binds,
    where the operator's own names for the machine are not known here."""
    if not is_loopback(host):
        return None
    shown = f"[{host}]" if ":" in host else host
    return frozenset({f"{shown}:{port}", f"localhost:{port}"})
