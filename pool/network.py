"""The swarm's network for real VMs: a tap per VM, a veth per namespace, one bridge, NAT.

The layout is the one Firecracker documents for clones of one snapshot::

    guest eth0 172.16.0.2/30
        |  (virtio-net on the tap)
    [ VM namespace ]  tap0 172.16.0.1/30 -- the control listener, the IRC forwarder
                      eth0 10.249.0.N/16 -- NAT: the guest leaves as 10.249.0.N
        |  (veth pair)
    [ host ]          fc<inst>v<hash> on the bridge fc<inst>br 10.249.0.1/16
                      NAT out of the host's other interfaces (``egress``)

Every VM has the same tap name and the same guest address, so clones of one
snapshot each find the network their template had. The listeners the
supervisor opens on the tap's address are the only things a guest reaches
inside its namespace; what it sends further is NATed twice (in its namespace
and on the host). VMs never reach one another (the bridge ports are isolated,
and each namespace takes no new connection from its veth) nor the host's own
services (the host takes no new connection from the bridge).

Names: everything carries the swarm's instance id (``<inst>``, six hex
digits), so ``leftovers`` finds what a crashed supervisor left and ``open``
removes it. The host's rules live in one nftables table, ``inet
fireclaw_<inst>``, replaced whole at ``open`` and deleted at ``close``. With
egress, ``open`` turns the host's IPv4 forwarding on; the last swarm to close
(or ``gc`` removing the last bridge) puts it back as it was.

Configuration runs in fresh OS threads (``netns.in_fresh_thread``): setns and
unshare move only the calling thread, and those threads end right after.
Rules are loaded with ``nft -f -`` (Debian's nftables).

Errors::

    NetworkError        the bridge, a namespace's links or the rules could not be set up
"""

from __future__ import annotations

import contextlib
import hashlib
import ipaddress
import os
import socket
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final

import trio
from fireclaw.guest_daemon.lines import first_line
from fireclaw.pool import netns
from fireclaw.pool.runner import ProgramFailed, run_program

#: Inside every VM namespace: the tap QEMU attaches to and the veth's end.
TAP: Final = "tap0"
NS_LINK: Final = "eth0"
#: The tap's side of the guest's /30: the guest's gateway and where its listeners are.
GATEWAY: Final = "172.16.0.1"
#: The tap's MAC, the same in every namespace: a clone's guest keeps the ARP entry
#: its template learned, and a tap with another MAC would never see its frames.
TAP_MAC: Final = "02:fc:00:00:00:01"
GUEST_CIDR: Final = "172.16.0.2/30"
_TAP_PREFIX: Final = 30
_GUEST_NET: Final = "172.16.0.0/30"
NFT_TIMEOUT: Final = 10.0


class NetworkError(Exception):
    """The bridge, a namespace's links or the rules could not be set up."""


def bridge_name(instance: str) -> str:
    return f"fc{instance}br"


def veth_prefix(instance: str) -> str:
    return f"fc{instance}v"


def veth_name(instance: str, ns_name: str) -> str:
    """The host end of ``ns_name``'s veth (15 characters at most, as Linux wants)."""
    return veth_prefix(instance) + hashlib.sha256(ns_name.encode()).hexdigest()[:6]


def table_name(instance: str) -> str:
    return f"fireclaw_{instance}"


def host_rules(instance: str, subnet: ipaddress.IPv4Network, *, egress: bool) -> str:
    """The host's nftables table for the swarm (pure)."""
    bridge = bridge_name(instance)
    table = table_name(instance)
    out = (
        f'        iifname "{bridge}" oifname != "{bridge}" ip saddr {subnet} accept\n'
        if egress
        else ""
    )
    nat = (
        f"    chain postrouting {{\n"
        f"        type nat hook postrouting priority srcnat; policy accept;\n"
        # The bridge's own address is the host's: its local traffic is left alone.
        f"        ip saddr {subnet} ip saddr != {subnet.network_address + 1}"
        f' oifname != "{bridge}" masquerade\n'
        f"    }}\n"
        if egress
        else ""
    )
    return (
        f"table inet {table}\n"
        f"delete table inet {table}\n"
        f"table inet {table} {{\n"
        f"    chain input {{\n"
        f"        type filter hook input priority filter; policy accept;\n"
        f'        iifname "{bridge}" ct state established,related accept\n'
        f'        iifname "{bridge}" drop\n'
        f"    }}\n"
        f"    chain forward {{\n"
        f"        type filter hook forward priority filter; policy accept;\n"
        f'        oifname "{bridge}" ct state established,related accept\n'
        f"{out}"
        f'        iifname "{bridge}" drop\n'
        f'        oifname "{bridge}" drop\n'
        f"    }}\n"
        f"{nat}"
        f"}}\n"
    )


def namespace_rules() -> str:
    """One VM namespace's table: the guest NATed out of its veth, nothing in (pure)."""
    return (
        "table ip fireclaw {\n"
        "    chain input {\n"
        "        type filter hook input priority filter; policy accept;\n"
        f'        iifname "{NS_LINK}" ct state established,related accept\n'
        f'        iifname "{NS_LINK}" drop\n'
        "    }\n"
        "    chain forward {\n"
        "        type filter hook forward priority filter; policy drop;\n"
        f'        iifname "{TAP}" oifname "{NS_LINK}" accept\n'
        f'        iifname "{NS_LINK}" oifname "{TAP}" ct state established,related accept\n'
        "    }\n"
        "    chain postrouting {\n"
        "        type nat hook postrouting priority srcnat; policy accept;\n"
        f'        oifname "{NS_LINK}" ip saddr {_GUEST_NET} masquerade\n'
        "    }\n"
        "}\n"
    )


def _nft(rules: str, *, netns_name: str | None = None) -> None:
    argv = ["nft", "-f", "-"]
    if netns_name is not None:
        argv = ["nsenter", f"--net={netns.NETNS_DIR / netns_name}", "--", *argv]
    try:
        run_program(argv, input=rules.encode(), timeout=NFT_TIMEOUT, name="nft")
    except ProgramFailed as exc:
        raise NetworkError(str(exc)) from exc


def _ip_forward(path: Path, value: str | None = None) -> str:
    """The namespace's (the calling thread's) IPv4 forwarding flag; set it to ``value``."""
    old = path.read_text().strip()
    if value is not None and old != value:
        path.write_text(value)
    return old


_IP_FORWARD: Final = Path("/proc/sys/net/ipv4/ip_forward")
#: The host's IPv4 forwarding flag from before a swarm turned it on.
FORWARD_BEFORE: Final = Path("/run/fireclaw/ip_forward.before")


@dataclass(frozen=True)
class Link:
    """One VM namespace's attachment: what to remove with it."""

    ns_name: str
    veth: str  # the host end
    address: str  # the namespace's address on the bridge


@dataclass
class Network:
    """The bridge and rules of one swarm; ``open`` before ``attach``, ``close`` after."""

    instance: str
    subnet: ipaddress.IPv4Network
    egress: bool = True
    _used: set[int] = field(default_factory=set)  # host indexes given to namespaces

    @property
    def bridge(self) -> str:
        return bridge_name(self.instance)

    @property
    def gateway(self) -> str:
        return str(self.subnet.network_address + 1)

    # --- the host side ---------------------------------------------------------------

    async def open(self, keep: Sequence[Link] = ()) -> None:
        """Remove what a previous supervisor left, then make the bridge and the rules.

        ``keep``: links of VMs a previous supervisor left running that are being
        adopted (their addresses in this subnet): they, and the bridge they are
        on, stay as they are."""
        for link in keep:
            self._used.add(int(ipaddress.IPv4Address(link.address)) - int(self.subnet[0]))
        await trio.to_thread.run_sync(self._open, {link.veth for link in keep})

    def _open(self, kept: set[str]) -> None:
        from pyroute2 import IPRoute
        from pyroute2.netlink.exceptions import NetlinkError

        try:
            with IPRoute() as ipr:
                keep = {self.bridge, *kept} if kept else set()
                _delete_links(ipr, [n for n in host_links(self.instance) if n not in keep])
                if not (kept and ipr.link_lookup(ifname=self.bridge)):
                    self._check_subnet_free(ipr)
                    ipr.link("add", ifname=self.bridge, kind="bridge")
                    (index,) = ipr.link_lookup(ifname=self.bridge)
                    ipr.addr(
                        "add", index=index, address=self.gateway, prefixlen=self.subnet.prefixlen
                    )
                    ipr.link("set", index=index, state="up")
        except NetlinkError as exc:
            raise NetworkError(f"bridge {self.bridge}: {exc}") from exc
        _nft(host_rules(self.instance, self.subnet, egress=self.egress))
        if self.egress:
            try:
                old = _ip_forward(_IP_FORWARD, "1")
                if old != "1" and not FORWARD_BEFORE.exists():
                    # Shared by every swarm on the host: the last one to close puts
                    # it back, whichever turned it on.
                    FORWARD_BEFORE.parent.mkdir(parents=True, exist_ok=True)
                    FORWARD_BEFORE.write_text(old)
            except OSError as exc:
                raise NetworkError(f"enabling IPv4 forwarding: {exc.strerror}") from exc

    def _check_subnet_free(self, ipr: object) -> None:
        from pyroute2 import IPRoute

        assert isinstance(ipr, IPRoute)
        for addr in ipr.get_addr(family=socket.AF_INET):
            found = addr.get_attr("IFA_ADDRESS")
            if found is not None and ipaddress.IPv4Address(found) in self.subnet:
                label = addr.get_attr("IFA_LABEL") or f"interface {addr['index']}"
                raise NetworkError(
                    f"network.subnet {self.subnet} overlaps {found} on {label}:"
                    " give this swarm another subnet"
                )

    async def close(self) -> None:
        """Remove the bridge and the rules (every namespace is detached by now)."""
        await trio.to_thread.run_sync(self._close)

    def _close(self) -> None:
        from pyroute2 import IPRoute

        with IPRoute() as ipr:
            _delete_links(ipr, host_links(self.instance))
        table = table_name(self.instance)
        with contextlib.suppress(NetworkError):
            _nft(f"table inet {table}\ndelete table inet {table}\n")
        restore_forwarding()

    # --- one VM namespace ----------------------------------------------------------

    async def attach(
        self, ns_name: str, port: int = 0, *, listen: bool = True
    ) -> tuple[socket.socket | None, Link]:
        """Create namespace ``ns_name`` with its tap, its veth on the bridge and its
        rules, and, with ``listen``, a listener on ``GATEWAY:port`` in it (a free
        port for 0; None without: a guest on a channel device dials nothing).

        On any failure nothing of it is left."""
        index = self._take_index()
        address = str(self.subnet.network_address + index)
        link = Link(ns_name=ns_name, veth=veth_name(self.instance, ns_name), address=address)
        try:
            sock = await trio.to_thread.run_sync(
                netns.in_fresh_thread, lambda: self._make_namespace(link, port, listen)
            )
        except BaseException:
            self._used.discard(index)
            raise
        return sock, link

    def _take_index(self) -> int:
        # .0 is the network, .1 the bridge, the last the broadcast address.
        for index in range(2, self.subnet.num_addresses - 1):
            if index not in self._used:
                self._used.add(index)
                return index
        raise NetworkError(f"network.subnet {self.subnet} has no address left")

    def _make_namespace(self, link: Link, port: int, listen: bool) -> socket.socket | None:
        from pyroute2 import IPRoute
        from pyroute2.netns import setns

        host_ns = os.open("/proc/thread-self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
        made = False
        try:
            netns.enter_new(link.ns_name)
            made = True
            with IPRoute() as ipr:
                ipr.link("add", ifname=TAP, kind="tuntap", mode="tap", ifr={"no_pi": True})
                (tap,) = ipr.link_lookup(ifname=TAP)
                ipr.addr("add", index=tap, address=GATEWAY, prefixlen=_TAP_PREFIX)
                ipr.link("set", index=tap, address=TAP_MAC, state="up")
                ipr.link(
                    "add",
                    ifname=NS_LINK,
                    kind="veth",
                    peer={"ifname": link.veth, "net_ns_fd": host_ns},
                )
                (eth,) = ipr.link_lookup(ifname=NS_LINK)
                ipr.addr("add", index=eth, address=link.address, prefixlen=self.subnet.prefixlen)
                ipr.link("set", index=eth, state="up")
                ipr.route("add", dst="0.0.0.0/0", gateway=self.gateway)
            _ip_forward(_IP_FORWARD, "1")  # this namespace's: it routes for its guest
            sock = netns.listen(GATEWAY, port) if listen else None
            try:
                _nft(namespace_rules(), netns_name=link.ns_name)
                setns(host_ns)
                with IPRoute() as ipr:
                    (veth,) = ipr.link_lookup(ifname=link.veth)
                    (bridge,) = ipr.link_lookup(ifname=self.bridge)
                    ipr.link("set", index=veth, master=bridge, state="up")
                    ipr.brport("set", index=veth, isolated=1)
            except BaseException:
                if sock is not None:
                    sock.close()
                raise
        except BaseException as exc:
            if made:
                _remove_sync(link)
            if isinstance(exc, Exception):
                raise NetworkError(f"namespace {link.ns_name}: {first_line(exc)}") from exc
            raise
        finally:
            os.close(host_ns)
        return sock

    async def detach(self, link: Link) -> None:
        """Remove ``link``'s veth and namespace (its tap goes with it)."""
        try:
            await trio.to_thread.run_sync(_remove_sync, link)
        finally:
            index = int(ipaddress.IPv4Address(link.address)) - int(self.subnet.network_address)
            self._used.discard(index)


def _remove_sync(link: Link) -> None:
    from pyroute2 import IPRoute

    # The veth would go with its namespace, but only once the kernel gets to it:
    # deleting it now means nothing of the VM is left when this returns.
    with IPRoute() as ipr:
        _delete_links(ipr, [link.veth])
    netns.remove_sync(link.ns_name)


def restore_forwarding() -> bool:
    """Put the host's IPv4 forwarding back to how it was before the first swarm
    turned it on, once no swarm's bridge is left to need it; True if it did."""
    if not FORWARD_BEFORE.exists() or any(n.endswith("br") for n in host_links()):
        return False
    try:
        _ip_forward(_IP_FORWARD, FORWARD_BEFORE.read_text().strip())
        FORWARD_BEFORE.unlink()
    except OSError:
        return False
    return True


def _delete_links(ipr: object, names: list[str]) -> None:
    """Delete the links ``names`` (those already gone are skipped)."""
    from pyroute2 import IPRoute
    from pyroute2.netlink.exceptions import NetlinkError

    assert isinstance(ipr, IPRoute)
    for name in names:
        with contextlib.suppress(NetlinkError, IndexError):
            ipr.link("del", index=ipr.link_lookup(ifname=name)[0])


def host_links(instance: str | None = None) -> list[str]:
    """Names of host links a swarm made (of ``instance``, or of any swarm)."""
    from pyroute2 import IPRoute

    with IPRoute() as ipr:
        names = [str(msg.get_attr("IFLA_IFNAME")) for msg in ipr.get_links()]
    if instance is not None:
        return [
            n for n in names if n == bridge_name(instance) or n.startswith(veth_prefix(instance))
        ]
    return [n for n in names if len(n) >= 10 and n.startswith("fc") and _is_ours(n)]


def _is_ours(name: str) -> bool:
    inst, rest = name[2:8], name[8:]
    hexdigits = set("0123456789abcdef")
    return set(inst) <= hexdigits and (
        rest == "br" or (rest[:1] == "v" and set(rest[1:]) <= hexdigits)
    )


def tables() -> list[str]:
    """Names of the host's nftables tables a swarm made."""
    try:
        listed = run_program(["nft", "list", "tables"], timeout=NFT_TIMEOUT)
    except ProgramFailed:
        return []
    found = []
    for line in listed.decode(errors="replace").splitlines():
        words = line.split()
        if len(words) == 3 and words[0] == "table" and words[2].startswith("fireclaw_"):
            found.append(f"{words[1]} {words[2]}")
    return found
