"""Per-VM network namespaces and the service forwarder, for real (needs root)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from functools import partial

import pytest
import trio
from fireclaw.pool import netns
from fireclaw.pool.forward import VM_SOURCE, forward

pytestmark = pytest.mark.skipif(netns.probe() is not None, reason=f"no namespaces: {netns.probe()}")

CONNECT = """
import socket, sys
c = socket.create_connection(("127.0.0.1", int(sys.argv[1])), timeout=5)
c.sendall(b"ping\\n")
print(c.makefile("rb").readline().decode().strip())
"""


async def echo(stream: trio.SocketStream) -> None:
    peer = stream.socket.getpeername()[0]
    async with stream:
        async for data in stream:
            await stream.send_all(f"echo from {peer}: ".encode() + data)


async def test_a_process_in_the_namespace_reaches_only_what_is_forwarded() -> None:
    name = f"{netns.PREFIX}test-{os.getpid()}"
    control = await netns.create_with_listener(name)
    try:
        assert name in netns.leftovers()
        async with trio.open_nursery() as nursery:
            (upstream,) = await nursery.start(partial(trio.serve_tcp, echo, 0, host="127.0.0.1"))
            up_port = upstream.socket.getsockname()[1]
            inner = await netns.open_listener(name)
            port = inner.getsockname()[1]
            listener = trio.SocketListener(trio.socket.from_stdlib_socket(inner))
            nursery.start_soon(partial(forward, listener, ("127.0.0.1", up_port), label="test"))

            def inside(target: int) -> subprocess.CompletedProcess[str]:
                return subprocess.run(
                    [
                        "nsenter",
                        f"--net=/run/netns/{name}",
                        "--",
                        sys.executable,
                        "-c",
                        CONNECT,
                        str(target),
                    ],
                    capture_output=True,
                    text=True,
                    timeout=20,
                )

            through = await trio.to_thread.run_sync(inside, port)
            # It arrives from the VMs' own loopback address, never from 127.0.0.1.
            assert through.stdout.strip() == f"echo from {VM_SOURCE}: ping"
            # The host's own services are not reachable from inside: only loopback is there.
            direct = await trio.to_thread.run_sync(inside, up_port)
            assert direct.returncode != 0 and "Connection refused" in direct.stderr
            # And the namespace's listeners are not reachable from the host.
            with pytest.raises(ConnectionRefusedError):
                socket.create_connection(("127.0.0.1", control.getsockname()[1]), timeout=5)
            nursery.cancel_scope.cancel()
    finally:
        control.close()
        await netns.remove(name)
    assert name not in netns.leftovers()


async def test_removing_a_missing_namespace_is_quiet(caplog: pytest.LogCaptureFixture) -> None:
    name = f"{netns.PREFIX}twice-{os.getpid()}"
    (await netns.create_with_listener(name)).close()
    assert name in netns.leftovers()
    await netns.remove(name)
    assert name not in netns.leftovers()
    # Again, once it is gone (a teardown that runs twice): no error.
    await netns.remove(name)
    # A name a crash left behind with no namespace mounted on it is cleared too.
    (netns.NETNS_DIR / name).touch()
    await netns.remove(name)
    assert name not in netns.leftovers()
    await netns.remove(f"{netns.PREFIX}never-made")
    assert [r.getMessage() for r in caplog.records] == []
