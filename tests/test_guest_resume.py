"""A promoted guest in a VM keeps its work across a lost connection and says so.

``Work`` directly (its bookkeeping, no processes), then the real guest daemon
as a subprocess, configured from a kernel command line as inside a VM, with a
real WebSocket host on loopback that drops the connection mid-task the way a
killed supervisor does.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import trio
from fireclaw.guest_daemon.harness import Identity
from fireclaw.guest_daemon.protocol import (
    MAX_RESUMED_TASKS,
    PROTOCOL_VERSION,
    Goodbye,
    GuestMessage,
    Harness,
    Hello,
    Promote,
    Promoted,
    ProtocolError,
    Resume,
    Stop,
    Task,
    TaskDone,
    decode_guest,
    encode,
)
from fireclaw.guest_daemon.users import lookup_self
from fireclaw.guest_daemon.work import Work
from test_guest_daemon import (
    TOKEN,
    VM_ID,
    WAIT,
    Host,
    _env_without_fireclaw,
    exit_code,
    gone,
    host,
)

__all__ = ["host"]  # the fixture, used by name


def _promoted(work: Work, name: str = "ada") -> None:
    msg = Promote(name=name, role="worker", harness=Harness(argv=["true"]))
    work.promote(Identity.from_promote(msg))


async def test_a_result_with_no_host_waits_for_the_next_session() -> None:
    sent: list[TaskDone] = []

    async def send(done: GuestMessage) -> None:
        assert isinstance(done, TaskDone)
        sent.append(done)

    async with trio.open_nursery() as jobs:
        work = Work({}, jobs, keep=True, user=lookup_self())
        assert work.resume() is None  # not an agent: nothing to resume
        _promoted(work)
        await work.report(TaskDone(task_id=3, code=0, output="three"))  # nobody attached
        assert work.resume() == Resume(agent="ada", tasks=[3])
        kept = work.attach(send)
        assert kept == [TaskDone(task_id=3, code=0, output="three")]
        assert work.resume() == Resume(agent="ada", tasks=[])  # handed over
        await work.report(TaskDone(task_id=4, code=1, output="four"))
        assert sent == [TaskDone(task_id=4, code=1, output="four")]
        # What a broken connection could not write comes back to the work.
        work.detach()
        work.undelivered(TaskDone(task_id=4, code=1, output="four"))
        assert work.resume() == Resume(agent="ada", tasks=[4])
        jobs.cancel_scope.cancel()


async def test_outside_a_vm_results_die_with_the_session() -> None:
    async with trio.open_nursery() as jobs:
        work = Work({}, jobs, keep=False, user=lookup_self())
        _promoted(work)
        await work.report(TaskDone(task_id=3, code=0, output="three"))
        assert work.resume() is None

        async def send(done: GuestMessage) -> None:
            raise AssertionError(f"sent {done}")

        assert work.attach(send) == []
        jobs.cancel_scope.cancel()


async def test_a_guest_says_at_most_so_many_tasks() -> None:
    async with trio.open_nursery() as jobs:
        work = Work({}, jobs, keep=True, user=lookup_self())
        _promoted(work)
        for task_id in range(1, MAX_RESUMED_TASKS + 10):
            work.undelivered(TaskDone(task_id=task_id, code=0, output=""))
        resume = work.resume()
        assert resume is not None and len(resume.tasks) == MAX_RESUMED_TASKS
        jobs.cancel_scope.cancel()


def test_a_resume_part_is_checked_like_the_rest() -> None:
    hello = Hello(
        vm_id=VM_ID, token=TOKEN, version=PROTOCOL_VERSION, resume=Resume(agent="ada", tasks=[1, 2])
    )
    assert decode_guest(encode(hello)) == hello

    too_many = Hello(
        vm_id=VM_ID,
        token=TOKEN,
        version=PROTOCOL_VERSION,
        resume=Resume(agent="ada", tasks=list(range(1, MAX_RESUMED_TASKS + 2))),
    )
    with pytest.raises(ProtocolError, match="tasks"):
        decode_guest(encode(too_many))
    bad_name = Hello(vm_id=VM_ID, token=TOKEN, version=PROTOCOL_VERSION, resume=Resume(agent="a b"))
    with pytest.raises(ProtocolError, match="agent"):
        decode_guest(encode(bad_name))


#: Waits for a line on the FIFO its first argument names, then answers once.
WAITING_HARNESS = ["sh", "-c", 'read line < "$1"; echo "finished $2"']


def _say_go(fifo: Path) -> None:
    """Blocks until the harness opens the FIFO to read it."""
    with open(fifo, "w") as go:
        go.write("go\n")


async def test_in_a_vm_a_task_runs_on_across_a_lost_connection(host: Host, tmp_path: Path) -> None:
    cmdline = tmp_path / "cmdline"
    cmdline.write_text(f"fireclaw.url={host.url} fireclaw.vm_id={VM_ID} fireclaw.token={TOKEN}\n")
    os.mkfifo(tmp_path / "go")
    # Agent work runs as root here: the FIFO is in the test's private directory.
    env = {**_env_without_fireclaw(), "FIRECLAW_AGENT_USER": "root"}
    proc = await host.launch("--cmdline", str(cmdline), env=env)
    first = await host.accept()
    hello = await first.welcome()
    assert hello.resume is None
    fifo = str(tmp_path / "go")
    harness = Harness(argv=[*WAITING_HARNESS, "sh", fifo, "{prompt}"], timeout=60)
    await first.send(Promote(name="ada", role="worker", harness=harness))
    assert await first.expect(Promoted) == Promoted(name="ada")
    await first.send(Task(task_id=5, prompt="the job"))
    # The host goes away (a supervisor killed) while the task runs.
    await first.ws.aclose()

    second = await host.accept()
    again = await second.welcome()
    assert again.pid == proc.pid  # the same daemon, never restarted
    assert again.resume == Resume(agent="ada", tasks=[5])
    with trio.fail_after(WAIT):
        # Abandoned on timeout: a harness that never reads would block the open for good.
        await trio.to_thread.run_sync(_say_go, tmp_path / "go", abandon_on_cancel=True)
    assert await second.expect(TaskDone) == TaskDone(task_id=5, code=0, output="finished the job\n")

    await second.send(Stop(reason="done"))
    # Nothing else came before the goodbye: the result was sent once.
    assert await second.recv() == Goodbye(reason="done")
    assert await exit_code(proc) == 0
    assert "lost; dialling again" in host.stderr()


async def test_a_process_guest_ends_its_harness_with_the_connection(
    host: Host, tmp_path: Path
) -> None:
    """Not in a VM: nobody can adopt it, so a lost connection ends the work."""
    # Agent work as root: the harness is this venv's Python, in root's home.
    proc = await host.launch(env={**host.env(), "FIRECLAW_AGENT_USER": "root"})
    conn = await host.accept()
    await conn.welcome()
    listener = trio.socket.socket()
    await listener.bind(("127.0.0.1", 0))
    listener.listen(1)
    port = listener.getsockname()[1]
    # The harness says it runs (its pid, over a socket), then waits.
    script = (
        f"import os, socket, time; s = socket.create_connection(('127.0.0.1', {port}));"
        " s.sendall(str(os.getpid()).encode()); s.close(); time.sleep(300)"
    )
    await conn.send(
        Promote(name="bob", role="worker", harness=Harness(argv=[sys.executable, "-c", script]))
    )
    await conn.expect(Promoted)
    await conn.send(Task(task_id=1, prompt="p"))
    with trio.fail_after(WAIT):
        peer, _ = await listener.accept()
        with peer:
            pid = int(await peer.recv(64))
    listener.close()
    await conn.ws.aclose()
    assert await exit_code(proc) == 1
    assert gone(pid)
    assert "terminating 1 child process group" in host.stderr()
