"""Where a task's CLI keeps its session while the task waits for an answer: a
workspace of the task's own (``workspaces.for_work``), apart from named agents',
removed once the task is over (``discard_task``); and the VM running a task
with a CLI given that disk at its promotion."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest
from fireclaw.pool import workspaces
from fireclaw.pool.drivers.base import Capability
from fireclaw.pool.gateway_core import Who
from fireclaw.pool.vm_base import AgentIdentity
from fireclaw.pool.vm_work import ChildWork


def test_a_named_agent_keeps_its_own_workspace(tmp_path: Path) -> None:
    for task, cli in ((None, False), (7, True)):
        assert workspaces.for_work(tmp_path, agent="alice", task=task, cli=cli) == (
            tmp_path,
            "alice",
        )


def test_a_task_run_by_a_cli_gets_one_of_its_own_apart_from_agents(tmp_path: Path) -> None:
    work = workspaces.for_work(tmp_path, agent=None, task=7, cli=True)
    assert work == (tmp_path / "tasks", "task-7")
    # An agent named like a task is not given the task's disk.
    assert workspaces.path_for(*work) != workspaces.path_for(tmp_path, "task-7")


@pytest.mark.parametrize(("task", "cli"), [(7, False), (None, True), (None, False)])
def test_other_work_gets_none(tmp_path: Path, task: int | None, cli: bool) -> None:
    assert workspaces.for_work(tmp_path, agent=None, task=task, cli=cli) is None


def test_a_finished_tasks_workspace_goes_and_only_its(tmp_path: Path) -> None:
    (tmp_path / "tasks").mkdir()
    mine = workspaces.path_for(tmp_path / "tasks", "task-7")
    other = workspaces.path_for(tmp_path / "tasks", "task-8")
    agent = workspaces.path_for(tmp_path, "task-7")
    for path in (mine, other, agent):
        path.write_bytes(b"ext4")
    workspaces.discard_task(tmp_path, 7)
    assert not mine.exists() and other.exists() and agent.exists()
    workspaces.discard_task(tmp_path, 7)  # already gone: nothing to do
    workspaces.discard_task(tmp_path, 9)  # never had one


# --- which disk a promoted VM is given ------------------------------------------


class Handle:
    """A stand-in VM handle (a fake, named as such): notes the disk it is given."""

    def __init__(self) -> None:
        self.attached: list[Path] = []

    async def attach_workspace(self, path: Path) -> None:
        self.attached.append(path)


class Driver:
    def describe(self) -> SimpleNamespace:
        return SimpleNamespace(can=lambda capability: capability is Capability.WORKSPACE)


def child(directory: Path, *, agent: str | None, task: int | None) -> tuple[ChildWork, Handle]:
    """A VM child's work layer over stand-ins of its runtime and its VM: what
    ``_attach_workspace`` reads of them, nothing else."""
    work = object.__new__(ChildWork)
    handle = Handle()
    work.name, work.handle, work._workspace_in = "coder-0", handle, None  # type: ignore[assignment]
    work.agent = AgentIdentity(name=agent) if agent is not None else None
    work.who = Who(vm="coder-0", role="coder", task=task)
    work.rt = SimpleNamespace(  # type: ignore[assignment]
        workspaces_dir=directory, driver=Driver(), event=lambda *a, **k: None
    )
    return work, handle


async def test_a_vm_running_a_cli_task_gets_the_tasks_disk(tmp_path: Path) -> None:
    work, handle = child(tmp_path, agent=None, task=7)
    assert await work._attach_workspace(cli=True)
    assert handle.attached == [tmp_path / "tasks" / "task-7.ext4"]
    assert handle.attached[0].is_file()  # made with mke2fs, as an agent's
    # The next VM of the same task (its answer) gets the same disk, not a new one.
    again, other = child(tmp_path, agent=None, task=7)
    assert await again._attach_workspace(cli=True)
    assert other.attached == handle.attached


async def test_a_task_of_another_harness_gets_none_and_an_agent_its_own(tmp_path: Path) -> None:
    work, handle = child(tmp_path, agent=None, task=7)
    assert not await work._attach_workspace(cli=False)
    assert handle.attached == []
    alice, hers = child(tmp_path, agent="alice", task=None)
    assert await alice._attach_workspace(cli=True)
    assert hers.attached == [tmp_path / "alice.ext4"]
