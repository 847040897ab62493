"""The dashboard in a real headless Chromium (Debian's, driven by Playwright), on a
live supervisor: log in through the form, see the pools and the VMs, then watch
an invoked agent appear and a task go from queued to done without a reload.

``FIRECLAW_SCREENSHOT=PATH`` also saves the page at the end (docs/dashboard.png
was made so).
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Final

import pytest
from swarmctl import NOTHING, WAIT, Swarm, idle, role_yaml
from test_web import OPERATE, start_web, url_of

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


def test_the_dashboard_shows_the_fleet_live(tmp_path: Path, open_dir: Path) -> None:
    from playwright.sync_api import sync_playwright

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
                problems: list[str] = []
                page.on("pageerror", lambda exc: problems.append(str(exc)))
                page.on(
                    "console",
                    lambda msg: problems.append(msg.text) if msg.type == "error" else None,
                )
                _see_the_fleet_live(swarm, page, url, gate, problems)
                assert problems == []
                shot = os.environ.get("FIRECLAW_SCREENSHOT")
                page.screenshot(path=shot or str(tmp_path / "dashboard.png"), full_page=True)
            finally:
                browser.close()
    finally:
        swarm.close()
    assert swarm.leftovers() == NOTHING


def _see_the_fleet_live(
    swarm: Swarm, page: object, url: str, gate: Path, problems: list[str]
) -> None:
    from playwright.sync_api import Page, expect

    assert isinstance(page, Page)
    expect.set_options(timeout=SHOW_MS)
    page.goto(f"{url}/")
    expect(page.locator("body")).to_contain_text("log in at /login")  # no session yet
    page.goto(f"{url}/login")
    page.fill("#token", OPERATE)
    page.click("button[type=submit]")
    page.wait_for_url(f"{url}/")
    assert OPERATE not in page.url
    problems.clear()  # the 401s of the visit before logging in; none from here on

    # The pools and the VMs of the running swarm.
    expect(page.locator("#live")).to_have_text("live")
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

    # An operator scales a role from the page (its CSRF token goes along).
    coder = page.locator('#roles tr[data-role="coder"]')
    coder.locator("input.scale").fill("2")
    coder.locator("button").click()
    expect(coder.locator("td.target")).to_have_text("2")
    expect(coder.locator("td.idle")).to_have_text("2")
    (audit,) = swarm.events("http_command")
    assert audit["detail"]["command"] == "scale coder 2" and audit["detail"]["via"] == "session"
    assert page.evaluate("window.fireclawNotReloaded") is True
