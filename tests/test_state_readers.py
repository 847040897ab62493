"""The state database as other processes see it while the supervisor has it open:
``fireclaw-swarm doctor``, ``gc`` and ``usage``-like readers come and go beside it."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from fireclaw.supervisor.state import Store

#: Another process: opens the database, counts the tasks, closes it.
COUNT = """
import sqlite3, sys
conn = sqlite3.connect(sys.argv[1])
print(conn.execute("SELECT count(*) FROM tasks").fetchone()[0])
conn.close()
"""


def tasks_seen_by_another_process(path: Path) -> int:
    out = subprocess.run(
        [sys.executable, "-c", COUNT, str(path)], capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 0, out.stderr
    return int(out.stdout)


def test_a_second_open_in_the_process_leaves_other_processes_seeing_every_write(
    tmp_path: Path,
) -> None:
    """The supervisor opens the database again to look for leftovers while its own
    connection is open. Closing that second one must not drop the first one's
    locks: a reader in another process that came and went would then remove the
    write-ahead log the supervisor goes on writing to, and every later write would
    be seen by no other process, and lost with the supervisor on a kill -9."""
    path = tmp_path / "swarm.db"
    with Store.open(path) as supervisor:
        Store.open(path).close()
        assert tasks_seen_by_another_process(path) == 0
        supervisor.add_task("worker", "written after a reader came and went")
        assert tasks_seen_by_another_process(path) == 1
        assert (tmp_path / "swarm.db-wal").exists()
    assert path.stat().st_mode & 0o777 == 0o600
