"""A guest that says a proper hello and then breaks the protocol on purpose.

Usage: hostile_guest.py MODE, with MODE one of oversize, garbage, offschema, flood,
or deaf (a well-behaved heartbeat, but Stop and SIGTERM are ignored).
"""

from __future__ import annotations

import itertools
import os
import signal
import sys

import trio
import trio_websocket
from fireclaw.guest_daemon import protocol as p


async def main(mode: str) -> None:
    async with trio_websocket.open_websocket_url(os.environ["FIRECLAW_CONTROL_URL"]) as ws:
        hello = p.Hello(
            vm_id=os.environ["FIRECLAW_VM_ID"],
            token=os.environ["FIRECLAW_TOKEN"],
            version=p.PROTOCOL_VERSION,
            pid=os.getpid(),
        )
        await ws.send_message(p.encode(hello))
        await ws.get_message()  # Welcome
        if mode == "oversize":
            await ws.send_message(b"\x00" * (8 * 1024 * 1024))
        elif mode == "garbage":
            await ws.send_message(b"\xc1\xc1 not msgpack")
        elif mode == "offschema":
            await ws.send_message(p.encode(p.Exited(req=12345, code=0)))
        elif mode == "deaf":
            signal.signal(signal.SIGTERM, signal.SIG_IGN)
            for seq in itertools.count():
                await ws.send_message(p.encode(p.Heartbeat(seq=seq)))
                await trio.sleep(0.2)
        elif mode == "flood":
            while True:
                await ws.send_message(p.encode(p.Heartbeat(seq=0)))
        await trio.sleep_forever()  # leave it to the supervisor to end us


if __name__ == "__main__":
    trio.run(main, sys.argv[1])
