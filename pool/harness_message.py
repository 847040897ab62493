"""What a role's ``harness:`` becomes in the ``Promote`` a guest receives.

``harness_message(spec, model=..., gateway=..., secrets=...)`` maps the config's
harness kinds to the wire's: ``command`` to ``Harness``, ``chat`` to
``ChatHarness`` (its base URL the VM's own gateway), a coding-agent CLI to
``CliHarness``. A CLI that can go through the gateway is pointed at it; its
secrets (from the role's secrets folder on the host) are read here, through the
``SecretReader`` the supervisor gives, and travel only in that message.

Exceptions::

    PromotionError      the harness cannot be given to this VM now: no gateway in
                        its namespace, or a secret that cannot be read. str() is
                        one line naming what is missing (never a secret's value).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

from fireclaw.config import AnyHarnessSpec, ChatHarnessSpec, CliHarnessBase, HarnessSpec
from fireclaw.guest_daemon import protocol as p
from fireclaw.guest_daemon.clis import SPECS

__all__ = ["PromotionError", "SecretReader", "harness_message"]

#: Reads ``names`` from the secrets folder ``folder`` (one file per variable) into
#: ``{name: value}``; raises any Exception whose str() is one line naming the file.
SecretReader = Callable[[Path, Sequence[str]], dict[str, str]]


class PromotionError(Exception):
    """The harness cannot be given to the VM now (one line)."""


def harness_message(
    spec: AnyHarnessSpec,
    *,
    model: str,
    gateway: tuple[str, int] | None,
    secrets: SecretReader | None,
) -> p.Harness | p.ChatHarness | p.CliHarness:
    """The wire form of ``spec`` for a VM whose gateway listens on ``gateway``."""
    if isinstance(spec, HarnessSpec):
        return p.Harness(argv=list(spec.command), timeout=spec.timeout)
    if isinstance(spec, ChatHarnessSpec):
        if gateway is None:
            raise PromotionError("no model gateway for its chat harness")
        # The guest reaches its model only through the gateway in its own namespace.
        host, port = gateway
        return p.ChatHarness(
            base_url=f"http://{host}:{port}/v1",
            model=model,
            tools=list(spec.tools),
            tool_mode=spec.tool_mode,
            max_steps=spec.max_steps,
            timeout=spec.timeout,
            max_tokens=spec.max_tokens,
            tool_timeout=spec.tool_timeout,
        )
    return _cli_harness(spec, gateway=gateway, secrets=secrets)


def _cli_harness(
    spec: CliHarnessBase, *, gateway: tuple[str, int] | None, secrets: SecretReader | None
) -> p.CliHarness:
    through_gateway = SPECS[spec.kind].gateway is not None
    if through_gateway and gateway is None:
        raise PromotionError(f"no model gateway for its {spec.kind} harness")
    values: dict[str, str] = {}
    if spec.secrets:
        if secrets is None or spec.secrets_dir is None:
            raise PromotionError(f"{spec.kind}: no way to read its secrets here")
        try:
            values = secrets(Path(spec.secrets_dir), spec.secrets)
        except Exception as exc:  # the reader's own error, one line naming the file
            raise PromotionError(f"{spec.kind} secret: {exc}") from None
    url = f"http://{gateway[0]}:{gateway[1]}" if through_gateway and gateway else ""
    return p.CliHarness(
        cli=spec.kind,
        gateway=url,
        timeout=spec.timeout,
        max_turns=getattr(spec, "max_turns", None),
        max_budget_usd=getattr(spec, "max_budget_usd", None),
        secrets=p.SecretEnv(values=values),
    )
