"""The CLI against a real supervisor: what an operator types, and what they read.

tests/test_cli_parse.py checks the same commands against a fake controller;
here each one goes through the real API to a real fleet of guest processes,
and its output is read the way a person reads it: headers, rows, columns.
"""

from __future__ import annotations

import json
import queue
import subprocess
import threading
import time
from typing import Any

from swarmctl import (
    FIRECLAW,
    NOTHING,
    STOP_WAIT,
    WAIT,
    Swarm,
    gone,
    idle,
    role_yaml,
    swarm_yaml,
)

CRASH = 'guest_command: ["sh", "-c", "exit 1"]\n'


def ok(swarm: Swarm, *args: str) -> str:
    out = swarm.cli(*args)
    assert out.returncode == 0, (args, out.stderr)
    assert out.stderr == b"", (args, out.stderr)
    return out.stdout.decode()


def table(text: str, header: list[str]) -> list[dict[str, str]]:
    """The rows of the table in ``text`` whose header line is ``header``, as dicts;
    each cell is read at its column's position under the header, as a person would."""
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if line.split() == header)
    head = lines[start]
    cols = [head.index(name) for name in header]
    rows = []
    for line in lines[start + 1 :]:
        if not line.strip():
            break
        # Every cell starts exactly under its header (left-aligned columns).
        cells = [line[c : (cols[i + 1] if i + 1 < len(cols) else None)] for i, c in enumerate(cols)]
        assert all(c == "" or not c.startswith(" ") for c in cells), (line, head)
        rows.append({h: cell.strip() for h, cell in zip(header, cells, strict=True)})
    return rows


def test_status_reads_as_a_table_of_roles_and_vms(make_swarm) -> None:  # type: ignore[no-untyped-def]
    swarm = make_swarm(swarm_yaml(role_yaml("worker", min_idle=2), role_yaml("coder", min_idle=1)))
    st = swarm.wait_for("pools full", lambda s: idle("worker", 2)(s) and idle("coder", 1)(s))
    text = ok(swarm, "status")
    assert text.splitlines()[0] == (
        f"fireclaw-swarm: pid {swarm.proc.pid}; backend process (configured); "
        "tasks claimed 0, done 0, failed 0, queued 0, waiting_for_input 0"
    )
    assert table(text, ["ROLE", "IDLE", "ACTIVE", "FAILED", "DEGRADED"]) == [
        {"ROLE": "worker", "IDLE": "2", "ACTIVE": "0", "FAILED": "0", "DEGRADED": "no"},
        {"ROLE": "coder", "IDLE": "1", "ACTIVE": "0", "FAILED": "0", "DEGRADED": "no"},
    ]
    vms = table(text, ["VM", "ROLE", "STATE", "PID", "RESTARTS", "AGENT"])
    assert vms == [
        {
            "VM": a["name"],
            "ROLE": a["role"],
            "STATE": "idle",
            "PID": str(a["pid"]),
            "RESTARTS": "0",
            "AGENT": "-",
        }
        for a in st["agents"]
    ]
    assert {v["VM"] for v in vms} == {"worker-0", "worker-1", "coder-0"}


def test_scale_then_tasks_list_what_ran(make_swarm) -> None:  # type: ignore[no-untyped-def]
    swarm = make_swarm(swarm_yaml(role_yaml("worker", min_idle=1)))
    assert ok(swarm, "scale", "worker", "3") == "worker: scaled to 3\n"
    swarm.wait_for("3 idle workers", idle("worker", 3))
    assert (
        table(ok(swarm, "status"), ["ROLE", "IDLE", "ACTIVE", "FAILED", "DEGRADED"])[0]["IDLE"]
        == "3"
    )

    assert ok(swarm, "tasks") == "no tasks\n"
    assert ok(swarm, "task", "worker", "say hello", "--wait", "--timeout", str(WAIT)).endswith(
        ": say hello\n"
    )
    (row,) = table(ok(swarm, "tasks"), ["ID", "ROLE", "STATE", "ATTEMPTS", "OWNER", "PROMPT"])
    assert row["ID"] == "1" and row["ROLE"] == "worker" and row["STATE"] == "done"
    assert row["ATTEMPTS"] == "0"  # none lost
    assert row["OWNER"].startswith("worker-")
    assert row["PROMPT"] == "say hello"
    assert ok(swarm, "tasks", "--state", "queued") == "no tasks\n"
    assert len(table(ok(swarm, "tasks", "--state", "done"), list(row))) == 1


def test_reset_clears_a_failed_vm(make_swarm) -> None:  # type: ignore[no-untyped-def]
    swarm = make_swarm(swarm_yaml(role_yaml("worker"), role_yaml("crasher", extra=CRASH)))
    swarm.wait_for("crasher failed", lambda s: s["roles"]["crasher"]["failed"] == 1)
    crashes = len(swarm.events("crashed"))
    assert ok(swarm, "reset", "crasher-0").startswith("crasher-0: reset (reset=1)")
    swarm.wait_for("crasher-0 tried again", lambda s: len(swarm.events("crashed")) > crashes)
    # An unknown name is one line on stderr and a failure.
    out = swarm.cli("reset", "nobody-7")
    assert out.returncode != 0
    assert len(out.stderr.decode().strip().splitlines()) == 1
    assert "nobody-7" in out.stderr.decode()


class Follower:
    """``fireclaw-swarm logs -f`` running; its lines read by a thread into a queue."""

    def __init__(self, swarm: Swarm) -> None:
        self.proc = subprocess.Popen(
            [FIRECLAW, "--state-dir", str(swarm.state), "logs", "-f"],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        self.lines: queue.Queue[str] = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.put(line.rstrip("\n"))

    def until(self, what: str, timeout: float = WAIT) -> list[str]:
        """Lines read until one contains ``what`` (that one included)."""
        deadline = time.monotonic() + timeout
        seen = []
        while True:
            left = deadline - time.monotonic()
            try:
                line = self.lines.get(timeout=max(left, 0))
            except queue.Empty:
                raise AssertionError(f"logs -f never showed {what!r}; it showed {seen}") from None
            seen.append(line)
            if what in line:
                return seen

    def close(self) -> None:
        self.proc.terminate()
        self.proc.wait(timeout=10)
        for stream in (self.proc.stdout, self.proc.stderr):
            if stream is not None:
                stream.close()


def event_line(line: str) -> dict[str, Any]:
    """``id date time kind subject key=value...`` as its parts."""
    event_id, day, clock, kind, subject, *detail = line.split(" ")
    return {"id": int(event_id), "when": f"{day} {clock}", "kind": kind, "subject": subject,
            "detail": detail}  # fmt: skip


def test_logs_prints_the_event_log_and_follows_new_events(make_swarm) -> None:  # type: ignore[no-untyped-def]
    swarm = make_swarm(swarm_yaml(role_yaml("worker", min_idle=1)))
    swarm.wait_for("1 idle worker", idle("worker", 1))
    lines = ok(swarm, "logs").splitlines()
    events = swarm.events()
    assert [event_line(line)["id"] for line in lines] == [e["id"] for e in events]
    first = event_line(lines[0])
    assert (first["kind"], first["subject"]) == ("started", "supervisor")
    assert f"pid={swarm.proc.pid}" in first["detail"]
    time.strptime(first["when"], "%Y-%m-%d %H:%M:%S")

    follower = Follower(swarm)
    try:
        shown = follower.until(f"{events[-1]['id']} ")  # caught up with the log so far
        assert ok(swarm, "scale", "worker", "2") == "worker: scaled to 2\n"
        shown += follower.until(" scaled worker")
        assert event_line(shown[-1])["detail"] == ["n=2"]
        # Each event once, in order: what was there, then what came.
        ids = [event_line(line)["id"] for line in shown]
        assert ids == sorted(set(ids)) and ids[: len(events)] == [e["id"] for e in events]
    finally:
        follower.close()


def test_down_stops_the_fleet_gracefully(make_swarm) -> None:  # type: ignore[no-untyped-def]
    swarm = make_swarm(swarm_yaml(role_yaml("worker", min_idle=2)))
    st = swarm.wait_for("2 idle workers", idle("worker", 2))
    assert ok(swarm, "down") == "stopping\n"
    assert swarm.proc.wait(timeout=STOP_WAIT) == 0
    for a in st["agents"]:
        assert gone(a["pid"])
        last = (swarm.state / "logs" / f"{a['name']}.log").read_text().splitlines()[-1]
        assert last.endswith(" INFO stopped: supervisor stopping"), last
    assert swarm.leftovers() == NOTHING
    # With the supervisor gone, the CLI says so in one line.
    out = swarm.cli("status")
    assert out.returncode != 0 and len(out.stderr.decode().strip().splitlines()) == 1


def test_a_handover_on_the_process_backend_is_a_clean_restart(make_swarm) -> None:  # type: ignore[no-untyped-def]
    """Process guests cannot outlive their supervisor, so a handover there stops
    the fleet gracefully and the new supervisor starts its own: ``down
    --leave-vms`` says so, and ``up --handover`` comes up once the old one is gone."""
    swarm = make_swarm(swarm_yaml(role_yaml("worker", min_idle=1)))
    st = swarm.wait_for("1 idle worker", idle("worker", 1))
    first = st["agents"][0]["pid"]
    old = swarm.proc
    swarm.start(args=["--handover"])
    assert old.wait(timeout=STOP_WAIT) == 0
    assert gone(first)
    st = swarm.wait_for("the new pool", idle("worker", 1))
    assert st["agents"][0]["pid"] != first
    assert ok(swarm, "down", "--leave-vms") == "stopping\n"
    assert swarm.proc.wait(timeout=STOP_WAIT) == 0
    assert swarm.leftovers() == NOTHING


def test_stop_ends_a_turn_and_logs_gives_one_agents_trail_as_json(make_swarm) -> None:  # type: ignore[no-untyped-def]
    """`stop NAME`: the task a VM works on, whose command would run for an hour,
    ends at once with exit 130 and the VM stays. `logs --agent NAME --json`:
    that VM's events, one JSON object a line, and nobody else's."""
    forever = 'harness: {kind: command, command: ["sh", "-c", "exec sleep 3600"]}\n'
    swarm = make_swarm(swarm_yaml(role_yaml("worker", min_idle=1, extra=forever)))
    swarm.wait_for("1 idle worker", idle("worker", 1))
    task = swarm.api.post("/tasks", {"role": "worker", "prompt": "never ends"})
    st = swarm.wait_for(
        "the task at work",
        lambda s: s["tasks"]["claimed"] == 1 and any(a["state"] == "active" for a in s["agents"]),
    )
    (vm,) = [a for a in st["agents"] if a["state"] == "active"]
    claimed = [e for e in swarm.events("task_claimed") if e["detail"]["task_id"] == task["id"]]
    assert [e["subject"] for e in claimed] == [vm["name"]]

    assert ok(swarm, "stop", vm["name"]) == f"{vm['name']}: stopped what it was doing\n"
    swarm.wait_for("the task failed", lambda s: s["tasks"]["failed"] == 1)
    row = swarm.api.get(f"/tasks/{task['id']}")
    assert (row["state"], row["exit_code"], row["attempts"]) == ("failed", 130, 0), row
    assert row["result"] == "cancelled: stopped through the API"
    assert any(a["name"] == vm["name"] and a["pid"] == vm["pid"] for a in swarm.agents())

    lines = ok(swarm, "logs", "--agent", vm["name"], "--json").splitlines()
    trail = [json.loads(line) for line in lines]
    named = vm["name"]
    mine = [
        e
        for e in swarm.events()
        if named in (e["subject"], e["detail"].get("agent"), e["detail"].get("vm"))
    ]
    assert [e["id"] for e in trail] == [e["id"] for e in mine]
    assert {"task_claimed", "turn_cancelled"} <= {e["kind"] for e in trail}, trail
    others = {a["name"] for a in swarm.agents()} - {vm["name"]}
    assert not any(e["subject"] in others for e in trail)
    out = swarm.cli("stop", "nobody-here")
    assert out.returncode == 1
    assert out.stderr.decode() == "fireclaw-swarm: no agent or VM named 'nobody-here'\n"
