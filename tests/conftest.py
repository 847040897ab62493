"""Fixtures shared by the test files."""

from swarmctl import make_swarm

__all__ = ["make_swarm"]
