"""The decoders of the coding-agent CLIs' streams: one per spec in ``clis.py``.

Each takes one object of its CLI's stream (a JSON line's value; a line of
text, for aider) with the run's ``cli_stream.RunState``, and gives the
``cli_stream`` events it means: ``None`` for an object it does not know (the
parser reports an ``Unknown`` or nothing, as the spec says). The framing, the
bounds and the field readers (``get``, ``text_at``, ...) are ``cli_stream``'s.

How each shows that it stopped for input (a ``Question``: the task then waits
for an operator's ``!answer``, which resumes the same session)::

    claude-code  its result's ``permission_denials`` (a tool it was not allowed;
                 headless, it denies rather than asks) and subtype
                 ``error_max_turns`` (``--max-turns`` reached). From its SDK's
                 documented result message; tests/data's stream of it is
                 written from those docs (doc-max-turns-denied.jsonl), the
                 captured runs never hit either.
    gemini-cli   a result whose error type names the turn limit (from its docs:
                 doc-turn-limit.jsonl).
    codex        none: ``codex exec`` never asks (its approval policy is
                 ``never`` there) and takes no turn limit; the captured streams
                 show none.
    opencode     none on its stream: ``opencode run`` rejects a permission that
                 would be asked, logging it but not on stdout, and ends its
                 turn (older versions hang: its ``timeout`` ends those).
    aider        none: ``--yes-always`` answers its confirmation prompts.

This module imports only the standard library and msgspec: it ships inside
VM images.
"""

from __future__ import annotations

import re
from typing import Any, Final

from .cli_stream import (
    CliEvent,
    Failure,
    Question,
    Result,
    RunState,
    Session,
    ToolUse,
    Usage,
    clip,
    failure_kind,
    float_at,
    get,
    int_at,
    json_text,
    text_at,
)

# --- claude-code: claude -p --output-format stream-json --------------------------


def decode_claude_code(obj: Any, state: RunState) -> list[CliEvent] | None:
    kind = obj.get("type")
    if kind == "system":
        if obj.get("subtype") == "init":
            return [Session(session_id=text_at(obj, "session_id"), model=text_at(obj, "model"))]
        if obj.get("subtype") == "api_retry":
            why = text_at(obj, "error") or "retrying the API call"
            return [
                Failure(
                    kind=failure_kind(why, int_at(obj, "error_status")), message=why, fatal=False
                )
            ]
        return []
    if kind == "assistant":
        events: list[CliEvent] = []
        content = get(obj, "message", "content")
        for block in content if isinstance(content, list) else []:
            if get(block, "type") == "text" and text_at(block, "text"):
                events.append(state.add_text(text_at(block, "text")))
            elif get(block, "type") == "tool_use":
                events.append(
                    ToolUse(
                        name=text_at(block, "name"),
                        call_id=text_at(block, "id"),
                        arguments=json_text(get(block, "input")),
                    )
                )
        return events
    if kind in ("user", "stream_event"):
        return []  # tool results it acted on; pieces of messages that come whole later
    if kind == "rate_limit_event":
        info = get(obj, "rate_limit_info")
        if get(info, "status") == "rejected":
            resets = int_at(info, "resetsAt")
            return [
                Failure(
                    kind="rate_limit",
                    message=f"rate limited until {resets}",
                    resets_at=float(resets) if resets > 0 else None,
                )
            ]
        return []
    if kind == "result":
        return _claude_result(obj, state)
    return None


def _claude_result(obj: Any, state: RunState) -> list[CliEvent]:
    usage = Usage(  # its input_tokens leave out what was read from or written to the cache
        input_tokens=int_at(obj, "usage", "input_tokens")
        + int_at(obj, "usage", "cache_creation_input_tokens")
        + int_at(obj, "usage", "cache_read_input_tokens"),
        output_tokens=int_at(obj, "usage", "output_tokens"),
        cached_tokens=int_at(obj, "usage", "cache_read_input_tokens"),
        cost_usd=float_at(obj, "total_cost_usd"),
    )
    events: list[CliEvent] = [usage]
    denials = get(obj, "permission_denials")
    for denial in denials if isinstance(denials, list) else []:
        tool = text_at(denial, "tool_name") or "a tool"
        events.append(
            Question(
                kind="permission",
                text=f"allow {tool} {json_text(get(denial, 'tool_input'))}".strip(),
            )
        )
    subtype = text_at(obj, "subtype")
    text = text_at(obj, "result") or state.end_step()
    if subtype == "error_max_turns":
        events.append(
            Question(
                kind="turn_limit", text=f"stopped after {int_at(obj, 'num_turns')} turns: go on?"
            )
        )
    elif subtype == "error_max_budget_usd":
        events.append(Failure(kind="exhausted", message="claude-code reached its budget", own=True))
    elif obj.get("is_error") is True or subtype.startswith("error"):
        # A failed API call ends as subtype "success" with is_error set.
        message = text or subtype or "claude-code failed"
        status = int_at(obj, "api_error_status") or None
        events.append(Failure(kind=failure_kind(message, status), message=message))
    else:
        events.append(Result(text=text))
    return events


# --- codex: codex exec --json -------------------------------------------------------


def decode_codex(obj: Any, state: RunState) -> list[CliEvent] | None:
    kind = obj.get("type")
    if kind == "thread.started":
        return [Session(session_id=text_at(obj, "thread_id"))]
    if kind in ("turn.started", "item.started", "item.updated"):
        return []
    if kind == "item.completed":
        item = get(obj, "item")
        item_type = get(item, "type")
        if item_type == "agent_message":
            state.end_step()  # each message is whole: the answer is the last one
            return [state.add_text(text_at(item, "text"))]
        if item_type == "command_execution":
            return [
                ToolUse(
                    name="shell",
                    call_id=text_at(item, "id"),
                    arguments=json_text({"command": get(item, "command")}),
                )
            ]
        if item_type == "mcp_tool_call":
            return [
                ToolUse(
                    name=f"{text_at(item, 'server')}.{text_at(item, 'tool')}",
                    call_id=text_at(item, "id"),
                    arguments=json_text(get(item, "arguments")),
                )
            ]
        if item_type in ("file_change", "web_search"):
            return [
                ToolUse(
                    name=str(item_type),
                    call_id=text_at(item, "id"),
                    arguments=json_text(get(item, "changes") or get(item, "query")),
                )
            ]
        if item_type == "error":
            # Warnings (an ignored setting, unknown model metadata); the turn goes on.
            return [Failure(kind="error", message=text_at(item, "message"), fatal=False)]
        return []  # reasoning, todo lists
    if kind == "turn.completed":
        usage = Usage(
            input_tokens=int_at(obj, "usage", "input_tokens"),
            output_tokens=int_at(obj, "usage", "output_tokens"),
            cached_tokens=int_at(obj, "usage", "cached_input_tokens"),
        )
        return [usage, Result(text=state.end_step())]
    if kind == "turn.failed":
        message = text_at(obj, "error", "message") or "codex: the turn failed"
        return [Failure(kind=failure_kind(message), message=message)]
    if kind == "error":
        # "Reconnecting... n/5": codex retries by itself; turn.failed ends the run.
        message = text_at(obj, "message") or "codex reported an error"
        return [Failure(kind=failure_kind(message), message=message, fatal=False)]
    return None


# --- gemini-cli: gemini -p ... --output-format stream-json ----------------------------


def decode_gemini_cli(obj: Any, state: RunState) -> list[CliEvent] | None:
    kind = obj.get("type")
    if kind == "init":
        return [Session(session_id=text_at(obj, "session_id"), model=text_at(obj, "model"))]
    if kind == "message":
        if get(obj, "role") == "assistant" and text_at(obj, "content"):
            return [state.add_text(text_at(obj, "content"))]
        return []
    if kind == "tool_use":
        state.end_step()
        return [
            ToolUse(
                name=text_at(obj, "tool_name"),
                call_id=text_at(obj, "tool_id"),
                arguments=json_text(get(obj, "parameters")),
            )
        ]
    if kind == "tool_result":
        return []
    if kind == "error":
        # Even an error of severity "error" is followed by the result, which ends the run.
        message = text_at(obj, "message") or "gemini-cli reported an error"
        return [Failure(kind=failure_kind(message), message=message, fatal=False)]
    if kind == "result":
        usage = Usage(
            input_tokens=int_at(obj, "stats", "input_tokens"),
            output_tokens=int_at(obj, "stats", "output_tokens"),
            cached_tokens=int_at(obj, "stats", "cached"),
        )
        if get(obj, "status") == "success":
            return [usage, Result(text=state.end_step())]
        message = text_at(obj, "error", "message") or "gemini-cli failed"
        if "turn" in text_at(obj, "error", "type").lower():
            return [usage, Question(kind="turn_limit", text=message)]
        return [usage, Failure(kind=failure_kind(message), message=message)]
    return None


# --- opencode: opencode run --format json ----------------------------------------------


def decode_opencode(obj: Any, state: RunState) -> list[CliEvent] | None:
    kind = obj.get("type")
    events: list[CliEvent] = []
    if text_at(obj, "sessionID"):
        events.append(Session(session_id=text_at(obj, "sessionID")))
    part = get(obj, "part")
    if kind == "step_start":
        pass
    elif kind == "text":
        if text_at(part, "text"):
            events.append(state.add_text(text_at(part, "text")))
    elif kind == "tool_use":
        events.append(
            ToolUse(
                name=text_at(part, "tool"),
                call_id=text_at(part, "callID"),
                arguments=json_text(get(part, "state", "input")),
            )
        )
    elif kind == "step_finish":
        tokens = get(part, "tokens")
        events.append(
            Usage(  # its input leaves the cache out
                input_tokens=int_at(tokens, "input")
                + int_at(tokens, "cache", "write")
                + int_at(tokens, "cache", "read"),
                output_tokens=int_at(tokens, "output") + int_at(tokens, "reasoning"),
                cached_tokens=int_at(tokens, "cache", "read"),
                cost_usd=float_at(part, "cost"),
            )
        )
        text = state.end_step()
        if get(part, "reason") != "tool-calls":  # a tool step is followed by another
            events.append(Result(text=text))
    elif kind == "error":
        message = text_at(obj, "error", "data", "message") or text_at(obj, "error", "name")
        status = int_at(obj, "error", "data", "statusCode") or None
        events.append(
            Failure(kind=failure_kind(message, status), message=message or "opencode failed")
        )
    else:
        return None
    return events


# --- aider: aider --message ... (plain text) ---------------------------------------------

#: Lines aider prints about itself before and around the answer.
_AIDER_CHATTER: Final = re.compile(
    r"^(Aider v|Model: |Git repo: |Repo-map: |Added .* to the chat|Restored previous conversation"
    r"|Use /help|Warning: |Weak model: |Editor model: |https://aider\.chat/"
    r"|Analytics have been permanently disabled)"
)
_COUNT: Final = r"(\d{1,12}(?:\.\d{1,6})?k?)"
_AIDER_TOKENS: Final = re.compile(
    rf"^Tokens: {_COUNT} sent(?:, {_COUNT} cache write)?(?:, {_COUNT} cache hit)?"
    rf", {_COUNT} received\.(?: Cost: \$(\d{{1,12}}(?:\.\d{{1,6}})?) message)?"
)
_AIDER_ERROR: Final = re.compile(r"^litellm\.(\w+):\s*(.*)$")
#: A failed fetch of its own (a price list, a release note), printed as it is.
_AIDER_FETCH: Final = re.compile(r"^HTTPS?ConnectionPool\(")


def _aider_count(text: str | None) -> tuple[int, bool]:
    """aider's ``2.2k`` as ``(2200, False)``; ``12`` as ``(12, True)``."""
    if not text:
        return 0, True
    if text.endswith("k"):
        return int(float(text[:-1]) * 1000), False
    return int(float(text)), True


def decode_aider(line: str, state: RunState) -> list[CliEvent]:
    if _AIDER_CHATTER.match(line) or line.startswith("─"):
        return []
    if not line.strip():
        return [] if not state.step_text else [state.add_text("\n")]
    if tokens := _AIDER_TOKENS.match(line):
        sent, exact_in = _aider_count(tokens.group(1))
        written, exact_w = _aider_count(tokens.group(2))
        hit, exact_hit = _aider_count(tokens.group(3))
        received, exact_out = _aider_count(tokens.group(4))
        cost = float(tokens.group(5)) if tokens.group(5) else None
        usage = Usage(
            input_tokens=sent + written,
            output_tokens=received,
            cached_tokens=hit,
            cost_usd=cost,
            exact=exact_in and exact_w and exact_hit and exact_out,
        )
        return [usage, Result(text=state.end_step().strip())]
    if _AIDER_FETCH.match(line):
        return [Failure(kind="error", message=clip(line), fatal=False)]
    if error := _AIDER_ERROR.match(line):
        message = clip(f"{error.group(1)}: {error.group(2)}")
        kind = "rate_limit" if error.group(1) == "RateLimitError" else failure_kind(message)
        return [Failure(kind=kind, message=message)]
    return [state.add_text(line + "\n")]
