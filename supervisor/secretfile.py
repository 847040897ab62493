"""Secrets kept in files: made once, readable by their owner alone.

A secret never sits in swarm.yaml, an event or a log line; the config names a
file (or an environment variable, ``read_env_secret``) and the supervisor reads
it when it needs the value. ``ensure_secret``
makes a missing file (in a folder only its owner may enter) with a random
URL-safe value; ``read_secret`` refuses a file that anyone but its owner could
read, as ssh does with a private key, so that a secret is never quietly shared.

Exceptions::

    SecretFileError     a secret file that cannot be used: missing, unreadable,
                        a link or not a regular file, owned by someone else,
                        open to group or others, or not a valid value; or an
                        environment variable unset or not a valid value. str()
                        is one line naming the file or variable (never the value).
"""

from __future__ import annotations

import contextlib
import os
import re
import secrets
import stat
from pathlib import Path
from typing import Final

__all__ = ["SECRET_BYTES", "SecretFileError", "ensure_secret", "read_env_secret", "read_secret"]

#: Random bytes in a generated secret (43 URL-safe characters).
SECRET_BYTES: Final = 32
#: Far above any real secret; a wrong path (a log, an image) is not slurped.
MAX_BYTES: Final = 4096


class SecretFileError(Exception):
    """A secret file that cannot be used. str() is one line."""


def ensure_secret(path: Path, pattern: re.Pattern[str], what: str) -> str:
    """The secret in ``path``, made first if missing (folder 0700, file 0600).

    Blocking: call it from a thread under trio. See ``read_secret`` for the checks.
    """
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    value = secrets.token_urlsafe(SECRET_BYTES)
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
    try:
        fd = os.open(path, flags, 0o600)
    except FileExistsError:
        pass  # made before (or by the operator): use what is there
    except OSError as exc:
        raise SecretFileError(f"{path}: cannot create: {exc.strerror or exc}") from exc
    else:
        try:
            os.write(fd, (value + "\n").encode("ascii"))
        except OSError as exc:
            os.close(fd)
            with contextlib.suppress(OSError):
                path.unlink()
            raise SecretFileError(f"{path}: cannot write: {exc.strerror or exc}") from exc
        os.close(fd)
    return read_secret(path, pattern, what)


def read_secret(path: Path, pattern: re.Pattern[str], what: str) -> str:
    """The first line of ``path``, which must fully match ``pattern`` (``what`` it is).

    The file must be a regular file (not a link), owned by our effective user,
    with no permission bits for group or others. Blocking.
    """
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except FileNotFoundError:
        raise SecretFileError(f"{path}: no such file") from None
    except OSError as exc:
        raise SecretFileError(f"{path}: cannot read: {exc.strerror or exc}") from exc
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise SecretFileError(f"{path}: not a regular file")
        if info.st_uid != os.geteuid():
            raise SecretFileError(
                f"{path}: owned by uid {info.st_uid}, not by us (uid {os.geteuid()})"
            )
        if info.st_mode & 0o077:
            raise SecretFileError(
                f"{path}: group or others may use it (mode {stat.S_IMODE(info.st_mode):04o});"
                f" chmod 600 {path}"
            )
        data = os.read(fd, MAX_BYTES + 1)
    finally:
        os.close(fd)
    if len(data) > MAX_BYTES:
        raise SecretFileError(f"{path}: larger than {MAX_BYTES} bytes; not a secret file")
    line = data.decode("utf-8", "replace").splitlines()[0] if data.strip() else ""
    if not pattern.fullmatch(line):
        raise SecretFileError(f"{path}: its first line must be {what}")
    return line


def read_env_secret(name: str, pattern: re.Pattern[str], what: str) -> str:
    """The value of the environment variable ``name``, which must fully match
    ``pattern`` (``what`` it is). For a service manager that hands secrets over
    in the environment (systemd's ``LoadCredential`` is the better way: a file)."""
    value = os.environ.get(name)
    if value is None:
        raise SecretFileError(f"environment variable {name}: not set")
    if not pattern.fullmatch(value):
        raise SecretFileError(f"environment variable {name}: must be {what}")
    return value
