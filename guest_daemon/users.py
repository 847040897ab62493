"""Who runs the agent's work: the unprivileged agent user, never the daemon's root.

The daemon may run as root (it mounts the workspace, sets the clock); what it
starts for an agent or a ``Run`` (harness, tools, commands) runs as the agent
user with the agent's directory as its working directory:

* inside a VM the image has an ``agent`` user (pool/image/rootfs.py), and its
  workspace is ``/workspace`` (or its home when no workspace disk is attached);
* under the process backend the daemon is a host process, root when the
  supervisor is: the user is the one named by ``FIRECLAW_AGENT_USER`` (the
  driver passes it on from the supervisor's environment), else ``agent`` when
  the host has one, else ``nobody``;
* a daemon that is not root cannot switch users: work runs as itself.

A ``Run`` may name another user (``run --user root`` for operators).

Errors::

    UnknownUser     no such user on this machine (one line)
"""

from __future__ import annotations

import os
import pwd
import re
import shutil
import stat
import sys
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Final

AGENT_USER: Final = "agent"
FALLBACK_USER: Final = "nobody"
ENV_USER: Final = "FIRECLAW_AGENT_USER"


class UnknownUser(Exception):
    """A user name that this machine does not know."""


@dataclass(frozen=True)
class RunAs:
    """A user to start children as; ``switch`` is false when they run as the daemon."""

    name: str
    uid: int
    gid: int
    home: str
    switch: bool

    def spawn_options(self) -> dict[str, Any]:
        """Keyword arguments for ``trio.lowlevel.open_process`` (``subprocess.Popen``)."""
        if not self.switch:
            return {}
        return {"user": self.uid, "group": self.gid, "extra_groups": []}

    def env(self) -> dict[str, str]:
        return {"HOME": self.home, "USER": self.name, "LOGNAME": self.name}


def lookup(name: str) -> RunAs:
    """``name`` as a ``RunAs``; raises UnknownUser."""
    try:
        entry = pwd.getpwnam(name)
    except KeyError:
        raise UnknownUser(f"no user {name!r} in this guest") from None
    return RunAs(
        name=entry.pw_name,
        uid=entry.pw_uid,
        gid=entry.pw_gid,
        home=entry.pw_dir,
        switch=os.geteuid() == 0 and entry.pw_uid != os.geteuid(),
    )


def lookup_self() -> RunAs:
    """The daemon's own user: work started as it runs unswitched."""
    return lookup(pwd.getpwuid(os.geteuid()).pw_name)


def agent_user(environ: Mapping[str, str]) -> RunAs:
    """The user agent work runs as (see the module docstring)."""
    if os.geteuid() != 0:
        return lookup_self()
    named = environ.get(ENV_USER)
    if named:
        return lookup(named)
    try:
        return lookup(AGENT_USER)
    except UnknownUser:
        return lookup(FALLBACK_USER)


def others_may_run(path: str) -> bool:
    """Whether a user with no special rights may execute ``path``: it and every
    directory above it are open to others (a pyenv under a private /root is not)."""
    real = os.path.realpath(path)
    try:
        if not os.stat(real).st_mode & stat.S_IXOTH:
            return False
        parent = os.path.dirname(real)
        while True:
            if not os.stat(parent).st_mode & stat.S_IXOTH:
                return False
            if parent == os.path.dirname(parent):
                return True
            parent = os.path.dirname(parent)
    except OSError:
        return False


def python_for(user: RunAs) -> str:
    """A Python interpreter ``user`` can run: this one when it may, else the system's."""
    if not user.switch or others_may_run(sys.executable):
        return sys.executable
    for candidate in ("/usr/bin/python3", "/usr/local/bin/python3", "/bin/python3"):
        if others_may_run(candidate):
            return candidate
    return sys.executable


_VM_ID: Final = re.compile(r"[0-9a-f]{6}-[A-Za-z0-9-]{1,80}")


class AgentDir:
    """The agent's working directory when it has no workspace disk.

    Its home when that is a directory it owns (inside a VM); otherwise a fresh
    private directory the daemon makes for it and removes in ``close``. A guest
    that is a host process (``FIRECLAW_VM_ID`` set) names it after its VM,
    ``fireclaw-<vm id>-<user>-*``, so the host removes it with the VM even when
    the daemon is killed before ``close``.
    """

    def __init__(self, user: RunAs) -> None:
        self._made: str | None = None
        if os.path.isdir(user.home) and os.stat(user.home).st_uid == user.uid:
            self.path = user.home
            return
        vm_id = os.environ.get("FIRECLAW_VM_ID", "")
        owner = f"{vm_id}-{user.name}" if _VM_ID.fullmatch(vm_id) else user.name
        self.path = self._made = tempfile.mkdtemp(prefix=f"fireclaw-{owner}-")
        if user.switch:
            os.chown(self.path, user.uid, user.gid)

    def close(self) -> None:
        if self._made is not None:
            shutil.rmtree(self._made, ignore_errors=True)
            self._made = None
