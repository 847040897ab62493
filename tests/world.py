"""A stand-in for the outside world: a namespace the host routes to over a veth.

Egress from VMs is shown by reaching a server in it, so no traffic ever
leaves the machine. Needs root and iproute2.
"""

from __future__ import annotations

import contextlib
import secrets
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass

from fireclaw.pool import netns

#: Serves one line to each connection: the address it came from.
SERVE = """
import socket, sys
s = socket.socket()
s.bind((sys.argv[1], 0))
s.listen(8)
print(s.getsockname()[1], flush=True)
while True:
    c, peer = s.accept()
    c.sendall(f"from {peer[0]}\\n".encode())
    c.close()
"""

#: Connects to argv[1]:argv[2] within argv[3] seconds; prints what the server says
#: or why it could not connect. Runs under any python3 (the guest's too).
CONNECT = """
import socket, sys
try:
    c = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=float(sys.argv[3]))
    print(c.makefile("rb").readline().decode().strip())
except OSError as exc:
    print("failed:", type(exc).__name__)
"""


def in_ns(ns: str | None, argv: list[str]) -> list[str]:
    return ["nsenter", f"--net=/run/netns/{ns}", "--", *argv] if ns else argv


class Server:
    """A line server in namespace ``ns`` (None: the host) on ``host``."""

    def __init__(self, ns: str | None, host: str) -> None:
        self.proc = subprocess.Popen(
            in_ns(ns, [sys.executable, "-c", SERVE, host]), stdout=subprocess.PIPE, text=True
        )
        assert self.proc.stdout is not None
        self.port = int(self.proc.stdout.readline())

    def close(self) -> None:
        self.proc.kill()
        self.proc.wait()
        if self.proc.stdout is not None:
            self.proc.stdout.close()


@dataclass(frozen=True)
class World:
    ns: str
    address: str  # the world's own
    host_address: str  # the host's, on the veth to the world


@contextlib.contextmanager
def world_namespace() -> Iterator[World]:
    tag = secrets.token_hex(3)
    name, host_if = f"{netns.PREFIX}world-{tag}", f"fcw{tag}"
    third = secrets.randbelow(200) + 20
    host_addr, world_addr = f"10.251.{third}.1", f"10.251.{third}.2"
    steps = [
        ["ip", "netns", "add", name],
        ["ip", "link", "add", host_if, "type", "veth", "peer", "name", "w0", "netns", name],
        ["ip", "addr", "add", f"{host_addr}/30", "dev", host_if],
        ["ip", "link", "set", host_if, "up"],
        ["ip", "-n", name, "addr", "add", f"{world_addr}/30", "dev", "w0"],
        ["ip", "-n", name, "link", "set", "w0", "up"],
        ["ip", "-n", name, "link", "set", "lo", "up"],
    ]
    try:
        for step in steps:
            subprocess.run(step, check=True, capture_output=True)
        yield World(ns=name, address=world_addr, host_address=host_addr)
    finally:
        subprocess.run(["ip", "link", "del", host_if], capture_output=True)
        subprocess.run(["ip", "netns", "del", name], capture_output=True)
