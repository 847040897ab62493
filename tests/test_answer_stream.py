"""The answer on its way to IRC, without I/O: the JSON action's final string
decoded as it grows, the text of a streamed reply, and IRC lines made as soon as
they are complete, the same lines wherever the text was split."""

from __future__ import annotations

import json
import random

import pytest
from fireclaw.guest_daemon.agent_rules import reply_lines
from fireclaw.guest_daemon.answer_stream import (
    MAX_OPENING,
    NO_ANSWER,
    AnswerLines,
    FinalDecoder,
    ReplyText,
)

TRICKY = [
    "plain",
    'quotes " and \\ backslashes / slashes',
    "lines\nand\ttabs\r\nand \b\f controls \x1f",
    "unicode: é ß 中文 and an emoji 😀 and 🇫🇷",
    "\ud83d lone surrogate",
    "",
]


def decode(pieces: list[str]) -> str:
    decoder = FinalDecoder()
    return "".join(decoder.feed(piece) for piece in pieces)


def splits(text: str, rng: random.Random, count: int = 40) -> list[list[str]]:
    """``text`` cut into one-character pieces, at every single place, and at random."""
    ways = [list(text), [text]]
    ways += [[text[:i], text[i:]] for i in range(1, len(text))]
    for _ in range(count if len(text) > 1 else 0):
        cuts = sorted(rng.sample(range(1, len(text)), min(len(text) - 1, rng.randint(1, 8))))
        ways.append([text[a:b] for a, b in zip([0, *cuts], [*cuts, len(text)], strict=True)])
    return ways


@pytest.mark.parametrize("value", TRICKY)
@pytest.mark.parametrize("ascii_only", [True, False])
def test_the_final_string_decodes_wherever_the_stream_is_split(
    value: str, ascii_only: bool
) -> None:
    rng = random.Random(len(value))
    for raw in (
        json.dumps({"final": value}, ensure_ascii=ascii_only),
        '  { "final" :\n "' + json.dumps(value, ensure_ascii=ascii_only)[1:] + " }",
        "```json\n" + json.dumps({"final": value}, ensure_ascii=ascii_only) + "\n```",
        '{"\\u0066inal": ' + json.dumps(value, ensure_ascii=ascii_only) + "}",
    ):
        for pieces in splits(raw, rng):
            assert decode(pieces) == json.loads(raw.strip("`json\n"))["final"], pieces


def test_the_answer_grows_as_the_string_does() -> None:
    decoder = FinalDecoder()
    assert decoder.feed('{"fin') == ""
    assert decoder.feed('al": "Hel') == "Hel"
    assert decoder.feed("lo\\") == "lo"  # the escape is held until it is whole
    assert decoder.feed("n wor\\u00") == "\n wor"
    assert decoder.feed("e9\\ud83d") == "é"  # a high surrogate waits for its pair
    assert decoder.feed('\\ude00!" , "more": "not this"}') == "😀!"
    assert decoder.feed("anything after") == ""


@pytest.mark.parametrize(
    "raw",
    [
        '{"tool": "run_shell", "arguments": {"command": "echo {\\"final\\": \\"x\\"}"}}',
        '{"arguments": {"final": "x"}, "tool": "save_memory"}',
        '{"final": 42}',
        '{"final": ["x"]}',
        '{"final": "raw\ncontrol"}',
        '{"final": "bad \\q escape"}',
        '{"final": "bad \\u12g4 escape"}',
        "Hello, I am not JSON at all",
        '["final", "x"]',
        '`` {"final": "x"}',
    ],
)
def test_what_is_not_a_final_answer_gives_nothing(raw: str) -> None:
    for pieces in splits(raw, random.Random(len(raw)), count=10):
        decoder = FinalDecoder()
        said = [decoder.feed(piece) for piece in pieces]
        # A raw control character or a bad escape is found late: what came before it
        # went out already, as it would have on IRC, but nothing after it.
        if raw.startswith('{"final": "'):
            before = raw[len('{"final": "') :].split("\n")[0].split("\\")[0]
            assert before.startswith("".join(said)), said
        else:
            assert said == [""] * len(pieces), pieces


def test_an_opening_that_never_comes_is_given_up_and_held_no_more() -> None:
    decoder = FinalDecoder()
    assert decoder.feed(" " * (MAX_OPENING + 1)) == ""
    assert decoder.feed('{"final": "late"}') == ""


def chunk(delta: dict[str, object]) -> dict[str, object]:
    return {"choices": [{"index": 0, "delta": delta, "finish_reason": None}]}


def test_native_reply_text_is_the_content_until_a_tool_call() -> None:
    text = ReplyText(native=True)
    assert text.feed(chunk({"role": "assistant", "content": "Let me "})) == "Let me "
    assert text.feed({"choices": [], "usage": {"prompt_tokens": 1}}) == ""
    assert text.feed("not a chunk") == ""
    assert text.feed(chunk({"content": None})) == ""
    assert text.feed(chunk({"content": "look."})) == "look."
    call = {"index": 0, "function": {"name": "run_shell", "arguments": "{}"}}
    assert text.feed(chunk({"tool_calls": [call]})) == ""
    assert text.feed(chunk({"content": "more"})) == ""
    whole = {"choices": [{"message": {"content": "all at once"}, "finish_reason": "stop"}]}
    assert ReplyText(native=True).feed(whole) == "all at once"


def test_json_reply_text_is_the_final_string() -> None:
    raw = json.dumps({"final": "It is 42.\nSure."})
    text = ReplyText(native=False)
    assert "".join(text.feed(chunk({"content": raw[i : i + 3]})) for i in range(0, 99, 3)) == (
        "It is 42.\nSure."
    )
    tool = json.dumps({"tool": "run_shell", "arguments": {"command": "ls"}})
    text = ReplyText(native=False)
    assert [text.feed(chunk({"content": c})) for c in tool] == [""] * len(tool)


# --- IRC lines ------------------------------------------------------------------------


def stream_lines(pieces: list[str], *, budget: int, max_lines: int = 10, **kw: str) -> list[str]:
    lines = AnswerLines(budget=budget, max_lines=max_lines, **{"prefix": "carol: ", **kw})
    out: list[str] = []
    for piece in pieces:
        lines.write(piece)
        out += lines.take()
    lines.close("".join(pieces))
    return out + lines.take()


def random_text(rng: random.Random) -> str:
    words = ["a", "word", "é", "中文字", "😀", "x" * 70, " ", "  ", "\t", "\x01", "\x00"]
    words += ["\n", "\r\n", "\r", "\n\n"]
    return "".join(rng.choice(words) + rng.choice(["", " "]) for _ in range(rng.randint(0, 120)))


def test_streamed_lines_are_the_whole_answers_lines_wherever_it_is_split() -> None:
    rng = random.Random(7)
    for _ in range(300):
        text = random_text(rng)
        budget = rng.choice([24, 40, 100, 400])  # room for "(… N more lines)"
        max_lines = rng.choice([2, 5, 10, 1000])
        whole = reply_lines(text, prefix="carol: ", budget=budget, max_lines=max_lines)
        assert all(len(line.encode()) <= budget for line in whole)
        assert all("\n" not in line and "\r" not in line and "\x01" not in line for line in whole)
        for pieces in splits(text, rng, count=3)[:: max(1, len(text) // 20)]:
            assert stream_lines(pieces, budget=budget, max_lines=max_lines) == whole, pieces


def test_a_line_is_ready_once_complete_and_the_rest_at_the_end() -> None:
    lines = AnswerLines(prefix="carol: ", budget=20, max_lines=10)
    lines.write("  First li")
    assert lines.take() == []
    lines.write("ne\nSecond")
    assert lines.take() == ["carol: First line"]
    lines.write(" is a long one that fills")
    assert lines.take() == ["Second is a long"]  # a full page goes before the newline
    lines.write(" it\n\n")
    assert lines.take() == ["one that fills it"]
    lines.write("end  ")
    lines.close("First line\nSecond is a long one that fills it\n\nend")
    assert lines.take() == ["end"]
    assert lines.closed


def test_the_cap_holds_the_last_line_allowed_until_the_end() -> None:
    lines = AnswerLines(prefix="", budget=400, max_lines=3)
    lines.write("a\nb\nc\n")
    assert lines.take() == ["a", "b"]  # "c" may be the last line or the count
    lines.close("a\nb\nc")
    assert lines.take() == ["c"]
    lines = AnswerLines(prefix="", budget=400, max_lines=3)
    lines.write("a\nb\nc\nd\ne")
    assert lines.take() == ["a", "b"]
    lines.close("a\nb\nc\nd\ne")
    assert lines.take() == ["(… 3 more lines)"]


def test_the_prefix_is_left_out_when_the_answer_addresses_the_sender() -> None:
    lines = AnswerLines(prefix="carol: ", addressee="carol", budget=400, max_lines=10)
    lines.write("Car")
    assert lines.take() == []
    lines.write("ol, yes\nno")
    assert lines.take() == ["Carol, yes"]
    assert stream_lines(["carolyn: hi"], budget=400, addressee="carol") == ["carol: carolyn: hi"]


def test_a_reply_that_was_not_the_answer_leaves_only_its_complete_lines() -> None:
    lines = AnswerLines(prefix="carol: ", budget=400, max_lines=10)
    lines.write("Let me look")
    lines.discard()  # it was a tool call after all: its unfinished line is dropped
    lines.write("It is 42.")
    lines.close("It is 42.")
    assert lines.take() == ["carol: It is 42."]


def test_an_apology_after_lines_went_out_is_one_line_without_the_prefix() -> None:
    lines = AnswerLines(prefix="carol: ", budget=400, max_lines=3)
    lines.write("one\ntwo\nthree\nfour and an unfinished")
    assert lines.take() == ["carol: one", "two"]
    lines.close("sorry, something went wrong\nwith a second line")
    assert lines.take() == ["sorry, something went wrong"]
    lines.write("late")
    assert lines.take() == []
    lines = AnswerLines(prefix="carol: ", budget=400, max_lines=3)
    lines.write("unfinished")
    lines.close("sorry, that took too long")
    assert lines.take() == ["carol: sorry, that took too long"]
    lines = AnswerLines(prefix="carol: ", budget=400, max_lines=3)
    lines.close("")
    assert lines.take() == [f"carol: {NO_ANSWER}"]
