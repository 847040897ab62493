"""The wire formats the model gateway speaks: where each lives, how its usage reads,
how its errors look.

Three APIs carry model calls, one per kind of client::

    /v1/chat/completions      OpenAI chat     the chat harness, opencode, aider
    /v1/responses             OpenAI Responses  codex (it refuses the chat API)
    /v1/messages              Anthropic Messages  claude-code
    /v1/messages/count_tokens                 claude-code's token count (no generation)

llama.cpp's server (the managed model server) serves all four itself, so the
gateway forwards each to the same path upstream and translates nothing: the
guest gets the server's own answer, byte for byte.

What differs per format is read here, by pure functions on decoded JSON:

- **usage**, from the upstream's answer, never the guest's word. Chat: the body's
  ``usage`` or, streamed, the last chunk's (``stream_options.include_usage``).
  Responses: ``usage`` of the body, or of the ``response`` in the
  ``response.completed`` (``.incomplete``, ``.failed``) event. Messages: the
  body's ``usage``, or streamed, ``message_start``'s ``message.usage`` updated by
  each ``message_delta``'s ``usage`` (its counts are running totals). Anthropic
  counts prompt tokens read from or written to its cache apart from
  ``input_tokens``; the ledger's prompt tokens are their sum, as OpenAI's
  ``prompt_tokens`` and ``input_tokens`` already include cached tokens.
- **the end of a stream**: chat's ``data: [DONE]``, Responses' terminal
  ``response.*`` event, Messages' ``message_stop``. A guest that hangs up after
  it had the whole answer did not cancel the call.
- **the final usage** of a stream: chat's usage chunk (``choices`` empty),
  Responses' terminal event, Messages' ``message_delta``. Before it, what the
  upstream said of usage is not its last word (Messages' ``message_start``
  gives the prompt and 0 or 1 output token, as may Responses'
  ``response.created``).
- **content deltas**: the streamed events that carry a piece of the answer
  (text, reasoning, tool-call arguments). llama.cpp streams about one token per
  delta event, so counting them is what the gateway charges for a stream cut
  before its final usage (pool/gateway_core.py ``UsageMeter.charge``).
- **errors**: OpenAI's ``{"error": {"message", "type", "code"}}``, or Anthropic's
  ``{"type": "error", "error": {"type", "message"}}``, so that each client
  reads a refusal (a spent budget, a body too large) as its own API's error.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Final, Literal

import msgspec

__all__ = [
    "APIS",
    "CHAT",
    "COUNT_TOKENS",
    "MESSAGES",
    "RESPONSES",
    "Api",
    "ErrorShape",
    "Tokens",
    "chat_deltas",
    "chat_usage",
    "error_body",
    "messages_deltas",
    "messages_usage",
    "responses_deltas",
    "responses_usage",
]

_json_encode = msgspec.json.Encoder().encode

ErrorShape = Literal["openai", "anthropic"]


@dataclass(frozen=True)
class Tokens:
    """What one call used, as the upstream counted it."""

    prompt: int = 0
    completion: int = 0


#: Reads one decoded answer (a whole body or one streamed event) with what was read
#: before it: the tokens so far, or None while no usage has been seen.
UsageReader = Callable[[object, Tokens | None], Tokens | None]


def _count(value: object) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) and value >= 0 else 0


def _usage(obj: object) -> dict[str, Any] | None:
    usage = obj.get("usage") if isinstance(obj, dict) else None
    return usage if isinstance(usage, dict) else None


def chat_usage(obj: object, seen: Tokens | None) -> Tokens | None:
    """OpenAI chat: ``usage.prompt_tokens`` and ``completion_tokens`` of a body or a
    chunk; the last chunk that has them wins."""
    usage = _usage(obj)
    if usage is None:
        return seen
    return Tokens(_count(usage.get("prompt_tokens")), _count(usage.get("completion_tokens")))


#: The events that end a Responses stream; each carries the whole ``response``.
RESPONSE_ENDS: Final = frozenset({"response.completed", "response.incomplete", "response.failed"})


#: The events that open a Responses stream; their ``response`` may carry a usage
#: (the prompt's) before any output, or ``null``.
RESPONSE_STARTS: Final = frozenset({"response.created", "response.in_progress"})


def responses_usage(obj: object, seen: Tokens | None) -> Tokens | None:
    """OpenAI Responses: ``usage.input_tokens`` and ``output_tokens`` of a whole
    response, or of the ``response`` a stream event carries: a terminal one, or an
    opening one where the server says the prompt's count early."""
    if isinstance(obj, dict) and obj.get("type") in RESPONSE_ENDS | RESPONSE_STARTS:
        obj = obj.get("response")
    usage = _usage(obj)
    if usage is None:
        return seen
    return Tokens(_count(usage.get("input_tokens")), _count(usage.get("output_tokens")))


def _anthropic_prompt(usage: dict[str, Any]) -> int:
    return (
        _count(usage.get("input_tokens"))
        + _count(usage.get("cache_read_input_tokens"))
        + _count(usage.get("cache_creation_input_tokens"))
    )


_PROMPT_KEYS: Final = ("input_tokens", "cache_read_input_tokens", "cache_creation_input_tokens")


def messages_usage(obj: object, seen: Tokens | None) -> Tokens | None:
    """Anthropic Messages: a body's ``usage``; streamed, ``message_start``'s
    ``message.usage``, then each ``message_delta``'s ``usage``, whose counts are
    totals so far and replace what they name (the prompt's only when it names one
    of its parts). Prompt tokens are input plus cache reads and writes."""
    kind = obj.get("type") if isinstance(obj, dict) else None
    if kind == "message_start":
        obj = obj.get("message") if isinstance(obj, dict) else None
    elif kind == "message_delta":
        usage = _usage(obj)
        if usage is None:
            return seen
        before = seen or Tokens()
        prompt = (
            _anthropic_prompt(usage) if any(k in usage for k in _PROMPT_KEYS) else before.prompt
        )
        completion = (
            _count(usage.get("output_tokens")) if "output_tokens" in usage else before.completion
        )
        return Tokens(prompt, completion)
    elif kind not in (None, "message"):
        return seen  # content blocks, pings: no usage
    usage = _usage(obj)
    if usage is None:
        return seen
    return Tokens(_anthropic_prompt(usage), _count(usage.get("output_tokens")))


def _no_usage(obj: object, seen: Tokens | None) -> Tokens | None:
    return seen


# --- content deltas: what a stream cut before its usage is charged by -----------------


def _piece(value: object) -> bool:
    return isinstance(value, str) and value != ""


def chat_deltas(obj: object) -> int:
    """OpenAI chat: of one streamed chunk, the choices whose ``delta`` carries a piece
    of the answer: ``content``, ``reasoning_content`` (llama.cpp's and DeepSeek's
    thinking) or ``tool_calls``. The first chunk's ``{"role": "assistant",
    "content": null}`` and the last one's ``{}`` carry none."""
    choices = obj.get("choices") if isinstance(obj, dict) else None
    if not isinstance(choices, list):
        return 0
    n = 0
    for choice in choices:
        delta = choice.get("delta") if isinstance(choice, dict) else None
        if not isinstance(delta, dict):
            continue
        calls = delta.get("tool_calls")
        text = _piece(delta.get("content")) or _piece(delta.get("reasoning_content"))
        if text or (isinstance(calls, list) and calls):
            n += 1
    return n


#: The Responses events that carry a piece of the answer in their ``delta``.
RESPONSE_DELTAS: Final = frozenset(
    {
        "response.output_text.delta",
        "response.function_call_arguments.delta",
        "response.custom_tool_call_input.delta",
        "response.reasoning_text.delta",
        "response.reasoning_summary_text.delta",
        "response.refusal.delta",
    }
)


def responses_deltas(obj: object) -> int:
    """OpenAI Responses: 1 for an event of ``RESPONSE_DELTAS`` with a non-empty
    ``delta`` (text, function-call arguments, reasoning), else 0."""
    if not isinstance(obj, dict) or obj.get("type") not in RESPONSE_DELTAS:
        return 0
    return 1 if _piece(obj.get("delta")) else 0


def messages_deltas(obj: object) -> int:
    """Anthropic Messages: 1 for a ``content_block_delta`` whose ``delta`` carries
    text, a tool call's ``partial_json`` or ``thinking``, else 0 (a thinking
    block's ``signature_delta`` is not generated text)."""
    if not isinstance(obj, dict) or obj.get("type") != "content_block_delta":
        return 0
    delta = obj.get("delta")
    if not isinstance(delta, dict):
        return 0
    return 1 if any(_piece(delta.get(k)) for k in ("text", "partial_json", "thinking")) else 0


def _no_deltas(obj: object) -> int:
    return 0


# --- the final usage of a stream ---------------------------------------------------------


def _chat_final(obj: object) -> bool:
    # OpenAI's usage chunk has no choices; a server streaming running usage
    # (vLLM's continuous_usage_stats) puts it on chunks that still have some.
    return _usage(obj) is not None and not (isinstance(obj, dict) and obj.get("choices"))


def _responses_final(obj: object) -> bool:
    return (
        isinstance(obj, dict)
        and obj.get("type") in RESPONSE_ENDS
        and _usage(obj.get("response")) is not None
    )


def _messages_final(obj: object) -> bool:
    return isinstance(obj, dict) and obj.get("type") == "message_delta" and _usage(obj) is not None


@dataclass(frozen=True)
class Api:
    """One route of the gateway: the guest's ``path``, the ``upstream`` path under
    the upstream's ``/v1`` prefix, whether a call is ``metered`` (a budget check
    and a ledger row), how its usage reads, what ends its stream, and the shape of
    its errors. Of a streamed event: ``final``, whether it carries the upstream's
    last word on usage; ``deltas``, how many pieces of the answer it carries."""

    name: str
    path: str
    upstream: str
    metered: bool
    errors: ErrorShape
    usage: UsageReader
    ends: Callable[[object], bool]
    final: Callable[[object], bool]
    deltas: Callable[[object], int]


def _chat_ends(obj: object) -> bool:
    return False  # its end is the non-JSON ``data: [DONE]``, read by the meter


def _responses_ends(obj: object) -> bool:
    return isinstance(obj, dict) and obj.get("type") in RESPONSE_ENDS


def _messages_ends(obj: object) -> bool:
    return isinstance(obj, dict) and obj.get("type") == "message_stop"


CHAT: Final = Api(
    name="chat",
    path="/v1/chat/completions",
    upstream="/chat/completions",
    metered=True,
    errors="openai",
    usage=chat_usage,
    ends=_chat_ends,
    final=_chat_final,
    deltas=chat_deltas,
)
RESPONSES: Final = Api(
    name="responses",
    path="/v1/responses",
    upstream="/responses",
    metered=True,
    errors="openai",
    usage=responses_usage,
    ends=_responses_ends,
    final=_responses_final,
    deltas=responses_deltas,
)
MESSAGES: Final = Api(
    name="messages",
    path="/v1/messages",
    upstream="/messages",
    metered=True,
    errors="anthropic",
    usage=messages_usage,
    ends=_messages_ends,
    final=_messages_final,
    deltas=messages_deltas,
)
#: Counting a prompt's tokens generates nothing: not metered, but size-capped,
#: its model forced and its calls counted among the VM's calls at once.
COUNT_TOKENS: Final = Api(
    name="count_tokens",
    path="/v1/messages/count_tokens",
    upstream="/messages/count_tokens",
    metered=False,
    errors="anthropic",
    usage=_no_usage,
    ends=_messages_ends,
    final=_messages_final,
    deltas=_no_deltas,
)
#: The POST routes, by the guest's path.
APIS: Final = {api.path: api for api in (CHAT, RESPONSES, MESSAGES, COUNT_TOKENS)}

#: Anthropic's error type for each HTTP status the gateway answers with.
_ANTHROPIC_TYPES: Final = {
    400: "invalid_request_error",
    404: "not_found_error",
    405: "invalid_request_error",
    413: "request_too_large",
    429: "rate_limit_error",
    502: "api_error",
    503: "overloaded_error",
    504: "timeout_error",
}


def error_body(
    message: str, type_: str, code: str, *, status: int = 400, shape: ErrorShape = "openai"
) -> bytes:
    """The error JSON of the guest's API: OpenAI's ``{"error": {message, type,
    code}}``, or Anthropic's ``{"type": "error", "error": {type, message}}`` with
    the Anthropic type that ``status`` has (``api_error`` for any other)."""
    if shape == "anthropic":
        kind = _ANTHROPIC_TYPES.get(status, "api_error")
        return _json_encode({"type": "error", "error": {"type": kind, "message": message}})
    return _json_encode({"error": {"message": message, "type": type_, "code": code}})
