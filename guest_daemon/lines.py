"""Text on one line: what every error a person reads is made of, on both sides.

``one_line`` flattens any text (an exception's words, a program's stderr, a
peer's answer) to one line of printable characters, cut to a length a person
reads; ``first_line`` is what an exception says first; ``redact`` takes
secrets out of a text someone else will read. One definition, here,
because the guest daemon ships alone into VM images and the host words its
errors the same way.

Standard library only.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Final

__all__ = ["MIN_SECRET", "REDACTED", "first_line", "one_line", "redact"]

REDACTED: Final = "[redacted]"
#: Secrets this short would redact ordinary words; the swarm never makes one.
MIN_SECRET: Final = 6


def one_line(text: str, limit: int = 1000) -> str:
    """``text`` on one line: control characters and runs of blanks become one
    blank, and a text longer than ``limit`` characters ends in ``...`` there."""
    flat = " ".join("".join(c if c.isprintable() else " " for c in text).split())
    return flat if len(flat) <= limit else flat[: max(limit - 3, 0)] + "..."


def first_line(exc: BaseException) -> str:
    """The first line of what ``exc`` says, or its type's name when it says nothing."""
    lines = str(exc).strip().splitlines()
    return lines[0] if lines else type(exc).__name__


def redact(text: str, secrets: Iterable[str]) -> str:
    """``text`` with every secret of ``secrets`` (at least ``MIN_SECRET`` long)
    replaced by ``REDACTED``; longest first, so none survives in part."""
    for secret in sorted((s for s in secrets if len(s) >= MIN_SECRET), key=len, reverse=True):
        text = text.replace(secret, REDACTED)
    return text
