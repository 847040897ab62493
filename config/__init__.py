"""fireclaw.config: swarm.yaml and role templates, loaded, validated and diffed.

``load_config`` gives an immutable ``Config`` or raises ``ConfigError`` (one
line, naming the file and the field); ``diff_config`` says what a reload would
change.
"""

from fireclaw.config.cli_harness import (
    CLI_KINDS,
    Account,
    ClaudeCodeHarnessSpec,
    CliHarnessBase,
    CliHarnessSpec,
    CliKind,
)
from fireclaw.config.cluster import ClusterSpec, IrcLinkSpec, IrcPeerSpec
from fireclaw.config.common import Backoff, RestartPolicy
from fireclaw.config.diff import ConfigDiff, RoleChange, diff_config, role_hash
from fireclaw.config.irc import (
    CommandRateSpec,
    IrcOperatorSpec,
    IrcSpec,
    ManagedIrcSpec,
    SaslSpec,
    parse_server,
)
from fireclaw.config.load import ConfigError, load_config, parse_config
from fireclaw.config.model import (
    AnyHarnessSpec,
    ChatHarnessSpec,
    Config,
    ControlSpec,
    HarnessSpec,
    NetworkSpec,
    PoolSpec,
    Resources,
    Role,
    StopSpec,
)
from fireclaw.guest_daemon.exits import EX_CONFIG

__all__ = [
    "CLI_KINDS",
    "EX_CONFIG",
    "Account",
    "AnyHarnessSpec",
    "Backoff",
    "ChatHarnessSpec",
    "ClaudeCodeHarnessSpec",
    "CliHarnessBase",
    "CliHarnessSpec",
    "CliKind",
    "ClusterSpec",
    "CommandRateSpec",
    "Config",
    "ConfigDiff",
    "ConfigError",
    "ControlSpec",
    "HarnessSpec",
    "IrcLinkSpec",
    "IrcOperatorSpec",
    "IrcPeerSpec",
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
