"""What each route of the control API accepts: request bodies, query limits, checks.

Bodies are msgspec Structs (frozen, unknown fields rejected, limits in the type);
a route decodes its body with ``decode_body`` and its query with ``query_params``
and ``int_param``, each of which raises ``HttpError(400, ...)`` with one line naming
the field or parameter that was wrong. supervisor/openapi.py describes the same
Structs and limits, so the document cannot drift from what is enforced.
"""

from __future__ import annotations

from typing import Annotated, Final, TypeVar

import msgspec
from fireclaw.pool.task_states import TASK_STATES as _TASK_STATES
from fireclaw.supervisor.api_http import MAX_BODY_BYTES, HttpError, Request
from msgspec import Meta

__all__ = [
    "ANSWER_DECODER",
    "DOWN_DECODER",
    "EMPTY_DECODER",
    "INVOKE_DECODER",
    "MAX_EVENTS_LIMIT",
    "MAX_STATUS_WAIT",
    "RESET_DECODER",
    "RETUNE_DECODER",
    "RUN_DECODER",
    "SCALE_DECODER",
    "TASK_DECODER",
    "TASK_STATES",
    "USAGE_BY",
    "AnswerRequest",
    "DownRequest",
    "EmptyRequest",
    "InvokeRequest",
    "ResetRequest",
    "RetuneRequest",
    "RunRequest",
    "ScaleRequest",
    "TaskRequest",
    "decode_body",
    "int_param",
    "query_params",
]

#: The states ``GET /tasks?state=`` may filter on, in the order a task goes through them.
TASK_STATES: Final = _TASK_STATES
#: Most events one ``GET /events`` answers with.
MAX_EVENTS_LIMIT: Final = 1000
#: Longest a status long-poll may wait, well inside the connection's idle timeout.
MAX_STATUS_WAIT: Final = 25.0
#: How ``GET /usage`` may sum the ledger.
USAGE_BY: Final = ("agent", "role", "task", "model", "vm")

_T = TypeVar("_T")

# ---------------------------------------------------------------- request bodies

_Name = Annotated[str, Meta(min_length=1, max_length=64)]
_Argv = Annotated[list[Annotated[str, Meta(max_length=8192)]], Meta(min_length=1, max_length=256)]


class RunRequest(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    role: _Name | None = None
    argv: _Argv
    #: Who runs it in the guest: empty for the unprivileged agent user, or a user name.
    user: Annotated[str, Meta(max_length=32, pattern=r"^([a-z_][a-z0-9_-]*)?$")] = ""


class TaskRequest(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    role: _Name
    prompt: Annotated[str, Meta(min_length=1, max_length=MAX_BODY_BYTES)]


#: Some character that is white space neither to Python's ``re`` (which checks it
#: here) nor to ECMAScript's (which a client checking the OpenAPI document uses):
#: ``\S`` alone differs between them on U+001C-U+001F, U+0085 and U+FEFF.
_SOMETHING: Final = r"[^\s\x1c-\x1f\u0085\ufeff]"


class AnswerRequest(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """The body of POST /answers: ``name`` is a waiting task (``task-N``) or the
    agent that asked; ``text`` the answer its CLI session resumes with."""

    name: _Name
    text: Annotated[str, Meta(min_length=1, max_length=MAX_BODY_BYTES, pattern=_SOMETHING)]


class ScaleRequest(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    role: _Name
    n: Annotated[int, Meta(ge=0, le=1000)]


class InvokeRequest(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    role: _Name
    name: _Name | None = None
    model: Annotated[str, Meta(min_length=1, max_length=256)] | None = None


class RetuneRequest(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    model: Annotated[str, Meta(min_length=1, max_length=256)] | None = None
    persona: Annotated[str, Meta(max_length=16384)] | None = None


class ResetRequest(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    name: _Name


class EmptyRequest(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """The body of POST /reload and POST /agents/<name>/stop: nothing, or an empty
    JSON object."""


class DownRequest(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """The body of POST /down: nothing, an empty object, or ``leave_vms: true`` (the
    supervisor exits and leaves its VMs running for the next one to adopt)."""

    leave_vms: bool = False


RUN_DECODER: Final = msgspec.json.Decoder(RunRequest)
TASK_DECODER: Final = msgspec.json.Decoder(TaskRequest)
ANSWER_DECODER: Final = msgspec.json.Decoder(AnswerRequest)
# Lax: JSON may write a whole number as 4.0 (or a client "4"); either is the number 4.
SCALE_DECODER: Final = msgspec.json.Decoder(ScaleRequest, strict=False)
RESET_DECODER: Final = msgspec.json.Decoder(ResetRequest)
INVOKE_DECODER: Final = msgspec.json.Decoder(InvokeRequest)
RETUNE_DECODER: Final = msgspec.json.Decoder(RetuneRequest)
EMPTY_DECODER: Final = msgspec.json.Decoder(EmptyRequest)
DOWN_DECODER: Final = msgspec.json.Decoder(DownRequest)


# ---------------------------------------------------------------- request checks


def decode_body(decoder: msgspec.json.Decoder[_T], body: bytes, *, optional: bool = False) -> _T:
    """``body`` decoded by ``decoder``; an empty body is ``{}`` when ``optional``."""
    if not body.strip():
        if optional:
            return decoder.decode(b"{}")
        raise HttpError(400, "invalid request body: a JSON object is required")
    try:
        return decoder.decode(body)
    except msgspec.DecodeError as exc:
        raise HttpError(400, f"invalid request body: {exc}") from exc


def query_params(request: Request, allowed: frozenset[str]) -> dict[str, str]:
    """The query of ``request``, refused if it names a parameter not in ``allowed``."""
    unknown = sorted(set(request.query) - allowed)
    if unknown:
        raise HttpError(400, f"unknown query parameter {unknown[0]!r}")
    return request.query


def int_param(query: dict[str, str], name: str, default: int, lo: int, hi: int) -> int:
    """Query parameter ``name`` as an integer in ``lo..hi``, ``default`` when absent."""
    raw = query.get(name)
    if raw is None:
        return default
    try:
        value = int(raw, 10)
    except ValueError:
        raise HttpError(400, f"query parameter {name} must be an integer") from None
    if not lo <= value <= hi:
        raise HttpError(400, f"query parameter {name} must be between {lo} and {hi}")
    return value
