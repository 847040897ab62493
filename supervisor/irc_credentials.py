"""The swarm's IRC credentials: the server password and SASL's, read once at start.

swarm.yaml names where each secret is (``password_file`` or ``password_env``,
under ``irc`` and ``irc.sasl``); this reads them through ``secretfile``, so a
file must be readable by its owner alone. The values go to the managed ngircd
(its ``Password =`` line), to the overseer's own connection, and, for the
server password, to the named agents that join IRC (``IrcPresence.password``
in their promotion): nowhere else, not into an event, a log line or the API.

Exceptions: ``SecretFileError``, one line naming the field and the file or
variable, never the value.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from fireclaw.config import IrcSpec
from fireclaw.supervisor.ircd_operators import OPER_PASSWORD_RE
from fireclaw.supervisor.secretfile import SecretFileError, read_env_secret, read_secret

__all__ = ["IrcCredentials", "read_irc_credentials"]

#: ngircd reads its password as one unquoted value into a 64-byte buffer.
_MANAGED_WORDS: Final = "one word: 1 to 64 printable ASCII characters without spaces"
#: Any other server takes it as one IRC parameter: one line, no control characters.
_LINE_RE: Final = re.compile(r"[^\x00-\x1f\x7f]{1,400}")
_LINE_WORDS: Final = "one line of 1 to 400 characters without control characters"


@dataclass(frozen=True)
class IrcCredentials:
    """What the swarm's IRC clients authenticate with; ``None``: not asked for."""

    password: str | None = None
    sasl_username: str | None = None
    sasl_password: str | None = None

    def __repr__(self) -> str:  # the values stay out of logs and tracebacks
        shown = {
            "password": self.password is not None,
            "sasl_username": self.sasl_username,
            "sasl_password": self.sasl_password is not None,
        }
        return f"IrcCredentials({shown})"


def read_irc_credentials(spec: IrcSpec) -> IrcCredentials:
    """Read the secrets ``spec`` names (paths are absolute: the loader made them so).

    Blocking: call it from a thread under trio."""
    pattern, words = (
        (OPER_PASSWORD_RE, _MANAGED_WORDS) if spec.is_managed else (_LINE_RE, _LINE_WORDS)
    )
    password = _read("irc", spec.password_file, spec.password_env, pattern, words)
    sasl = spec.sasl
    if sasl is None:
        return IrcCredentials(password=password)
    return IrcCredentials(
        password=password,
        sasl_username=sasl.username,
        sasl_password=_read(
            "irc.sasl", sasl.password_file, sasl.password_env, _LINE_RE, _LINE_WORDS
        ),
    )


def _read(
    where: str, file: str | None, env: str | None, pattern: re.Pattern[str], words: str
) -> str | None:
    try:
        if file is not None:
            return read_secret(Path(file), pattern, f"the password: {words}")
        if env is not None:
            return read_env_secret(env, pattern, f"the password: {words}")
    except SecretFileError as exc:
        field = "password_file" if file is not None else "password_env"
        raise SecretFileError(f"{where}.{field}: {exc}") from None
    return None
