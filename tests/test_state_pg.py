"""What only the PostgreSQL store has: its server, its connection string and
password, claims from many connections at once, and fencing across hosts.
The behaviour both stores share is checked on both in ``test_state.py``."""

from __future__ import annotations

import pathlib

import psycopg
from pg import PgCluster, start_cluster


def _processes_under(root: pathlib.Path) -> list[int]:
    """Processes whose command line names ``root`` (the server and its backends
    name their data folder, or were started from it)."""
    found = []
    for proc in pathlib.Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            cmdline = (proc / "cmdline").read_bytes()
            cwd = str((proc / "cwd").readlink())
        except OSError:
            continue
        if str(root).encode() in cmdline or cwd.startswith(str(root)):
            found.append(int(proc.name))
    return found


def test_a_cluster_runs_as_nobody_on_a_socket_only_and_leaves_nothing() -> None:
    cluster: PgCluster = start_cluster()
    root = cluster.root
    try:
        assert _processes_under(root), "the server runs from its folder"
        assert (root / "nobody").stat().st_uid == 65534
        with cluster.connect() as conn:
            (user,) = conn.execute("SELECT current_user").fetchone()  # type: ignore[misc]
            (listen,) = conn.execute("SHOW listen_addresses").fetchone()  # type: ignore[misc]
        assert (user, listen) == ("fireclaw", "")
        status = pathlib.Path(f"/proc/{cluster.proc.pid}/status").read_text()
        uid_line = next(line for line in status.splitlines() if line.startswith("Uid:"))
        assert set(uid_line.split()[1:]) == {"65534"}  # nobody, never root
    finally:
        cluster.stop()
    assert not root.exists()
    assert _processes_under(root) == []
    try:
        psycopg.connect(cluster.dsn("postgres"), password=cluster.password, connect_timeout=5)
    except psycopg.OperationalError:
        pass
    else:
        raise AssertionError("the server still answers after stop()")
