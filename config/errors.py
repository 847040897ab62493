"""``ConfigError``, and how a validation failure becomes one line a YAML author reads.

msgspec reports a bad field as ``Expected `int` >= 1 - at `$.roles.coder.pool.min_idle```;
``convert`` turns that into ``swarm.yaml: roles.coder.pool.min_idle: expected int
>= 1, got 0``: the field's dotted path, what was expected in YAML's words (a
mapping, a list), what the file holds there, the fields or choices a typo could
have meant, and what a pattern means instead of the pattern itself.

Exceptions::

    ConfigError     a config file is missing, unreadable or invalid (one line)
"""

from __future__ import annotations

import re
from typing import Any, Final, TypeVar

import msgspec
import msgspec.inspect as mi
from fireclaw.config.common import POLICY_ALIASES
from fireclaw.config.irc import PATTERN_WORDS

__all__ = ["ConfigError", "convert", "show"]

# msgspec's names for JSON types, as a YAML author knows them.
_YAML_TYPE_NAMES: Final = {
    "object": "mapping",
    "array": "list",
    "object | null": "mapping or null",
    "array | null": "list or null",
}

T = TypeVar("T")


class ConfigError(Exception):
    """A config file is missing, unreadable or invalid.

    ``file`` is the file at fault (as the user named it), ``field`` the dotted
    path of the offending field (``None`` when the whole file is at fault),
    ``line``/``column`` (1-based) the place of a YAML syntax error.
    """

    def __init__(
        self,
        file: str,
        field: str | None,
        detail: str,
        *,
        line: int | None = None,
        column: int | None = None,
    ) -> None:
        super().__init__(file, field, detail)
        self.file = file
        self.field = None if field is None else _printable(field)
        self.detail = _printable(" ".join(detail.split()))
        self.line = line
        self.column = column

    def __str__(self) -> str:
        where = self.file if self.line is None else f"{self.file}:{self.line}:{self.column}"
        return ": ".join(part for part in (where, self.field, self.detail) if part)


def _printable(text: str) -> str:
    """``text`` with every unprintable character escaped (``\\r``, ``\\x1b``): a key
    or value from the file must not break the one-line error or drive a terminal."""
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


def convert(raw: object, typ: type[T], shown: str, prefix: str) -> T:
    """``raw`` as a ``typ``, or ``ConfigError`` naming ``shown`` (the file) and the
    field under ``prefix`` (a dotted path, empty for the top level)."""
    try:
        return msgspec.convert(raw, typ, strict=True)
    except msgspec.ValidationError as exc:
        field, what = _explain(str(exc), typ, raw)
        raise ConfigError(shown, _join(prefix, field), what) from exc


_AT_RE: Final = re.compile(r"(?s)(?P<what>.*?) - at (?P<key>`key` in )?`\$(?P<path>[^`]*)`")
_SEGMENT_RE: Final = re.compile(r"\.([^.\[]+)|\[(\d+|\.\.\.)\]")
_BLAME_RE: Final = re.compile(r"(?s)(?P<field>[a-z_]+): (?P<what>.+)")
_REGEX_RE: Final = re.compile(r"(?s)Expected `str` matching regex '(?P<pattern>.*)'")
# msgspec quotes a pattern with repr(): the key it is looked up by.
_PATTERN_WORDS: Final = {repr(p)[1:-1]: words for p, words in PATTERN_WORDS.items()}


def _explain(message: str, typ: type[Any], raw: object) -> tuple[str, str]:
    """Turn a msgspec validation message into (field path, what is wrong)."""
    match = _AT_RE.fullmatch(message)
    what, path = (match["what"], match["path"]) if match else (message, "")
    segments: list[str | int] = [
        name if name else (int(index) if index.isdigit() else index)
        for name, index in _SEGMENT_RE.findall(path)
    ]
    if match and match["key"]:
        return _path(segments), f"key: {_yaml_words(what)}"
    if m := re.fullmatch(r"Object contains unknown field `(.+)`", what):
        fields = _struct_fields(_type_at(mi.type_info(typ), segments, raw))
        expected = f"; expected one of: {', '.join(fields)}" if fields else ""
        return _path([*segments, m[1]]), f"unknown field{expected}"
    if m := re.fullmatch(r"Object missing required field `(.+)`", what):
        return _path([*segments, m[1]]), "required field is missing"
    if (m := re.fullmatch(r"Invalid value (.+)", what)) and segments:
        # A tagged union's tag (a harness's kind) that names no member.
        choices = _union_tags(_type_at(mi.type_info(typ), segments[:-1], raw))
        if choices:
            return _path(segments), f"expected one of: {', '.join(choices)}; got {m[1]}"
    if m := re.fullmatch(r"Invalid enum value (.+)", what):
        choices = _literal_values(_type_at(mi.type_info(typ), segments, raw))
        if segments and segments[-1] == "policy":
            choices += list(POLICY_ALIASES)
        return _path(segments), f"expected one of: {', '.join(choices)}; got {m[1]}"
    if m := _BLAME_RE.fullmatch(what):
        # A __post_init__ names the field it blames first: "server: expected ...".
        if m["field"] in _struct_fields(_type_at(mi.type_info(typ), segments, raw)):
            return _path([*segments, m["field"]]), m["what"]
    if (m := _REGEX_RE.fullmatch(what)) and m["pattern"] in _PATTERN_WORDS:
        found, value = _lookup(raw, segments)
        got = f", got {show(value)}" if found else ""
        return _path(segments), f"expected {_PATTERN_WORDS[m['pattern']]}{got}"
    if what.startswith("Expected "):
        what = _yaml_words("expected " + what.removeprefix("Expected "))
        found, value = _lookup(raw, segments)
        if found and ", got" not in what:
            what += f", got {show(value)}"
        if found and what.startswith("expected str") and isinstance(value, bool | int | float):
            # YAML reads bare true, no, 1.5 as non-strings.
            what += f" {show(value)} (quote it to make it a string)"
        return _path(segments), what
    return _path(segments), what


def _yaml_words(text: str) -> str:
    return re.sub(r"`([^`]*)`", lambda m: _YAML_TYPE_NAMES.get(m[1], m[1]), text)


def _path(segments: list[str | int]) -> str:
    out = ""
    for seg in segments:
        if isinstance(seg, int) or seg == "...":
            out += f"[{seg}]"
        else:
            out += f".{seg}" if out else seg
    return out


def _join(prefix: str, field: str) -> str:
    if not prefix or not field:
        return prefix or field
    return prefix + field if field.startswith("[") else f"{prefix}.{field}"


def _type_at(t: mi.Type, segments: list[str | int], raw: object = None) -> mi.Type | None:
    """The type at ``segments``; ``raw`` (the data being converted) picks the member
    of a tagged union (a harness's ``kind``)."""
    for seg in segments:
        if isinstance(t, mi.UnionType):
            structs = [u for u in t.types if not isinstance(u, mi.NoneType)]
            if len(structs) > 1:
                structs = [u for u in structs if _tag_matches(u, raw)]
            if len(structs) != 1:
                return None
            t = structs[0]
        raw = raw.get(seg) if isinstance(raw, dict) and isinstance(seg, str) else None
        if isinstance(t, mi.StructType) and isinstance(seg, str):
            found = [f.type for f in t.fields if f.encode_name == seg]
            if not found:
                return None
            t = found[0]
        elif isinstance(t, mi.VarTupleType | mi.ListType) and isinstance(seg, int):
            t = t.item_type
        elif isinstance(t, mi.DictType):
            t = t.value_type
        else:
            return None
    if isinstance(t, mi.UnionType):
        tagged = [u for u in t.types if _tag_matches(u, raw)]
        return tagged[0] if len(tagged) == 1 else t
    return t


def _tag_matches(t: mi.Type, raw: object) -> bool:
    return (
        isinstance(t, mi.StructType)
        and t.tag_field is not None
        and isinstance(raw, dict)
        and raw.get(t.tag_field) == t.tag
    )


def _union_tags(t: mi.Type | None) -> list[str]:
    if isinstance(t, mi.UnionType):
        return [str(u.tag) for u in t.types if isinstance(u, mi.StructType) and u.tag]
    return []


def _struct_fields(t: mi.Type | None) -> list[str]:
    if isinstance(t, mi.UnionType):
        return [f for u in t.types for f in _struct_fields(u)]
    if isinstance(t, mi.StructType):
        return [f.encode_name for f in t.fields]
    return []


def _literal_values(t: mi.Type | None) -> list[str]:
    if isinstance(t, mi.LiteralType):
        return [str(v) for v in t.values]
    return []


def _lookup(raw: object, segments: list[str | int]) -> tuple[bool, object]:
    for seg in segments:
        if isinstance(raw, dict) and isinstance(seg, str) and seg in raw:
            raw = raw[seg]
        elif isinstance(raw, list) and isinstance(seg, int) and seg < len(raw):
            raw = raw[seg]
        else:
            return False, None
    return True, raw


def show(value: object) -> str:
    """A value as the YAML author wrote it, short."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str):
        return repr(value) if len(value) <= 60 else repr(value[:57] + "...")
    if isinstance(value, dict):
        return "a mapping"
    if isinstance(value, list):
        return "a list"
    return type(value).__name__
