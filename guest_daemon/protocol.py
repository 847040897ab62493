"""The control protocol between the supervisor (host) and a guest daemon (VM).

One channel per VM (``channel.py``): a WebSocket the guest dials, or a port
the guest keeps open and the host connects to (a virtio-serial port under
QEMU). Every message is one binary frame holding one msgpack-encoded Struct
from the tagged unions below (the tag field is ``type``). Nothing else is
accepted: text frames,
unknown message types, unknown fields, out-of-range values and frames larger
than ``MAX_FRAME_BYTES`` are protocol violations.

The host treats everything a guest sends as untrusted input: it decodes with
``decode_guest`` (which enforces the schema and the size cap) and kills a guest
that breaks the protocol. The guest trusts the host.

Conversation::

    guest                              host
      | <----------- Attach(entropy) -- |   on a port only: a host is here
      | -- Hello(id, token, resume?) -> |   within boot_timeout of the VM starting
      | <------- Welcome(entropy, now) -- |   guest reseeds its RNG, sets its clock
      | -- Heartbeat ------------------> |   every heartbeat_interval
      | <-------------- Run(req, argv) -- |   parked guest runs a command
      | -- Output(req, stream, data) ---> |   zero or more
      | -- Exited(req, code) -----------> |
      | <---- Promote(name, role, ...) -- |   becomes an agent
      | -- Promoted(name) --------------> |
      | <------------ Task(id, prompt) -- |
      | -- ToolRan(task, tool, ...) ----> |   a chat harness's tool call: the audit trail
      | <------------------- Cancel ---- |   ends the agent's current turn(s)
      | -- TaskDone(id, code, output) --> |   or, its CLI stopped to ask: TaskDone(waiting)
      | <- Task(id, answer, resume=session) |   an operator's answer resumes that session
      | <--------------- Stop(reason) --- |   asks the guest to stop
      | -- Goodbye(reason) -------------> |   then the guest exits 0

On a port the host speaks first: the guest cannot see a new host arrive
(a VM restored from a snapshot wakes up on the port its template had open,
with a new QEMU and a new host behind it), so each host that connects says
``Attach``, and the guest answers with a new Hello whatever it was doing. The
guest mixes ``Attach.entropy`` into its RNG at once: a restored clone diverges
from its siblings before anything else runs, however late its Welcome. Bytes
the guest wrote before the Attach may reach the new host: before its Hello,
the host passes over heartbeats.

A guest that was already at work when its connection was lost (its
supervisor crashed or was upgraded; the VM kept running) says so in its next
Hello: ``resume`` names the agent it is and the tasks it holds, running or
finished with their ``TaskDone`` not yet sent. After the Welcome it sends
those ``TaskDone`` messages first. A host that adopts the VM takes the agent
as it is and waits for those tasks' results instead of sending them again.

This module imports only msgspec: it ships inside VM images.
"""

from __future__ import annotations

from typing import Annotated, Final, Literal, TypeVar

import msgspec
from msgspec import Meta

_T = TypeVar("_T")

#: 2: ``Hello.resume`` (a guest that outlived its supervisor says what it holds).
#: 3: the chat harness (``ChatHarness``, ``Cancel``, ``ToolRan``, ``Run.user``).
#: 4: the coding-agent CLI harness (``CliHarness``).
#: 5: the port channel (``Attach``, ``Hello.dials``).
#: 6: questions (``TaskDone.waiting``, ``Task.resume``).
#: 7: a task refused by its account's provider (``TaskDone.limited``).
PROTOCOL_VERSION: Final = 7

#: Largest frame either side accepts. Output is chunked well below this.
MAX_FRAME_BYTES: Final = 64 * 1024
#: Largest chunk of command output carried by one ``Output`` message.
MAX_OUTPUT_CHUNK: Final = 16 * 1024
#: Largest prompt a ``Task`` carries; with 3-byte characters it still fits a frame.
MAX_PROMPT_CHARS: Final = 16 * 1024
#: Largest task result carried by ``TaskDone`` (the rest is cut, and says so).
MAX_RESULT_BYTES: Final = 32 * 1024
#: Most tasks a resuming guest may say it holds.
MAX_RESUMED_TASKS: Final = 64
#: Largest tool output carried by one ``ToolRan`` (the rest is cut, and says so).
MAX_TOOL_OUTPUT: Final = 16 * 1024
#: Largest tool arguments (as JSON text) carried by one ``ToolRan``.
MAX_TOOL_ARGUMENTS: Final = 8 * 1024
#: Longest question a waiting task carries: it goes to IRC as one line.
MAX_QUESTION_CHARS: Final = 400

Name = Annotated[str, Meta(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.\-\[\]{}|^`\\]+$")]
Token = Annotated[str, Meta(min_length=16, max_length=128, pattern=r"^[A-Za-z0-9_\-]+$")]
ReqId = Annotated[int, Meta(ge=0, le=2**53)]
Seq = Annotated[int, Meta(ge=0, le=2**53)]
ExitCode = Annotated[int, Meta(ge=-255, le=255)]
TaskId = Annotated[int, Meta(ge=1, le=2**53)]
ShortText = Annotated[str, Meta(max_length=1024)]
UserName = Annotated[str, Meta(max_length=32, pattern=r"^([a-z_][a-z0-9_-]*)?$")]
#: Exit code of a task whose turn was cancelled (like a shell's 128 + SIGINT).
EXIT_CANCELLED: Final = 130
Argv = Annotated[list[Annotated[str, Meta(max_length=8192)]], Meta(min_length=1, max_length=256)]


class _Msg(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True, tag_field="type"):
    pass


# --- guest -> host -----------------------------------------------------------


class Resume(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """What a guest already at work is, said again on a new connection."""

    agent: Name  # the name it was promoted as
    #: Tasks it holds: running, or done with their TaskDone still to send.
    tasks: Annotated[list[TaskId], Meta(max_length=MAX_RESUMED_TASKS)] = []


class Hello(_Msg, frozen=True, kw_only=True, forbid_unknown_fields=True, tag="hello"):
    """First message on a connection: who the guest claims to be."""

    vm_id: Name
    token: Token
    version: Annotated[int, Meta(ge=0, le=1000)]
    pid: Annotated[int, Meta(ge=0, le=2**31)] = 0
    #: Set by a promoted guest dialling again after a lost connection.
    resume: Resume | None = None
    #: How many times this daemon has opened its channel: dialled a WebSocket, or
    #: opened its port (once for its whole life: hosts come to it).
    dials: Annotated[int, Meta(ge=0, le=2**31)] = 0


class Heartbeat(_Msg, frozen=True, kw_only=True, forbid_unknown_fields=True, tag="heartbeat"):
    seq: Seq


class Output(_Msg, frozen=True, kw_only=True, forbid_unknown_fields=True, tag="output"):
    """A chunk of a running command's stdout or stderr."""

    req: ReqId
    stream: Literal["stdout", "stderr"]
    data: Annotated[bytes, Meta(max_length=MAX_OUTPUT_CHUNK)]


class Exited(_Msg, frozen=True, kw_only=True, forbid_unknown_fields=True, tag="exited"):
    """A ``Run`` request finished. ``code`` is negative for a signal, like Popen."""

    req: ReqId
    code: ExitCode
    error: ShortText = ""


class Promoted(_Msg, frozen=True, kw_only=True, forbid_unknown_fields=True, tag="promoted"):
    name: Name


#: A CLI's session id as it may go back on its command line (``cli_stream.SESSION_ID``).
SessionId = Annotated[str, Meta(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.:-]{0,127}$")]
QuestionKind = Literal["permission", "question", "turn_limit"]


class Waiting(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """A task's CLI stopped for something only a person can give (a permission, a
    question, its turn limit). ``question`` is one printable line; an answer
    resumes ``session`` (``Task.resume``)."""

    kind: QuestionKind
    question: Annotated[
        str, Meta(min_length=1, max_length=MAX_QUESTION_CHARS, pattern=r"^[^\x00-\x1f\x7f]+$")
    ]
    session: SessionId
#: The longest wait a guest may say its provider asked for (a week).
MAX_RETRY_AFTER: Final = 7 * 86400.0


class Limited(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """A CLI's provider refused the account it ran on: ``rate_limit`` (try later)
    or ``exhausted`` (its quota or credit is spent). ``retry_after``: seconds
    until the provider said it takes calls again, if it said. The guest's word:
    the host bounds it and only ever marks the account the task ran on."""

    kind: Literal["rate_limit", "exhausted"]
    retry_after: Annotated[float, Meta(ge=0, le=MAX_RETRY_AFTER)] | None = None
    message: ShortText = ""


class TaskDone(_Msg, frozen=True, kw_only=True, forbid_unknown_fields=True, tag="task_done"):
    """A task's turn ended: its result, or (``waiting``) the question it stopped at."""

    task_id: TaskId
    code: ExitCode
    output: Annotated[str, Meta(max_length=MAX_RESULT_BYTES)]
    truncated: bool = False
    waiting: Waiting | None = None
    #: The run failed because its account was refused (a coding-agent CLI's).
    limited: Limited | None = None


class ToolRan(_Msg, frozen=True, kw_only=True, forbid_unknown_fields=True, tag="tool_ran"):
    """A chat harness ran a tool: one line of the audit trail.

    ``task_id`` is 0 for a turn that answers IRC. ``output`` is the tool's whole
    output up to ``MAX_TOOL_OUTPUT`` bytes (the model was shown less).
    """

    task_id: Annotated[int, Meta(ge=0, le=2**53)]
    tool: Annotated[str, Meta(max_length=64)]
    arguments: Annotated[str, Meta(max_length=MAX_TOOL_ARGUMENTS)]
    code: ExitCode
    duration: Annotated[float, Meta(ge=0, le=86400)]
    output: Annotated[str, Meta(max_length=MAX_TOOL_OUTPUT)]
    truncated: bool = False


class Goodbye(_Msg, frozen=True, kw_only=True, forbid_unknown_fields=True, tag="goodbye"):
    reason: ShortText = ""


GuestMessage = Hello | Heartbeat | Output | Exited | Promoted | TaskDone | ToolRan | Goodbye


# --- host -> guest -----------------------------------------------------------


class Attach(_Msg, frozen=True, kw_only=True, forbid_unknown_fields=True, tag="attach"):
    """A host connected to the guest's port; the guest answers with Hello."""

    entropy: Annotated[bytes, Meta(min_length=32, max_length=512)]


class Welcome(_Msg, frozen=True, kw_only=True, forbid_unknown_fields=True, tag="welcome"):
    """Sent after a valid ``Hello``. A restored clone reseeds and resets its clock."""

    entropy: Annotated[bytes, Meta(min_length=32, max_length=512)]
    unix_time: float
    heartbeat_interval: Annotated[float, Meta(gt=0, le=3600)]
    #: Set inside a VM: clones restored from one snapshot each get their own.
    hostname: Annotated[str, Meta(max_length=63, pattern=r"^([A-Za-z0-9][A-Za-z0-9-]*)?$")] = ""


class Run(_Msg, frozen=True, kw_only=True, forbid_unknown_fields=True, tag="run"):
    """Run ``argv`` (no shell) in the guest and stream its output back."""

    req: ReqId
    argv: Argv
    cwd: Annotated[str, Meta(max_length=4096)] = ""
    #: Who runs it: empty for the agent user (the safe default), or a user name.
    user: UserName = ""


class Harness(_Msg, frozen=True, kw_only=True, forbid_unknown_fields=True, tag="command"):
    """The ``command`` harness: ``argv`` with ``{prompt}`` replaced by the prompt."""

    argv: Argv
    timeout: Annotated[float, Meta(gt=0, le=86400)] = 600.0


#: The tools a chat harness may hand its model.
ToolName = Literal["run_shell", "read_file", "write_file", "save_memory", "podman_run"]
#: ``native``: the server's ``tools`` field; ``json``: an action object enforced by a
#: JSON schema; ``auto``: native when the server says the model's template takes tools.
ToolMode = Literal["auto", "native", "json"]
DEFAULT_TOOLS: Final[tuple[ToolName, ...]] = ("run_shell", "read_file", "write_file", "save_memory")


class ChatHarness(_Msg, frozen=True, kw_only=True, forbid_unknown_fields=True, tag="chat"):
    """The ``chat`` harness: a tool loop on ``{base_url}/chat/completions``.

    ``base_url`` is the model gateway as the guest reaches it (``http://HOST:PORT/v1``).
    Every model call asks for at most ``max_tokens``; a task or turn takes at most
    ``max_steps`` model calls and ``timeout`` seconds; one tool run ``tool_timeout``.
    """

    base_url: Annotated[str, Meta(max_length=1024, pattern=r"^http://[^\s/?#]+(/[^\s?#]*)?$")]
    model: Annotated[str, Meta(min_length=1, max_length=256)]
    tools: Annotated[list[ToolName], Meta(max_length=8)] = msgspec.field(
        default_factory=lambda: list(DEFAULT_TOOLS)
    )
    tool_mode: ToolMode = "auto"
    max_steps: Annotated[int, Meta(ge=1, le=100)] = 8
    timeout: Annotated[float, Meta(gt=0, le=86400)] = 300.0
    max_tokens: Annotated[int, Meta(ge=16, le=32768)] = 512
    tool_timeout: Annotated[float, Meta(gt=0, le=3600)] = 60.0


#: The coding-agent CLIs a ``CliHarness`` may name (one spec each in ``clis.py``).
CliName = Literal["claude-code", "codex", "gemini-cli", "opencode", "aider"]
EnvVar = Annotated[str, Meta(pattern=r"^[A-Za-z_][A-Za-z0-9_]{0,127}$")]


class SecretEnv(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """Environment variables read from the role's secrets folder on the host, for
    the CLI's process only. Its repr names the variables, never their values."""

    values: Annotated[dict[EnvVar, Annotated[str, Meta(max_length=4096)]], Meta(max_length=32)] = (
        msgspec.field(default_factory=dict)
    )

    def __repr__(self) -> str:
        return f"SecretEnv({', '.join(sorted(self.values))})"


class CliHarness(_Msg, frozen=True, kw_only=True, forbid_unknown_fields=True, tag="cli"):
    """A coding-agent CLI harness: the spec ``cli`` run headless on each task or turn.

    ``gateway`` is the VM's model gateway root as the guest reaches it
    (``http://HOST:PORT``), or empty for a CLI that cannot go through it. The
    CLI's own limits are passed where it takes them; ``timeout`` kills its
    process group."""

    cli: CliName
    gateway: Annotated[str, Meta(max_length=1024, pattern=r"^(http://[^\s/?#]+)?$")] = ""
    timeout: Annotated[float, Meta(gt=0, le=86400)] = 900.0
    max_turns: Annotated[int, Meta(ge=1, le=1000)] | None = None
    max_budget_usd: Annotated[float, Meta(gt=0, le=100_000)] | None = None
    secrets: SecretEnv = msgspec.field(default_factory=SecretEnv)


class IrcPresence(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """Where and how a named agent appears on IRC, as seen from inside its VM."""

    host: Annotated[str, Meta(min_length=1, max_length=255)]
    port: Annotated[int, Meta(ge=1, le=65535)]
    nick: Name
    channels: Annotated[list[Annotated[str, Meta(max_length=50)]], Meta(max_length=32)]
    password: Annotated[str, Meta(max_length=256)] = ""
    cooldown: Annotated[float, Meta(ge=0, le=3600)] = 10.0


class Promote(_Msg, frozen=True, kw_only=True, forbid_unknown_fields=True, tag="promote"):
    """Become an agent named ``name`` of ``role``; with ``irc``, also join IRC."""

    name: Name
    role: Name
    persona: Annotated[str, Meta(max_length=16384)] = ""
    model: Annotated[str, Meta(max_length=256)] = ""
    harness: Harness | ChatHarness | CliHarness
    irc: IrcPresence | None = None
    #: The agent's persistent workspace disk is attached: mount it and work in it.
    workspace: bool = False


class Task(_Msg, frozen=True, kw_only=True, forbid_unknown_fields=True, tag="task"):
    """Serve ``prompt``; with ``resume``, it is an operator's answer to the question
    the task stopped at, given to the same CLI session."""

    task_id: TaskId
    prompt: Annotated[str, Meta(max_length=MAX_PROMPT_CHARS)]
    resume: SessionId | None = None


class Cancel(_Msg, frozen=True, kw_only=True, forbid_unknown_fields=True, tag="cancel"):
    """End the agent's current turn(s): its model stream is closed, its tool processes
    are killed, and a task so ended is reported done with ``EXIT_CANCELLED``."""

    reason: ShortText = ""


class Stop(_Msg, frozen=True, kw_only=True, forbid_unknown_fields=True, tag="stop"):
    reason: ShortText = ""


HostMessage = Attach | Welcome | Run | Promote | Task | Cancel | Stop


class ProtocolError(Exception):
    """A frame that is not a valid message: too big, undecodable, or off-schema."""


_guest_decoder: msgspec.msgpack.Decoder[GuestMessage] = msgspec.msgpack.Decoder(GuestMessage)
_host_decoder: msgspec.msgpack.Decoder[HostMessage] = msgspec.msgpack.Decoder(HostMessage)
_encoder = msgspec.msgpack.Encoder()


def encode(msg: GuestMessage | HostMessage) -> bytes:
    return _encoder.encode(msg)


def decode_guest(frame: bytes | str) -> GuestMessage:
    """Decode a frame from an untrusted guest, enforcing type, size and schema."""
    return _decode(_guest_decoder, frame)


def decode_host(frame: bytes | str) -> HostMessage:
    return _decode(_host_decoder, frame)


def _decode(decoder: msgspec.msgpack.Decoder[_T], frame: bytes | str) -> _T:
    if not isinstance(frame, bytes):
        raise ProtocolError("text frame (only binary msgpack frames are allowed)")
    if len(frame) > MAX_FRAME_BYTES:
        raise ProtocolError(f"frame of {len(frame)} bytes exceeds {MAX_FRAME_BYTES}")
    try:
        return decoder.decode(frame)
    except msgspec.ValidationError as exc:
        raise ProtocolError(f"invalid message: {_quoted(str(exc))}") from exc
    except msgspec.DecodeError as exc:
        raise ProtocolError(f"undecodable frame: {_quoted(str(exc))}") from exc


#: Longest part of a decoder's complaint kept in a ProtocolError.
_MAX_COMPLAINT: Final = 300


def _quoted(text: str) -> str:
    """A decoder's complaint, which may quote what the peer sent, made safe for one
    log line: unprintable characters escaped, cut to ``_MAX_COMPLAINT``."""
    if not text.isprintable():
        text = "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)
    return text if len(text) <= _MAX_COMPLAINT else text[:_MAX_COMPLAINT] + "..."
