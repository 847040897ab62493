"""What a reload changes: the difference between two Configs, role by role.

A role's fields fall into four groups, by what applying a change costs:

- ``resources``, ``guest_command``, ``harness``, ``nick_pattern``: the VM itself
  differs; its VMs are replaced one at a time (``role_hash`` covers these).
- ``pool``: the role scales; running VMs are untouched.
- ``restart``: the new policy applies in place, to the next exit.
- ``model``, ``persona``, ``channels``, ``description``: hot-reloaded into the
  role's agents without a restart.
"""

from __future__ import annotations

import hashlib
from typing import Final

import msgspec
from fireclaw.config.model import AnyHarnessSpec, Config, Resources, Role

__all__ = ["ConfigDiff", "RoleChange", "diff_config", "role_hash"]

HOT_FIELDS: Final = ("model", "persona", "channels", "description")


class _VmSpec(msgspec.Struct, frozen=True, kw_only=True):
    """The part of a Role that is baked into its VMs."""

    resources: Resources
    guest_command: tuple[str, ...] | None
    harness: AnyHarnessSpec
    nick_pattern: str


# Sorted keys: the hash depends on values, not on the order fields are declared in.
_CANONICAL: Final = msgspec.json.Encoder(order="sorted")


def role_hash(role: Role) -> str:
    """sha256 (hex) of what a role's VMs are made of: equal hashes, interchangeable VMs."""
    spec = _VmSpec(
        resources=role.resources,
        guest_command=role.guest_command,
        harness=role.harness,
        nick_pattern=role.nick_pattern,
    )
    return hashlib.sha256(_CANONICAL.encode(spec)).hexdigest()


class RoleChange(msgspec.Struct, frozen=True, kw_only=True):
    """How one role present in both configs changed (at least one part is set)."""

    replace: bool
    """role_hash differs: its VMs must be replaced."""
    scale: bool
    """pool differs."""
    restart_policy: bool
    """restart differs."""
    hot: tuple[str, ...]
    """Changed fields among HOT_FIELDS, in that order."""


class ConfigDiff(msgspec.Struct, frozen=True, kw_only=True):
    """Old config to new. Role names are in file order (``removed``: the old file's)."""

    added: tuple[str, ...]
    removed: tuple[str, ...]
    unchanged: tuple[str, ...]
    changed: dict[str, RoleChange]
    control_changed: bool
    stop_changed: bool
    backend_changed: bool
    state_dir_changed: bool
    task_max_attempts_changed: bool
    irc_changed: bool
    """Anything under ``irc`` differs (server, channels, operators, rates, restart)."""
    network_changed: bool = False
    """Anything under ``network`` differs; it takes effect at the next start."""

    @property
    def is_empty(self) -> bool:
        """True when the new config changes nothing at all."""
        return not (
            self.added
            or self.removed
            or self.changed
            or self.control_changed
            or self.stop_changed
            or self.backend_changed
            or self.state_dir_changed
            or self.task_max_attempts_changed
            or self.irc_changed
            or self.network_changed
        )


def diff_config(old: Config, new: Config) -> ConfigDiff:
    """Compare two configs; every role of ``new`` is added, changed or unchanged."""
    changed: dict[str, RoleChange] = {}
    unchanged: list[str] = []
    for name, role in new.roles.items():
        before = old.roles.get(name)
        if before is None:
            continue
        if before == role:
            unchanged.append(name)
            continue
        changed[name] = RoleChange(
            replace=role_hash(before) != role_hash(role),
            scale=before.pool != role.pool,
            restart_policy=before.restart != role.restart,
            hot=tuple(f for f in HOT_FIELDS if getattr(before, f) != getattr(role, f)),
        )
    return ConfigDiff(
        added=tuple(n for n in new.roles if n not in old.roles),
        removed=tuple(n for n in old.roles if n not in new.roles),
        unchanged=tuple(unchanged),
        changed=changed,
        control_changed=old.control != new.control,
        stop_changed=old.stop != new.stop,
        backend_changed=old.backend != new.backend,
        state_dir_changed=old.state_dir != new.state_dir,
        task_max_attempts_changed=old.task_max_attempts != new.task_max_attempts,
        irc_changed=old.irc != new.irc,
        network_changed=old.network != new.network,
    )
