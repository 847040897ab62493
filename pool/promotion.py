"""What makes a pooled VM an agent of its role: the ``Promote`` message.

``promotion`` is a pure function of the role's current spec, the agent's
identity and what the VM can reach from its namespace (the IRC forwarder, the
model gateway), so a reload, a retune and a first promotion all say the same.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from fireclaw.config import Account, Role
from fireclaw.guest_daemon import protocol as p
from fireclaw.pool.control import GuestLost
from fireclaw.pool.harness_message import PromotionError, SecretReader, harness_message

if TYPE_CHECKING:
    from fireclaw.pool.runtime import IrcRoute
    from fireclaw.pool.vm_base import AgentIdentity

__all__ = ["promotion"]


def promotion(
    role: Role,
    *,
    vm_name: str,
    agent: AgentIdentity | None,
    irc: IrcRoute | None,
    irc_endpoint: tuple[str, int] | None,
    model_endpoint: tuple[str, int] | None,
    secrets: SecretReader | None,
    account: Account | None = None,
) -> p.Promote:
    """What makes the VM ``vm_name`` an agent of ``role``.

    A named agent (``agent``) gets its own name, its overrides, and (when IRC is
    on and its VM has a way there, ``irc_endpoint``) its IRC presence; a task
    runner is named after its VM. A chat or CLI harness talks to its model only
    through ``model_endpoint``, the gateway in the VM's own namespace, and a
    CLI's secrets are read with ``secrets`` at each promotion (from ``account``'s
    folder for a role with accounts): GuestLost when the VM has no gateway or a
    secret cannot be read."""
    presence = None
    if agent is not None and irc is not None and irc_endpoint is not None:
        host, port = irc_endpoint
        channels = [irc.agents_channel, *(c for c in role.channels if c != irc.agents_channel)]
        presence = p.IrcPresence(
            host=host,
            port=port,
            nick=agent.name,
            channels=channels,
            password=irc.password or "",
            cooldown=irc.cooldown,
        )
    model = role.model if agent is None or agent.model is None else agent.model
    try:
        harness = harness_message(
            role.harness, model=model, gateway=model_endpoint, secrets=secrets, account=account
        )
    except PromotionError as exc:
        raise GuestLost(f"{vm_name}: {exc}") from None
    return p.Promote(
        name=agent.name if agent is not None else vm_name,
        role=role.name,
        persona=role.persona if agent is None or agent.persona is None else agent.persona,
        model=model,
        harness=harness,
        irc=presence,
    )
