"""How the HTTP listener reads a request and words a refusal.

Every refusal is ``{"error": "<one line>"}`` with its status: a route raises
``ControllerError`` (a bad query parameter, an unreadable body) and
``answering`` turns it into that answer, as it does a full state disk (507)
and anything unexpected (500, logged, its text not shown). ``http_error``
does the same for starlette's own refusals (no such route, wrong method).
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import TypeVar

import msgspec
from fireclaw.supervisor.api import ControllerError
from fireclaw.supervisor.api_http import one_line
from fireclaw.supervisor.state import StateUnwritable
from fireclaw.supervisor.webauth import same_origin
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

__all__ = [
    "MAX_BODY_BYTES",
    "answering",
    "decode_body",
    "error",
    "http_error",
    "int_param",
    "only",
    "own_origin",
    "same_site",
]

logger = logging.getLogger(__name__)

#: The largest request body a route reads.
MAX_BODY_BYTES = 64 * 1024

_T = TypeVar("_T")


def same_site(request: Request) -> bool:
    """No ``Origin``, or ours: a form another site posts carries its own."""
    origin = request.headers.get("origin")
    return origin is None or same_origin(origin, own_origin(request))


def own_origin(request: Request) -> str:
    return f"{request.url.scheme}://{request.headers.get('host', '')}"


def error(status: int, message: str) -> JSONResponse:
    """``{"error": message}``, the message on one line and at most 1000 characters,
    as the unix-socket API words its refusals."""
    return JSONResponse({"error": one_line(message) or "error"}, status)


def int_param(request: Request, name: str, default: int, lo: int, hi: int) -> int:
    """The query parameter ``name``, an integer from ``lo`` to ``hi``; ``default`` if absent."""
    raw = request.query_params.get(name)
    if raw is None:
        return default
    if not raw.isascii() or not raw.isdigit() or len(raw) > 19 or not lo <= int(raw) <= hi:
        raise ControllerError(f"query parameter {name} must be an integer from {lo} to {hi}")
    return int(raw)


def only(request: Request, *allowed: str) -> None:
    """Refuse a query parameter the route does not take."""
    for key in request.query_params:
        if key not in allowed:
            raise ControllerError(f"unknown query parameter {key!r}")


async def decode_body(request: Request, kind: type[_T]) -> _T:
    """The JSON body as ``kind`` (no body: ``{}``); a refusal naming what was wrong."""
    raw = await request.body()
    if len(raw) > MAX_BODY_BYTES:
        raise ControllerError("request body too large", 413)
    try:
        return msgspec.json.decode(raw or b"{}", type=kind)
    except msgspec.DecodeError as exc:
        raise ControllerError(f"invalid request body: {exc}") from exc


def answering(
    handler: Callable[[Request], Awaitable[Response]],
) -> Callable[[Request], Awaitable[Response]]:
    """``handler`` with every refusal turned into ``{"error": ...}`` and its status."""

    async def answer(request: Request) -> Response:
        try:
            return await handler(request)
        except ControllerError as exc:
            status = exc.status if 400 <= exc.status <= 599 else 500
            return error(status, exc.message)
        except StateUnwritable as exc:
            return error(507, f"the state disk is {exc.why}: request not served")
        except Exception as exc:
            logger.exception("http: %s %s failed", request.method, request.url.path)
            return error(500, f"internal error: {type(exc).__name__}")

    return answer


async def http_error(request: Request, exc: Exception) -> Response:
    """Starlette's own refusals (no such route, wrong method) as ``{"error": ...}``."""
    assert isinstance(exc, HTTPException)
    headers = {"allow": exc.headers["allow"]} if exc.headers and "allow" in exc.headers else None
    message = "no such endpoint" if exc.status_code == 404 else str(exc.detail)
    response = error(exc.status_code, f"{message}: {request.method} {request.url.path[:200]}")
    if headers:
        response.headers.update(headers)
    return response
