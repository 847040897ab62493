"""``fireclaw-swarm doctor``: what this host offers a swarm, and what swarms left on it.

``examine(config, state_dir)`` looks (it blocks: namespace and cgroup probes,
netlink, nft, procfs) and gives a ``Report``; ``Report.lines()`` is what the
command prints. Nothing is changed on the host beyond what the supervisor's own
start-up probes do (a namespace made and removed, the cgroup parent created).
"""

from __future__ import annotations

import ipaddress
import os
import shutil
import socket
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final

import msgspec
from fireclaw.config import Config
from fireclaw.pool import cgroup, netns, network
from fireclaw.pool.accel import KVM_DEVICE, installed_version
from fireclaw.pool.drivers import (
    ACCEL_CACHE,
    QEMU,
    BackendUnavailable,
    Capability,
    DriverInfo,
    choose,
    describe_here,
)
from fireclaw.pool.runtime import instance_id
from fireclaw.supervisor import leftovers
from fireclaw.supervisor.ircd_operators import operator_password_path
from fireclaw.supervisor.leftovers import Leftovers, Owner

IMAGES_NAME: Final = "images"  # as supervisor/daemon.py
_LABEL: Final = 14


@dataclass
class Report:
    """What ``doctor`` found; ``problems`` and leftovers make it exit 1."""

    config: Path
    state_dir: Path
    instance: str
    supervisor: Owner
    backend: str
    accel: str
    isolation: str
    network: str
    mine: Leftovers
    #: Who may command the overseer over IRC, and how they prove it.
    irc: str = "off"
    #: What each driver says of itself here: whether it can run, and why not.
    drivers: list[DriverInfo] = field(default_factory=list)
    #: Said but not failed on: the swarm runs, less safely than it could.
    warnings: list[str] = field(default_factory=list)
    #: Other instances on the host: whether their supervisor runs, and what they have.
    others: dict[str, tuple[Owner, Leftovers]] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)

    @property
    def running(self) -> bool:
        return self.supervisor.state == "running"

    @property
    def left_over(self) -> bool:
        """Something on the host that no running supervisor owns."""
        return (not self.running and not self.mine.empty) or any(
            owner.state != "running" for owner, _ in self.others.values()
        )

    @property
    def exit_status(self) -> int:
        return 1 if self.problems or self.left_over else 0

    def lines(self) -> list[str]:
        out = [
            _row("config", str(self.config)),
            _row("state dir", f"{self.state_dir} (instance {self.instance})"),
            _row("supervisor", str(self.supervisor)),
            _row("backend", self.backend),
            _row("accel", self.accel),
            *(_row(info.name, driver_line(info)) for info in self.drivers),
            _row("isolation", self.isolation),
            _row("network", self.network),
            _row("irc", self.irc),
        ]
        items = self.mine.items()
        if not items:
            out.append(_row("leftovers", "none"))
        elif self.running:
            holder = f"the running supervisor (pid {self.supervisor.pid or '?'})"
            out.append(_row("leftovers", f"none: its {len(items)} resources belong to {holder}"))
        else:
            out.append(_row("leftovers", f"{len(items)} of this swarm:"))
            out += [_row("", item) for item in items]
        if not self.others:
            out.append(_row("others", "none"))
        for n, (instance, (owner, found)) in enumerate(sorted(self.others.items())):
            other = found.items()
            if owner.state == "running":
                text = f"{instance}: {owner}, {len(other)} resources in use"
                out.append(_row("" if n else "others", text))
            else:
                text = f"{instance}: {owner}, {len(other)} left over:"
                out.append(_row("" if n else "others", text))
                out += [_row("", f"  {item}") for item in other]
        out += [_row("cannot check", error) for error in self.mine.errors]
        out += [_row("problem", problem) for problem in self.problems]
        out += [_row("warning", warning) for warning in self.warnings]
        mine = not self.running and not self.mine.empty
        others = any(o.state != "running" for o, _ in self.others.values())
        if mine and others:
            out.append(
                "run `fireclaw-swarm gc` to remove this swarm's leftovers,"
                " `fireclaw-swarm gc --all` for other swarms' too"
            )
        elif mine:
            out.append("run `fireclaw-swarm gc` to remove them")
        elif others:
            out.append("run `fireclaw-swarm gc --all` to remove other swarms' leftovers")
        return out


def _row(label: str, text: str) -> str:
    return f"{label:<{_LABEL}}{text}".rstrip()


def driver_line(info: DriverInfo) -> str:
    """A driver as ``doctor`` shows it: ``no: why``, or ``yes`` and what it can do."""
    if info.unavailable is not None:
        return f"no: {info.unavailable}"
    can = [c.value for c in Capability if info.can(c)]
    cannot = [c.value for c in Capability if not info.can(c)]
    text = "; ".join(["yes", *([", ".join(can)] if can else [])])
    if cannot:
        text += f"; not {', '.join(cannot)}"
        whys = {info.lacking.get(c, "") for c in Capability if not info.can(c)}
        if len(whys) == 1 and "" not in whys:  # one reason for all: say it
            text += f" ({whys.pop()})"
    return text


def examine(config: Config, state_dir: Path) -> Report:
    """Look at the host for the swarm of ``config`` whose state dir is ``state_dir``."""
    state_dir = state_dir.resolve()
    instance = instance_id(state_dir)
    images = state_dir / IMAGES_NAME
    problems: list[str] = []

    ns_why = netns.probe()
    cg_why = cgroup.probe()
    isolation = "; ".join(
        [
            "netns: "
            + ("yes, one network namespace per VM" if ns_why is None else f"no, {ns_why}"),
            "cgroups: " + ("yes, one memory cgroup per VM" if cg_why is None else f"no, {cg_why}"),
        ]
    )

    drivers = describe_here(images, ns_why)
    described = {info.name: info for info in drivers}
    qemu_chosen = False
    try:
        choice = choose(config.backend, images=images, netns_why=ns_why)
    except BackendUnavailable as exc:
        backend = str(exc)
        problems.append(f"backend: {exc}")
    else:
        backend = choice.reason
        qemu_chosen = choice.name == "qemu"
        # What open_backend checks before a configured qemu starts (and fails on).
        why = described["qemu"].unavailable
        if config.backend == "qemu" and why is not None:
            problems.append(f"backend: qemu cannot run here: {why}")

    tools = "; ".join(
        f"{tool}: {'yes' if shutil.which(tool) else 'not installed'}"
        for tool in ("nft", "qemu-img")
    )
    subnet = ipaddress.IPv4Network(config.network.subnet)
    try:
        overlaps = subnet_overlaps(subnet, skip=network.bridge_name(instance))
    except Exception as exc:  # netlink unusable: say so, do not fail the report
        net_text = f"{tools}; subnet {subnet}: cannot list host addresses ({exc})"
    else:
        if overlaps:
            net_text = f"{tools}; subnet {subnet} overlaps {', '.join(overlaps)}"
            if qemu_chosen:
                problems.append(
                    f"network.subnet {subnet} overlaps {overlaps[0]}: give this swarm another"
                    " subnet"
                )
        else:
            net_text = f"{tools}; subnet {subnet}: no host address in it"

    found = leftovers.find_all(state_dir)
    mine = found.pop(instance)
    running = leftovers.running_instances(found)
    others = {
        inst: (Owner("running", running[inst]) if inst in running else Owner("unknown"), left)
        for inst, left in found.items()
    }
    irc, warnings = irc_operators(config, state_dir)
    supervisor = leftovers.owner(state_dir)
    if supervisor.state == "unknown":
        problems.append(f"cannot tell whether a supervisor holds {state_dir}/supervisor.pid")
    return Report(
        config=config.path,
        state_dir=state_dir,
        instance=instance,
        supervisor=supervisor,
        backend=backend,
        accel=accel_status(images),
        drivers=drivers,
        isolation=isolation,
        network=net_text,
        mine=mine,
        irc=irc,
        warnings=warnings,
        others=others,
        problems=problems,
    )


def irc_operators(config: Config, state_dir: Path) -> tuple[str, list[str]]:
    """How an operator proves who they are to the overseer, and warnings about it."""
    spec = config.irc
    if not spec.enabled:
        return "off", []
    masks = ", ".join(spec.operators) or "none"
    match spec.operator_auth:
        case "hostmask":
            warning = (
                "irc.operator_auth is hostmask: anyone who can connect from an address"
                f" matching irc.operators ({masks}) can command the swarm; use oper"
            )
            return f"operators by hostmask alone ({masks})", [warning]
        case "account":
            accounts = ", ".join(spec.operator_accounts)
            return f"operators: accounts {accounts}, from {masks}", []
    if not spec.is_managed:
        return f"operators: the server's IRC operators, from {masks}", []
    opers = "; ".join(
        f"/OPER {op.name} <{operator_password_path(state_dir, op)}>"
        for op in spec.managed.operators
    )
    return f"operators: {opers}, from {masks}", []


def subnet_overlaps(subnet: ipaddress.IPv4Network, *, skip: str = "") -> list[str]:
    """Host addresses inside ``subnet`` ("ADDRESS on LINK"), except on link ``skip``.

    The same test as the swarm's network makes at start (an address of the
    host inside the subnet); ``skip`` is the swarm's own bridge, which a
    start removes first."""
    from pyroute2 import IPRoute

    with IPRoute() as ipr:
        names = {msg["index"]: str(msg.get_attr("IFLA_IFNAME")) for msg in ipr.get_links()}
        found = []
        for addr in ipr.get_addr(family=socket.AF_INET):
            address = addr.get_attr("IFA_ADDRESS")
            link = names.get(addr["index"], f"interface {addr['index']}")
            if address is not None and link != skip and ipaddress.IPv4Address(address) in subnet:
                found.append(f"{address} on {link}")
    return found


def accel_status(images: Path) -> str:
    """KVM or TCG as the qemu backend would pick it, if the boot probe's cache says."""
    if not KVM_DEVICE.exists():
        return f"tcg (kvm: {KVM_DEVICE} does not exist)"
    if not os.access(KVM_DEVICE, os.R_OK | os.W_OK):
        return f"tcg (kvm: no read/write access to {KVM_DEVICE})"
    cache = images / ACCEL_CACHE
    try:
        entries = msgspec.json.decode(cache.read_bytes())
    except (OSError, msgspec.DecodeError):
        return "not probed yet"
    if not isinstance(entries, dict) or not entries:
        return "not probed yet"
    version = installed_version(QEMU)
    release = os.uname().release
    for key, entry in sorted(entries.items()):
        # The probe's cache key: "vmlinux|mtime_ns|qemu version|host kernel release".
        parts = str(key).split("|")
        if len(parts) < 4 or parts[-1] != release or not isinstance(entry, dict):
            continue
        if version is not None and "|".join(parts[2:-1]) != version:
            continue
        try:
            if str(Path(parts[0]).stat().st_mtime_ns) != parts[1]:
                continue
        except OSError:
            continue
        return f"{entry.get('name', '?')} ({entry.get('reason', 'no reason cached')})"
    return "not probed yet for this kernel and QEMU"
