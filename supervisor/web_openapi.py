"""The HTTP listener's JSON API described as an OpenAPI 3.1 document
(``GET /v1/openapi.json``), built like the unix-socket API's (supervisor/openapi.py):
answers are described as far as clients rely on them (fields may be added),
every error is ``{"error": "<one line>"}``, and every operation needs a bearer
token or a session (401 without). Nothing here does I/O.
"""

from __future__ import annotations

import functools
from typing import Any, Final

from fireclaw.supervisor.metrics import POOL_STATES
from fireclaw.supervisor.openapi import EVENT, HOST, TASK, _errors, _operation, _path, _query
from fireclaw.supervisor.usage_series import MAX_BUCKETS

__all__ = ["document"]

_OBJECT: Final = {"type": "object"}
_NULLABLE_INT: Final = {"type": ["integer", "null"]}


@functools.cache
def document() -> dict[str, Any]:
    """The OpenAPI document of ``/v1`` on the HTTP listener."""
    from fireclaw.supervisor import web_views, webapp

    role = {
        "type": "object",
        "required": ["target", *POOL_STATES, "degraded", "memory_mib", "model"],
        "properties": {
            **{s: {"type": "integer", "minimum": 0} for s in POOL_STATES},
            "target": {"type": "integer", "minimum": 0},
            "degraded": {"type": "boolean"},
            "memory_mib": _NULLABLE_INT,
            "vcpus": _NULLABLE_INT,
            "model": {"type": ["string", "null"]},
            "description": {"type": "string"},
        },
    }
    agent = {
        "type": "object",
        "required": ["name", "role", "state", "agent", "uptime", "restarts", "backend"],
        "properties": {
            "name": {"type": "string"},
            "role": {"type": "string"},
            "state": {"type": "string"},
            "agent": {"type": ["string", "null"]},
            "uptime": {"type": "number"},
            "restarts": {"type": "integer", "minimum": 0},
            "backend": {"type": "string"},
            "memory_mib": _NULLABLE_INT,
        },
    }
    chat_line = {
        "type": "object",
        "required": ["id", "at", "nick", "text", "action"],
        "properties": {
            "id": {"type": "integer", "minimum": 1},
            "at": {"type": "number"},
            "nick": {"type": "string"},
            "text": {"type": "string"},
            "action": {"type": "boolean"},
        },
    }
    id_param = {"type": "integer", "minimum": 0, "maximum": 2**63 - 1}
    name = {"type": "string", "minLength": 1, "maxLength": 64}

    def listed(key: str, item: dict[str, Any]) -> dict[str, Any]:
        return {
            "type": "object",
            "required": [key],
            "properties": {key: {"type": "array", "items": item}},
        }

    def get(summary: str, ok: dict[str, Any], **kw: Any) -> dict[str, Any]:
        op = _operation(summary, ok, **kw)
        op["responses"].update(_errors(401))
        return {"get": op}

    paths: dict[str, Any] = {
        "/v1/health": get(
            "Whether the supervisor answers and is not stopping.",
            {
                "type": "object",
                "required": ["ok", "version", "pid"],
                "properties": {"ok": {"type": "boolean"}, "version": {"type": "integer"}},
            },
        ),
        "/v1/roles": get(
            "Each role's pool: VMs by state, its target, whether it is degraded.",
            {
                "type": "object",
                "required": ["roles"],
                "properties": {"roles": {"type": "object", "additionalProperties": role}},
            },
        ),
        "/v1/agents": get(
            "Every VM, with the agent it runs.",
            listed("agents", agent),
            params=[
                _query("role", name, "only this role"),
                _query("state", {"type": "string", "maxLength": 32}, "only this state"),
            ],
        ),
        "/v1/agents/{name}": get(
            "One VM, by its name or its agent's.",
            agent,
            params=[_path("name", name)],
            errors=(404,),
        ),
        "/v1/hosts": get(
            "A cluster's hosts: state (up, draining, silent, fenced), roles with their load,"
            " tasks running, heartbeat age; null for one host.",
            {
                "type": "object",
                "required": ["hosts"],
                "properties": {"hosts": {"type": ["array", "null"], "items": HOST}},
            },
        ),
        "/v1/tasks": get(
            "The most recent tasks.",
            listed("tasks", TASK),
            params=[_query("state", {"enum": list(webapp._TASK_STATES)}, "only this state")],
        ),
        "/v1/events": get(
            "The audit trail, oldest first, after an event id.",
            listed("events", EVENT),
            params=[
                _query("after", id_param, "the last event id seen"),
                _query(
                    "limit",
                    {"type": "integer", "minimum": 1, "maximum": web_views.MAX_EVENTS_LIMIT},
                    "at most this many",
                ),
            ],
        ),
        "/v1/usage": get(
            "Tokens per role over time, from the usage ledger: `buckets` buckets of"
            " `step` seconds from `start` (UNIX time), the last one holding now.",
            {
                "type": "object",
                "required": ["start", "step", "buckets", "roles"],
                "properties": {
                    "start": {"type": "integer"},
                    "step": {"type": "integer", "minimum": 1},
                    "buckets": {"type": "integer", "minimum": 1},
                    "roles": {
                        "type": "object",
                        "additionalProperties": {
                            "type": "array",
                            "items": {"type": "integer", "minimum": 0},
                        },
                    },
                },
            },
            params=[
                _query(
                    "window",
                    {"type": "integer", "minimum": 60, "maximum": webapp._MAX_USAGE_WINDOW},
                    "seconds the buckets cover at least (default 3600)",
                ),
                _query(
                    "buckets",
                    {"type": "integer", "minimum": 1, "maximum": MAX_BUCKETS},
                    "how many buckets (default 30)",
                ),
            ],
        ),
        "/v1/chat": get(
            "What was said in the agents' IRC channel lately, oldest first, after a"
            " line id; plain text, secrets redacted. `channel` is null off IRC.",
            {
                "type": "object",
                "required": ["channel", "last", "lines"],
                "properties": {
                    "channel": {"type": ["string", "null"]},
                    "last": {"type": "integer", "minimum": 0},
                    "lines": {"type": "array", "items": chat_line},
                },
            },
            params=[
                _query("after", id_param, "the last line id seen"),
                _query(
                    "limit",
                    {"type": "integer", "minimum": 1, "maximum": webapp.CHAT_LINES},
                    "at most this many (the newest)",
                ),
                _query(
                    "wait",
                    {"type": "integer", "minimum": 0, "maximum": webapp.CHAT_MAX_WAIT},
                    "seconds to wait for a line after `after` (a long poll)",
                ),
            ],
        ),
        "/v1/openapi.json": get("This document.", _OBJECT),
    }
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "fireclaw-swarm HTTP API",
            "version": "1",
            "description": "Read-only views of the fleet on the HTTP listener (http.listen)."
            " Send Authorization: Bearer <token>, or log in at /login for a session.",
        },
        "paths": paths,
        "components": {
            "schemas": {
                "Error": {
                    "type": "object",
                    "required": ["error"],
                    "properties": {"error": {"type": "string"}},
                }
            },
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
        },
        "security": [{"bearer": []}],
    }
