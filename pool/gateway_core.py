"""The model gateway's sans-I/O core: who calls, where to, and what a request becomes.

``plan`` reads one guest request (method, target, headers, body) with what the
gateway knows (``Who`` calls, the ``Upstream``, the ``Limits``, the ``Meter``'s
budgets) and decides: ``Refuse`` it with an error in the shape of the guest's
API, answer ``ToolCaps`` itself, or ``Forward`` it upstream with the key added
(``upstream_request``). ``UsageMeter`` reads the tokens a call used from the
upstream's answer, streamed or whole, in any of the formats of
pool/gateway_formats.py, and says what the ledger ``charge``s: the upstream's
own figures, or, for a stream cut before its final usage, what the gateway
counted itself. Values in, decisions out: no sockets, no clock;
pool/gateway.py is the trio adapter that moves the bytes.
"""

from __future__ import annotations

import email.utils
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Final, Protocol

import h11
import msgspec
from fireclaw.pool.gateway_formats import APIS, Api, ErrorShape, Tokens, error_body
from fireclaw.pool.gateway_formats import CHAT as CHAT_API
from fireclaw.pool.store import CallRecord

__all__ = [
    "ANTHROPIC_VERSION",
    "BYTES_PER_TOKEN",
    "CHAT",
    "MAX_EVENT_BYTES",
    "MODELS",
    "PROPS",
    "AccountRefused",
    "Charge",
    "Forward",
    "Limits",
    "Meter",
    "ModelRoute",
    "Refuse",
    "ToolCaps",
    "Upstream",
    "UsageMeter",
    "Who",
    "error_body",
    "plan",
    "prompt_estimate",
    "retry_after",
    "upstream_request",
]

CHAT: Final = "/v1/chat/completions"
MODELS: Final = "/v1/models"
#: llama-server's own route beside ``/v1``: what a chat harness asks in ``tool_mode: auto``.
PROPS: Final = "/props"
#: Of an SSE stream, the longest line kept for reading usage (a chunk of JSON).
MAX_EVENT_BYTES: Final = 1 << 20
#: Bytes of a request body taken as one prompt token when the upstream never said.
BYTES_PER_TOKEN: Final = 4

_json_decode = msgspec.json.Decoder(Any).decode
_json_encode = msgspec.json.Encoder().encode


@dataclass
class Who:
    """Whose calls a gateway carries now. Mutable: promotion and task code update it
    as the VM becomes an agent or takes a task; ``model`` is the role's or the
    agent's, used when a request names none."""

    vm: str
    role: str
    agent: str | None = None
    task: int | None = None
    model: str = ""
    #: The account of the role's provider its calls are made with, and that
    #: account's key, sent upstream instead of the swarm's (never shown).
    account: str | None = None
    account_key: str | None = field(default=None, repr=False)


@dataclass(frozen=True)
class Upstream:
    """Where calls go: an OpenAI-compatible API at ``scheme://host:port{prefix}``.
    ``prefix`` ends at ``/v1`` (``/v1/models`` is ``prefix + '/models'``).
    ``api_key`` is sent as the API of the route wants it (``upstream_request``);
    it never reaches a guest."""

    scheme: str
    host: str
    port: int
    prefix: str
    api_key: str | None = None

    def __repr__(self) -> str:  # the key never shows up in a log or a traceback
        return f"Upstream({self.scheme}://{self.host}:{self.port}{self.prefix})"


class Meter(Protocol):
    """What a gateway (and a role group) asks of the supervisor: budgets and the ledger."""

    def refusal(self, role: str) -> str | None:
        """Why ``role`` may not call now (its budget or the swarm's is spent), or None."""

    def record(self, call: CallRecord) -> None:
        """Keep the record of one finished call."""

    async def wait_changed(self) -> None:
        """Return when what ``refusal`` says may have changed."""


@dataclass
class Limits:
    """Per VM: request size, calls at once, and how long a call may take."""

    max_request_bytes: int = 1 << 20
    max_concurrent: int = 2
    call_timeout: float = 300.0


#: Told when the upstream answers 429 to a call made with an account's key:
#: ``(role, account, retry_after)``, the seconds its ``Retry-After`` gave, if any.
AccountRefused = Callable[[str, str, float | None], None]


@dataclass
class ModelRoute:
    """What every VM's gateway shares: where calls go, who meters them, the limits,
    and who hears of an account the upstream refused (``on_refused``).
    ``upstream()`` is asked at each call (None: no model server now)."""

    upstream: Callable[[], Upstream | None]
    meter: Meter
    limits: Limits = field(default_factory=Limits)
    on_refused: AccountRefused | None = None


# --- the sans-I/O core -------------------------------------------------------------


@dataclass(frozen=True)
class Refuse:
    """Answer the guest with ``status`` and an error in its API's shape (``errors``);
    nothing goes upstream. ``type`` and ``code`` are OpenAI's; an Anthropic error
    takes its type from ``status``. ``final``: asking again soon gets the same
    answer, which the ``x-should-retry: false`` header tells the OpenAI and
    Anthropic clients (claude-code would otherwise retry a 429 ten times)."""

    status: int
    message: str
    type: str
    code: str
    errors: ErrorShape = "openai"
    final: bool = False

    def body(self) -> bytes:
        return error_body(self.message, self.type, self.code, status=self.status, shape=self.errors)


@dataclass(frozen=True)
class Forward:
    """Send ``method path`` with ``body`` upstream; ``stream``: the answer is SSE.
    ``path`` follows the upstream's ``/v1`` prefix, or its root with ``root``.
    ``api``: the format of a POST route (how its usage reads, its errors' shape);
    None for the GET routes, whose errors are OpenAI's."""

    method: str
    path: str
    body: bytes
    model: str
    stream: bool
    metered: bool  # a model call: a ledger row and a budget check
    root: bool = False
    api: Api | None = None

    @property
    def errors(self) -> ErrorShape:
        return self.api.errors if self.api is not None else "openai"


@dataclass(frozen=True)
class ToolCaps:
    """Answer with what the upstream's ``/props`` says of tool calls, and nothing
    else of it (it names files and settings of the host)."""


def plan(
    method: str, target: str, body: bytes, who: Who, *, max_bytes: int
) -> Forward | ToolCaps | Refuse:
    """Decide what to do with one request the guest sent (its body read in full,
    at most ``max_bytes`` + 1 bytes of it). Only the routes of ``APIS``, ``MODELS``
    and ``PROPS`` are served. A POST body must be a JSON object; its query string
    is dropped. The chat route keeps the model the guest names (the role's when it
    names none); the routes the coding CLIs use are held to the role's model, as
    they name their vendors' models. A streamed chat call is made to report usage
    (the other formats always do)."""
    path = target.split("?", 1)[0]
    if path in (PROPS, MODELS):
        if method != "GET":
            return Refuse(405, f"{path} takes GET", "invalid_request_error", "method_not_allowed")
        if path == PROPS:
            return ToolCaps()
        return Forward("GET", "/models", b"", model="", stream=False, metered=False)
    api = APIS.get(path)
    if api is None:
        routes = ", ".join([*APIS, MODELS, PROPS])
        return Refuse(
            404,
            f"no route {path[:100]!r}: the gateway serves {routes}",
            "invalid_request_error",
            "not_found",
        )
    if method != "POST":
        return Refuse(
            405, f"{path} takes POST", "invalid_request_error", "method_not_allowed", api.errors
        )
    if len(body) > max_bytes:
        return Refuse(
            413,
            f"request larger than {max_bytes} bytes",
            "invalid_request_error",
            "request_too_large",
            api.errors,
        )
    try:
        request = _json_decode(body)
    except msgspec.DecodeError as exc:
        return Refuse(
            400, f"body is not JSON: {exc}", "invalid_request_error", "invalid_json", api.errors
        )
    if not isinstance(request, dict):
        return Refuse(
            400, "body must be a JSON object", "invalid_request_error", "invalid_json", api.errors
        )
    if api is CHAT_API:
        model = request.get("model") or who.model
    else:
        model = who.model or request.get("model")
    if not isinstance(model, str) or not model:
        return Refuse(
            400, "model must be a string", "invalid_request_error", "invalid_model", api.errors
        )
    request["model"] = model
    stream = request.get("stream") is True
    if stream and api is CHAT_API:
        # Usage is read from the upstream's own answer, so it must send it.
        options = request.get("stream_options")
        options = dict(options) if isinstance(options, dict) else {}
        options["include_usage"] = True
        request["stream_options"] = options
    return Forward("POST", api.upstream, _json_encode(request), model, stream, api.metered, api=api)


#: The Messages API version sent to an Anthropic-style upstream (its one stable one).
ANTHROPIC_VERSION: Final = "2023-06-01"


def upstream_request(fwd: Forward, upstream: Upstream, key: str | None = None) -> h11.Request:
    """The request line and headers sent upstream: built anew, nothing of the guest's
    headers passes (its own Authorization, cookies, Host) except what the body says.

    The key (``key``, an account's, else the upstream's own) goes as the route's
    API wants it: ``x-api-key`` with ``anthropic-version`` for an Anthropic-style
    route (``/v1/messages``), a bearer token for an OpenAI-style one."""
    headers = [
        ("Host", f"{upstream.host}:{upstream.port}"),
        ("Connection", "close"),
        ("Accept", "text/event-stream" if fwd.stream else "application/json"),
        ("User-Agent", "fireclaw-gateway"),
    ]
    if fwd.method == "POST":
        headers += [("Content-Type", "application/json"), ("Content-Length", str(len(fwd.body)))]
    key = key or upstream.api_key
    if fwd.errors == "anthropic":
        headers.append(("anthropic-version", ANTHROPIC_VERSION))
        if key:
            headers.append(("x-api-key", key))
    elif key:
        headers.append(("Authorization", f"Bearer {key}"))
    base = upstream.prefix.removesuffix("/v1") if fwd.root else upstream.prefix
    return h11.Request(method=fwd.method, target=base + fwd.path, headers=headers)


def retry_after(value: bytes, now: float) -> float | None:
    """Seconds a ``Retry-After`` header value asks to wait (delay-seconds or an
    HTTP-date, read against unix time ``now``); None for one that is neither."""
    text = value.decode("latin-1").strip()
    if text.isdigit():
        return float(int(text[:12]))
    try:
        when = email.utils.parsedate_to_datetime(text)
    except (TypeError, ValueError, IndexError):
        return None
    if when.tzinfo is None:
        return None
    return max(0.0, when.timestamp() - now)


def prompt_estimate(request_bytes: int) -> int:
    """The prompt tokens charged for a request whose upstream never said how many it
    read: the body's bytes / ``BYTES_PER_TOKEN`` (4), rounded up, so at least 1 for
    any non-empty body. Four bytes a token is the usual measure of English text,
    and the JSON around the messages (keys, roles, tool schemas) counts as well:
    codex's real first request, 40459 bytes, is charged 10115 where llama.cpp
    read 4577 tokens. Text of fewer bytes a token (code, non-Latin scripts) can
    be charged less than it read."""
    return -(-max(0, request_bytes) // BYTES_PER_TOKEN)


@dataclass(frozen=True)
class Charge:
    """What the ledger records of one call: its tokens, and ``host_counted`` when
    the gateway counted them itself because the upstream's final usage never came
    (see ``UsageMeter.charge``)."""

    prompt: int
    completion: int
    host_counted: bool = False


class UsageMeter:
    """Reads the token counts out of an upstream answer, fed as it arrives, in the
    format of ``api`` (pool/gateway_formats.py: chat by default).

    For a JSON answer, the usage of the whole body; for server-sent events, what
    the ``data:`` events say of it, read in order (``event:`` lines are not needed:
    every event's JSON names its type). Counts that are not non-negative integers
    are taken as 0; an answer without usage counts 0 (``found`` stays False).
    ``prompt_tokens`` and ``completion_tokens`` are the upstream's word; what the
    ledger records is ``charge()``.

    The adapter tells it what only the sockets know: ``sent`` once the request
    goes upstream, ``status`` once the upstream answers. ``request_bytes`` is the
    size of the body sent upstream."""

    def __init__(self, *, stream: bool, api: Api = CHAT_API, request_bytes: int = 0) -> None:
        self.stream = stream
        self.api = api
        self.request_bytes = request_bytes
        self.prompt_tokens = 0
        self.completion_tokens = 0
        self.found = False
        #: The upstream's last word on usage went by: a whole body's, or a stream's
        #: final usage event (pool/gateway_formats.py ``Api.final``).
        self.final = False
        #: Streamed events passed on that carry a piece of the answer.
        self.deltas = 0
        self.sent = False
        self.status: int | None = None
        #: What a refusal's ``Retry-After`` asked (seconds), set by the adapter.
        self.retry_after: float | None = None
        #: How the call ended: ``ok``, ``upstream_error``, or ``cancelled`` while it
        #: has not ended by itself. Set before the guest is told, so that a guest that
        #: hangs up at the last byte does not change what the ledger says.
        self.outcome = "cancelled"
        #: The stream's last event went by (chat's ``data: [DONE]``, Responses'
        #: ``response.completed``, Messages' ``message_stop``): the answer is whole,
        #: whatever the HTTP framing after it.
        self.done = False
        self._tokens: Tokens | None = None
        self._buffer = bytearray()

    def feed(self, data: bytes) -> None:
        self._buffer += data
        if not self.stream:
            return
        *lines, rest = bytes(self._buffer).split(b"\n")
        self._buffer = bytearray(rest[-MAX_EVENT_BYTES:])
        for line in lines:
            line = line.rstrip(b"\r")
            if line.startswith(b"data:"):
                self._take(line[5:].strip())

    def close(self) -> None:
        """The body has ended."""
        if self.stream:
            self.feed(b"\n")
        else:
            self._take(bytes(self._buffer))
        self._buffer.clear()

    def _take(self, payload: bytes) -> None:
        if payload == b"[DONE]":
            self.done = True
            return
        if not payload:
            return
        try:
            data = _json_decode(payload)
        except msgspec.DecodeError:
            return
        if self.api.ends(data):
            self.done = True
        self.deltas += self.api.deltas(data)
        tokens = self.api.usage(data, self._tokens)
        if tokens is not None:
            self._tokens = tokens
            self.found = True
            self.prompt_tokens, self.completion_tokens = tokens.prompt, tokens.completion
            if not self.stream or self.api.final(data):
                self.final = True

    def charge(self) -> Charge:
        """What the ledger records for the call, as far as the answer went.

        The upstream's own figures when its final usage came, or when the call never
        reached it (``sent`` False) or it answered with an error status: then it
        said what it used, normally nothing. Otherwise the upstream took the call
        and its answer stopped before its final usage (the guest hung up just
        before it, the call timed out, the upstream broke off or reports no
        usage), and the host counts, so that no guest decides what its budget
        counts: completion tokens are the content deltas passed on (or the
        upstream's running count, if higher), prompt tokens the upstream's
        figure when it gave one (Messages' ``message_start``), else
        ``prompt_estimate`` of the request. Each delta of llama.cpp's streams is
        at least one token, so the completion count only grows as more of a
        stream is fed, up to the upstream's own figure."""
        refused = self.status is not None and not 200 <= self.status < 300
        if self.final or not self.sent or refused:
            return Charge(self.prompt_tokens, self.completion_tokens)
        prompt = self.prompt_tokens or prompt_estimate(self.request_bytes)
        return Charge(prompt, max(self.completion_tokens, self.deltas), host_counted=True)
