"""The state database's schema, as the migrations that make it.

``MIGRATIONS[i]`` takes a database from schema version ``i`` (SQLite's
``user_version``) to ``i + 1``, in one transaction; a database of a newer
version than ``SCHEMA_VERSION`` is refused (``state_db.Database.open``).
Shipped entries are never edited: a change is a new entry.
"""

from __future__ import annotations

from typing import Final

# Each entry migrates the schema from version i to i + 1, in one transaction.
MIGRATIONS: Final[tuple[tuple[str, ...], ...]] = (
    (
        """CREATE TABLE tasks (
            id INTEGER PRIMARY KEY AUTOINCREMENT,
            role TEXT NOT NULL,
            prompt TEXT NOT NULL,
            state TEXT NOT NULL CHECK (state IN ('queued', 'claimed', 'done', 'failed')),
            attempts INTEGER NOT NULL DEFAULT 0 CHECK (attempts >= 0),
            owner TEXT,
            exit_code INTEGER,
            result TEXT,
            created_at REAL NOT NULL,
            updated_at REAL NOT NULL
        )""",
        "CREATE INDEX tasks_by_role_state ON tasks (role, state, id)",
        "CREATE INDEX tasks_by_state ON tasks (state, id)",
        """CREATE TABLE events (
            id INTEGER PRIMARY KEY AUTOINCREMENT,
            at REAL NOT NULL,
            kind TEXT NOT NULL,
            subject TEXT NOT NULL,
            detail TEXT NOT NULL
        )""",
        """CREATE TABLE restarts (
            id INTEGER PRIMARY KEY AUTOINCREMENT,
            at REAL NOT NULL,
            name TEXT NOT NULL,
            role TEXT NOT NULL,
            reason TEXT NOT NULL,
            exit_code INTEGER,
            delay REAL NOT NULL
        )""",
        "CREATE INDEX restarts_by_name ON restarts (name)",
        """CREATE TABLE vms (
            name TEXT PRIMARY KEY,
            role TEXT NOT NULL,
            pid INTEGER NOT NULL,
            start_time INTEGER NOT NULL,
            boot_id TEXT NOT NULL,
            spec_hash TEXT NOT NULL,
            netns TEXT,
            cgroup TEXT,
            socket TEXT,
            log TEXT
        )""",
        """CREATE TABLE scales (
            role TEXT PRIMARY KEY,
            n INTEGER NOT NULL CHECK (n >= 0)
        )""",
    ),
    # 2: named agents (!invoke), so they come back after a supervisor restart.
    (
        """CREATE TABLE agents (
            name TEXT PRIMARY KEY,
            role TEXT NOT NULL,
            model TEXT,
            persona TEXT,
            created_at REAL NOT NULL
        )""",
    ),
    # 3: managed services (ngircd, ...) in the crash-only registry, as VMs are.
    (
        """CREATE TABLE services (
            name TEXT PRIMARY KEY,
            command TEXT NOT NULL,
            pid INTEGER NOT NULL CHECK (pid >= 0),
            start_time INTEGER NOT NULL,
            boot_id TEXT NOT NULL,
            address TEXT
        )""",
    ),
    # 4: what a restarted supervisor needs to adopt a VM that still runs.
    (
        "ALTER TABLE vms ADD COLUMN vm_id TEXT NOT NULL DEFAULT ''",
        "ALTER TABLE vms ADD COLUMN port INTEGER NOT NULL DEFAULT 0",
        "ALTER TABLE vms ADD COLUMN irc_port INTEGER NOT NULL DEFAULT 0",
        "ALTER TABLE vms ADD COLUMN veth TEXT",
        "ALTER TABLE vms ADD COLUMN address TEXT",
        "ALTER TABLE vms ADD COLUMN disk TEXT",
        "ALTER TABLE vms ADD COLUMN guest_id TEXT NOT NULL DEFAULT ''",
        "ALTER TABLE vms ADD COLUMN guest_token TEXT NOT NULL DEFAULT ''",
        "ALTER TABLE vms ADD COLUMN claimed INTEGER NOT NULL DEFAULT 0",
        "ALTER TABLE vms ADD COLUMN agent TEXT",
        "ALTER TABLE vms ADD COLUMN workspace INTEGER NOT NULL DEFAULT 0",
        "ALTER TABLE vms ADD COLUMN started_as TEXT NOT NULL DEFAULT ''",
    ),
    # 5: the ledger of model calls, metered by the gateways; budgets sum it.
    (
        """CREATE TABLE model_calls (
            id INTEGER PRIMARY KEY AUTOINCREMENT,
            at REAL NOT NULL,
            agent TEXT,
            role TEXT NOT NULL,
            vm TEXT NOT NULL,
            task INTEGER,
            model TEXT NOT NULL,
            prompt_tokens INTEGER NOT NULL CHECK (prompt_tokens >= 0),
            completion_tokens INTEGER NOT NULL CHECK (completion_tokens >= 0),
            duration REAL NOT NULL,
            outcome TEXT NOT NULL
        )""",
        "CREATE INDEX model_calls_by_at ON model_calls (at)",
        "CREATE INDEX model_calls_by_role ON model_calls (role, at)",
    ),
    # 6: a call whose stream was cut before the server's usage is counted by the
    # gateway itself; the ledger says which rows are.
    (
        "ALTER TABLE model_calls ADD COLUMN host_counted INTEGER NOT NULL DEFAULT 0"
        " CHECK (host_counted IN (0, 1))",
    ),
    # 7: fencing (each claim a new epoch, carried by every later write of the
    # task) and the host that claimed it, as a cluster's PostgreSQL store has;
    # the hosts table holds the one host here, for the same interface.
    (
        "ALTER TABLE tasks ADD COLUMN epoch INTEGER NOT NULL DEFAULT 0",
        "ALTER TABLE tasks ADD COLUMN host TEXT",
        """CREATE TABLE hosts (
            name TEXT PRIMARY KEY,
            started_at REAL NOT NULL,
            heartbeat_at REAL NOT NULL
        )""",
    ),
    # 8: a task whose CLI stopped to ask waits for an answer (pool/task_states.py),
    # keeping the CLI's session and then the answer its next run resumes with.
    # SQLite cannot change a CHECK: the table is made again, ids and their
    # sequence kept.
    (
        """CREATE TABLE tasks_new (
            id INTEGER PRIMARY KEY AUTOINCREMENT,
            role TEXT NOT NULL,
            prompt TEXT NOT NULL,
            state TEXT NOT NULL CHECK (state IN
                ('queued', 'claimed', 'waiting_for_input', 'done', 'failed')),
            attempts INTEGER NOT NULL DEFAULT 0 CHECK (attempts >= 0),
            owner TEXT,
            exit_code INTEGER,
            result TEXT,
            created_at REAL NOT NULL,
            updated_at REAL NOT NULL,
            epoch INTEGER NOT NULL DEFAULT 0,
            host TEXT,
            session TEXT,
            answer TEXT
        )""",
        "INSERT INTO tasks_new (id, role, prompt, state, attempts, owner, exit_code, result,"
        " created_at, updated_at, epoch, host)"
        " SELECT id, role, prompt, state, attempts, owner, exit_code, result,"
        " created_at, updated_at, epoch, host FROM tasks",
        "DELETE FROM sqlite_sequence WHERE name = 'tasks_new'",
        "INSERT INTO sqlite_sequence (name, seq)"
        " SELECT 'tasks_new', seq FROM sqlite_sequence WHERE name = 'tasks'",
        "DROP TABLE tasks",
        "ALTER TABLE tasks_new RENAME TO tasks",
        "CREATE INDEX tasks_by_role_state ON tasks (role, state, id)",
        "CREATE INDEX tasks_by_state ON tasks (state, id)",
    ),
    # 9: accounts. The account a task ran on and a call was made with, and each
    # account's exhaustion (a provider's rate limit or spent credit): until
    # when it is not to be used, which survives a restart.
    (
        "ALTER TABLE tasks ADD COLUMN account TEXT",
        "ALTER TABLE model_calls ADD COLUMN account TEXT",
        """CREATE TABLE accounts (
            role TEXT NOT NULL,
            name TEXT NOT NULL,
            exhausted_until REAL NOT NULL,
            reason TEXT NOT NULL,
            PRIMARY KEY (role, name)
        )""",
    ),
    # 10: operating a fleet: a host told to drain, and the load its heartbeat reports.
    (
        "ALTER TABLE hosts ADD COLUMN draining INTEGER NOT NULL DEFAULT 0"
        " CHECK (draining IN (0, 1))",
        "ALTER TABLE hosts ADD COLUMN load TEXT NOT NULL DEFAULT '{}'",
    ),
)

SCHEMA_VERSION: Final = len(MIGRATIONS)
