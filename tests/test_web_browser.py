"""The dashboard in a real headless Chromium (Debian's, driven by Playwright), on a
live supervisor: log in through the form, see the pools and the VMs, then watch
an invoked agent appear and a task go from queued to done without a reload.
With IRC on and a SCRIPTED model server (``scripted_model.py``, a test double
named as such) behind the gateways: see the usage chart draw an agent's tokens
and what is said in #agents come in live.

``FIRECLAW_SCREENSHOT=PATH`` also saves the page at the end of the second test,
whose roles and model are the shipped config's (docs/dashboard.png was made so).
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Final

import pytest
from ircperson import Person
from scripted_model import ScriptedModel, text
from swarmctl import NOTHING, WAIT, Swarm, idle, role_yaml, swarm_yaml
from test_chat_irc import AGENTS, CONTROL, served
from test_chat_irc import irc_yaml as chat_irc_yaml
from test_swarm import free_port
from test_web import OPERATE, READ, http_yaml, start_web, url_of
from test_web_live import MODEL

CHROMIUM: Final = shutil.which("chromium") or "/usr/bin/chromium"
#: How long the page may take to show a change: as long as a VM may take to boot
#: on a loaded machine (the live update itself is well under a second).
SHOW_MS: Final = int(WAIT * 1000)

pytestmark = pytest.mark.skipif(
    not Path(CHROMIUM).exists(), reason="Debian's chromium is not installed (make setup does)"
)


@pytest.fixture
def open_dir() -> Iterator[Path]:
    """A directory the unprivileged agent user can look into, removed afterwards."""
    path = Path(tempfile.mkdtemp(prefix="fireclaw-web-"))
    path.chmod(0o755)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


@contextmanager
def chromium_page(problems: list[str]) -> Iterator[Any]:
    """A page of a headless Chromium, its errors and console errors into ``problems``."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        browser = pw.chromium.launch(
            executable_path=CHROMIUM,
            headless=True,
            timeout=SHOW_MS,
            args=[
                "--no-sandbox",
                "--disable-gpu",
                "--disable-background-networking",
                "--disable-component-update",
            ],
        )
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 900})
            page.set_default_timeout(SHOW_MS)  # a loaded machine: navigation too
            page.on("pageerror", lambda exc: problems.append(str(exc)))
            page.on(
                "console",
                lambda msg: problems.append(msg.text) if msg.type == "error" else None,
            )
            yield page
        finally:
            browser.close()


def log_in(page: Any, url: str, token: str, problems: list[str]) -> None:
    from playwright.sync_api import expect

    expect.set_options(timeout=SHOW_MS)
    page.goto(f"{url}/")
    expect(page.locator("body")).to_contain_text("log in at /login")  # no session yet
    page.goto(f"{url}/login")
    page.fill("#token", token)
    page.click("button[type=submit]")
    page.wait_for_url(f"{url}/")
    assert token not in page.url
    problems.clear()  # the 401s of the visit before logging in; none from here on
    expect(page.locator("#live")).to_have_text("live")


def test_the_dashboard_shows_the_fleet_live(tmp_path: Path, open_dir: Path) -> None:
    gate = open_dir / "gate"
    # One worker at a time, each task waiting for the gate: the second task stays
    # queued until the test opens it.
    harness = (
        'harness: {kind: command, command: ["sh", "-c", '
        f'"while [ ! -e {gate} ]; do sleep 0.05; done; echo done: $FIRECLAW_PROMPT"]}}\n'
    )
    swarm = start_web(
        tmp_path,
        role_yaml("worker", min_idle=1, max_active=1, extra=harness)
        + role_yaml("coder", min_idle=1, max_active=2),
    )
    try:
        swarm.wait_for(
            "idle workers and coders", lambda s: idle("worker", 1)(s) and idle("coder", 1)(s)
        )
        url = url_of(swarm)
        problems: list[str] = []
        with chromium_page(problems) as page:
            _see_the_fleet_live(swarm, page, url, gate, problems)
            assert problems == []
    finally:
        swarm.close()
    assert swarm.leftovers() == NOTHING


def _see_the_fleet_live(
    swarm: Swarm, page: object, url: str, gate: Path, problems: list[str]
) -> None:
    from playwright.sync_api import Page, expect

    assert isinstance(page, Page)
    log_in(page, url, OPERATE, problems)

    # The pools and the VMs of the running swarm.
    expect(page.locator('#roles tr[data-role="worker"] td.idle')).to_have_text("1")
    expect(page.locator('#roles tr[data-role="coder"] td.idle')).to_have_text("1")
    for vm in swarm.status()["agents"]:
        expect(page.locator(f'#agents tr[data-vm="{vm["name"]}"]')).to_contain_text(vm["role"])
    page.evaluate("window.fireclawNotReloaded = true")

    # An agent invoked from outside appears.
    swarm.api.post("/agents", {"role": "coder", "name": "ada"})
    expect(page.locator('#agents tr[data-agent="ada"]')).to_contain_text("coder")

    # A task waits in the queue behind a busy worker, then is done.
    first = swarm.api.post("/tasks", {"role": "worker", "prompt": "first"})
    swarm.wait_for("the first task claimed", lambda s: s["tasks"]["claimed"] == 1)
    second = swarm.api.post("/tasks", {"role": "worker", "prompt": "second"})
    assert swarm.api.get(f"/tasks/{second['id']}")["state"] == "queued"
    expect(page.locator(f'#tasks tr[data-task="{second["id"]}"]')).to_have_attribute(
        "data-state", "queued"
    )
    gate.touch()
    for task in (first, second):
        expect(page.locator(f'#tasks tr[data-task="{task["id"]}"]')).to_have_attribute(
            "data-state", "done"
        )
    expect(page.locator("#task-counts")).to_contain_text("done 2")

    # An operator scales a role from the page (its CSRF token goes along). What they
    # typed survives the live views that redraw the table before they click.
    coder = page.locator('#roles tr[data-role="coder"]')
    coder.locator("input.scale").fill("2")
    third = swarm.api.post("/tasks", {"role": "worker", "prompt": "third"})
    expect(page.locator(f'#tasks tr[data-task="{third["id"]}"]')).to_have_attribute(
        "data-state", "done"
    )
    expect(coder.locator("input.scale")).to_have_value("2")
    expect(coder.locator("td.target")).to_have_text("1")
    coder.locator("button").click()
    expect(coder.locator("td.target")).to_have_text("2")
    expect(coder.locator("td.idle")).to_have_text("2")
    (audit,) = swarm.events("http_command")
    assert audit["detail"]["command"] == "scale coder 2" and audit["detail"]["via"] == "session"
    assert page.evaluate("window.fireclawNotReloaded") is True


@pytest.mark.root
@pytest.mark.skipif(os.geteuid() != 0, reason="VMs in their own namespaces need root")
def test_the_dashboard_shows_usage_over_time_and_agents_talking(tmp_path: Path) -> None:
    from playwright.sync_api import expect

    # The shipped config's roles, on its model's name, answered by the scripted server.
    harness = "harness: {kind: chat, tool_mode: native, tools: [], max_steps: 2, timeout: 120}\n"
    roles = (
        f"\n  worker:\n    model: {MODEL}\n    pool: {{min_idle: 2}}\n    {harness}"
        f"  coder:\n    model: {MODEL}\n    pool: {{min_idle: 1}}\n    {harness}"
    )
    model = ScriptedModel(
        [text("Hello from alice."), text("Small machines wake; / each agent in its own box.")],
        models=(MODEL,),
    )
    port = free_port()
    op: Person | None = None
    with served(model) as (model_url, _):
        config = (
            f"models:\n  server: {model_url}\n"
            + swarm_yaml(roles, irc=chat_irc_yaml(port))
            + http_yaml(tmp_path)
        )
        swarm = Swarm(tmp_path, config)
        try:
            swarm.start()
            swarm.wait_for(
                "idle workers and coders", lambda s: idle("worker", 2)(s) and idle("coder", 1)(s)
            )
            url = url_of(swarm)
            op = Person(("127.0.0.1", port), "op").start(CONTROL, AGENTS)
            op.say(CONTROL, "!invoke worker alice")
            op.said(CONTROL, "op: alice is up: a worker agent on ", timeout=WAIT)
            op.expect(
                "alice joining #agents",
                lambda e: e.type == "join" and e.source.nick == "alice" and e.target == AGENTS,
                timeout=WAIT,
            )
            # A chat call before the page opens: the chart draws it when the page loads.
            op.say(AGENTS, "alice: hello")
            op.said(AGENTS, "op: Hello from alice.")
            swarm.wait_for("alice's call in the ledger", lambda _: swarm.events("model_call"))
            # And a task for a coder, done before the page opens.
            swarm.api.post("/tasks", {"role": "coder", "prompt": "A haiku about microVMs"})
            swarm.wait_for("the task done", lambda s: s["tasks"]["done"] == 1)
            problems: list[str] = []
            with chromium_page(problems) as page:
                log_in(page, url, READ, problems)
                # One band per role, stacked: coder's (first by name) on the axis,
                # worker's on top of it.
                band = page.locator('#usage-chart polygon[data-role="worker"]')
                expect(band).to_have_attribute("data-tokens", "15")  # 10 + 5, as scripted
                coder = page.locator('#usage-chart polygon[data-role="coder"]')
                expect(coder).to_have_attribute("data-tokens", "15")
                expect(page.locator("#usage-chart polygon")).to_have_count(2)
                heights = {}
                for role, shape in [("coder", coder), ("worker", band)]:
                    points = (shape.get_attribute("points") or "").split()
                    assert len(points) == 60  # its upper edge, then its lower one: 30 buckets
                    heights[role] = [float(p.split(",")[1]) for p in points]
                coder_top, coder_base = heights["coder"][:30], heights["coder"][30:]
                worker_top, worker_base = heights["worker"][:30], heights["worker"][30:]
                assert len(set(coder_base)) == 1  # the axis
                assert min(coder_top) < coder_base[0]  # it rises where its call was
                assert worker_base == coder_top[::-1]  # the worker's band sits on it
                # and so reaches higher where the worker's call was (the two calls may
                # fall in one bucket or in two).
                assert all(w <= c for w, c in zip(worker_top, coder_top, strict=True))
                assert worker_top != coder_top
                expect(page.locator('#usage-legend span[data-role="worker"]')).to_contain_text(
                    "worker 15"
                )

                # What was said before the page opened, then a line said now, live.
                chat = page.locator("#chat li")
                expect(chat.nth(0)).to_contain_text("<op> alice: hello")
                expect(chat.nth(1)).to_contain_text("<alice> op: Hello from alice.")
                page.evaluate("window.fireclawNotReloaded = true")
                op.say(AGENTS, "<b>not bold</b> \x02nor this\x02")
                expect(chat).to_have_count(3)
                expect(chat.nth(2).locator(".said")).to_have_text("<b>not bold</b> nor this")
                assert page.locator("#chat b").count() == 0  # text, never markup
                expect(page.locator("#chat-channel")).to_have_text(AGENTS)
                assert page.evaluate("window.fireclawNotReloaded") is True
                assert problems == []
                shot = os.environ.get("FIRECLAW_SCREENSHOT")
                page.screenshot(path=shot or str(tmp_path / "dashboard.png"), full_page=True)
            assert swarm.stop() == 0
            assert swarm.leftovers() == NOTHING
        finally:
            if op is not None:
                op.stop()
            swarm.close()
