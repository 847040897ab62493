"""A VM's model gateway: the one way its agent reaches a model, metered and bounded.

The supervisor opens one listener per VM incarnation inside the VM's network
namespace (loopback without isolation) and serves it here. Whoever connects to
that listener is that VM: which VM, role, agent and task a call belongs to is
read from ``Who`` (kept by the supervisor), never from the request. Behind it::

    guest --HTTP/1.1--> gateway --HTTP/1.1--> model server (loopback) or upstream URL
                        |  POST /v1/chat/completions   (OpenAI chat; streamed or not)
                        |  POST /v1/responses          (OpenAI Responses: codex)
                        |  POST /v1/messages           (Anthropic Messages: claude-code)
                        |  POST /v1/messages/count_tokens   (not metered)
                        |  GET  /v1/models
                        |  GET  /props                 (llama-server's; only whether
                        |                               the model's template takes tools)
                        +- size cap, calls-at-once cap, budget check (429 + the
                        |  error of the guest's API: OpenAI's or Anthropic's)
                        +- the upstream's API key added here (an account's, when the
                        |  VM's task runs on one: x-api-key on /v1/messages, else
                        |  Bearer); the guest never sees it; a 429 to an account's
                        |  key is told to the supervisor (``on_refused``)
                        +- usage read from the upstream's answer -> one ledger row;
                           a stream cut before it is counted by the gateway

Each POST route goes to the same path upstream, untranslated: llama.cpp's
server speaks all of them (pool/gateway_formats.py says what differs).

The request handling is sans-I/O (``plan``, ``UsageMeter``: pool/gateway_core.py):
bytes and values in, decisions out. ``serve_gateway`` is the thin trio adapter: one request per
connection, h11 on both sides, the upstream's body passed to the guest chunk by
chunk as it arrives (server-sent events included). Here are the rules it
applies in order (caps, budget, the ledger row, a refused account); the HTTP
they drive is in pool/gateway_http.py.

What a gateway needs from above is the ``Meter`` protocol: whether a role may
call now, and where a finished call's record goes (the supervisor's budgets).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import replace
from typing import Any, Final

import h11
import trio
from fireclaw.pool.gateway_core import (
    AccountRefused,
    Charge,
    Limits,
    Meter,
    ModelRoute,
    Refuse,
    ToolCaps,
    Upstream,
    UsageMeter,
    Who,
    plan,
)
from fireclaw.pool.gateway_formats import CHAT
from fireclaw.pool.gateway_http import (
    GuestGone,
    UpstreamError,
    answer,
    answer_tool_caps,
    fetch_models,
    proxy,
    read_request,
)
from fireclaw.pool.store import CallRecord

__all__ = ["REQUEST_TIMEOUT", "UpstreamError", "fetch_models", "serve_gateway"]

log = logging.getLogger("fireclaw.gateway")

#: Seconds a guest has to send its request (headers and body).
REQUEST_TIMEOUT: Final = 30.0
#: Connections one VM may hold open at once; beyond it they are closed unanswered.
MAX_CONNECTIONS_FACTOR: Final = 4
_MAX_HEADER_BYTES: Final = 16 * 1024

_NO_SERVER: Final = Refuse(503, "no model server is running", "server_error", "unavailable")


# --- the trio adapter -----------------------------------------------------------------


async def serve_gateway(listener: trio.SocketListener, who: Who, route: ModelRoute) -> None:
    """Serve one VM's gateway on ``listener`` until cancelled, for whoever ``who`` is
    at each call. Without a model server (``route.upstream()`` None) calls get 503."""
    upstream, meter, limits = route.upstream, route.meter, route.limits
    calls = trio.CapacityLimiter(limits.max_concurrent)
    connections = trio.CapacityLimiter(limits.max_concurrent * MAX_CONNECTIONS_FACTOR)

    async def handle(stream: trio.SocketStream) -> None:
        async with stream:
            if connections.available_tokens == 0:
                return  # a flood: close at once rather than queue
            async with connections:
                try:
                    await _one_request(
                        stream, who, upstream, meter, limits, calls, route.on_refused
                    )
                except (GuestGone, trio.BrokenResourceError):
                    pass
                except Exception:
                    # One request's failure must not end the gateway, nor the VM it serves.
                    log.exception("%s: gateway request failed", who.vm)

    async with listener:
        await trio.serve_listeners(handle, [listener])


async def _one_request(
    stream: trio.SocketStream,
    who: Who,
    upstream_of: Callable[[], Upstream | None],
    meter: Meter,
    limits: Limits,
    calls: trio.CapacityLimiter,
    on_refused: AccountRefused | None = None,
) -> None:
    conn = h11.Connection(h11.SERVER, max_incomplete_event_size=_MAX_HEADER_BYTES)
    with trio.move_on_after(REQUEST_TIMEOUT) as scope:
        request, body = await read_request(stream, conn, limits.max_request_bytes)
    if scope.cancelled_caught:
        return
    if request is None:
        await answer(
            stream, conn, Refuse(400, "bad HTTP request", "invalid_request_error", "bad_request")
        )
        return
    decision = plan(
        request.method.decode("ascii", "replace"),
        request.target.decode("ascii", "replace"),
        body,
        who,
        max_bytes=limits.max_request_bytes,
    )
    if isinstance(decision, Refuse):
        await answer(stream, conn, decision)
        return
    if isinstance(decision, ToolCaps):
        up = upstream_of()
        if up is None:
            await answer(stream, conn, _NO_SERVER)
            return
        await answer_tool_caps(stream, conn, up, limits)
        return
    shape = decision.errors
    up = upstream_of()
    if up is None:
        await answer(stream, conn, replace(_NO_SERVER, errors=shape))
        return
    busy = Refuse(
        429,
        f"{limits.max_concurrent} calls are already running for this VM",
        "rate_limit_exceeded",
        "too_many_concurrent_calls",
        shape,
    )
    # The account whose key the call is made with is fixed when it starts.
    account, key = who.account, who.account_key
    if not decision.metered:
        if calls.available_tokens == 0:
            await answer(stream, conn, busy)
            return
        async with calls:
            await proxy(stream, conn, decision, up, limits, UsageMeter(stream=decision.stream), key)
        return
    started = trio.current_time()
    # Who made the call is fixed when it starts: a task that ends meanwhile does
    # not move the call to the next one.
    record = dict(
        agent=who.agent,
        role=who.role,
        vm=who.vm,
        task=who.task,
        model=decision.model,
        account=account,
    )
    why = meter.refusal(who.role)
    if why is not None:
        # Recorded before the answer: once the guest has it, the ledger says so.
        _record(meter, record, None, "refused", 0.0)
        # A budget comes back with the next period or a reload, not in seconds.
        refuse = Refuse(429, why, "insufficient_quota", "budget_exceeded", shape, final=True)
        await answer(stream, conn, refuse)
        return
    if calls.available_tokens == 0:
        await answer(stream, conn, busy)  # no call was made: nothing for the ledger
        return
    usage = UsageMeter(
        stream=decision.stream, api=decision.api or CHAT, request_bytes=len(decision.body)
    )
    try:
        async with calls:
            await proxy(stream, conn, decision, up, limits, usage, key)
    finally:
        _record(meter, record, usage, usage.outcome, trio.current_time() - started)
        if usage.status == 429 and account is not None and on_refused is not None:
            # The upstream refused this account's key: it rests, and its task
            # runs again on another (the role group decides).
            on_refused(who.role, account, usage.retry_after)


def _record(
    meter: Meter, who: dict[str, Any], usage: UsageMeter | None, outcome: str, duration: float
) -> None:
    charge = usage.charge() if usage else Charge(0, 0)
    meter.record(
        CallRecord(
            at=time.time(),
            prompt_tokens=charge.prompt,
            completion_tokens=charge.completion,
            duration=round(duration, 3),
            outcome=outcome,
            host_counted=charge.host_counted,
            **who,
        )
    )
