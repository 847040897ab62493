"""The managed ngircd's IRC operators: their ``[Operator]`` blocks and passwords.

Each operator in ``irc.managed.operators`` becomes a block of ngircd.conf
(``/OPER name password``). The password is read from a file only its owner may
read (``secretfile``): the one the config names, or
``<state_dir>/secrets/irc-operator-<name>``, made at the first start. It goes
nowhere else: not into swarm.yaml, an event, a log line or a VM.

Exceptions: ``SecretFileError`` (from ``operator_blocks``), one line that
names the operator and the file.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from fireclaw.config.irc import IrcOperatorSpec
from fireclaw.supervisor.secretfile import SecretFileError, ensure_secret, read_secret

__all__ = ["SECRETS_DIR", "OperatorBlock", "operator_blocks", "operator_password_path"]

SECRETS_DIR: Final = "secrets"
"""Folder of the state dir that holds generated secrets (0700)."""
#: What ngircd takes as an operator password: one unquoted word of printable ASCII.
OPER_PASSWORD_RE: Final = re.compile(r"[!-~]{1,64}")
_PASSWORD_WORDS: Final = "the password: 1 to 64 printable ASCII characters without spaces"


@dataclass(frozen=True)
class OperatorBlock:
    """One ``[Operator]`` of ngircd.conf: ``/OPER name password``, from ``mask`` if set."""

    name: str
    password: str
    mask: str | None = None

    def __repr__(self) -> str:  # the password stays out of logs and tracebacks
        return f"OperatorBlock(name={self.name!r}, mask={self.mask!r})"


def operator_password_path(state_dir: Path, operator: IrcOperatorSpec) -> Path:
    """The file that holds ``operator``'s password: its ``password_file`` (made
    absolute by the loader), else ``<state_dir>/secrets/irc-operator-<name>``."""
    if operator.password_file is not None:
        return Path(operator.password_file)
    return state_dir / SECRETS_DIR / f"irc-operator-{operator.name}"


def operator_blocks(operators: Iterable[IrcOperatorSpec], state_dir: Path) -> list[OperatorBlock]:
    """The blocks of ``operators``, each password read from its file; a default
    file that is missing is made first. Blocking: call it from a thread."""
    blocks = []
    for op in operators:
        path = operator_password_path(state_dir, op)
        try:
            if op.password_file is None:
                password = ensure_secret(path, OPER_PASSWORD_RE, _PASSWORD_WORDS)
            else:
                password = read_secret(path, OPER_PASSWORD_RE, _PASSWORD_WORDS)
        except SecretFileError as exc:
            raise SecretFileError(f"irc.managed.operators {op.name}: {exc}") from None
        blocks.append(OperatorBlock(name=op.name, password=password, mask=op.mask))
    return blocks
