"""Generated input against the swarm's untrusted and user-facing edges.

* swarm.yaml: the shipped file with one field replaced by a generated value (or
  a generated key added), and generated text that is not the shipped file at
  all, go through ``parse_config`` (what ``up`` and every reload run). Each is
  either a Config or a ConfigError whose text is one line naming the file;
  nothing else may escape. ``up`` on such a file exits 78 with that line.
* The guest control protocol: generated frames (raw bytes, and msgpack maps
  shaped like messages with generated fields) through ``decode_guest`` raise
  ``ProtocolError`` or give a message that encodes back to a valid frame.
* A hostile guest: generated message sequences sent to a real host session
  (``ControlSession`` over a WebSocket on memory streams) end in an orderly
  way: served, or ``GuestLost`` naming why; never another exception, never a
  hang.

Each runs a bounded number of examples; ``FIRECLAW_FUZZ_EXAMPLES=10000`` makes
a longer campaign of the same tests (see tests/README.md).
"""

from __future__ import annotations

import os
import pathlib
import shutil
import subprocess
import sys
from typing import Any

import msgspec
import pytest
import trio
import trio.testing
import yaml
from fireclaw.config import EX_CONFIG, Config, ConfigError, parse_config
from fireclaw.guest_daemon import protocol as p
from fireclaw.guest_daemon.channel import WsChannel
from fireclaw.pool.control import ControlSession, GuestLost
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_control import SPEC, TOKEN, pair

REPO = pathlib.Path(__file__).resolve().parent.parent
SHIPPED = yaml.safe_load((REPO / "swarm.yaml").read_text())
FIRECLAW = str(pathlib.Path(sys.executable).parent / "fireclaw-swarm")
EXAMPLES = int(os.environ.get("FIRECLAW_FUZZ_EXAMPLES", "200"))

FUZZ = settings(
    max_examples=EXAMPLES,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)

# --- swarm.yaml -------------------------------------------------------------------

scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=40),
    st.sampled_from(
        [
            "",
            "managed",
            "auto",
            "qemu",
            "firecracker",
            "permanent",
            "always",
            "no",
            "*!*@127.0.0.1",
            "#control",
            "10.0.0.0/8",
            "[::1]:6667",
            "127.0.0.1:0",
            "\x00",
            "a\nb",
            "{role}-{n}",
            "~/../../etc",
        ]
    ),
)
values = st.recursive(
    scalars,
    lambda inner: st.one_of(
        st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=12), inner, max_size=4)
    ),
    max_leaves=12,
)


def _paths(node: Any, prefix: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    """Every path into ``node`` (mapping keys and list indexes), the root excluded."""
    out: list[tuple[Any, ...]] = []
    if isinstance(node, dict):
        for key, value in node.items():
            out.append((*prefix, key))
            out += _paths(value, (*prefix, key))
    elif isinstance(node, list):
        for i, value in enumerate(node):
            out.append((*prefix, i))
            out += _paths(value, (*prefix, i))
    return out


SHIPPED_PATHS = _paths(SHIPPED)


def _at(doc: Any, path: tuple[Any, ...]) -> Any:
    for key in path:
        doc = doc[key]
    return doc


MAPPINGS = [(), *(path for path in SHIPPED_PATHS if isinstance(_at(SHIPPED, path), dict))]


def _replaced(doc: Any, path: tuple[Any, ...], value: Any) -> Any:
    if not path:
        return value
    head, rest = path[0], path[1:]
    if isinstance(doc, dict):
        return {**doc, head: _replaced(doc.get(head), rest, value)}
    if isinstance(doc, list):
        copy = list(doc)
        copy[head] = _replaced(copy[head], rest, value)
        return copy
    return {head: _replaced(None, rest, value)}


@st.composite
def mutated_files(draw: st.DrawFn) -> str:
    """The shipped swarm.yaml with one field replaced, or one key added somewhere."""
    if draw(st.booleans()):
        path = draw(st.sampled_from(SHIPPED_PATHS))
    else:  # a new key in one of the file's mappings
        parent = draw(st.sampled_from(MAPPINGS))
        path = (*parent, draw(st.text(min_size=1, max_size=12)))
    doc = _replaced(SHIPPED, path, draw(values))
    return yaml.safe_dump(doc, allow_unicode=True)


def _check_outcome(text: str, where: pathlib.Path) -> None:
    try:
        config = parse_config(text, path=where)
    except ConfigError as exc:
        message = str(exc)
        assert "\n" not in message and "\r" not in message, message
        assert message.startswith(str(where)), message
        assert len(message) < 2000, message
    else:
        assert isinstance(config, Config)


@FUZZ
@given(text=mutated_files())
def test_a_mutated_swarm_yaml_loads_or_gets_one_line(text: str, tmp_path: pathlib.Path) -> None:
    _check_outcome(text, tmp_path / "swarm.yaml")


@FUZZ
@given(text=st.one_of(st.text(max_size=300), st.from_regex(r"[-:\[\]{}#&*!|>'\"%@` \n\tA-z0-9]*")))
def test_any_text_as_swarm_yaml_loads_or_gets_one_line(text: str, tmp_path: pathlib.Path) -> None:
    _check_outcome(text, tmp_path / "swarm.yaml")


@FUZZ
@given(doc=st.dictionaries(st.text(max_size=12), values, max_size=6))
def test_a_generated_mapping_loads_or_gets_one_line(
    doc: dict[str, Any], tmp_path: pathlib.Path
) -> None:
    _check_outcome(yaml.safe_dump({"version": 1, **doc}), tmp_path / "swarm.yaml")


@settings(max_examples=5, deadline=None)
@given(text=mutated_files())
def test_up_on_a_bad_file_exits_78_with_one_line(text: str) -> None:
    """What a user sees: ``up`` on a file that does not load prints one line and exits 78,
    before it takes the lock or touches the state dir."""
    root = pathlib.Path(os.environ.get("TMPDIR", "/tmp"))
    work = root / f"fireclaw-fuzz-{os.getpid()}"
    work.mkdir(exist_ok=True)
    try:
        where = work / "swarm.yaml"
        where.write_text(text)
        try:
            parse_config(text, path=where)
        except ConfigError as exc:
            expected = f"fireclaw-swarm: {exc}"
        else:
            return  # a file that loads would start a swarm: not what this test is about
        done = subprocess.run(
            [FIRECLAW, "up", "--config", str(where)],
            capture_output=True,
            timeout=60,
            stdin=subprocess.DEVNULL,
        )
        assert done.returncode == EX_CONFIG, done
        assert done.stderr.decode().splitlines() == [expected]
        assert not (work / "state").exists()
    finally:
        shutil.rmtree(work, ignore_errors=True)


# --- the guest control protocol ----------------------------------------------------

_GUEST_TAGS = ["hello", "heartbeat", "output", "exited", "promoted", "task_done", "goodbye"]
_FIELDS = ["vm_id", "token", "version", "pid", "seq", "req", "stream", "data", "code", "error"]
_FIELDS += ["name", "task_id", "output", "truncated", "reason", "type"]

wire_values = st.recursive(
    st.one_of(
        st.none(),
        st.booleans(),
        st.integers(min_value=-(2**63), max_value=2**64 - 1),
        st.floats(),
        st.text(max_size=80),
        st.binary(max_size=80),
    ),
    lambda inner: st.one_of(
        st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=8,
)


@st.composite
def message_like(draw: st.DrawFn) -> bytes:
    """A msgpack map that looks like a guest message: a real or made-up tag, real or
    made-up fields, generated values."""
    fields = draw(st.dictionaries(st.sampled_from(_FIELDS) | st.text(max_size=8), wire_values))
    tag = draw(st.sampled_from(_GUEST_TAGS) | st.text(max_size=10))
    return msgspec.msgpack.encode({"type": tag, **fields})


frames = st.one_of(st.binary(max_size=300), message_like())


@FUZZ
@given(frame=frames)
def test_decode_guest_raises_protocol_error_or_gives_a_valid_message(frame: bytes) -> None:
    try:
        msg = p.decode_guest(frame)
    except p.ProtocolError as exc:
        assert "\n" not in str(exc).strip()
        return
    assert p.decode_guest(p.encode(msg)) == msg


def test_decode_guest_refuses_text_and_oversized_frames() -> None:
    with pytest.raises(p.ProtocolError, match="text frame"):
        p.decode_guest("{}")
    big = msgspec.msgpack.encode({"type": "goodbye", "reason": "x" * p.MAX_FRAME_BYTES})
    with pytest.raises(p.ProtocolError, match="exceeds"):
        p.decode_guest(big)


# --- a hostile guest against the real host session ---------------------------------

valid_messages = st.one_of(
    st.builds(p.Heartbeat, seq=st.integers(0, 2**53)),
    st.builds(
        p.Output,
        req=st.integers(0, 10),
        stream=st.sampled_from(["stdout", "stderr"]),
        data=st.binary(max_size=64),
    ),
    st.builds(p.Exited, req=st.integers(0, 10), code=st.integers(-255, 255)),
    st.builds(p.Promoted, name=st.sampled_from(["w-0", "alice"])),
    st.builds(p.TaskDone, task_id=st.integers(1, 5), code=st.integers(0, 3), output=st.text()),
    st.builds(p.Hello, vm_id=st.just("w-0"), token=st.just(TOKEN), version=st.just(1)),
    st.builds(p.Goodbye, reason=st.text(max_size=20)),
)
guest_frames = st.one_of(valid_messages.map(p.encode), frames)


@FUZZ
@given(sequence=st.lists(guest_frames, max_size=12))
def test_a_hostile_guest_ends_its_session_in_an_orderly_way(sequence: list[bytes]) -> None:
    """Whatever a connected guest sends, the host's session either keeps serving (and
    ends when the guest goes quiet for the heartbeat timeout) or ends with GuestLost;
    no other exception escapes, and the session always ends."""

    async def main() -> None:
        ended: list[BaseException | None] = []
        over = trio.Event()
        async with trio.open_nursery() as nursery:
            host, guest = await pair(nursery)
            await guest.send_message(
                p.encode(p.Hello(vm_id="w-0", token=TOKEN, version=p.PROTOCOL_VERSION))
            )
            session = await ControlSession.handshake(
                WsChannel(host), vm_id="w-0", token=TOKEN, spec=SPEC
            )

            async def serve() -> None:
                try:
                    await session.serve()
                except GuestLost as exc:
                    ended.append(exc)
                else:
                    ended.append(None)
                finally:
                    over.set()

            nursery.start_soon(serve)
            for frame in sequence:
                try:
                    await guest.send_message(frame)
                except Exception:  # the host closed the connection: it has judged
                    break
            # The guest now goes quiet: the session must end by the heartbeat timeout.
            with trio.fail_after(SPEC.heartbeat_timeout * 3):
                await over.wait()
            nursery.cancel_scope.cancel()
        assert ended and (ended[0] is None or isinstance(ended[0], GuestLost))
        if isinstance(ended[0], GuestLost):
            assert ended[0].reason and "\n" not in ended[0].reason

    trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))
