"""fireclaw.pool.gateway_formats and the routes of ``plan``: each API's usage read
from bytes, its stream's end, its errors' shape; on the real llama.cpp answers in
tests/data/model_answers/ and the real CLIs' requests in tests/data/cli_requests/
(see the README of each). No sockets."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from fireclaw.pool.gateway_core import (
    Charge,
    Forward,
    Refuse,
    UsageMeter,
    Who,
    plan,
    prompt_estimate,
)
from fireclaw.pool.gateway_formats import (
    CHAT,
    COUNT_TOKENS,
    MESSAGES,
    RESPONSES,
    Api,
    Tokens,
    chat_deltas,
    messages_deltas,
    messages_usage,
    responses_deltas,
    responses_usage,
)

DATA = Path(__file__).parent / "data"
WHO = Who(vm="coder-0", role="coder", agent="alice", model="smollm2")
MAX = 1 << 20


def request_of(name: str) -> tuple[str, bytes]:
    record = json.loads((DATA / "cli_requests" / name).read_text())
    return record["target"], record["body"].encode()


# --- routes ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "api", "upstream"),
    [
        ("codex-responses.json", RESPONSES, "/responses"),
        ("claude-code-messages.json", MESSAGES, "/messages"),
    ],
)
def test_a_real_cli_request_goes_upstream_whole_under_the_roles_model(
    name: str, api: Api, upstream: str
) -> None:
    target, body = request_of(name)
    sent = json.loads(body)
    sent["model"] = "gpt-5-codex" if api is RESPONSES else "claude-sonnet-4-5"
    fwd = plan("POST", target, json.dumps(sent).encode(), WHO, max_bytes=MAX)
    assert isinstance(fwd, Forward)
    assert (fwd.path, fwd.api, fwd.stream, fwd.metered, fwd.model) == (
        upstream,
        api,
        True,
        True,
        "smollm2",
    )
    # Nothing else is changed: no stream_options (these APIs always report usage).
    assert json.loads(fwd.body) == {**sent, "model": "smollm2"}


def test_the_chat_route_keeps_the_model_the_guest_names() -> None:
    body = json.dumps({"model": "other", "messages": []}).encode()
    fwd = plan("POST", "/v1/chat/completions", body, WHO, max_bytes=MAX)
    assert isinstance(fwd, Forward) and fwd.model == "other" and fwd.api is CHAT


def test_count_tokens_is_forwarded_unmetered_and_its_query_dropped() -> None:
    body = json.dumps({"model": "claude-haiku", "messages": []}).encode()
    fwd = plan("POST", "/v1/messages/count_tokens?beta=true", body, WHO, max_bytes=MAX)
    assert isinstance(fwd, Forward)
    assert (fwd.path, fwd.metered, fwd.model, fwd.api) == (
        "/messages/count_tokens",
        False,
        "smollm2",
        COUNT_TOKENS,
    )


def test_without_a_role_model_the_cli_routes_keep_the_guests() -> None:
    body = json.dumps({"model": "m", "input": "hi"}).encode()
    fwd = plan("POST", "/v1/responses", body, Who(vm="v", role="r"), max_bytes=MAX)
    assert isinstance(fwd, Forward) and fwd.model == "m"


@pytest.mark.parametrize(
    ("method", "target", "body", "status", "code", "kind"),
    [
        ("GET", "/v1/messages", b"", 405, "method_not_allowed", "invalid_request_error"),
        ("POST", "/v1/messages", b"x" * 2000, 413, "request_too_large", "request_too_large"),
        ("POST", "/v1/messages?beta=true", b"{nope", 400, "invalid_json", "invalid_request_error"),
        ("POST", "/v1/messages/count_tokens", b"[]", 400, "invalid_json", "invalid_request_error"),
        ("POST", "/v1/responses", b"x" * 2000, 413, "request_too_large", None),
        ("GET", "/v1/responses", b"", 405, "method_not_allowed", None),
        ("POST", "/v1/responses/input_tokens", b"{}", 404, "not_found", None),
    ],
)
def test_a_refusal_takes_the_shape_of_the_routes_api(
    method: str, target: str, body: bytes, status: int, code: str, kind: str | None
) -> None:
    """Anthropic's ``{"type": "error", "error": {type, message}}`` on the Messages
    routes (``kind`` its type), OpenAI's ``{"error": {...}}`` elsewhere."""
    out = plan(method, target, body, WHO, max_bytes=1024)
    assert isinstance(out, Refuse) and (out.status, out.code) == (status, code)
    error = json.loads(out.body())
    if kind is None:
        assert error == {"error": {"message": out.message, "type": out.type, "code": code}}
    else:
        assert error == {"type": "error", "error": {"type": kind, "message": out.message}}


def test_a_budget_refusal_reads_as_each_apis_rate_limit() -> None:
    why = "role coder's budget of 100 tokens per day is spent (120 used)"
    openai = Refuse(429, why, "insufficient_quota", "budget_exceeded")
    anthropic = Refuse(429, why, "insufficient_quota", "budget_exceeded", "anthropic")
    assert json.loads(openai.body())["error"]["type"] == "insufficient_quota"
    assert json.loads(anthropic.body()) == {
        "type": "error",
        "error": {"type": "rate_limit_error", "message": why},
    }


# --- usage, from the real server's answers ------------------------------------------------


def answer(name: str) -> bytes:
    return (DATA / "model_answers" / name).read_bytes()


def sse_events(data: bytes) -> list[dict[str, Any]]:
    return [json.loads(x[5:]) for x in data.split(b"\n") if x.startswith(b"data: {")]


def expected(name: str) -> tuple[int, int]:
    """The figures of a recorded answer, read here by hand from its JSON."""
    data = answer(name)
    if name == "chat.sse":
        usage = sse_events(data)[-1]["usage"]
        return usage["prompt_tokens"], usage["completion_tokens"]
    if name == "responses.json":
        usage = json.loads(data)["usage"]
        return usage["input_tokens"], usage["output_tokens"]
    if name == "responses.sse":
        (last,) = [e for e in sse_events(data) if e["type"] == "response.completed"]
        return last["response"]["usage"]["input_tokens"], last["response"]["usage"]["output_tokens"]
    if name == "messages.json":
        usage = json.loads(data)["usage"]
    else:
        events = sse_events(data)
        usage = dict(events[0]["message"]["usage"])
        usage.update(next(e for e in events if e["type"] == "message_delta")["usage"])
    return usage["input_tokens"] + usage["cache_read_input_tokens"], usage["output_tokens"]


@pytest.mark.parametrize(
    ("name", "api"),
    [
        ("chat.sse", CHAT),
        ("responses.json", RESPONSES),
        ("responses.sse", RESPONSES),
        ("messages.json", MESSAGES),
        ("messages.sse", MESSAGES),
    ],
)
@pytest.mark.parametrize("piece", [1, 7, 1 << 20])
def test_usage_of_a_real_answer_split_anywhere(name: str, api: Api, piece: int) -> None:
    data = answer(name)
    meter = UsageMeter(stream=name.endswith(".sse"), api=api)
    for i in range(0, len(data), piece):
        meter.feed(data[i : i + piece])
    meter.close()
    assert meter.found
    assert (meter.prompt_tokens, meter.completion_tokens) == expected(name)
    assert meter.completion_tokens > 0 and meter.prompt_tokens > 0
    assert meter.done is name.endswith(".sse")  # a stream's last event went by


@pytest.mark.parametrize(
    ("name", "api"), [("responses.sse", RESPONSES), ("messages.sse", MESSAGES)]
)
def test_a_stream_cut_before_its_last_event_is_not_done(name: str, api: Api) -> None:
    data = answer(name)
    cut = data[: data.rindex(b"event: ")]  # up to the last event
    meter = UsageMeter(stream=True, api=api)
    meter.feed(cut)
    meter.close()
    assert not meter.done


def test_messages_usage_follows_the_running_totals_of_message_delta() -> None:
    """Anthropic's API (not llama.cpp) also sends input counts in ``message_delta``,
    and counts a prompt written to its cache apart; the events as its documentation
    shows them, written here."""
    start = {
        "type": "message_start",
        "message": {
            "usage": {
                "input_tokens": 12,
                "cache_creation_input_tokens": 300,
                "cache_read_input_tokens": 2000,
                "output_tokens": 1,
            }
        },
    }
    seen = messages_usage(start, None)
    assert seen == Tokens(2312, 1)
    seen = messages_usage({"type": "content_block_delta", "usage": {"output_tokens": 99}}, seen)
    assert seen == Tokens(2312, 1)  # only message_start and message_delta carry usage
    seen = messages_usage({"type": "message_delta", "usage": {"output_tokens": 40}}, seen)
    assert seen == Tokens(2312, 40)
    final = {"type": "message_delta", "usage": {"input_tokens": 15, "output_tokens": 42}}
    assert messages_usage(final, seen) == Tokens(15, 42)


def test_responses_usage_ends_with_any_terminal_event() -> None:
    for kind in ("response.completed", "response.incomplete", "response.failed"):
        event = {"type": kind, "response": {"usage": {"input_tokens": 9, "output_tokens": 2}}}
        assert responses_usage(event, None) == Tokens(9, 2)
        assert RESPONSES.ends(event)
    assert responses_usage({"type": "response.output_text.delta", "delta": "x"}, None) is None


@pytest.mark.parametrize("api", [RESPONSES, MESSAGES])
def test_an_answer_without_usage_counts_nothing(api: Api) -> None:
    meter = UsageMeter(stream=True, api=api)
    meter.feed(b'event: x\ndata: {not json\n\ndata: [1, 2]\n\ndata: {"type": "ping"}\n\n')
    meter.close()
    assert (meter.found, meter.prompt_tokens, meter.completion_tokens) == (False, 0, 0)


@pytest.mark.parametrize("api", [RESPONSES, MESSAGES])
def test_counts_that_are_not_counts_are_zero(api: Api) -> None:
    meter = UsageMeter(stream=False, api=api)
    usage = {"input_tokens": -3, "output_tokens": "7", "cache_read_input_tokens": True}
    meter.feed(json.dumps({"usage": usage}).encode())
    meter.close()
    assert (meter.found, meter.prompt_tokens, meter.completion_tokens) == (True, 0, 0)


# --- what a cut stream is charged -----------------------------------------------------------

#: Each recorded stream, its API, and how a line that carries a piece of the answer
#: looks in it (read by eye from the file, not by the gateway's parsers).
STREAMS = [
    ("chat.sse", CHAT, b'"delta":{"content":"'),
    ("responses.sse", RESPONSES, b'"type":"response.output_text.delta"'),
    ("messages.sse", MESSAGES, b'"type":"content_block_delta"'),
]
#: The request each recorded stream answered, as its README gives it.
MESSAGES_REQUEST = (
    b'{"model":"smollm2","system":"You are terse.","messages":[{"role":"user",'
    b'"content":"Say hello in five words."}],"max_tokens":12,"stream":true}'
)
REQUEST_BYTES = {"chat.sse": 209, "responses.sse": 40459, "messages.sse": len(MESSAGES_REQUEST)}


def started(name: str, api: Api) -> UsageMeter:
    """A meter as the gateway holds it once the upstream answered 200."""
    meter = UsageMeter(stream=True, api=api, request_bytes=REQUEST_BYTES[name])
    meter.sent, meter.status = True, 200
    return meter


def test_the_request_sizes_are_the_recorded_ones() -> None:
    _, body = request_of("codex-responses.json")
    assert len(body) == REQUEST_BYTES["responses.sse"]
    readme = (DATA / "model_answers" / "README.md").read_text()
    assert f"({REQUEST_BYTES['chat.sse']} bytes)" in readme


@pytest.mark.parametrize(("name", "api", "piece"), STREAMS)
def test_a_real_stream_cut_at_every_byte_is_charged_what_was_forwarded(
    name: str, api: Api, piece: bytes
) -> None:
    """Fed one byte at a time, as a guest that hangs up anywhere would have it: until
    the upstream's final usage the host counts, completion tokens being the content
    deltas whose line went by whole; the count never decreases; once the final usage
    goes by, the upstream's own figures stand."""
    data = answer(name)
    prompt, completion = expected(name)
    meter = started(name, api)
    last = Charge(0, 0)
    for i in range(len(data)):
        meter.feed(data[i : i + 1])
        charge = meter.charge()
        whole_lines = data[: i + 1].split(b"\n")[:-1]
        received = sum(piece in line for line in whole_lines)
        assert charge.completion >= last.completion, i
        if meter.final:
            assert charge == Charge(prompt, completion), i
        else:
            assert charge.host_counted and charge.completion == received, i
            assert charge.prompt > 0, i
        last = charge
    meter.close()
    assert meter.charge() == Charge(prompt, completion)
    # llama.cpp streams one token a delta; the end of generation is counted, not streamed.
    assert 0 <= completion - meter.deltas <= 1


@pytest.mark.parametrize(("name", "api", "piece"), STREAMS)
def test_a_guest_that_hangs_up_right_before_the_usage_event_is_charged_its_deltas(
    name: str, api: Api, piece: bytes
) -> None:
    """Cut just before the event that carries the final usage: every piece of the
    answer went to the guest, and every piece is charged. The prompt is the
    upstream's word where it gave it early (Messages' message_start), else the
    request's size / 4, rounded up."""
    data = answer(name)
    marker = {CHAT: b'data: {"choices":[],', RESPONSES: b"event: response.completed"}
    cut = data[: data.index(marker.get(api, b"event: message_delta"))]
    meter = started(name, api)
    meter.feed(cut)
    charge = meter.charge()
    prompt, completion = expected(name)
    assert charge.host_counted and not meter.final
    assert charge.completion == cut.count(piece) > 0
    assert completion - charge.completion <= 1
    if api is MESSAGES:
        assert charge.prompt == prompt  # message_start said so
    else:
        assert charge.prompt == -(-REQUEST_BYTES[name] // 4)
        assert charge.prompt >= prompt  # more than the model read, for these requests


def test_prompt_estimate_is_a_quarter_of_the_bytes_rounded_up() -> None:
    assert [prompt_estimate(n) for n in (0, 1, 4, 5, 8, 40459)] == [0, 1, 1, 2, 2, 10115]


@pytest.mark.parametrize(
    ("sent", "status", "body", "charge"),
    [
        # Never reached the upstream: nothing to charge.
        (False, None, b"", Charge(0, 0)),
        # The upstream refused it (a prompt too long): it read nothing of it.
        (True, 400, b'{"error": {"message": "too long"}}', Charge(0, 0)),
        # The upstream took it, the guest hung up while it read the prompt.
        (True, None, b"", Charge(25, 0, host_counted=True)),
        # Only the role chunk went by.
        (
            True,
            200,
            b'data: {"choices":[{"delta":{"role":"assistant","content":null}}]}\n\n',
            Charge(25, 0, host_counted=True),
        ),
        # A server that never reports usage: counted by the host, to the end.
        (
            True,
            200,
            b'data: {"choices":[{"delta":{"content":"a"}}]}\n\n'
            b'data: {"choices":[{"delta":{"content":"b"}}]}\n\ndata: [DONE]\n\n',
            Charge(25, 2, host_counted=True),
        ),
        # Running usage on every chunk (vLLM's continuous_usage_stats) is not the
        # final word: the higher of it and the deltas.
        (
            True,
            200,
            b'data: {"choices":[{"delta":{"content":"a"}}],'
            b'"usage":{"prompt_tokens":9,"completion_tokens":1}}\n\n'
            b'data: {"choices":[{"delta":{"content":"b"}}]}\n\n',
            Charge(9, 2, host_counted=True),
        ),
    ],
)
def test_what_a_chat_call_is_charged_by_how_far_it_went(
    sent: bool, status: int | None, body: bytes, charge: Charge
) -> None:
    meter = UsageMeter(stream=True, api=CHAT, request_bytes=100)
    meter.sent, meter.status = sent, status
    meter.feed(body)
    assert meter.charge() == charge


def test_a_responses_stream_that_says_its_prompt_early_is_charged_that_prompt() -> None:
    """llama.cpp's ``response.created`` carries no usage (the recorded stream); a
    server whose does says the prompt's count, and a cut stream is charged it."""
    created = {"type": "response.created", "response": {"usage": {"input_tokens": 321}}}
    delta = {"type": "response.output_text.delta", "delta": "x"}
    meter = UsageMeter(stream=True, api=RESPONSES, request_bytes=100)
    meter.sent, meter.status = True, 200
    meter.feed(b"".join(b"data: " + json.dumps(e).encode() + b"\n\n" for e in (created, delta)))
    assert not meter.final
    assert meter.charge() == Charge(321, 1, host_counted=True)
    nulled = {"type": "response.in_progress", "response": {"usage": None}}
    assert responses_usage(nulled, None) is None


def test_a_whole_body_without_usage_is_charged_its_prompts_estimate() -> None:
    meter = UsageMeter(stream=False, api=CHAT, request_bytes=9)
    meter.sent, meter.status = True, 200
    meter.feed(b'{"choices": [{"message": {"content": "hi"}}]}')
    meter.close()
    assert meter.charge() == Charge(3, 0, host_counted=True)


def test_chat_deltas_count_content_reasoning_and_tool_call_pieces() -> None:
    def chunk(*deltas: object) -> dict[str, Any]:
        return {"choices": [{"index": i, "delta": d} for i, d in enumerate(deltas)]}

    call = {"index": 0, "function": {"arguments": '{"pa'}}
    assert chat_deltas(chunk({"content": "x"})) == 1
    assert chat_deltas(chunk({"reasoning_content": "hm"})) == 1
    assert chat_deltas(chunk({"tool_calls": [call]})) == 1
    assert chat_deltas(chunk({"content": "a"}, {"content": "b"})) == 2  # n = 2
    nothing: list[object] = [
        chunk({"role": "assistant", "content": None}),
        chunk({}),
        chunk({"content": ""}),
        chunk({"tool_calls": []}),
        chunk("text"),
        {"choices": [], "usage": {"completion_tokens": 5}},
        {"choices": "x"},
        [1, 2],
        None,
    ]
    assert [chat_deltas(x) for x in nothing] == [0] * len(nothing)


def test_responses_deltas_count_text_arguments_and_reasoning() -> None:
    for kind in (
        "response.output_text.delta",
        "response.function_call_arguments.delta",
        "response.reasoning_text.delta",
    ):
        assert responses_deltas({"type": kind, "delta": "x"}) == 1
        assert responses_deltas({"type": kind, "delta": ""}) == 0
    assert responses_deltas({"type": "response.output_text.done", "text": "xyz"}) == 0
    assert responses_deltas({"type": "response.created", "delta": "x"}) == 0


def test_messages_deltas_count_text_tool_input_and_thinking() -> None:
    def delta(**d: str) -> dict[str, Any]:
        return {"type": "content_block_delta", "index": 0, "delta": d}

    assert messages_deltas(delta(type="text_delta", text="x")) == 1
    assert messages_deltas(delta(type="input_json_delta", partial_json='{"a')) == 1
    assert messages_deltas(delta(type="thinking_delta", thinking="hm")) == 1
    assert messages_deltas(delta(type="signature_delta", signature="abc")) == 0
    assert messages_deltas(delta(type="text_delta", text="")) == 0
    assert messages_deltas({"type": "message_delta", "delta": {"text": "x"}}) == 0
