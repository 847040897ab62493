"""The state store as the pool sees it: the records the pool writes, the errors
it handles, and ``StateStore``, the protocol naming exactly the store methods
the pool calls. The supervisor's SQLite database satisfies it, and so does the
PostgreSQL store of a cluster; the pool names neither, so either can be used
(or faked in a test) without the pool knowing.

Fencing: each claim of a task gives it a new ``epoch``; every later write for
that task (its result, a requeue) carries the epoch of the claim it belongs
to, and changes nothing if the task was claimed again since (by another VM,
or in a cluster by another host that took it over): ``TaskFenced``.

Exceptions (raised by the store, handled by the pool)::

    StateError              any failure of the database, one line naming it
     +-- StateUnwritable    the database refused a write (disk full, read-only,
     |                      failing; a cluster's database unreachable)
     +-- TaskNotFound       no task with that id
     +-- TaskConflict       the task is not in a state that allows the move
          +-- TaskFenced    the task was claimed again since: the write is stale
"""

from __future__ import annotations

import pathlib
from typing import Protocol

import msgspec
from fireclaw.pool.task_states import TASK_STATES, TaskState

__all__ = ["TASK_STATES", "TaskState"]


class StateError(Exception):
    pass


class StateUnwritable(StateError):
    """The disk under the database refused a write; ``why`` says how, in a word
    or two ("full", "read-only", "failing", "unreachable"). It passes once the
    disk has room again (or the database answers again). ``path`` names the
    database: its file, or a cluster's ``host/dbname``."""

    def __init__(self, message: str, why: str, path: pathlib.Path | str) -> None:
        super().__init__(message)
        self.why = why
        self.path = path


class TaskNotFound(StateError):
    pass


class TaskConflict(StateError):
    pass


class TaskFenced(TaskConflict):
    """A write for a task carried the epoch of an older claim: the task has been
    claimed again since, and this writer no longer owns it."""


class TaskRow(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    id: int
    role: str
    prompt: str
    state: TaskState
    attempts: int
    #: The VM (agent name) that claimed it; kept on a failed task for the record.
    owner: str | None
    exit_code: int | None
    #: Output of a finished task, or why it was last requeued or failed.
    result: str | None
    created_at: float
    updated_at: float
    #: Claims so far: the fencing token every write for the current claim carries.
    epoch: int = 0
    #: The host whose VM claimed it last (a cluster's host name; one host's own).
    host: str | None = None
    #: The CLI session it stopped in to ask (``waiting_for_input``; then kept).
    session: str | None = None
    #: An operator's answer to its question: the prompt its next run resumes with.
    answer: str | None = None
    #: The account of its role's provider it last ran on (a role with accounts).
    account: str | None = None


class VmRecord(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """One running VM, as needed to adopt or reclaim it after a supervisor crash.

    The row holds the guest's token (``guest_token``): the database is root's
    and 0600, like the state dir it is in."""

    name: str
    role: str
    pid: int
    start_time: int
    boot_id: str
    spec_hash: str
    netns: str | None = None
    cgroup: str | None = None
    #: The VMM's control socket (qemu: its QMP socket), for a later supervisor.
    socket: str | None = None
    log: str | None = None
    #: The incarnation's id: its namespace, cgroup and overlay are named after it.
    vm_id: str = ""
    #: Where the guest dials in its namespace (the control listener's port) and
    #: where its IRC client does (the forwarder's; 0: none).
    port: int = 0
    irc_port: int = 0
    #: The namespace's link to the swarm's bridge (qemu): host end and address.
    veth: str | None = None
    address: str | None = None
    disk: str | None = None  # its own overlay
    #: Who the guest says it is in its Hello: a clone says its template's id and token.
    guest_id: str = ""
    guest_token: str = ""
    #: Handed out of the pool: a named agent (``agent``), or serving a task or a run.
    claimed: bool = False
    agent: str | None = None
    workspace: bool = False  # the agent's workspace disk is attached
    started_as: str = ""


class CallRecord(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """One model call through a VM's gateway: who made it (as the supervisor knows
    it, never as the guest says), and the tokens the model server reported.

    ``outcome`` is ``ok``, ``refused`` (budget, size, concurrency), ``upstream_error``
    (the server failed or answered an error) or ``cancelled`` (the VM hung up).
    ``host_counted``: the server's final usage never came (the stream was cut
    before it), so the tokens are the gateway's own count of what it passed on."""

    at: float
    agent: str | None
    role: str
    vm: str
    task: int | None
    model: str
    prompt_tokens: int
    completion_tokens: int
    duration: float
    outcome: str
    host_counted: bool = False
    #: The account whose key the gateway sent upstream (a role with accounts).
    account: str | None = None


class PendingWrites(Protocol):
    """What a held write reports to the store's health: how many writes are held
    in memory, waiting for the disk to take them."""

    pending: int


class StateStore(Protocol):
    """The store methods the pool calls. Task moves are durable once they return
    and raise ``StateUnwritable`` when the disk refuses them; the VM registry and
    restart records are best effort (a refused write is dropped, never raised)."""

    @property
    def health(self) -> PendingWrites: ...

    def count_queued(self, role: str) -> int:
        """Number of tasks of ``role`` waiting for an agent."""
        ...

    def claim_task(self, role: str, owner: str) -> TaskRow | None:
        """Atomically move the oldest queued task of ``role`` to claimed by
        ``owner`` on this host, with a new ``epoch``; ``None`` if there is none."""
        ...

    def finish_task(
        self, task_id: int, *, epoch: int, ok: bool, exit_code: int | None, result: str
    ) -> TaskRow:
        """The task claimed at ``epoch`` ran to the end: done if ``ok``, else
        failed. Raises ``TaskNotFound``; ``TaskFenced`` if it was claimed again
        since; ``TaskConflict`` if it is not claimed."""
        ...

    def requeue_task(self, task_id: int, *, epoch: int, reason: str, max_attempts: int) -> TaskRow:
        """Give the task claimed at ``epoch`` back to the queue (failed at
        ``max_attempts``). Raises as ``finish_task``."""
        ...

    def ask_task(self, task_id: int, *, epoch: int, question: str, session: str) -> TaskRow:
        """The task claimed at ``epoch`` stopped to ask ``question`` in the CLI
        session ``session``: it waits for input, holding no VM (its question is
        its ``result`` meanwhile). Raises as ``finish_task``."""
        ...

    def assign_account(self, task_id: int, *, epoch: int, account: str) -> TaskRow:
        """Record that the task claimed at ``epoch`` runs on ``account``. Raises as
        ``finish_task``."""
        ...

    def defer_task(self, task_id: int, *, epoch: int, reason: str) -> TaskRow:
        """Give the task claimed at ``epoch`` back to the queue without counting an
        attempt (its account was refused, not the task). Raises as ``finish_task``."""
        ...

    def exhaust_account(self, role: str, name: str, *, until: float, reason: str) -> None:
        """Mark ``role``'s account ``name`` exhausted until ``until`` (unix time)."""
        ...

    def exhausted_accounts(self, role: str) -> dict[str, float]:
        """``{account: exhausted until}`` of ``role``, past times included."""
        ...

    def account_spent(self, role: str, *, since: float) -> dict[str, int]:
        """Tokens the ledger holds of each of ``role``'s accounts since ``since``."""
        ...

    def record_restart(
        self, name: str, role: str, *, reason: str, exit_code: int | None, delay: float
    ) -> None:
        """Note that the VM ``name`` is restarted after ``delay`` seconds."""
        ...

    def put_vm(self, rec: VmRecord) -> None:
        """Insert or replace the registry row named ``rec.name``."""
        ...

    def drop_vm(self, name: str) -> None:
        """Forget ``name``; no error if it is not there."""
        ...
