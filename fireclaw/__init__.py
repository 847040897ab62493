"""fireclaw-swarm: a supervisor for fleets of AI agents, one microVM per agent."""

__version__ = "0.1.0"
