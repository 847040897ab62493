"""What the supervisor checks of the coding-agent CLI harnesses at start and reload.

- ``read_role_secrets``: a role's secrets, one file per environment variable in
  its ``harness.secrets_dir``, read through ``secretfile`` (a regular file,
  ours, chmod 600); what ``RoleGroup`` reads again at each promotion.
- ``check_role_secrets``: one line naming the first secret a role names that
  cannot be read (in its folder, or in any of its accounts' folders), so a
  missing key is reported when the config is loaded, not found by a task.
- ``check_image_clis``: one line naming a role whose CLI the guest image
  lacks, with the command that builds one that has it.
- ``needed_clis``: the CLIs a config's roles run, which the image is built with.

A secret's value never appears in what these return: only the file's path.

Exceptions::

    HarnessUnavailable  what the checks found, at start: one line
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Final

from fireclaw.config import CliHarnessBase, Config
from fireclaw.supervisor.secretfile import SecretFileError, read_secret

__all__ = [
    "HarnessUnavailable",
    "check_image_clis",
    "check_role_secrets",
    "needed_clis",
    "read_role_secrets",
]

#: A secret's value: printable ASCII without spaces (API keys, tokens).
SECRET_VALUE: Final = re.compile(r"[\x21-\x7e]{1,4096}")
_SECRET_WORDS: Final = "a secret (printable characters, no spaces)"


class HarnessUnavailable(Exception):
    """A CLI harness the swarm cannot run here (one line)."""


def read_role_secrets(folder: Path, names: Sequence[str]) -> dict[str, str]:
    """``{name: value}`` from the files ``folder/name``. Raises SecretFileError
    (one line naming the file). Blocking, but a few small files."""
    return {name: read_secret(folder / name, SECRET_VALUE, _SECRET_WORDS) for name in names}


def check_role_secrets(config: Config) -> str | None:
    """One line for the first role secret that cannot be read; None when all can."""
    for role in config.roles.values():
        harness = role.harness
        if not isinstance(harness, CliHarnessBase) or not harness.secrets:
            continue
        for n, account in enumerate(harness.accounts):
            try:
                read_role_secrets(Path(account.secrets_dir), harness.secrets)
            except SecretFileError as exc:
                return f"roles.{role.name}.harness.accounts[{n}] ({account.name}): {exc}"
        if harness.secrets_dir is not None:
            try:
                read_role_secrets(Path(harness.secrets_dir), harness.secrets)
            except SecretFileError as exc:
                return f"roles.{role.name}.harness.secrets: {exc}"
    return None


def needed_clis(config: Config) -> tuple[str, ...]:
    """The CLIs the config's roles run, sorted."""
    return tuple(
        sorted(
            {r.harness.kind for r in config.roles.values() if isinstance(r.harness, CliHarnessBase)}
        )
    )


def check_image_clis(config: Config, image_clis: Iterable[str] | None) -> str | None:
    """One line naming a role whose CLI the image (with ``image_clis``) lacks, and the
    build that has them all; None when it has them, or when no image is known
    (the process backend runs the CLIs the host has)."""
    if image_clis is None:
        return None
    has = set(image_clis)
    for role in config.roles.values():
        harness = role.harness
        if isinstance(harness, CliHarnessBase) and harness.kind not in has:
            wanted = ",".join(sorted(has | set(needed_clis(config))))
            built = ", ".join(sorted(has)) or "none"
            return (
                f"roles.{role.name}.harness.kind: {harness.kind} is not in the guest image"
                f" (its CLIs: {built}); build one with: fireclaw-swarm image build --with {wanted},"
                " then restart the swarm"
            )
    return None
