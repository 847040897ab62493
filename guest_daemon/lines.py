"""Text on one line: what every error a person reads is made of, on both sides.

``one_line`` flattens any text (an exception's words, a program's stderr, a
peer's answer) to one line of printable characters, cut to a length a person
reads; ``first_line`` is what an exception says first. One definition, here,
because the guest daemon ships alone into VM images and the host words its
errors the same way.

Standard library only.
"""

from __future__ import annotations

__all__ = ["first_line", "one_line"]


def one_line(text: str, limit: int = 1000) -> str:
    """``text`` on one line: control characters and runs of blanks become one
    blank, and a text longer than ``limit`` characters ends in ``...`` there."""
    flat = " ".join("".join(c if c.isprintable() else " " for c in text).split())
    return flat if len(flat) <= limit else flat[: max(limit - 3, 0)] + "..."


def first_line(exc: BaseException) -> str:
    """The first line of what ``exc`` says, or its type's name when it says nothing."""
    lines = str(exc).strip().splitlines()
    return lines[0] if lines else type(exc).__name__
