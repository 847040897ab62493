"""What operating a fleet keeps in the state store, on both stores (the
fixtures of ``test_state.py``: SQLite, and a real PostgreSQL from ``pg.py``):
a host's load and drain flag ride on its heartbeat, a drain outlives the
host's own restart, and a named agent's name is unique across hosts."""

from __future__ import annotations

import pathlib
import sqlite3

import pytest
import test_state
from fireclaw.supervisor import state_schema
from fireclaw.supervisor.state import (
    AgentExists,
    AgentRecord,
    HostLoad,
    RoleLoad,
    Store,
)
from test_state import OpenStore

# Both stores, as test_state.py opens them.
stores = test_state.stores
clock = test_state.clock
db_path = test_state.db_path


def test_heartbeat_reports_the_load_and_reads_the_drain_flag(
    stores: OpenStore, db_path: pathlib.Path
) -> None:
    here = stores("here", db_path)
    load = HostLoad(roles={"worker": RoleLoad(active=2, target=1)}, tasks=1)
    assert here.heartbeat(load) is False
    (row,) = here.hosts()
    assert row.load == load and row.draining is False
    assert here.set_draining("here", True) is True
    assert here.set_draining("nowhere", True) is False  # a host that never beat
    # The next beat says so, and does not clear it.
    assert here.heartbeat(HostLoad()) is True
    assert here.heartbeat(HostLoad()) is True
    (row,) = here.hosts()
    assert row.draining is True and row.load == HostLoad()
    assert here.set_draining("here", False) is True
    assert here.heartbeat() is False


def test_a_drain_outlives_the_hosts_restart(stores: OpenStore, db_path: pathlib.Path) -> None:
    first = stores("here", db_path)
    first.heartbeat()
    first.set_draining("here", True)
    first.close()
    again = stores("here", db_path)
    assert again.heartbeat() is True


def test_an_agent_name_is_unique(stores: OpenStore, db_path: pathlib.Path) -> None:
    here = stores("here", db_path)
    here.add_agent(AgentRecord(name="ada", role="worker"))
    with pytest.raises(AgentExists, match="an agent named 'ada' already exists") as caught:
        here.add_agent(AgentRecord(name="ada", role="coder"))
    (ada,) = here.agents()
    assert ada.role == "worker"
    assert caught.value.host is None  # this host's
    # Retuning keeps the name's one row.
    here.put_agent(AgentRecord(name="ada", role="worker", model="m2"))
    assert [a.model for a in here.agents()] == ["m2"]
    here.drop_agent("ada")
    here.add_agent(AgentRecord(name="ada", role="coder"))
    assert [a.role for a in here.agents()] == ["coder"]


@pytest.mark.parametrize("stores", ["postgresql"], indirect=True)
def test_one_name_across_hosts_and_each_agent_on_its_host(
    stores: OpenStore, tmp_path: pathlib.Path
) -> None:
    alpha = stores("alpha", tmp_path / "alpha.db")
    beta = stores("beta", tmp_path / "beta.db")
    alpha.add_agent(AgentRecord(name="ada", role="worker"))
    # The leader places one on another host: it lives there.
    alpha.add_agent(AgentRecord(name="bob", role="worker", host="beta"))
    with pytest.raises(AgentExists, match="already exists on host alpha") as caught:
        beta.add_agent(AgentRecord(name="ada", role="worker"))
    assert caught.value.host == "alpha"
    # Each host sees the others' agents with their host, its own as its own (None).
    assert {a.name: a.host for a in beta.agents()} == {"ada": "alpha", "bob": None}
    assert {a.name: a.host for a in alpha.agents()} == {"ada": None, "bob": "beta"}
    # A drain is set by any host, for any host.
    alpha.heartbeat()
    beta.heartbeat()
    assert alpha.set_draining("beta", True) is True
    assert beta.heartbeat() is True and alpha.heartbeat() is False
    assert {h.name: h.draining for h in alpha.hosts()} == {"alpha": False, "beta": True}


def test_one_host_stores_no_host_for_its_agents(stores: OpenStore, db_path: pathlib.Path) -> None:
    here: Store = stores("here", db_path)
    here.add_agent(AgentRecord(name="ada", role="worker"))
    (ada,) = here.agents()
    assert ada.host is None


def test_a_version_7_database_gains_the_drain_flag_and_load(db_path: pathlib.Path) -> None:
    """A host row written before migration 10 reads as not draining, with no load."""
    db_path.parent.mkdir()
    conn = sqlite3.connect(db_path)
    for migration in state_schema.MIGRATIONS[:7]:  # the schema as version 7 made it
        for statement in migration:
            conn.execute(statement)
    conn.execute("INSERT INTO hosts VALUES ('here', 1.0, 2.0)")
    conn.execute("PRAGMA user_version = 7")
    conn.commit()
    conn.close()
    with Store.open(db_path, host="here") as store:
        (row,) = store.hosts()
        assert (row.name, row.draining, row.load) == ("here", False, HostLoad())
        assert store.set_draining("here", True) is True
        assert store.heartbeat() is True
