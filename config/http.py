"""The ``http:`` section of swarm.yaml: the listener for people and monitors.

::

    http:
      listen: 127.0.0.1:8470          # ip:port; IPv6 in brackets: [::1]:8470; port 0: any
      tokens:                          # bearer tokens, each the first line of a file
        - {file: secrets/http-read.token, access: read}
        - {file: secrets/http-operator.token, access: operate}
      allow_loopback_without_token: false

No section: no listener. A token is never written here: ``file`` names a file
(relative to swarm.yaml's folder, readable by its owner alone) whose first line
is the token. With no ``tokens`` listed, the supervisor makes one read-only
token at ``<state_dir>/secrets/http-token`` at its first start. ``read`` sees;
``operate`` may also act (scale, invoke, stop). Requests from a loopback
address go without a token only when ``allow_loopback_without_token`` says so,
and then they may only read.
"""

from __future__ import annotations

import ipaddress
from typing import Annotated, Final, Literal

import msgspec
from msgspec import Meta

__all__ = ["DEFAULT_TOKEN_NAME", "Access", "HttpSpec", "HttpTokenSpec"]

Access = Literal["read", "operate"]
#: The token made under ``<state_dir>/secrets/`` when no ``tokens`` are listed.
DEFAULT_TOKEN_NAME: Final = "http-token"


class HttpTokenSpec(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """One bearer token: the first line of ``file``, granting ``access``."""

    file: Annotated[str, Meta(min_length=1, max_length=4096)]
    access: Access = "read"


class HttpSpec(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """Where the dashboard, ``/metrics`` and ``/v1`` listen, and who may use them."""

    listen: Annotated[str, Meta(min_length=3, max_length=300)] = "127.0.0.1:8470"
    tokens: Annotated[tuple[HttpTokenSpec, ...], Meta(max_length=64)] = ()
    allow_loopback_without_token: bool = False

    def __post_init__(self) -> None:
        try:
            host, _ = self.address
        except ValueError as exc:
            why = str(exc).replace("'managed' or ", "")
            raise ValueError(f"listen: {why} (as in 127.0.0.1:8470 or [::1]:8470)") from None
        try:
            ipaddress.ip_address(host)
        except ValueError:
            raise ValueError(
                f"listen: {host!r} is not an IP address (the listener binds an address,"
                " as in 127.0.0.1:8470 or [::1]:8470)"
            ) from None

    @property
    def address(self) -> tuple[str, int]:
        """(host, port) to bind; port 0 takes any free port (``status`` shows which)."""
        # Imported here: config.model holds this section, so it cannot be imported first.
        from fireclaw.config.irc import parse_server

        host, sep, port = self.listen.rpartition(":")
        if sep and port == "0":
            return parse_server(f"{host}:1")[0], 0
        return parse_server(self.listen)
