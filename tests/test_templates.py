"""Retrying a snapshot template that could not be made, timed exactly under a fake clock.

The real ``Templates`` runs here with a real ``Runtime`` and state database; only
``_boot_and_snapshot`` is scripted (no QEMU): each attempt fails or succeeds as
the script says, so the backoff between attempts can be checked to the virtual
second.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TypeVar, cast

import msgspec
import pytest
import trio
import trio.testing
from fireclaw.config import Role, parse_config
from fireclaw.config.model import Resources
from fireclaw.pool.backoff import MAX_EXPONENT
from fireclaw.pool.drivers.base import (
    CONTROL_PORT,
    Capability,
    Driver,
    DriverError,
    DriverInfo,
    VmHandle,
    VmSpec,
)
from fireclaw.pool.runtime import Runtime
from fireclaw.pool.template_make import Template, TemplateError
from fireclaw.pool.templates import RETRY_BASE, RETRY_MAX, Templates, retry_delay
from fireclaw.supervisor.state import Store

#: Long enough for every retry a test waits for, short of a hang.
DEADLINE = 3600.0

T = TypeVar("T")


@pytest.fixture
def clock() -> trio.testing.MockClock:
    """pytest-trio's ``autojump_clock``: ``ScriptedTemplates`` does its file work
    on the event loop, so nothing runs while the clock jumps."""
    return trio.testing.MockClock(autojump_threshold=0)


class FakeDriver:
    """What ``Templates`` reads of a driver here: its description (the key's inputs)."""

    name = "fake"
    outlives_supervisor = False

    def __init__(self) -> None:
        #: A restore of the spec named here fails with that reason, or waits for that event.
        self.restores: dict[str, str | trio.Event] = {}

    async def restore(self, spec: VmSpec, snapshot: Path) -> VmHandle:
        outcome = self.restores[cast(str, spec)]
        if isinstance(outcome, str):
            raise DriverError(outcome)
        await outcome.wait()
        return cast(VmHandle, object())

    def describe(self) -> DriverInfo:
        return DriverInfo(
            name=self.name,
            capabilities=frozenset(Capability),
            key_inputs={"image": "image-1", "accel": "tcg"},
        )


class Events:
    """The runtime's events, in order, with the virtual time each was sent at."""

    def __init__(self) -> None:
        self.seen: list[tuple[float, str, dict[str, object]]] = []
        self._changed = trio.Event()

    def __call__(self, kind: str, subject: str, detail: dict[str, object]) -> None:
        self.seen.append((trio.current_time(), kind, detail))
        self._changed.set()
        self._changed = trio.Event()

    def of(self, kind: str) -> list[tuple[float, dict[str, object]]]:
        return [(t, d) for t, k, d in self.seen if k == kind]

    async def wait_for(self, kind: str, count: int = 1) -> None:
        while len(self.of(kind)) < count:
            await self._changed.wait()


class ScriptedTemplates(Templates):
    """Attempt n for a key fails while n <= ``fail``. Each attempt sets ``began``;
    while ``gate`` is an event not set yet, attempts wait for it."""

    def __init__(self, rt: Runtime, directory: Path, *, fail: int) -> None:
        super().__init__(rt, cast(Driver, FakeDriver()), directory)
        self.fail = fail
        self.attempts: dict[str, list[float]] = {}
        self.in_flight = 0
        self.most_in_flight = 0
        self.began = trio.Event()
        self.gate: trio.Event | None = None
        # Its file work runs on the event loop: a worker thread would let the fake
        # clock jump (to a test's deadline) while the thread runs on a busy machine.
        self._run_sync = _inline

    async def _boot_and_snapshot(self, key: str, role: Role) -> Template:
        times = self.attempts.setdefault(key, [])
        times.append(trio.current_time())
        self.began.set()
        self.in_flight += 1
        self.most_in_flight = max(self.most_in_flight, self.in_flight)
        try:
            if self.gate is not None:
                await self.gate.wait()
            if len(times) <= self.fail:
                raise TemplateError(f"boot {len(times)} timed out")
        finally:
            self.in_flight -= 1
        self.rt.event("template_made", f"template-{key[:16]}", role=role.name)
        return Template(
            key=key,
            snapshot=self.directory / f"{key[:16]}.snap",
            vm_id="tpl",
            token="secret",
            port=CONTROL_PORT,
        )


async def _inline(fn: Callable[..., T], *args: object) -> T:
    return fn(*args)


def make_templates(tmp_path: Path, *, fail: int) -> tuple[ScriptedTemplates, Role, Events]:
    config = parse_config(
        "version: 1\nroles:\n  worker: {harness: {command: ['true']}}\n",  # no model server
        path=tmp_path / "swarm.yaml",
    )
    events = Events()
    rt = Runtime(
        driver=cast(Driver, FakeDriver()),
        store=Store.open(tmp_path / "db"),
        state_dir=tmp_path,
        control=config.control,
        stop=config.stop,
        isolate_net=False,
        use_cgroups=False,
        uniform=lambda lo, hi: hi,  # the top of the jitter range: exact delays
        on_event=events,
    )
    return ScriptedTemplates(rt, tmp_path / "templates", fail=fail), config.roles["worker"], events


def since(t0: float, times: list[float]) -> list[float]:
    return [round(t - t0, 3) for t in times]


async def test_a_failed_template_is_retried_with_backoff_until_it_is_made(
    tmp_path: Path, clock: trio.testing.MockClock
) -> None:
    templates, role, events = make_templates(tmp_path, fail=3)
    key = templates.key_for(role)
    async with trio.open_nursery() as nursery:
        await nursery.start(templates.run, set())
        t0 = trio.current_time()
        with trio.fail_after(DEADLINE):
            assert await templates.get(role) is None  # the first attempt failed: cold boot
        assert trio.current_time() == t0
        assert templates.describe(role) == (
            "cold boot (no snapshot template: boot 1 timed out; retrying in 5s)"
        )

        # While it fails, get() answers at once and the VM cold-boots.
        await trio.sleep(2)
        assert await templates.get(role) is None
        assert trio.current_time() == t0 + 2
        assert templates.describe(role).endswith("; retrying in 3s)")

        with trio.fail_after(DEADLINE):
            await events.wait_for("template_failed", 2)
        assert templates.describe(role) == (
            "cold boot (no snapshot template: boot 2 timed out; retrying in 10s)"
        )

        with trio.fail_after(DEADLINE):
            await events.wait_for("template_made")
        # Attempts after 5, 10 and 20 s: the delay doubles from RETRY_BASE.
        assert since(t0, templates.attempts[key]) == [0.0, 5.0, 15.0, 35.0]
        retries = events.of("template_retry")
        assert [round(t - t0, 3) for t, _ in retries] == [5.0, 15.0, 35.0]
        assert [(d["attempt"], d["delay"]) for _, d in retries] == [(2, 5.0), (3, 10.0), (4, 20.0)]
        failed = [d for _, d in events.of("template_failed")]
        assert [(d["attempt"], d["retry_in"]) for d in failed] == [(1, 5.0), (2, 10.0), (3, 20.0)]
        assert failed[-1]["reason"] == "boot 3 timed out"
        assert templates.most_in_flight == 1

        made_at = trio.current_time()
        template = await templates.get(role)
        assert trio.current_time() == made_at
        assert template is not None and template.key == key
        assert templates.describe(role) == f"restored from snapshot template {template.short}"
        templates.release(template)

        # Made means done: no attempt after it, however long we wait.
        await trio.sleep(10 * RETRY_MAX)
        assert len(templates.attempts[key]) == 4
        nursery.cancel_scope.cancel()


async def test_the_delay_is_capped_and_there_is_one_attempt_at_a_time(
    tmp_path: Path, clock: trio.testing.MockClock
) -> None:
    templates, role, events = make_templates(tmp_path, fail=1000)
    key = templates.key_for(role)
    async with trio.open_nursery() as nursery:
        await nursery.start(templates.run, set())
        t0 = trio.current_time()
        with trio.fail_after(DEADLINE):
            assert await templates.get(role) is None
            await events.wait_for("template_failed", 9)
        # 5, 10, 20, 40, 80, 160, then RETRY_MAX (300) from then on.
        assert since(t0, templates.attempts[key]) == [0, 5, 15, 35, 75, 155, 315, 615, 915]

        # An attempt under way: VMs still cold-boot at once, and asking again
        # does not start another attempt.
        templates.gate = trio.Event()
        with trio.fail_after(DEADLINE):
            await events.wait_for("template_retry", 9)
        assert trio.current_time() - t0 == 1215
        assert templates.describe(role) == (
            "cold boot (no snapshot template: boot 9 timed out; retrying now)"
        )
        for _ in range(3):
            assert await templates.get(role) is None
        assert trio.current_time() - t0 == 1215
        await trio.sleep(RETRY_MAX * 3)
        assert len(templates.attempts[key]) == 10
        assert templates.most_in_flight == 1
        templates.gate.set()
        templates.gate = None
        with trio.fail_after(DEADLINE):
            await events.wait_for("template_failed", 10)
        assert templates.describe(role).endswith("boot 10 timed out; retrying in 300s)")
        nursery.cancel_scope.cancel()


async def test_a_key_nobody_wants_any_more_is_not_retried(
    tmp_path: Path, clock: trio.testing.MockClock
) -> None:
    templates, role, events = make_templates(tmp_path, fail=1000)
    old_key = templates.key_for(role)
    async with trio.open_nursery() as nursery:
        await nursery.start(templates.run, set())
        with trio.fail_after(DEADLINE):
            assert await templates.get(role) is None
            await events.wait_for("template_failed", 2)
        assert len(templates.attempts[old_key]) == 2

        # The role now asks for another shape (a new key) while the old one waits
        # for its third attempt: the old key is not tried again.
        more = Resources(vcpus=role.resources.vcpus, memory_mib=2 * role.resources.memory_mib)
        bigger = msgspec.structs.replace(role, resources=more)
        new_key = templates.key_for(bigger)
        assert new_key != old_key
        with trio.fail_after(DEADLINE):
            assert await templates.get(bigger) is None
        await trio.sleep(10 * RETRY_MAX)
        assert len(templates.attempts[old_key]) == 2
        assert len(templates.attempts[new_key]) > 2  # the new key is, meanwhile

        # The role is removed while an attempt for its key is under way: that
        # attempt ends, and no other follows.
        templates.gate = trio.Event()
        templates.began = trio.Event()
        with trio.fail_after(DEADLINE):
            await templates.began.wait()
        assert templates.in_flight == 1
        templates.forget(role.name)
        failures = len(events.of("template_failed"))
        templates.gate.set()
        with trio.fail_after(DEADLINE):
            await events.wait_for("template_failed", failures + 1)
        assert "retry_in" not in events.of("template_failed")[-1][1]
        attempts = len(templates.attempts[new_key])
        await trio.sleep(10 * RETRY_MAX)
        assert len(templates.attempts[new_key]) == attempts
        assert templates.describe(role) == "snapshot template: not made yet"
        assert templates.most_in_flight == 1
        nursery.cancel_scope.cancel()


async def test_a_broken_template_keeps_its_files_while_another_clone_still_needs_them(
    tmp_path: Path, clock: trio.testing.MockClock
) -> None:
    """Two roles of one shape share a key: one's clone failing to restore (perhaps
    for a reason of its own) must not pull the files from under the other's."""
    templates, role, events = make_templates(tmp_path, fail=0)
    driver = cast(FakeDriver, templates.driver)
    async with trio.open_nursery() as nursery:
        await nursery.start(templates.run, set())
        with trio.fail_after(DEADLINE):
            first = await templates.get(role)
            second = await templates.get(role)
        assert first is not None and first is second
        first.snapshot.parent.mkdir(parents=True, exist_ok=True)
        first.snapshot.write_bytes(b"device state")
        driver.restores = {"a": "no room for its socket", "b": trio.Event()}

        with pytest.raises(DriverError):
            await templates.restore(cast(VmSpec, "a"), first)
        templates.release(first)
        assert [d["reason"] for _, d in events.of("template_dropped")] == ["no room for its socket"]
        assert first.snapshot.exists()  # the second clone has not restored yet
        assert "dropped" in templates.describe(role)

        # Asking for the key now waits for the broken template to go, then makes it anew.
        asked: list[Template | None] = []
        answered = trio.Event()

        async def ask() -> None:
            asked.append(await templates.get(role))
            answered.set()

        nursery.start_soon(ask)
        await trio.testing.wait_all_tasks_blocked()
        assert asked == [] and len(templates.attempts[first.key]) == 1

        async def restore_second() -> None:
            await templates.restore(cast(VmSpec, "b"), first)

        nursery.start_soon(restore_second)
        await trio.testing.wait_all_tasks_blocked()
        assert first.snapshot.exists()  # restoring from it
        driver_gate = driver.restores["b"]
        assert isinstance(driver_gate, trio.Event)
        driver_gate.set()
        with trio.fail_after(DEADLINE):
            await answered.wait()
        assert not first.snapshot.exists()  # nobody needed it any more
        again = asked[0]
        assert again is not None and again is not first
        assert len(templates.attempts[first.key]) == 2
        templates.release(first)  # the second clone ends: the new template is not touched
        assert templates.describe(role) == f"restored from snapshot template {again.short}"
        templates.release(again, settled=False)  # its clone never got to restore
        nursery.cancel_scope.cancel()


def test_retry_delay_is_full_jitter_doubling_to_a_cap() -> None:
    ranges: list[tuple[float, float]] = []

    def uniform(lo: float, hi: float) -> float:
        ranges.append((lo, hi))
        return (lo + hi) / 2

    delays = [retry_delay(n, uniform) for n in range(1, 10)]
    assert [hi for _, hi in ranges] == [5, 10, 20, 40, 80, 160, 300, 300, 300]
    assert all(lo == 0 for lo, _ in ranges)
    assert delays[0] == RETRY_BASE / 2
    assert retry_delay(10 * MAX_EXPONENT, uniform) == RETRY_MAX / 2  # no overflow
