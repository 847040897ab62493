"""Serving a running VM: its control channel, its IRC forwarder and its model
gateway, from the guest's Hello until the VM ends.

The control session comes as the driver offers it (``pool.channel``): on the
listener in the VM's namespace, where the guest dials; or on the VM's channel
device, the host attaching to it (no listener is opened then)."""

from __future__ import annotations

import dataclasses
import logging
import socket
from functools import partial
from typing import TYPE_CHECKING, Final

import trio
from fireclaw.guest_daemon import protocol as p
from fireclaw.guest_daemon.channel import FramedChannel
from fireclaw.pool import netns, steps
from fireclaw.pool.channel import accept_dialled, answer_hello, attach, say_attach
from fireclaw.pool.control import ControlSession, GuestLost, GuestViolation, HeartbeatMissed
from fireclaw.pool.drivers.base import ChannelKind, DriverError
from fireclaw.pool.forward import forward
from fireclaw.pool.gateway import serve_gateway
from fireclaw.pool.lifecycle import Event
from fireclaw.pool.runtime import AuditedMeter
from fireclaw.pool.vm_base import Outcome
from fireclaw.pool.vm_work import ChildWork

if TYPE_CHECKING:
    from fireclaw.pool.template_make import Template

log = logging.getLogger("fireclaw.vm")

#: The model gateway's port inside each VM's own namespace.
GATEWAY_PORT: Final = 4000


class ChildServing(ChildWork):
    """A child's running VM, served until it ends."""

    async def _serve_vm(
        self,
        sock: socket.socket | None,
        ns_name: str | None,
        expect_id: str,
        expect_token: str,
        outcome: Outcome,
        started: float,
        template: Template | None,
        *,
        irc_port: int = 0,
        adopted: bool = False,
        port: FramedChannel | None = None,
    ) -> None:
        """Serve the running VM through ``sock``, its control listener (owned
        from here; None on a channel device), or ``port``, its control port with
        Attach said on it (``_say_attach``), until it ends; the IRC forwarder
        runs beside it."""
        listener = (
            trio.SocketListener(trio.socket.from_stdlib_socket(sock)) if sock is not None else None
        )
        try:
            await self._serve_routed(
                listener,
                ns_name,
                expect_id,
                expect_token,
                outcome,
                started,
                template,
                irc_port=irc_port,
                adopted=adopted,
                port=port,
            )
        finally:
            if listener is not None:
                await listener.aclose()

    async def _serve_routed(
        self,
        listener: trio.SocketListener | None,
        ns_name: str | None,
        expect_id: str,
        expect_token: str,
        outcome: Outcome,
        started: float,
        template: Template | None,
        *,
        irc_port: int,
        adopted: bool,
        port: FramedChannel | None,
    ) -> None:
        async with trio.open_nursery() as ws_nursery:
            self.irc_endpoint = await self._open_irc_route(ws_nursery, ns_name, irc_port)
            self.model_endpoint = await self._open_model_gateway(ws_nursery, ns_name)
            if self.irc_endpoint is not None and ns_name is not None:
                self._register(irc_port=self.irc_endpoint[1])
            steps.mark("listeners open")
            await self._serve(
                ws_nursery,
                listener,
                expect_id,
                expect_token,
                outcome,
                started,
                template,
                adopted,
                port=port,
            )
            ws_nursery.cancel_scope.cancel()

    async def _open_irc_route(
        self, nursery: trio.Nursery, ns_name: str | None, port: int = 0
    ) -> tuple[str, int] | None:
        """Give the VM a way to the IRC server: a forwarder inside its namespace,
        on ``port`` (an adopted VM's agent dials the one it had; 0: a free one)."""
        route = self.rt.irc
        if route is None:
            return None
        if ns_name is None:
            return route.upstream  # not isolated: the guest dials the server itself
        try:
            sock = await netns.open_listener(ns_name, self.rt.listen_host, port)
        except netns.NetnsError as exc:
            log.warning("%s: no IRC for this VM: %s", self.name, exc)
            return None
        listener = trio.SocketListener(trio.socket.from_stdlib_socket(sock))
        nursery.start_soon(partial(forward, listener, route.upstream, label=self.name))
        return (self.rt.listen_host, sock.getsockname()[1])

    async def _open_model_gateway(
        self, nursery: trio.Nursery, ns_name: str | None
    ) -> tuple[str, int] | None:
        """Give the VM its model gateway: a listener inside its namespace (on loopback
        when not isolated) that only this VM can reach, served for ``self.who``.

        In a namespace it takes ``GATEWAY_PORT``, the same in every VM, so a clone
        restored from a snapshot finds it where its template did."""
        route = self.rt.models
        if route is None:
            return None
        try:
            if ns_name is not None:
                sock = await netns.open_listener(ns_name, self.rt.listen_host, GATEWAY_PORT)
            else:
                sock = loopback_listener()
        except (netns.NetnsError, OSError) as exc:
            log.warning("%s: no model gateway for this VM: %s", self.name, exc)
            return None
        listener = trio.SocketListener(trio.socket.from_stdlib_socket(sock))
        audited = dataclasses.replace(route, meter=AuditedMeter(route.meter, self.rt))
        nursery.start_soon(serve_gateway, listener, self.who, audited)
        return (self.rt.listen_host, sock.getsockname()[1])

    async def _serve(
        self,
        ws_nursery: trio.Nursery,
        listener: trio.SocketListener | None,
        vm_id: str,
        token: str,
        outcome: Outcome,
        started: float,
        template: Template | None,
        adopted: bool = False,
        *,
        port: FramedChannel | None = None,
    ) -> None:
        assert self.handle is not None
        handle = self.handle
        async with trio.open_nursery() as nursery:

            async def watch_vmm() -> None:
                code = await handle.wait()
                outcome.code = code
                if not outcome.broke_protocol:
                    # The cause, whichever was noticed first: the lost connection or this.
                    outcome.reason = (
                        f"VMM exited with code {code}"
                        if code is not None
                        else "VMM exited (its exit status is unknowable: it was adopted)"
                    )
                self._exited.set()
                nursery.cancel_scope.cancel()

            nursery.start_soon(watch_vmm)
            opened: trio.abc.Stream | None = None
            try:
                with trio.fail_after(self.rt.control.boot_timeout):
                    if port is not None:
                        session = await answer_hello(
                            port, vm_id=vm_id, token=token, spec=self.rt.control, hostname=self.name
                        )
                    elif listener is not None:  # the guest dials
                        session = await self._accept(ws_nursery, listener, vm_id, token)
                    else:  # adopted: attach anew
                        opened = await handle.open_channel()
                        session = await self._attach(opened, vm_id, token)
                if listener is not None:  # one connection per VM: nobody else may dial in
                    await listener.aclose()
                session.on_tool_ran = self._tool_ran
                self.session = session
                self.ready_seconds = trio.current_time() - started
                steps.mark("hello")
                if template is not None:
                    traced = steps.current()
                    self.rt.event(
                        "restored",
                        self.name,
                        role=self.group.name,
                        template=template.short,
                        seconds=round(self.ready_seconds, 3),
                        # of which: the VMM up with the state loaded and running
                        vmm_seconds=round(self.vmm_seconds, 3),
                        # where the time went, in ms from the incarnation's start
                        steps=traced.as_ms() if traced is not None else {},
                    )
                self._boot_done()
                self.tracker.ready(trio.current_time())
                self._fire(Event.READY)
                resumed = adopted and self._take_back(session.hello.resume)
                if adopted:
                    resume = session.hello.resume
                    self.rt.event(
                        "adopted",
                        self.name,
                        role=self.group.name,
                        pid=handle.pid,
                        agent=self.promoted_as,
                        tasks=list(resume.tasks) if resume is not None else [],
                        seconds=round(self.ready_seconds, 3),
                    )
                    log.info("%s adopted (pid %d)", self.name, handle.pid)
                if self.agent is not None and not resumed:
                    nursery.start_soon(self._promote_again, outcome, nursery.cancel_scope)
                await session.serve()
            except trio.TooSlowError:
                outcome.reason = f"guest did not connect within {self.rt.control.boot_timeout:g}s"
            except GuestLost as exc:
                outcome.reason = exc.reason
                outcome.broke_protocol = isinstance(exc, GuestViolation | HeartbeatMissed)
                if not outcome.broke_protocol:
                    # The guest is going away by itself: learn how it exited.
                    with trio.move_on_after(1.0):
                        await self._exited.wait()
            except p.ProtocolError as exc:
                outcome.reason = str(exc)
                outcome.broke_protocol = True
            except DriverError as exc:  # the channel device could not be opened
                outcome.reason = str(exc)
            finally:
                if opened is not None:
                    with trio.CancelScope(shield=True):
                        await opened.aclose()
            nursery.cancel_scope.cancel()

    def _take_back(self, resume: p.Resume | None) -> bool:
        """An adopted guest that says it is still at work as this child's agent (a
        named one, or its task runner) is taken as it is: promoted, not promoted
        again. True if it was."""
        who = self.agent.name if self.agent is not None else self.name
        if not self.claimed or resume is None or resume.agent != who:
            return False
        self._fire(Event.PROMOTE)
        self.promoted_as = who
        self._fire(Event.PROMOTED)
        return True

    async def _accept(
        self, ws_nursery: trio.Nursery, listener: trio.SocketListener, vm_id: str, token: str
    ) -> ControlSession:
        return await accept_dialled(
            ws_nursery, listener, vm_id=vm_id, token=token, spec=self.rt.control, hostname=self.name
        )

    async def _say_attach(self) -> FramedChannel | None:
        """On a channel device, the VM's port with Attach said on it, at once: the
        guest answers while the host opens the VM's listeners. None for a guest
        that dials."""
        if self.rt.driver.describe().channel is ChannelKind.DIALLED:
            return None
        assert self.handle is not None
        return await say_attach(await self.handle.open_channel(), self.rt.control)

    async def _attach(self, port: trio.abc.Stream, vm_id: str, token: str) -> ControlSession:
        return await attach(
            port, vm_id=vm_id, token=token, spec=self.rt.control, hostname=self.name
        )

    async def _promote_again(self, outcome: Outcome, scope: trio.CancelScope) -> None:
        """A named agent's VM came back: make it that agent again."""
        try:
            await self.promote(self.group.promotion_for(self))
        except GuestLost as exc:
            outcome.reason = f"promotion failed: {exc.reason}"
            outcome.broke_protocol = isinstance(exc, GuestViolation)
            scope.cancel()
        else:
            self.rt.event("agent_back", self.name, agent=self.promoted_as, role=self.group.name)


def loopback_listener() -> socket.socket:
    """A listening socket on a free loopback port: a VM's listener when it has no namespace."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        sock.bind(("127.0.0.1", 0))
        sock.listen(4)
    except OSError:
        sock.close()
        raise
    return sock
