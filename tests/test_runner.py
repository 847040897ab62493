"""The host's one subprocess runner (pool/runner.py), with real programs."""

from __future__ import annotations

import time

import pytest
from fireclaw.pool.runner import ProgramFailed, run_program, telling


def test_stdout_comes_back_and_input_goes_in() -> None:
    assert run_program(["sh", "-c", "tr a-z A-Z; echo done >&2"], input=b"abc", timeout=30) == (
        b"ABC"
    )


def test_stdin_is_closed_when_no_input_is_given() -> None:
    # A program reading stdin sees EOF at once instead of waiting on ours.
    assert run_program(["cat"], timeout=30) == b""


def test_a_failure_is_one_line_with_the_telling_stderr_line() -> None:
    script = "echo working >&2; echo 'E: the mirror is gone' >&2; echo cleaning up >&2; exit 4"
    with pytest.raises(ProgramFailed) as caught:
        run_program(["sh", "-c", script], timeout=30)
    assert str(caught.value) == "sh: E: the mirror is gone"
    assert caught.value.returncode == 4
    assert caught.value.stderr_line == "E: the mirror is gone"


def test_a_silent_failure_names_its_exit_code() -> None:
    with pytest.raises(ProgramFailed) as caught:
        run_program(["sh", "-c", "exit 3"], timeout=30)
    assert str(caught.value) == "sh: exit code 3"
    assert caught.value.stderr_line == ""


def test_a_program_that_names_itself_is_not_named_twice() -> None:
    with pytest.raises(ProgramFailed) as caught:
        run_program(["sh", "-c", "echo 'sh: no such thing' >&2; exit 1"], timeout=30)
    assert str(caught.value) == "sh: no such thing"


def test_name_is_how_errors_call_a_wrapped_program() -> None:
    with pytest.raises(ProgramFailed) as caught:
        run_program(["env", "sh", "-c", "echo broken >&2; exit 1"], timeout=30, name="nft")
    assert str(caught.value) == "nft: broken"


def test_a_missing_program_never_ran() -> None:
    with pytest.raises(ProgramFailed) as caught:
        run_program(["fireclaw-no-such-program"], timeout=30)
    assert str(caught.value) == "fireclaw-no-such-program: No such file or directory"
    assert caught.value.returncode is None


def test_a_program_past_its_timeout_is_killed() -> None:
    started = time.monotonic()
    with pytest.raises(ProgramFailed) as caught:
        run_program(["sleep", "600"], timeout=0.5)
    assert str(caught.value) == "sleep: took over 0.5s"
    assert caught.value.returncode is None
    # Killed at its timeout, not left to run: far less than the 600 s it asked for.
    assert time.monotonic() - started < 60


def test_stderr_lines_stream_as_they_come() -> None:
    seen: list[str] = []
    out = run_program(
        ["sh", "-c", "echo one >&2; echo two >&2; echo out"], timeout=None, on_line=seen.append
    )
    assert (out, seen) == (b"out\n", ["one", "two"])


def test_telling_prefers_the_last_marked_error_line() -> None:
    assert telling(["a", "error: first", "b", "Error: second", "c"]) == "error: first"
    assert telling(["a", "E: one", "E: two", "c"]) == "E: two"
    assert telling(["a", " b ", ""]) == "b"
    assert telling([]) == ""
