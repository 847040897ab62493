"""Exit statuses that mean the same on both sides of the control channel.

The guest daemon exits with ``EX_CONFIG`` when its configuration is missing or
wrong; the supervisor exits with it on a bad ``swarm.yaml``, and its restart
policy treats it as fatal by default (a process that will fail the same way
again is reported, not restarted). One definition, here, because the guest
daemon ships alone into VM images and the host reads what it exits with.

Standard library only, and nothing else in this module: the command line
imports it at start.
"""

from __future__ import annotations

from typing import Final

__all__ = ["EX_CONFIG"]

#: sysexits.h EX_CONFIG: the program stopped on a bad configuration.
EX_CONFIG: Final = 78
