"""Fixtures shared by the test files."""

from pg import pg_cluster, pg_dsn
from swarmctl import make_swarm

__all__ = ["make_swarm", "pg_cluster", "pg_dsn"]
