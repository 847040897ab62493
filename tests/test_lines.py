"""Text on one line (guest_daemon/lines.py), as every error a person reads is worded."""

from __future__ import annotations

from fireclaw.guest_daemon.lines import first_line, one_line


def test_one_line_flattens_blanks_and_control_characters() -> None:
    assert one_line("  disk\tfull\r\n\x1b[31mnow\x00 ") == "disk full [31mnow"
    assert one_line("\n\t ") == ""


def test_one_line_is_cut_at_its_limit_and_says_so() -> None:
    assert one_line("a" * 10, 10) == "a" * 10
    assert one_line("a" * 11, 10) == "a" * 7 + "..."
    assert len(one_line("word " * 1000)) == 1000


def test_first_line_is_what_an_exception_says_first_or_its_type() -> None:
    assert first_line(OSError("no room\nsecond line")) == "no room"
    assert first_line(ValueError()) == "ValueError"
    assert first_line(RuntimeError("  \n")) == "RuntimeError"
