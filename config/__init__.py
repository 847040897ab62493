"""fireclaw.config: swarm.yaml and role templates, loaded, validated and diffed.

``load_config`` gives an immutable ``Config`` or raises ``ConfigError`` (one
line, naming the file and the field); ``diff_config`` says what a reload would
change.
"""

from fireclaw.config.diff import ConfigDiff, RoleChange, diff_config, role_hash
from fireclaw.config.load import EX_CONFIG, ConfigError, load_config, parse_config
from fireclaw.config.model import (
    Backoff,
    Config,
    ControlSpec,
    HarnessSpec,
    PoolSpec,
    Resources,
    RestartPolicy,
    Role,
    StopSpec,
)

__all__ = [
    "EX_CONFIG",
    "Backoff",
    "Config",
    "ConfigDiff",
    "ConfigError",
    "ControlSpec",
    "HarnessSpec",
    "PoolSpec",
    "Resources",
    "RestartPolicy",
    "Role",
    "RoleChange",
    "StopSpec",
    "diff_config",
    "load_config",
    "parse_config",
    "role_hash",
]
