"""A cluster's PostgreSQL schema, as the migrations that make it.

``MIGRATIONS[i]`` takes the database from schema version ``i`` (the one row
of ``fireclaw_schema``) to ``i + 1``; all pending ones run in one transaction
under an advisory lock, so hosts starting together migrate once. A database of
a newer version than ``SCHEMA_VERSION`` is refused (``state_pg_db``). Shipped
entries are never edited: a change is a new entry.

What the hosts share lives here: the task queue (with the claiming host and
the epoch that fences its writes), named agents, the audit trail, the ledger
of model calls and the hosts with their heartbeats (in the database's time).
What only one host can use (its VM and service registry, restarts, scale
overrides) stays in that host's SQLite database (``state_pg.py``).
"""

from __future__ import annotations

from typing import Final

#: Serialises migrations across hosts (``pg_advisory_xact_lock``).
MIGRATION_LOCK: Final = 0x66697265636C6177  # "fireclaw"

MIGRATIONS: Final[tuple[tuple[str, ...], ...]] = (
    (
        """CREATE TABLE hosts (
            name TEXT PRIMARY KEY,
            started_at TIMESTAMPTZ NOT NULL DEFAULT now(),
            heartbeat_at TIMESTAMPTZ NOT NULL DEFAULT now()
        )""",
        """CREATE TABLE tasks (
            id BIGSERIAL PRIMARY KEY,
            role TEXT NOT NULL,
            prompt TEXT NOT NULL,
            state TEXT NOT NULL CHECK (state IN ('queued', 'claimed', 'done', 'failed')),
            attempts INTEGER NOT NULL DEFAULT 0 CHECK (attempts >= 0),
            owner TEXT,
            host TEXT,
            epoch BIGINT NOT NULL DEFAULT 0 CHECK (epoch >= 0),
            exit_code INTEGER,
            result TEXT,
            created_at DOUBLE PRECISION NOT NULL,
            updated_at DOUBLE PRECISION NOT NULL
        )""",
        # Claims scan only the queued tasks of one role, oldest first.
        "CREATE INDEX tasks_queued ON tasks (role, id) WHERE state = 'queued'",
        "CREATE INDEX tasks_by_state ON tasks (state, id)",
        "CREATE INDEX tasks_claimed_by_host ON tasks (host, id) WHERE state = 'claimed'",
        """CREATE TABLE agents (
            name TEXT PRIMARY KEY,
            role TEXT NOT NULL,
            model TEXT,
            persona TEXT,
            host TEXT NOT NULL,
            created_at DOUBLE PRECISION NOT NULL
        )""",
        """CREATE TABLE events (
            id BIGSERIAL PRIMARY KEY,
            at DOUBLE PRECISION NOT NULL,
            host TEXT NOT NULL,
            kind TEXT NOT NULL,
            subject TEXT NOT NULL,
            detail TEXT NOT NULL
        )""",
        """CREATE TABLE model_calls (
            id BIGSERIAL PRIMARY KEY,
            at DOUBLE PRECISION NOT NULL,
            host TEXT NOT NULL,
            agent TEXT,
            role TEXT NOT NULL,
            vm TEXT NOT NULL,
            task BIGINT,
            model TEXT NOT NULL,
            prompt_tokens INTEGER NOT NULL CHECK (prompt_tokens >= 0),
            completion_tokens INTEGER NOT NULL CHECK (completion_tokens >= 0),
            duration DOUBLE PRECISION NOT NULL,
            outcome TEXT NOT NULL,
            -- the gateway counted the tokens itself: the stream was cut before the server's usage
            host_counted BOOLEAN NOT NULL DEFAULT false
        )""",
        "CREATE INDEX model_calls_by_at ON model_calls (at)",
        "CREATE INDEX model_calls_by_role ON model_calls (role, at)",
    ),
    # 2: a task whose CLI stopped to ask waits for an answer (pool/task_states.py),
    # keeping the CLI's session and then the answer its next run resumes with.
    (
        "ALTER TABLE tasks DROP CONSTRAINT tasks_state_check",
        "ALTER TABLE tasks ADD CONSTRAINT tasks_state_check CHECK (state IN"
        " ('queued', 'claimed', 'waiting_for_input', 'done', 'failed'))",
        "ALTER TABLE tasks ADD COLUMN session TEXT",
        "ALTER TABLE tasks ADD COLUMN answer TEXT",
    ),
    # 3: accounts (as SQLite's migration 9): the account of a task and of a call,
    # and each account's exhaustion, shared by the hosts.
    (
        "ALTER TABLE tasks ADD COLUMN account TEXT",
        "ALTER TABLE model_calls ADD COLUMN account TEXT",
        """CREATE TABLE accounts (
            role TEXT NOT NULL,
            name TEXT NOT NULL,
            exhausted_until DOUBLE PRECISION NOT NULL,
            reason TEXT NOT NULL,
            PRIMARY KEY (role, name)
        )""",
    ),
    # 4: operating a fleet: a host told to drain, and the load its heartbeat reports.
    (
        "ALTER TABLE hosts ADD COLUMN draining BOOLEAN NOT NULL DEFAULT false",
        "ALTER TABLE hosts ADD COLUMN load TEXT NOT NULL DEFAULT '{}'",
    ),
)

SCHEMA_VERSION: Final = len(MIGRATIONS)
