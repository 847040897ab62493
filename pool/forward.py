"""A VM's way out to one service: a listener that forwards to a fixed upstream.

An isolated VM's network namespace has only loopback. For each service it may
use (today: the IRC server), the supervisor opens a listener inside that
namespace and forwards whatever connects to the service's real address. The
VM can reach those services and nothing else, and needs no routes or NAT.
"""

from __future__ import annotations

import logging
from typing import Final

import trio

log = logging.getLogger("fireclaw.forward")

#: Connections one VM may hold open through one forwarder.
MAX_CONNECTIONS: Final = 4
_CHUNK: Final = 64 * 1024


#: Where forwarded connections to a service on this host's loopback come from.
#: Not 127.0.0.1: a service that trusts 127.0.0.1 (the IRC overseer trusts its
#: operators by host) must never mistake a VM for a local user.
VM_SOURCE: Final = "127.77.0.1"


async def forward(
    listener: trio.SocketListener, upstream: tuple[str, int], *, label: str = ""
) -> None:
    """Serve ``listener`` until cancelled, piping each connection to ``upstream``."""
    source = VM_SOURCE if upstream[0].startswith("127.") else None
    limit = trio.CapacityLimiter(MAX_CONNECTIONS)

    async def handle(stream: trio.SocketStream) -> None:
        async with stream:
            if limit.available_tokens == 0:
                return  # over the limit: close at once rather than queue
            async with limit:
                try:
                    up = await trio.open_tcp_stream(*upstream, local_address=source)
                except OSError as exc:
                    log.warning("%s: cannot reach %s:%d: %s", label, *upstream, exc)
                    return
                async with up, trio.open_nursery() as nursery:
                    nursery.start_soon(_pump, stream, up, nursery.cancel_scope)
                    nursery.start_soon(_pump, up, stream, nursery.cancel_scope)

    async with listener:
        await trio.serve_listeners(handle, [listener])


async def _pump(src: trio.SocketStream, dst: trio.SocketStream, done: trio.CancelScope) -> None:
    """Copy until either side closes or breaks; then end both directions."""
    try:
        while data := await src.receive_some(_CHUNK):
            await dst.send_all(data)
    except (trio.BrokenResourceError, trio.ClosedResourceError):
        pass
    finally:
        done.cancel()
