"""Operating a fleet end to end: two real ``fireclaw-swarm up`` (process
backend) of one cluster on this machine, sharing a real PostgreSQL (``pg.py``),
their managed ngircd linked (``test_cluster_irc.two_hosts``), and an operator on
IRC. ``!fleet`` lists both hosts; a drained host finishes its running task,
empties its pool, claims nothing while the other host takes the queue, stays
drained across its own restart and comes back with ``undrain``; ``!invoke``
puts a named agent on the less loaded host; ``up --cluster DSN --host NAME``
runs a host without a ``cluster:`` section and refuses a password on the
command line."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from fireclaw.supervisor.client import ApiError
from fireclaw.supervisor.cluster import HEARTBEAT
from ircperson import Event, Person
from pg import PgCluster
from swarmctl import FIRECLAW, NOTHING, WAIT, Swarm, idle, role_yaml, swarm_yaml
from test_cluster_irc import LEAD_WAIT, LINK_WAIT, two_hosts
from test_ircd import ngircd_of
from test_overseer import operator
from test_swarm import open_dir  # noqa: F401  (a fixture)

pytestmark = [
    pytest.mark.root,
    pytest.mark.skipif(os.geteuid() != 0, reason="the supervisor's VM plumbing needs root"),
]

#: A host reads its drain flag, and reports its load, at each heartbeat: a
#: change shows within one, here allowed three and a VM's boot.
BEAT_WAIT = 3 * HEARTBEAT + WAIT


def _dbname(dsn: str) -> str:
    return dsn.rsplit("/", 1)[1].split("?")[0]


def _tasks(pg_cluster: PgCluster, pg_dsn: str) -> dict[str, tuple[str, str | None]]:
    """Every task in PostgreSQL by prompt: (state, host that claimed it last)."""
    with pg_cluster.connect(_dbname(pg_dsn)) as conn:
        rows = conn.execute("SELECT prompt, state, host FROM tasks").fetchall()
    return {str(p): (str(s), None if h is None else str(h)) for p, s, h in rows}


def _host(status: dict[str, Any], name: str) -> dict[str, Any] | None:
    return next((h for h in status.get("hosts") or [] if h["name"] == name), None)


def _both_up_with(role: str) -> Callable[[dict[str, Any]], bool]:
    def ready(status: dict[str, Any]) -> bool:
        hosts = [_host(status, name) for name in ("alpha", "beta")]
        return all(h is not None and h["state"] == "up" and role in h["roles"] for h in hosts)

    return ready


def _overseer_said(fragment: str) -> Callable[[Event], bool]:
    return lambda e: (
        e.type == "pubmsg" and e.source.nick.startswith("overseer-") and fragment in e.arguments[0]
    )


def _sees_overseer_of(host: str) -> Callable[[Event], bool]:
    nick = f"overseer-{host}"
    return lambda e: (
        (e.type == "join" and e.source.nick == nick)
        or (e.type == "namreply" and nick in e.arguments[-1].split())
    )


@pytest.fixture
def people() -> Iterator[list[Person]]:
    """The people a test connects, disconnected at its end whatever happened."""
    met: list[Person] = []
    try:
        yield met
    finally:
        for someone in met:
            someone.stop()


def _close(swarms: dict[str, Swarm]) -> None:
    for swarm in swarms.values():
        swarm.close()
    for swarm in swarms.values():
        assert swarm.leftovers() == NOTHING
        assert ngircd_of(swarm.state / "ircd" / "ngircd.conf") == []


def test_fleet_lists_both_hosts_and_a_drained_host_hands_the_queue_over(
    tmp_path: Path,
    pg_cluster: PgCluster,
    pg_dsn: str,
    people: list[Person],
    request: pytest.FixtureRequest,
) -> None:
    gate = request.getfixturevalue("open_dir") / "gate"  # where the agent user can see it
    harness = (
        'harness: {kind: command, timeout: 600, command: ["sh", "-c", '
        f'"while [ ! -e {gate} ]; do sleep 0.05; done; echo done: $FIRECLAW_PROMPT"]}}\n'
    )
    roles = role_yaml("worker", min_idle=1, max_active=3, extra=harness)
    ports, swarms = two_hosts(tmp_path, pg_cluster, pg_dsn, roles)
    alpha, beta = swarms["alpha"], swarms["beta"]
    try:
        for swarm in swarms.values():
            swarm.start()
        alice = operator(ports["beta"][0], beta.state, "alice", "#control")
        people.append(alice)
        alice.expect("alpha's overseer in #control", _sees_overseer_of("alpha"), LINK_WAIT)
        alpha.wait_for("both hosts up with workers", _both_up_with("worker"), BEAT_WAIT)
        alpha.wait_for("an idle worker on alpha", idle("worker", 1))
        beta.wait_for("an idle worker on beta", idle("worker", 1))

        # !fleet: one line per host, from the leader.
        alice.say("#control", "!fleet")
        lines = {
            host: alice.expect(f"!fleet's line for {host}", _overseer_said(f"alice: {host}: "))
            for host in ("alpha", "beta")
        }
        for host, event in lines.items():
            line = event.arguments[0].removeprefix("alice: ")
            assert line.startswith(
                f"{host}: up; roles worker 0/1 (active/target); 0 tasks running;"
            )
            assert line.endswith(" s ago")
        # status has the hosts too, on either host.
        shown = alpha.cli("status")
        assert shown.returncode == 0, shown.stderr
        table = shown.stdout.decode()
        assert "HOST" in table and "alpha  up" in table and "beta   up" in table

        # beta drains (from alpha's command line): a task queued now runs on alpha.
        drained = alpha.cli("drain", "beta")
        assert drained.returncode == 0, drained.stderr
        alice.expect("beta saying it drains", _overseer_said("host beta drains"), BEAT_WAIT)
        beta.wait_for("beta's pool empty", idle("worker", 0), BEAT_WAIT)
        alice.expect("beta drained", _overseer_said("host beta is drained"), BEAT_WAIT)
        alpha.api.post("/tasks", {"role": "worker", "prompt": "first"})
        alpha.wait_for("alpha running it", lambda s: s["tasks"]["claimed"] == 1)
        assert _tasks(pg_cluster, pg_dsn)["first"] == ("claimed", "alpha")
        assert beta.cli("undrain", "beta").returncode == 0
        beta.wait_for("beta's pool back", idle("worker", 1), BEAT_WAIT)
        alice.expect("beta back", _overseer_said("host beta no longer drains"))

        # alpha drains (from IRC) while its task runs: it stops its warm VM, keeps
        # its task, claims none of those queued now; beta takes them.
        alice.say("#control", "!drain alpha")
        alice.expect("the answer", _overseer_said("alice: host alpha drains"))
        said = alice.expect(
            "alpha saying it drains", _overseer_said("host alpha drains:"), BEAT_WAIT
        )
        assert "finishes its 1 running and stops its 1 warm VMs" in said.arguments[0]
        alpha.wait_for(
            "alpha's pool empty, its task still running",
            lambda s: s["roles"]["worker"]["idle"] == 0 and s["roles"]["worker"]["active"] == 1,
            BEAT_WAIT,
        )
        for prompt in ("second", "third"):
            beta.api.post("/tasks", {"role": "worker", "prompt": prompt})
        beta.wait_for("beta running both", lambda s: s["roles"]["worker"]["active"] == 2)
        tasks = _tasks(pg_cluster, pg_dsn)
        assert (tasks["second"], tasks["third"]) == (("claimed", "beta"), ("claimed", "beta"))
        # Its heartbeat says so: draining, its task at work, no warm target.
        beta.wait_for(
            "alpha draining in the hosts, with its load",
            lambda s: (
                _host(s, "alpha")
                == {
                    **(_host(s, "alpha") or {}),
                    "state": "draining",
                    "tasks": 1,
                    "roles": {"worker": {"active": 1, "target": 0}},
                }
            ),
            BEAT_WAIT,
        )

        gate.touch()
        beta.wait_for("all three done", lambda s: s["tasks"]["done"] == 3)
        alice.expect("alpha drained", _overseer_said("host alpha is drained"), BEAT_WAIT)
        assert _tasks(pg_cluster, pg_dsn) == {
            "first": ("done", "alpha"),
            "second": ("done", "beta"),
            "third": ("done", "beta"),
        }
        # Nothing failed on the way: no task was requeued.
        with pg_cluster.connect(_dbname(pg_dsn)) as conn:
            kinds = [k for (k,) in conn.execute("SELECT kind FROM events")]
        assert "task_requeued" not in kinds
        # Drained, it claims nothing queued now either.
        beta.api.post("/tasks", {"role": "worker", "prompt": "fourth"})
        beta.wait_for("beta did the fourth", lambda s: s["tasks"]["done"] == 4)
        assert _tasks(pg_cluster, pg_dsn)["fourth"] == ("done", "beta")

        # A drained host restarts drained: no warm VM, still draining in the table.
        assert alpha.stop() == 0
        alpha.start()
        st = alpha.wait_for(
            "alpha back, drained",
            lambda s: (_host(s, "alpha") or {}).get("state") == "draining",
            BEAT_WAIT,
        )
        assert st["roles"]["worker"]["idle"] == 0 and st["roles"]["worker"]["starting"] == 0
        # undrain brings its pool back. (From the command line: the lead may be
        # between hosts now, as alpha held it perhaps, and a command said in
        # #control meanwhile is nobody's to answer.)
        undrained = beta.cli("undrain", "alpha")
        assert undrained.returncode == 0, undrained.stderr
        alpha.wait_for("alpha's pool back", idle("worker", 1), BEAT_WAIT)
        undrains = [e["subject"] for e in beta.events("host_undrained")]
        assert undrains == ["beta", "alpha"]
        for swarm in swarms.values():
            assert swarm.stop() == 0
    finally:
        gate.touch()
        _close(swarms)


def test_invoke_places_a_named_agent_on_the_less_loaded_host(
    tmp_path: Path, pg_cluster: PgCluster, pg_dsn: str, people: list[Person]
) -> None:
    roles = role_yaml("worker", min_idle=1, max_active=3)
    ports, swarms = two_hosts(tmp_path, pg_cluster, pg_dsn, roles)
    alpha, beta = swarms["alpha"], swarms["beta"]
    try:
        for swarm in swarms.values():
            swarm.start()
        alice = operator(ports["beta"][0], beta.state, "alice", "#control")
        people.append(alice)
        alice.expect("alpha's overseer in #control", _sees_overseer_of("alpha"), LINK_WAIT)
        beta.wait_for("both hosts up with workers", _both_up_with("worker"), BEAT_WAIT)

        # ada on alpha, through alpha's own API: alpha is the more loaded now.
        ada = alpha.api.post("/agents", {"role": "worker", "name": "ada"}, timeout=WAIT)
        assert ada["name"] == "ada"
        # The name is the fleet's: beta cannot make another ada.
        with pytest.raises(ApiError, match="already exists on host alpha") as refused:
            beta.api.post("/agents", {"role": "worker", "name": "ada"}, timeout=WAIT)
        assert refused.value.status == 409

        alice.say("#control", "!invoke worker bob")
        answer = alice.expect("the answer to !invoke", _overseer_said("alice: bob "), BEAT_WAIT)
        leader = answer.source.nick.removeprefix("overseer-")
        if leader == "beta":  # placed on its own host: up when it answers
            assert answer.arguments[0].startswith("alice: bob is up on host beta: a worker agent")
        else:  # placed on beta, which brings it up and says so
            assert answer.arguments[0].startswith("alice: bob goes to host beta, the least loaded")
            up = alice.expect("bob up on beta", _overseer_said("bob is up on host beta"), BEAT_WAIT)
            assert up.source.nick == "overseer-beta"
        beta.wait_for(
            "bob on beta", lambda s: any(a["agent"] == "bob" for a in s["agents"]), BEAT_WAIT
        )
        assert not any(a["agent"] == "bob" for a in alpha.status()["agents"])
        with pg_cluster.connect(_dbname(pg_dsn)) as conn:
            placed = dict(conn.execute("SELECT name, host FROM agents").fetchall())
        assert placed == {"ada": "alpha", "bob": "beta"}
        # carol, on the host not leading, is destroyed from IRC: the leader drops
        # her row, and her host stops her.
        other = "alpha" if leader == "beta" else "beta"
        swarms[other].api.post("/agents", {"role": "worker", "name": "carol"}, timeout=WAIT)
        alice.say("#control", "!destroy carol")
        answer = alice.expect("the answer to !destroy", _overseer_said("alice: carol "))
        assert answer.arguments[0] == (
            f"alice: carol is gone from host {other} (it stops within a heartbeat)"
        )
        swarms[other].wait_for(
            "carol gone",
            lambda s: not any(a["agent"] == "carol" for a in s["agents"]),
            BEAT_WAIT,
        )
        # Stopped by its host (the leader only dropped the row: agent_dropped).
        assert [e["subject"] for e in swarms[other].events("destroyed")] == ["carol"]
        assert [e["subject"] for e in swarms[other].events("agent_dropped")] == ["carol"]

        # alpha stops: ada's workspace is there, so !invoke says that host is gone.
        assert alpha.stop() == 0
        beta.wait_for(
            "alpha silent",
            lambda s: (_host(s, "alpha") or {}).get("state") in ("silent", "fenced"),
            BEAT_WAIT,
        )
        if leader == "alpha":
            alice.expect("beta leading", _overseer_said("overseer-beta leads the fleet"), LEAD_WAIT)
        alice.say("#control", "!invoke worker ada")
        gone = alice.expect("the answer about ada", _overseer_said("alice: ada "))
        assert gone.arguments[0].startswith(
            "alice: ada lives on host alpha with its workspace, and that host is gone (silent"
        ), gone.arguments
        assert placed == {"ada": "alpha", "bob": "beta"}
        assert beta.stop() == 0
    finally:
        _close(swarms)


def test_up_cluster_runs_a_host_without_a_cluster_section(
    tmp_path: Path, pg_cluster: PgCluster, pg_dsn: str
) -> None:
    swarm = Swarm(tmp_path, swarm_yaml(role_yaml("worker", min_idle=1)))
    try:
        swarm.start(
            args=[
                "--cluster",
                pg_dsn,
                "--host",
                "gamma",
                "--cluster-password-file",
                str(pg_cluster.password_file),
            ]
        )
        status = swarm.wait_for(
            "gamma in the hosts", lambda s: _host(s, "gamma") is not None, BEAT_WAIT
        )
        gamma = _host(status, "gamma")
        assert gamma is not None and gamma["state"] == "up"
        # Drains name a host of the fleet, in one line when they do not.
        with pytest.raises(ApiError) as unknown:
            swarm.api.post("/hosts/nowhere/drain", {})
        assert (unknown.value.status, str(unknown.value)) == (
            404,
            "no host named 'nowhere' in the fleet (hosts: gamma)",
        )
        bad = swarm.cli("drain", "no/such")
        assert bad.returncode == 2
        assert bad.stderr.decode().startswith("fireclaw-swarm: 'no/such' is not a host name")
        swarm.api.post("/tasks", {"role": "worker", "prompt": "from the flags"})
        swarm.wait_for("the task done", lambda s: s["tasks"]["done"] == 1)
        assert _tasks(pg_cluster, pg_dsn)["from the flags"] == ("done", "gamma")
        assert swarm.stop() == 0
    finally:
        swarm.close()
    assert swarm.leftovers() == NOTHING


@pytest.mark.parametrize(
    "dsn", ["postgresql://fireclaw:s3cret-pw@127.0.0.1/db", "postgresql://db/x?password=s3cret-pw"]
)
def test_up_cluster_refuses_a_password_on_the_command_line(tmp_path: Path, dsn: str) -> None:
    config = tmp_path / "swarm.yaml"
    config.write_text(swarm_yaml(role_yaml("worker", min_idle=0)))
    done = subprocess.run(
        [FIRECLAW, "up", "--config", str(config), "--state-dir", str(tmp_path / "state"),
         "--cluster", dsn, "--host", "alpha"],
        capture_output=True,
        timeout=60,
    )  # fmt: skip
    assert done.returncode == 78
    lines = done.stderr.decode().splitlines()
    assert lines == [
        "fireclaw-swarm: --cluster: a password is never given on the command line, where every"
        " user sees it: put it in a file only its owner may read (chmod 600) and name it with"
        " --cluster-password-file, or set PGPASSWORD or PGPASSFILE"
    ]
    assert not (tmp_path / "state" / "api.sock").exists()


def test_one_host_has_no_hosts_to_show_or_drain(tmp_path: Path) -> None:
    swarm = Swarm(tmp_path, swarm_yaml(role_yaml("worker", min_idle=0)))
    try:
        swarm.start()
        assert swarm.api.get("/hosts") == {"hosts": None}
        assert swarm.status()["hosts"] is None
        refused = swarm.cli("drain", "localhost")
        assert refused.returncode == 1
        assert refused.stderr.decode().splitlines() == [
            "fireclaw-swarm: this swarm is one host (swarm.yaml has no cluster: section):"
            " there is no other host to drain it to"
        ]
        assert swarm.stop() == 0
    finally:
        swarm.close()
    assert swarm.leftovers() == NOTHING
