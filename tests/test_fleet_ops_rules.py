"""The rules of operating a fleet, without I/O: a host's state from its row,
where a new named agent goes, the ``!fleet`` lines, the commands that drain
and undrain, and ``up --cluster``'s flags made into a cluster section."""

from __future__ import annotations

import pathlib

import pytest
from fireclaw.config.cluster import ClusterFlags, ClusterSpec, IrcLinkSpec
from fireclaw.supervisor import commands as c
from fireclaw.supervisor.cluster import HEARTBEAT
from fireclaw.supervisor.fleet import NoRoom, fleet_line, host_state, host_status, place
from fireclaw.supervisor.fleet_side import LATE, FleetSide
from fireclaw.supervisor.state import HostLoad, HostRow, RoleLoad

SILENT_AFTER = 30.0


def row(
    name: str,
    *,
    age: float = 1.0,
    draining: bool = False,
    roles: dict[str, tuple[int, int]] | None = None,
    tasks: int = 0,
) -> HostRow:
    load = HostLoad(
        roles={r: RoleLoad(active=a, target=t) for r, (a, t) in (roles or {}).items()},
        tasks=tasks,
    )
    return HostRow(
        name=name, started_at=0.0, heartbeat_at=0.0, age=age, draining=draining, load=load
    )


def state(r: HostRow) -> str:
    return host_state(r, late=LATE, silent_after=SILENT_AFTER)


def test_silent_is_two_missed_heartbeats() -> None:
    assert LATE == 2 * HEARTBEAT


@pytest.mark.parametrize(
    ("age", "draining", "expected"),
    [
        (0.0, False, "up"),
        (LATE, False, "up"),
        (LATE + 0.1, False, "silent"),
        (SILENT_AFTER, False, "silent"),
        (SILENT_AFTER + 0.1, False, "fenced"),
        (1.0, True, "draining"),
        (LATE + 1, True, "silent"),  # what it does matters less than that it is not heard
        (SILENT_AFTER + 1, True, "fenced"),
    ],
)
def test_host_state(age: float, draining: bool, expected: str) -> None:
    assert state(row("a", age=age, draining=draining)) == expected


def place_in(rows: list[HostRow], role: str = "worker", **placed: int) -> str:
    return place(rows, role, placed=placed, late=LATE, silent_after=SILENT_AFTER)


def test_the_least_loaded_host_of_the_role_is_chosen() -> None:
    rows = [
        row("alpha", roles={"worker": (3, 1)}),
        row("beta", roles={"worker": (1, 1)}),
        row("gamma", roles={"worker": (2, 1)}),
    ]
    assert place_in(rows) == "beta"


def test_a_tie_goes_to_the_name_sorting_first() -> None:
    rows = [row("beta", roles={"worker": (1, 1)}), row("alpha", roles={"worker": (1, 4)})]
    assert place_in(rows) == "alpha"


def test_agents_placed_since_the_last_heartbeat_count() -> None:
    rows = [row("alpha", roles={"worker": (0, 1)}), row("beta", roles={"worker": (1, 1)})]
    assert place_in(rows) == "alpha"
    # alpha's heartbeat still says 0, but the agents table already has two there.
    assert place_in(rows, alpha=2) == "beta"
    # and a count below what the heartbeat says changes nothing
    assert place_in(rows, beta=0) == "alpha"


def test_hosts_without_the_role_are_not_chosen() -> None:
    rows = [row("alpha", roles={"coder": (0, 1)}), row("beta", roles={"worker": (5, 1)})]
    assert place_in(rows) == "beta"
    with pytest.raises(NoRoom, match="^no host runs the role researcher$"):
        place_in(rows, "researcher")


def test_draining_silent_and_fenced_hosts_are_not_chosen() -> None:
    rows = [
        row("alpha", draining=True, roles={"worker": (0, 0)}),
        row("beta", age=LATE + 1, roles={"worker": (0, 1)}),
        row("gamma", age=SILENT_AFTER + 1, roles={"worker": (0, 1)}),
        row("delta", roles={"worker": (9, 1)}),
    ]
    assert place_in(rows) == "delta"
    with pytest.raises(NoRoom) as caught:
        place_in(rows[:3])
    assert str(caught.value) == (
        "no host of role worker can take an agent now (alpha draining, beta silent, gamma fenced)"
    )


def test_fleet_lines() -> None:
    alpha = row("alpha", age=2.4, roles={"worker": (2, 1), "coder": (0, 2)}, tasks=1)
    assert fleet_line(alpha, late=LATE, silent_after=SILENT_AFTER) == (
        "alpha: up; roles coder 0/2, worker 2/1 (active/target); 1 task running; heartbeat 2 s ago"
    )
    beta = row("beta", age=600, draining=True, tasks=3)
    assert fleet_line(beta, late=LATE, silent_after=SILENT_AFTER) == (
        "beta: fenced; roles none (active/target); 3 tasks running; heartbeat 10 min ago"
    )
    assert host_status(alpha, late=LATE, silent_after=SILENT_AFTER) == {
        "name": "alpha",
        "state": "up",
        "draining": False,
        "roles": {"coder": {"active": 0, "target": 2}, "worker": {"active": 2, "target": 1}},
        "tasks": 1,
        "heartbeat_age": 2.4,
    }


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("!fleet", c.Fleet()),
        ("!drain alpha", c.Drain("alpha")),
        ("!DRAIN db-2.example", c.Drain("db-2.example")),
        ("!undrain alpha", c.Drain("alpha", draining=False)),
    ],
)
def test_fleet_commands(text: str, expected: c.Command) -> None:
    assert c.parse(text) == expected


@pytest.mark.parametrize(
    ("text", "says"),
    [
        ("!drain", "name one host (usage: !drain HOST)"),
        ("!undrain a b", "name one host (usage: !undrain HOST)"),
        ("!drain -alpha", "'-alpha' is not a host name"),
        ("!drain al/pha", "'al/pha' is not a host name"),
        ("!fleet now", "takes no arguments (usage: !fleet)"),
    ],
)
def test_fleet_command_usage(text: str, says: str) -> None:
    result = c.parse(text)
    assert isinstance(result, c.Usage)
    assert result.message == says or says in result.message


# --- up --cluster DSN --host NAME -------------------------------------------------


def test_flags_make_a_cluster_section() -> None:
    spec = ClusterFlags(database="postgresql://fireclaw@db/fleet", host="alpha").spec(None)
    assert spec == ClusterSpec(database="postgresql://fireclaw@db/fleet", host="alpha")


def test_flags_replace_the_files_database_and_host_and_keep_the_rest(
    tmp_path: pathlib.Path,
) -> None:
    base = ClusterSpec(
        database="postgresql://old@db/old",
        host="old",
        password_file="/etc/old-password",
        silent_after=60,
        irc=IrcLinkSpec(port=7000),
    )
    flags = ClusterFlags(
        database="postgresql://fireclaw@db/fleet",
        host="alpha",
        password_file=str(tmp_path / "pw"),
    )
    spec = flags.spec(base)
    assert (spec.database, spec.host, spec.password_file) == (
        "postgresql://fireclaw@db/fleet",
        "alpha",
        str(tmp_path / "pw"),
    )
    assert spec.silent_after == 60 and spec.irc == base.irc
    # Without --host or --cluster-password-file, the file's stay.
    kept = ClusterFlags(database="postgresql://fireclaw@db/fleet").spec(base)
    assert (kept.host, kept.password_file) == ("old", "/etc/old-password")


@pytest.mark.parametrize(
    "dsn", ["postgresql://fireclaw:s3cret@db/fleet", "postgresql://db/fleet?password=s3cret"]
)
def test_a_password_on_the_command_line_is_refused(dsn: str) -> None:
    with pytest.raises(ValueError) as caught:
        ClusterFlags(database=dsn, host="alpha").spec(None)
    message = str(caught.value)
    assert message.startswith("--cluster: a password is never given on the command line")
    assert "--cluster-password-file" in message and "s3cret" not in message


@pytest.mark.parametrize(
    ("flags", "says"),
    [
        (ClusterFlags(database="mysql://db/x"), "--cluster: database: expected a postgresql://"),
        (ClusterFlags(database="postgresql://db/x", host="a b"), "--host: 'a b' is not a host"),
        (
            ClusterFlags(database="postgresql://db/x", host="a\n"),
            "--host: 'a.n' is not a host",
        ),  # shown as its repr
    ],
)
def test_bad_flags_are_one_line_naming_the_flag(flags: ClusterFlags, says: str) -> None:
    with pytest.raises(ValueError, match="^" + says.replace("?", r"\?")):
        flags.spec(None)


# --- a host told to drain (FleetSide.drain_told), over stand-in role groups -------


class _Group:
    """A stand-in for a role group: VMs running tasks and warm ones."""

    def __init__(self, tasks: int, warm: int) -> None:
        self.tasks, self.warm, self.draining = tasks, warm, False

    def running_tasks(self) -> int:
        return self.tasks

    def pool_children(self) -> list[object]:
        return [object()] * self.warm

    def set_draining(self, draining: bool) -> None:
        self.draining = draining
        if draining:
            self.warm = 0  # what the real group's reconciler then does


class _Host(FleetSide):
    def __init__(self, groups: dict[str, _Group]) -> None:
        self.groups = groups  # type: ignore[assignment]
        self.store = type("S", (), {"host": "alpha"})()  # type: ignore[assignment]
        self.draining, self._drained_said = False, False
        self.said: list[tuple[str, dict[str, object]]] = []

    def event(self, kind: str, subject: str, **detail: object) -> None:
        assert subject == "alpha"
        self.said.append((kind, detail))


def test_a_drain_is_said_once_when_told_and_once_when_done() -> None:
    worker, coder = _Group(tasks=2, warm=1), _Group(tasks=0, warm=2)
    host = _Host({"worker": worker, "coder": coder})
    host.drain_told(False)
    assert host.said == [] and not worker.draining
    host.drain_told(True)
    assert worker.draining and coder.draining
    assert host.said == [("host_draining", {"tasks": 2, "warm": 3})]
    host.drain_told(True)  # the next heartbeats, tasks still running
    host.drain_told(True)
    assert len(host.said) == 1
    worker.tasks = 0
    host.drain_told(True)
    host.drain_told(True)
    assert host.said[1:] == [("host_drained", {})]
    host.drain_told(False)
    assert not worker.draining and not coder.draining
    assert host.said[2:] == [("host_undrained", {})]
    # Told again: it says so again, and again when empty.
    host.drain_told(True)
    assert [kind for kind, _ in host.said[3:]] == ["host_draining", "host_drained"]
