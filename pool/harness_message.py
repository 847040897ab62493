"""What a role's ``harness:`` becomes in the ``Promote`` a guest receives.

``harness_message(spec, model=..., gateway=..., secrets=...)`` maps the config's
harness kinds to the wire's: ``command`` to ``Harness``, ``chat`` to
``ChatHarness`` (its base URL the VM's own gateway), a coding-agent CLI to
``CliHarness``. A CLI that can go through the gateway is pointed at it; its
secrets (from the role's secrets folder on the host, or from the folder of the
account its run was given) are read here, through the ``SecretReader`` the
supervisor gives, and travel only in that message. An account's key for a CLI
that goes through the gateway stays on the host (``account_key``): the gateway
sends it upstream.

Exceptions::

    PromotionError      the harness cannot be given to this VM now: no gateway in
                        its namespace, or a secret that cannot be read. str() is
                        one line naming what is missing (never a secret's value).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

from fireclaw.config import Account, AnyHarnessSpec, ChatHarnessSpec, CliHarnessBase, HarnessSpec
from fireclaw.guest_daemon import protocol as p
from fireclaw.guest_daemon.clis import SPECS

__all__ = ["PromotionError", "SecretReader", "account_key", "harness_message"]

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
    account: Account | None = None,
) -> p.Harness | p.ChatHarness | p.CliHarness:
    """The wire form of ``spec`` for a VM whose gateway listens on ``gateway``; a CLI
    with accounts runs on ``account`` (its secrets from that account's folder)."""
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
    return _cli_harness(spec, gateway=gateway, secrets=secrets, account=account)


def account_key(spec: CliHarnessBase, account: Account, secrets: SecretReader) -> str | None:
    """The key ``account`` holds for the provider of ``spec``'s CLI (its ``key_env``
    file), which the VM's gateway sends upstream for a CLI that goes through it;
    None for a CLI that cannot, or a role whose secrets do not name it. Raises
    PromotionError (one line naming the file)."""
    cli = SPECS[spec.kind]
    if cli.gateway is None or not cli.key_env or cli.key_env not in spec.secrets:
        return None
    try:
        return secrets(Path(account.secrets_dir), [cli.key_env])[cli.key_env]
    except Exception as exc:  # the reader's own error, one line naming the file
        raise PromotionError(f"{spec.kind} account {account.name}: {exc}") from None


def _cli_harness(
    spec: CliHarnessBase,
    *,
    gateway: tuple[str, int] | None,
    secrets: SecretReader | None,
    account: Account | None,
) -> p.CliHarness:
    cli = SPECS[spec.kind]
    through_gateway = cli.gateway is not None
    if through_gateway and gateway is None:
        raise PromotionError(f"no model gateway for its {spec.kind} harness")
    if spec.accounts and account is None:
        raise PromotionError(f"{spec.kind}: no account of its role chosen for this run")
    folder = account.secrets_dir if account is not None else spec.secrets_dir
    values: dict[str, str] = {}
    if spec.secrets:
        if secrets is None or folder is None:
            raise PromotionError(f"{spec.kind}: no way to read its secrets here")
        try:
            values = secrets(Path(folder), spec.secrets)
        except Exception as exc:  # the reader's own error, one line naming the file
            where = f" (account {account.name})" if account is not None else ""
            raise PromotionError(f"{spec.kind} secret{where}: {exc}") from None
    if through_gateway and account is not None:
        # The gateway sends the account's key upstream itself: it never enters the VM.
        values.pop(cli.key_env, None)
    url = f"http://{gateway[0]}:{gateway[1]}" if through_gateway and gateway else ""
    return p.CliHarness(
        cli=spec.kind,
        gateway=url,
        timeout=spec.timeout,
        max_turns=getattr(spec, "max_turns", None),
        max_budget_usd=getattr(spec, "max_budget_usd", None),
        secrets=p.SecretEnv(values=values),
    )
