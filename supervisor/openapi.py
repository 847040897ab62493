"""The control API described as an OpenAPI 3.1 document (``GET /openapi.json``).

Request bodies are described by the very msgspec Structs the server decodes
them with (``msgspec.json.schema_components``), so the document cannot drift
from what the server accepts. Answers are described as far as clients rely on
them: their type and the fields every answer carries; fields may be added.
Every error is ``{"error": "<one line>"}``.

Nothing here does I/O: ``document()`` builds a plain dict once.
"""

from __future__ import annotations

import functools
from typing import Any, Final

import msgspec
from fireclaw.supervisor import api_requests

__all__ = ["EVENT", "HOST", "TASK", "document"]

_ERROR: Final = {
    "type": "object",
    "required": ["error"],
    "properties": {"error": {"type": "string"}},
}
_OBJECT: Final = {"type": "object"}
_REF: Final = "#/components/schemas/"

#: A task as both APIs answer with it (this one and the HTTP listener's /v1).
TASK: Final = {
    "type": "object",
    "required": ["id", "role", "prompt", "state", "attempts"],
    "properties": {
        "id": {"type": "integer"},
        "role": {"type": "string"},
        "prompt": {"type": "string"},
        "state": {"enum": list(api_requests.TASK_STATES)},
        "attempts": {"type": "integer", "minimum": 0},
    },
}
#: An event of the log, as both APIs answer with it.
EVENT: Final = {
    "type": "object",
    "required": ["id", "at", "kind", "subject", "detail"],
    "properties": {
        "id": {"type": "integer"},
        "at": {"type": "number"},
        "kind": {"type": "string"},
        "subject": {"type": "string"},
        "detail": _OBJECT,
    },
}

#: A cluster's host, as ``/hosts`` and ``/status`` answer with it (``fleet.host_status``).
HOST: Final = {
    "type": "object",
    "required": ["name", "state", "draining", "roles", "tasks", "heartbeat_age"],
    "properties": {
        "name": {"type": "string"},
        "state": {"enum": ["up", "draining", "silent", "fenced"]},
        "draining": {"type": "boolean"},
        "roles": _OBJECT,
        "tasks": {"type": "integer", "minimum": 0},
        "heartbeat_age": {"type": "number"},
    },
}


def _json(schema: dict[str, Any]) -> dict[str, Any]:
    return {"application/json": {"schema": schema}}


def _errors(*statuses: int) -> dict[str, Any]:
    """The error answers an operation may give: always 400 and 500, plus ``statuses``."""
    out: dict[str, Any] = {}
    for status in sorted({400, 500, *statuses}):
        out[str(status)] = {
            "description": "refused",
            "content": _json({"$ref": "#/components/schemas/Error"}),
        }
    return out


def _operation(
    summary: str,
    ok: dict[str, Any],
    *,
    body: str | None = None,
    body_required: bool = True,
    params: list[dict[str, Any]] | None = None,
    errors: tuple[int, ...] = (),
    content_type: str = "application/json",
) -> dict[str, Any]:
    op: dict[str, Any] = {
        "summary": summary,
        "responses": {
            "200": {"description": "done", "content": {content_type: {"schema": ok}}},
            **_errors(*errors),
        },
    }
    if body is not None:
        op["requestBody"] = {
            "required": body_required,
            "content": _json({"$ref": _REF + body}),
        }
    if params:
        op["parameters"] = params
    return op


def _query(name: str, schema: dict[str, Any], what: str) -> dict[str, Any]:
    return {"name": name, "in": "query", "required": False, "schema": schema, "description": what}


def _path(name: str, schema: dict[str, Any]) -> dict[str, Any]:
    return {"name": name, "in": "path", "required": True, "schema": schema}


@functools.cache
def document() -> dict[str, Any]:
    """The OpenAPI document of the control API served on ``<state_dir>/api.sock``."""
    structs = (
        api_requests.RunRequest,
        api_requests.TaskRequest,
        api_requests.AnswerRequest,
        api_requests.ScaleRequest,
        api_requests.InvokeRequest,
        api_requests.RetuneRequest,
        api_requests.ResetRequest,
        api_requests.EmptyRequest,
        api_requests.DownRequest,
    )
    _, components = msgspec.json.schema_components(
        structs, ref_template="#/components/schemas/{name}"
    )
    # What the handler checks beyond the Struct: a retune names a model, a persona or both.
    components["RetuneRequest"]["anyOf"] = [
        {"required": [field], "properties": {field: {"type": "string"}}}
        for field in ("model", "persona")
    ]
    status = {
        "type": "object",
        "required": ["version", "pid", "backend", "roles", "agents", "tasks"],
        "properties": {
            "version": {"type": "integer"},
            "pid": {"type": "integer"},
            "backend": {"type": "string"},
            "roles": {"type": "object"},
            "agents": {"type": "array", "items": _OBJECT},
            # null when a failing state disk cannot even be read
            "tasks": {"type": ["object", "null"]},
            # null for one host, or while a cluster's database does not answer
            "hosts": {"type": ["array", "null"], "items": HOST},
            "state": {
                "type": "object",
                "description": "Whether the state disk takes writes; what was dropped meanwhile.",
                "properties": {
                    "writable": {"type": "boolean"},
                    "why": {"enum": ["full", "read-only", "failing", None]},
                    "since": {"type": ["number", "null"]},
                    "dropped_events": {"type": "integer"},
                    "dropped_writes": {"type": "integer"},
                    "pending_writes": {"type": "integer"},
                },
            },
        },
    }
    seconds = {"type": "number", "minimum": 0, "maximum": api_requests.MAX_STATUS_WAIT}
    id_param = {"type": "integer", "minimum": 0, "maximum": 2**63 - 1}
    name = {"type": "string", "minLength": 1, "maxLength": 64}
    paths: dict[str, Any] = {
        "/health": {
            "get": _operation(
                "Whether the supervisor answers, and its pid.",
                {"type": "object", "required": ["ok", "pid"]},
            )
        },
        "/status": {
            "get": _operation(
                "The fleet; with since, a long poll for a change past that version.",
                status,
                params=[
                    _query("since", id_param, "a version from an earlier answer"),
                    _query("wait", seconds, "how long to wait for a change (default 10)"),
                ],
            )
        },
        "/run": {
            "post": _operation(
                "Run a command in a VM from the pool, streamed as JSON lines; the last line"
                " is {exit} or {error}. The VM is destroyed after.",
                _OBJECT,
                body="RunRequest",
                errors=(404, 503),
                content_type="application/x-ndjson",
            )
        },
        "/tasks": {
            "get": _operation(
                "The most recent tasks, newest first.",
                {"type": "object", "required": ["tasks"], "properties": {
                    "tasks": {"type": "array", "items": TASK}}},
                params=[
                    _query("state", {"enum": list(api_requests.TASK_STATES)}, "only this state")
                ],
            ),
            "post": _operation(
                "Queue a durable task for a role; 507 while the state disk is full.",
                TASK,
                body="TaskRequest",
                errors=(404, 507),
            ),
        },
        "/tasks/{id}": {
            "get": _operation(
                "One task.",
                TASK,
                params=[_path("id", {"type": "integer", "minimum": 1, "maximum": 10**18 - 1})],
                errors=(404,),
            )
        },
        "/scale": {
            "post": _operation(
                "Keep N idle VMs for a role.", _OBJECT, body="ScaleRequest", errors=(404, 507)
            )
        },
        "/answers": {
            "post": _operation(
                "Answer the question a task stopped at: its CLI session resumes with it.",
                TASK,
                body="AnswerRequest",
                errors=(404, 409, 507),
            )
        },
        "/reset": {
            "post": _operation(
                "Clear a failed VM, or every failed VM of a role.",
                _OBJECT,
                body="ResetRequest",
                errors=(404,),
            )
        },
        "/agents": {
            "post": _operation(
                "Bring up a named agent of a role.",
                _OBJECT,
                body="InvokeRequest",
                errors=(404, 409, 503, 507),
            )
        },
        "/agents/{name}": {
            "post": _operation(
                "Give a named agent a new model or persona, without restarting its VM.",
                _OBJECT,
                body="RetuneRequest",
                params=[_path("name", name)],
                errors=(404, 507),
            ),
            "delete": _operation(
                "Stop a named agent for good.",
                _OBJECT,
                params=[_path("name", name)],
                errors=(404, 507),
            ),
        },
        "/agents/{name}/stop": {
            "post": _operation(
                "End the current turn of an agent (or of the VM running a task): its model"
                " stream is closed, its tool processes are killed, a task so ended fails"
                " with exit 130. The agent stays.",
                _OBJECT,
                body="EmptyRequest",
                body_required=False,
                params=[_path("name", name)],
                errors=(404, 409),
            )
        },
        "/reload": {
            "post": _operation(
                "Reload swarm.yaml; a file that does not load changes nothing.",
                {"type": "object", "required": ["ok"]},
                body="EmptyRequest",
                body_required=False,
            )
        },
        "/events": {
            "get": _operation(
                "The audit trail, oldest first, after an event id.",
                {"type": "object", "required": ["events"], "properties": {
                    "events": {"type": "array", "items": EVENT}}},
                params=[
                    _query("after", id_param, "the last event id seen"),
                    _query("limit", {"type": "integer", "minimum": 1,
                                     "maximum": api_requests.MAX_EVENTS_LIMIT},
                           "at most this many"),
                ],
            )
        },
        "/usage": {
            "get": _operation(
                "The ledger of model calls summed per agent, role, task, model or VM, and"
                " the budgets.",
                {"type": "object", "required": ["by", "since", "rows", "budget"], "properties": {
                    "rows": {"type": "array", "items": {"type": "object", "required": [
                        "key", "calls", "prompt_tokens", "completion_tokens", "tokens"]}}}},
                params=[
                    _query("by", {"enum": list(api_requests.USAGE_BY)}, "sum per (default agent)"),
                    _query("since", id_param, "unix time; only calls from then on"),
                    _query("key", {"type": "string", "minLength": 1, "maxLength": 200},
                           "only this agent, role, task, model or VM"),
                ],
            )
        },
        "/down": {
            "post": _operation(
                "Stop the fleet gracefully, then the supervisor; with leave_vms, exit"
                " and leave the VMs running for the next supervisor to adopt.",
                _OBJECT,
                body="DownRequest",
                body_required=False,
            )
        },
        "/hosts": {
            "get": _operation(
                "A cluster's hosts: state (up, draining, silent, fenced), roles with their"
                " load, tasks running, heartbeat age; null for one host.",
                {"type": "object", "required": ["hosts"], "properties": {
                    "hosts": {"type": ["array", "null"], "items": HOST}}},
            )
        },
        "/hosts/{name}/drain": {
            "post": _operation(
                "Tell a cluster's host to drain: it claims no tasks, finishes its running"
                " ones and stops its warm VMs; it stays drained across its restarts.",
                _OBJECT,
                body="EmptyRequest",
                body_required=False,
                params=[_path("name", name)],
                errors=(404, 409, 507),
            )
        },
        "/hosts/{name}/undrain": {
            "post": _operation(
                "Tell a drained host to claim tasks and keep warm VMs again.",
                _OBJECT,
                body="EmptyRequest",
                body_required=False,
                params=[_path("name", name)],
                errors=(404, 409, 507),
            )
        },
        "/openapi.json": {"get": _operation("This document.", _OBJECT)},
    }  # fmt: skip
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "fireclaw-swarm control API",
            "version": "1",
            "description": "HTTP/1.1 over the unix socket <state_dir>/api.sock (mode 0600):"
            " whoever can open it controls the swarm. One request per connection.",
        },
        "paths": paths,
        "components": {"schemas": {**components, "Error": _ERROR}},
    }
