"""The overseer: the swarm's operator seat on IRC.

It joins the control channel and obeys ``!commands`` (``commands.py``) from
operators only: ``operators.OperatorGate`` decides, by the allowlist masks in
``irc.operators`` AND the proof ``irc.operator_auth`` asks for (by default,
being an IRC operator: WHOIS shows numeric 313 after ``/OPER``). Anyone else
gets a polite refusal, recorded as an event. Each sender has a token bucket of
commands (``irc.command_rate``). Commands run in tasks of their own, so a slow
one (``!invoke`` waits for a VM) never holds up the others.

It announces from the supervisor's event feed: crashes and restarts, failed
VMs, degraded and recovered roles, named agents coming back, finished tasks.

It also sits, silent, in the agents' channel and keeps what is said there in
``agents_log`` (supervisor/chatlog.py), which the dashboard shows, with every
secret the supervisor holds redacted.

In cluster mode every host runs one, and all sit in the one linked control
channel; only the leader's (``cluster.py``) obeys commands there, or answers
them. The others stay silent until their host takes the lead.
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping
from typing import TYPE_CHECKING, Final

import trio
from fireclaw.config import IrcSpec
from fireclaw.guest_daemon.irc import IrcClient
from fireclaw.guest_daemon.irc_events import Disconnected, IrcConfig, Message
from fireclaw.guest_daemon.irc_wire import casefold
from fireclaw.guest_daemon.lines import one_line
from fireclaw.supervisor import commands as c
from fireclaw.supervisor.api import ControllerError
from fireclaw.supervisor.budget import period_bounds
from fireclaw.supervisor.chatlog import ChatLog, redact
from fireclaw.supervisor.irc_credentials import IrcCredentials
from fireclaw.supervisor.ircd_operators import operator_blocks
from fireclaw.supervisor.operators import (
    Action,
    Obey,
    OperatorGate,
    Refuse,
    Throttle,
    Whois,
)
from fireclaw.supervisor.secretfile import SecretFileError
from fireclaw.supervisor.state import UsageBy

if TYPE_CHECKING:
    from fireclaw.supervisor.daemon import Supervisor

log = logging.getLogger("fireclaw.overseer")

#: Lines one answer may take in the channel; the rest is summarised.
MAX_ANSWER_LINES: Final = 12
#: Characters of a waiting task's question shown: its line stays one IRC line.
MAX_QUESTION_SHOWN: Final = 300

#: What a refused sender is told, per ``irc.operator_auth``.
REFUSAL: Final = {
    "oper": "sorry, only the swarm's IRC operators may give me orders (/OPER first)",
    "account": "sorry, only the swarm's operators, logged in to their accounts, may give me orders",
    "hostmask": "sorry, only the swarm's operators may give me orders",
}


class Overseer:
    def __init__(
        self,
        supervisor: Supervisor,
        spec: IrcSpec,
        address: tuple[str, int],
        credentials: IrcCredentials | None = None,
        *,
        leads: bool = True,
    ) -> None:
        """``leads``: whether it obeys commands from the start (a single host's
        does; in a fleet, only once ``take_lead`` is called)."""
        credentials = credentials or IrcCredentials()
        self.sup = supervisor
        self.leads = leads
        self.spec = spec
        self.channel = spec.control_channel
        self.client = IrcClient(
            IrcConfig(
                host=address[0],
                port=address[1],
                nick=spec.overseer_nick,
                username="overseer",
                realname="fireclaw-swarm overseer",
                password=credentials.password,
                sasl_username=credentials.sasl_username,
                sasl_password=credentials.sasl_password,
                channels=(spec.control_channel, spec.agents_channel),
            )
        )
        self._credentials = credentials
        self._oper_passwords: tuple[str, ...] = ()
        self.agents_log = ChatLog(spec.agents_channel, secrets=self._secrets)
        self._said = trio.Event()  # set, and replaced, at each line kept in agents_log
        self.gate = OperatorGate(spec)
        # WHOIS questions go out in the order asked: answers are matched in order. The
        # gate keeps at most operators.MAX_WAITING questions open, and those not sent when the
        # connection drops are dropped with them, so this never holds more.
        self._whois_in, self._whois_out = trio.open_memory_channel[str](math.inf)
        if spec.operator_auth == "hostmask":
            log.warning(
                "irc.operator_auth is hostmask: anyone who can connect from an address"
                " matching irc.operators can command the swarm"
            )

    @property
    def nick(self) -> str:
        return self.spec.overseer_nick

    async def take_lead(self) -> None:
        """Obey commands from now on, and say so in the control channel (once
        connected, if it is not yet)."""
        self.leads = True
        log.info("%s leads the fleet now", self.nick)
        await self.client.privmsg(self.channel, f"{self.nick} leads the fleet now")

    async def lose_lead(self) -> None:
        """Stop obeying commands: another host's overseer is about to lead."""
        self.leads = False
        log.warning("%s no longer leads the fleet: it lost the shared database", self.nick)
        await self.client.privmsg(
            self.channel, f"{self.nick} no longer leads the fleet: its host lost the database"
        )

    async def wait_said(self, after: int) -> None:
        """Return once ``agents_log`` holds a line with an id above ``after``;
        bound it at the call site."""
        while self.agents_log.last_id <= after:
            await self._said.wait()

    def _secrets(self) -> list[str]:
        """Every secret a line said in the agents' channel might carry."""
        upstream = self.sup.upstream()
        found = [
            self._credentials.password,
            self._credentials.sasl_password,
            upstream.api_key if upstream is not None else None,
        ]
        return [s for s in found if s] + list(self._oper_passwords)

    def _read_oper_passwords(self) -> tuple[str, ...]:
        """The managed server's operator passwords (from their files): for redaction."""
        if not self.spec.is_managed:
            return ()
        try:
            blocks = operator_blocks(self.spec.managed.operators, self.sup.state_dir)
        except SecretFileError:
            return ()  # the managed server refused them too, and said so
        return tuple(b.password for b in blocks)

    async def run(self) -> None:
        feed = self.sup.watch()
        self._oper_passwords = await trio.to_thread.run_sync(self._read_oper_passwords)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self.client.run)
            nursery.start_soon(self._announce, feed)
            nursery.start_soon(self._ask_whois)
            async for event in self.client.events():
                if isinstance(event, Message):
                    self._on_message(event, nursery)
                    continue
                if isinstance(event, Disconnected):
                    self._drop_unsent_whois()
                self._act(self.gate.on_event(event, trio.current_time()), nursery)

    def _drop_unsent_whois(self) -> None:
        with contextlib.suppress(trio.WouldBlock):
            while True:
                self._whois_out.receive_nowait()

    async def _ask_whois(self) -> None:
        async for nick in self._whois_out:
            await self.client.whois(nick)

    # --- commands ------------------------------------------------------------------

    def _on_message(self, msg: Message, nursery: trio.Nursery) -> None:
        if not msg.private and casefold(msg.target) == casefold(self.agents_log.channel):
            self.agents_log.add(msg.source, msg.text, time.time(), action=msg.action)
            self._said.set()
            self._said = trio.Event()
        if not msg.private and msg.target.lower() != self.channel.lower():
            return
        if not self.leads:
            return  # another host's overseer answers
        command = c.parse(msg.text)
        if command is None:
            return
        self._act(self.gate.submit(msg, command, trio.current_time()), nursery)

    def _act(self, actions: list[Action], nursery: trio.Nursery) -> None:
        """Carry out the gate's decisions: obey, refuse, say we are throttled, ask."""
        for action in actions:
            match action:
                case Whois(nick=nick):
                    self._whois_in.send_nowait(nick)
                case Obey(message=msg, command=command):
                    self.sup.event("command", msg.source, mask=_mask(msg), command=msg.text[:200])
                    nursery.start_soon(self._run_command, command, self._sayer(msg))
                case Refuse(message=msg, reason=reason):
                    self.sup.event(
                        "refused", msg.source, mask=_mask(msg), command=msg.text[:200], why=reason
                    )
                    say = self._sayer(msg)
                    nursery.start_soon(say, REFUSAL[self.spec.operator_auth])
                case Throttle(message=msg, first=True):
                    nursery.start_soon(self._sayer(msg), "too many commands; give me a moment")

    def _sayer(self, msg: Message) -> Callable[[str], Awaitable[None]]:
        """How to answer ``msg``: privately to a private message, else in the channel."""
        reply_to = msg.source if msg.private else self.channel
        prefix = "" if msg.private else f"{msg.source}: "

        async def say(text: str) -> None:
            await self.client.privmsg(reply_to, prefix + text)

        return say

    async def _run_command(
        self, command: c.Command | c.Usage, say: Callable[[str], Awaitable[None]]
    ) -> None:
        try:
            lines = await self._execute(command)
        except ControllerError as exc:
            lines = [exc.message]
        except Exception as exc:  # a bug must not take the overseer down
            log.exception("overseer: %r failed", command)
            lines = [f"that failed: {type(exc).__name__}"]
        if len(lines) > MAX_ANSWER_LINES:
            more = len(lines) - MAX_ANSWER_LINES + 1
            lines = [
                *lines[: MAX_ANSWER_LINES - 1],
                f"(and {more} more; see fireclaw-swarm status)",
            ]
        for line in lines:
            await say(line)

    async def _execute(self, command: c.Command | c.Usage) -> list[str]:
        sup = self.sup
        match command:
            case c.Usage(message=message):
                return [message]
            case c.Help(topic=None):
                return [f"{usage}: {what}" for usage, what in c.HELP.values()]
            case c.Help(topic=str(topic)):
                usage, what = c.HELP[topic]
                return [f"{usage}: {what}"]
            case c.Invoke(role=role, name=name, model=model):
                done = await sup.place_agent(role, name, model)
                return [_invoked(done)]
            case c.Destroy(name=name):
                done = await sup.destroy_anywhere(name)
                if "host" in done:
                    return [
                        f"{name} is gone from host {done['host']} (it stops within a heartbeat)"
                    ]
                return [f"{name} is gone"]
            case c.Stop(name=name):
                await sup.cancel(name, "stopped by an operator on IRC")
                return [f"{name}: stopped what it was doing"]
            case c.List():
                return self._list()
            case c.Status():
                return self._status()
            case c.Templates():
                return [
                    f"{name}: {role.description or 'no description'} (model {role.model})"
                    for name, role in sup.config.roles.items()
                ]
            case c.Scale(role=role, n=n):
                await sup.scale(role, n)
                return [f"{role}: keeping {n} idle"]
            case c.Task(role=role, prompt=prompt):
                task = await sup.submit_task(role, prompt)
                return [f"task {task['id']} queued for {role}; I will say here when it is done"]
            case c.Answer(name=name, text=text):
                task = await sup.answer(name, text)
                return [
                    f"task {task['id']} resumes with your answer; I will say here when it is done"
                ]
            case c.Model(name=name, model=model):
                await sup.retune(name, model=model)
                return [f"{name} now uses {model}"]
            case c.Persona(name=name, text=text):
                await sup.retune(name, persona=text)
                return [f"{name} has a new persona"]
            case c.Reset(name=name):
                result = await sup.reset(name)
                return [f"{name}: reset ({result.get('reset', 0)} cleared)"]
            case c.Reload():
                result = await sup.reload()
                if not result.get("ok"):
                    return [f"reload rejected: {result.get('error')}"]
                names = result.get("changed")
                changed = (
                    ", ".join(map(str, names)) if isinstance(names, list) and names else "nothing"
                )
                return [f"reloaded; changed: {changed}"]
            case c.UsageOf(name=name):
                return self._usage(name)
            case c.Fleet():
                return sup.fleet_lines()
            case c.Drain(host=host, draining=draining):
                await sup.drain(host, draining)
                if draining:
                    return [f"host {host} drains: it says here when it starts and when it is done"]
                return [f"host {host} is told to stop draining"]
        return ["I do not know that one; try !help"]

    def _usage(self, name: str | None) -> list[str]:
        """Tokens since the budget period began: per agent, or of one agent or role."""
        budgets = self.sup.budgets
        since, _ = period_bounds(budgets.spec.period, time.time())
        store = self.sup.store
        if name is None:
            rows = store.usage(by="agent", since=since)
        else:
            by: UsageBy = "role" if name in self.sup.groups else "agent"
            rows = store.usage(by=by, since=since, key=name)
        period = budgets.spec.period
        if not rows:
            return [f"no model calls this {period}" + (f" by {name}" if name else "")]
        lines = [
            f"{r.key or '(task runners)'}: {r.tokens} tokens in {r.calls} calls this {period}"
            f" ({r.prompt_tokens} prompt, {r.completion_tokens} completion)"
            for r in rows
        ]
        for scope, why in budgets.exhausted.items():
            lines.append(f"budget {scope}: {why}")
        return lines

    def _status(self) -> list[str]:
        lines = []
        for name, group in self.sup.groups.items():
            n = group.counts()
            degraded = ", DEGRADED" if n["degraded"] else ""
            lines.append(
                f"{name}: {n['idle']} idle, {n['active']} active, {n['starting']} starting, "
                f"{n['failed']} failed{degraded}"
            )
        return lines or ["no roles"]

    def _list(self) -> list[str]:
        lines = []
        for group in self.sup.groups.values():
            for a in group.snapshot():
                who = f"{a['agent']} on {a['name']}" if a["agent"] else str(a["name"])
                lines.append(f"{who} ({a['role']}, {a['state']}, restarts {a['restarts']})")
        return lines or ["no VMs"]

    # --- announcements ---------------------------------------------------------------

    async def _announce(
        self, feed: trio.MemoryReceiveChannel[tuple[str, str, dict[str, object]]]
    ) -> None:
        async for kind, subject, detail in feed:
            line = self._announcement(kind, subject, detail)
            if line is not None and self.client.registered:
                await self.client.privmsg(self.channel, line)

    def _announcement(self, kind: str, subject: str, d: dict[str, object]) -> str | None:
        match kind:
            case "crashed":
                if d.get("restart"):
                    return f"{subject} crashed ({d.get('reason')}); restarting in {d.get('delay')}s"
                return f"{subject} crashed ({d.get('reason')})"
            case "failed":
                return f"{subject} failed and will not be restarted: {d.get('reason')}"
            case "degraded":
                return f"role {subject} is degraded: most of its VMs failed (!reset {subject})"
            case "recovered":
                return f"role {subject} recovered"
            case "agent_back":
                return f"{d.get('agent')} is back on {subject}"
            case "task_done":
                return self._task_line(d.get("task_id"))
            case "task_waiting":
                return question_line(subject, d, self._secrets())
            case "task_requeued" if d.get("state") == "failed":
                return self._task_line(d.get("task_id"))
            case "ircd_crashed":
                return None  # nobody is here to hear it
            case "ircd_link_up":
                return f"IRC server {d.get('peer')} joined the network"
            case "ircd_link_down":
                return (
                    f"netsplit: IRC server {d.get('peer')} left the network ({d.get('reason')});"
                    " its host's agents are out of reach from here"
                )
            case "ircd_link_refused":
                return f"IRC server {d.get('peer')} was refused a link: {d.get('reason')}"
            case "budget_exhausted":
                return (
                    f"budget {subject} is spent for this {d.get('period')}"
                    f" ({d.get('spent')} of {d.get('limit')} tokens): its model calls are"
                    " refused and its tasks wait; raise it in swarm.yaml and !reload"
                )
            case "host_draining":
                return (
                    f"host {subject} drains: it claims no new tasks, finishes its"
                    f" {d.get('tasks')} running and stops its {d.get('warm')} warm VMs"
                )
            case "host_drained":
                return (
                    f"host {subject} is drained: no tasks running, no warm VMs (!undrain {subject})"
                )
            case "host_undrained":
                return f"host {subject} no longer drains: it claims tasks and keeps warm VMs again"
            case "agent_up":
                role, vm = d.get("role"), d.get("vm")
                return f"{subject} is up on host {d.get('host')}: a {role} agent on {vm}"
            case "budget_resumed":
                return f"budget {subject} is open again: its work resumes"
            case "account_exhausted":
                kind = "rate-limited" if d.get("refusal") == "rate_limit" else "out of quota"
                said = "as its provider said" if d.get("said") else "by the swarm's backoff"
                return (
                    f"account {d.get('account')} of role {subject} is {kind}: it rests until"
                    f" {_utc(d.get('until'))} ({said}); tasks run on the role's other accounts"
                )
            case "accounts_resting":
                back = d.get("until")
                when = f"until {_utc(back)}" if back is not None else "until its budgets reopen"
                return f"every account of role {subject} rests: its tasks wait {when}"
        return None

    def _task_line(self, task_id: object) -> str | None:
        if not isinstance(task_id, int):
            return None
        task = self.sup.store.get_task(task_id)
        if task is None:
            return None
        result = " ".join((task.result or "").split())
        if len(result) > 300:
            result = result[:300] + "..."
        verdict = "done" if task.state == "done" else f"{task.state} (exit {task.exit_code})"
        return f"task {task.id} ({task.role}) {verdict}: {result or '(no output)'}"


def question_line(asked_by: str, d: Mapping[str, object], secrets: Iterable[str]) -> str | None:
    """The announcement of a ``task_waiting`` event: which task asks what, and how
    to answer it. The question is the guest's word: made one plain line, cut to
    ``MAX_QUESTION_SHOWN``, every one of ``secrets`` taken out."""
    task_id, question = d.get("task_id"), d.get("question")
    if not isinstance(task_id, int) or not isinstance(question, str):
        return None
    text = one_line(redact(question, secrets), MAX_QUESTION_SHOWN)
    return (
        f"task {task_id} ({d.get('role')}) on {asked_by} asks: {text} (!answer task-{task_id} TEXT)"
    )


def _utc(at: object) -> str:
    """A unix time as an operator reads it on IRC: ``2026-12-01 03:04:05 UTC``."""
    if not isinstance(at, int | float) or isinstance(at, bool) or not math.isfinite(at):
        return "a time not known"
    return time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(at))


def _invoked(done: dict[str, object]) -> str:
    """The answer to ``!invoke``: up here, placed on another host, or an
    existing agent left on the host with its workspace."""
    name, role, host = done["name"], done["role"], done.get("host")
    if "vm" in done:
        on = f" on host {host}" if host is not None else ""
        return f"{name} is up{on}: a {role} agent on {done['vm']}"
    if done.get("existing"):
        return f"{name} lives on host {host} with its workspace: it comes back there"
    return (
        f"{name} goes to host {host}, the least loaded of role {role}: it says here when it is up"
    )


def _mask(msg: Message) -> str:
    return f"{msg.source}!{msg.user}@{msg.host}"
