"""fireclaw.config: swarm.yaml and role templates, loaded, validated and diffed.

``load_config`` gives an immutable ``Config`` or raises ``ConfigError`` (one
line, naming the file and the field); ``diff_config`` says what a reload would
change.
"""

from fireclaw.config.diff import ConfigDiff, RoleChange, diff_config, role_hash
from fireclaw.config.load import EX_CONFIG, ConfigError, load_config, parse_config
from fireclaw.config.model import (
    AnyHarnessSpec,
    Backoff,
    ChatHarnessSpec,
    CommandRateSpec,
    Config,
    ControlSpec,
    HarnessSpec,
    IrcOperatorSpec,
    IrcSpec,
    ManagedIrcSpec,
    NetworkSpec,
    PoolSpec,
    Resources,
    RestartPolicy,
    Role,
    SaslSpec,
    StopSpec,
    parse_server,
)

__all__ = [
    "EX_CONFIG",
    "AnyHarnessSpec",
    "Backoff",
    "ChatHarnessSpec",
    "CommandRateSpec",
    "Config",
    "ConfigDiff",
    "ConfigError",
    "ControlSpec",
    "HarnessSpec",
    "IrcOperatorSpec",
    "IrcSpec",
    "ManagedIrcSpec",
    "NetworkSpec",
    "PoolSpec",
    "Resources",
    "RestartPolicy",
    "Role",
    "RoleChange",
    "SaslSpec",
    "StopSpec",
    "diff_config",
    "load_config",
    "parse_config",
    "parse_server",
    "role_hash",
]
