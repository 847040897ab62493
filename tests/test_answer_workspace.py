"""Where a task's CLI keeps its session while the task waits for an answer: a
workspace of the task's own (``workspaces.for_work``), apart from named agents',
removed once the task is over (``discard_task``)."""

from __future__ import annotations

from pathlib import Path

import pytest
from fireclaw.pool import workspaces


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
