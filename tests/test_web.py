"""The HTTP listener on a live supervisor: who gets in, what they may do, what it shows.

Each test runs a real ``fireclaw-swarm up`` (process backend) with an ``http:``
section on a free loopback port (``status`` says which) and talks to it with
real HTTP requests.
"""

from __future__ import annotations

import json
import re
import secrets
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Final

import pytest
import requests
from fireclaw.supervisor.web_openapi import document
from fireclaw.supervisor.webapp import PUBLIC, SECURE_HEADERS
from fireclaw.supervisor.webauth import LOGIN_FAILURES_BURST
from swarmctl import NOTHING, WAIT, Swarm, idle, role_yaml, swarm_yaml

#: Generous for one local request on a loaded machine; a hang fails the test.
TIMEOUT: Final = 30.0
READ: Final = "read-" + secrets.token_urlsafe(24)
OPERATE: Final = "oper-" + secrets.token_urlsafe(24)


def token_file(path: Path, token: str) -> str:
    path.write_text(token + "\n")
    path.chmod(0o600)
    return path.name


def http_yaml(root: Path, *, listen: str = "127.0.0.1:0", extra: str = "") -> str:
    read = token_file(root / "read.token", READ)
    operate = token_file(root / "operate.token", OPERATE)
    return (
        f'http:\n  listen: "{listen}"\n'
        f"  tokens:\n    - {{file: {read}, access: read}}\n"
        f"    - {{file: {operate}, access: operate}}\n" + extra
    )


def start_web(root: Path, roles: str, **kw: Any) -> Swarm:
    swarm = Swarm(root, swarm_yaml(roles) + http_yaml(root, **kw))
    swarm.start()
    return swarm


def url_of(swarm: Swarm) -> str:
    url = swarm.status()["http"]
    assert isinstance(url, str) and url.startswith("http://"), url
    return url


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def login(url: str, token: str) -> tuple[requests.Session, str]:
    """A browser-like session logged in with ``token``, and the page's CSRF token."""
    session = requests.Session()
    answer = session.post(
        f"{url}/login", data={"token": token}, headers={"Origin": url}, timeout=TIMEOUT
    )
    assert answer.status_code == 200 and answer.url == f"{url}/", answer.text
    csrf = answer.text.split('name="csrf-token" content="', 1)[1].split('"', 1)[0]
    assert len(csrf) > 20
    return session, csrf


@pytest.fixture
def web(tmp_path: Path) -> Iterator[tuple[Swarm, str]]:
    swarm = start_web(tmp_path, role_yaml("worker", min_idle=1, max_active=3))
    try:
        swarm.wait_for("an idle worker", idle("worker", 1))
        yield swarm, url_of(swarm)
    finally:
        swarm.close()
    assert swarm.leftovers() == NOTHING


def every_path(swarm: Swarm) -> list[str]:
    """Every GET route the listener has, with a real agent name filled in."""
    name = swarm.status()["agents"][0]["name"]
    api = [p.replace("{name}", name) for p in document()["paths"]]
    return ["/", "/metrics", "/v1/stream", "/static/dashboard.js", "/static/dashboard.css", *api]


# --- the gate ------------------------------------------------------------------------------


def test_without_a_token_everything_but_the_login_page_is_401(web: tuple[Swarm, str]) -> None:
    swarm, url = web
    for path in every_path(swarm):
        answer = requests.get(url + path, timeout=TIMEOUT)
        assert answer.status_code == 401, path
        assert answer.json() == {"error": "log in at /login or send Authorization: Bearer <token>"}
    for path, method in [("/v1/roles/worker/scale", "POST"), ("/v1/agents", "POST")]:
        assert requests.request(method, url + path, timeout=TIMEOUT).status_code == 401
    login_page = requests.get(f"{url}/login", timeout=TIMEOUT)
    assert login_page.status_code == 200 and 'name="token"' in login_page.text
    assert PUBLIC == {"/login", "/logout", "/static/login.css"}


@pytest.mark.parametrize(
    "authorization",
    [f"Bearer {READ}x", f"Bearer {READ[:-1]}", f"Basic {READ}", "Bearer ", f"bearer  {READ}"[:7]],
)
def test_a_wrong_token_is_401(web: tuple[Swarm, str], authorization: str) -> None:
    _, url = web
    answer = requests.get(f"{url}/v1/agents", headers={"Authorization": authorization})
    assert answer.status_code == 401


def test_a_token_sees_the_fleet_the_controller_sees(web: tuple[Swarm, str]) -> None:
    swarm, url = web
    agents = requests.get(f"{url}/v1/agents", headers=bearer(READ), timeout=TIMEOUT).json()
    status = swarm.status()
    assert [a["name"] for a in agents["agents"]] == [a["name"] for a in status["agents"]]
    assert all(
        a["memory_mib"] == 512 and a["backend"] == status["backend"] for a in agents["agents"]
    )
    roles = requests.get(f"{url}/v1/roles", headers=bearer(READ), timeout=TIMEOUT).json()["roles"]
    assert roles["worker"]["idle"] == status["roles"]["worker"]["idle"] == 1
    one = agents["agents"][0]["name"]
    assert requests.get(f"{url}/v1/agents/{one}", headers=bearer(READ)).json()["name"] == one
    missing = requests.get(f"{url}/v1/agents/nobody", headers=bearer(READ), timeout=TIMEOUT)
    assert missing.status_code == 404 and missing.json() == {
        "error": "no VM or agent named 'nobody'"
    }
    health = requests.get(f"{url}/v1/health", headers=bearer(READ), timeout=TIMEOUT).json()
    assert health["ok"] is True and health["pid"] == status["pid"]


def test_every_answer_carries_the_secure_headers(web: tuple[Swarm, str]) -> None:
    _, url = web
    for path, headers in [("/login", {}), ("/", bearer(READ)), ("/nowhere", bearer(READ))]:
        answer = requests.get(url + path, headers=headers, timeout=TIMEOUT)
        for name, value in SECURE_HEADERS.items():
            assert answer.headers[name] == value, (path, name)
    csp = SECURE_HEADERS["content-security-policy"]
    assert "unsafe-inline" not in csp and "script-src 'self'" in csp


def test_a_read_only_token_cannot_act(web: tuple[Swarm, str]) -> None:
    swarm, url = web
    before = swarm.status()["roles"]["worker"]["target"]
    refused = [
        requests.post(f"{url}/v1/roles/worker/scale", json={"n": 3}, headers=bearer(READ)),
        requests.post(f"{url}/v1/agents", json={"role": "worker"}, headers=bearer(READ)),
        requests.delete(f"{url}/v1/agents/worker-0", headers=bearer(READ)),
    ]
    for answer in refused:
        assert answer.status_code == 403
        assert answer.json() == {"error": "token access is read-only"}
    session, csrf = login(url, READ)
    answer = session.post(
        f"{url}/v1/roles/worker/scale", json={"n": 3}, headers={"X-CSRF-Token": csrf}
    )
    assert answer.status_code == 403 and answer.json() == {"error": "session access is read-only"}
    assert swarm.status()["roles"]["worker"]["target"] == before
    kinds = {e["kind"] for e in swarm.events()}
    assert "scaled" not in kinds and "http_command" not in kinds


def test_an_operator_acts_and_the_audit_trail_says_so(web: tuple[Swarm, str]) -> None:
    swarm, url = web
    answer = requests.post(
        f"{url}/v1/roles/worker/scale", json={"n": 2}, headers=bearer(OPERATE), timeout=TIMEOUT
    )
    assert answer.status_code == 200 and answer.json() == {"role": "worker", "target": 2}
    swarm.wait_for("two idle workers", idle("worker", 2))
    audit = [e for e in swarm.events("http_command")]
    assert [e["detail"]["command"] for e in audit] == ["scale worker 2"]
    assert audit[0]["detail"]["who"] == "token#1" and audit[0]["detail"]["via"] == "token"
    bad = requests.post(f"{url}/v1/roles/worker/scale", json={"n": "many"}, headers=bearer(OPERATE))
    assert bad.status_code == 400 and bad.json()["error"].startswith("invalid request body:")


def test_a_cross_site_or_forged_post_is_refused(web: tuple[Swarm, str]) -> None:
    swarm, url = web
    session, csrf = login(url, OPERATE)
    scale = f"{url}/v1/roles/worker/scale"
    forged = [
        ({}, "missing or wrong CSRF token"),
        ({"X-CSRF-Token": csrf[:-2] + "xx"}, "missing or wrong CSRF token"),
        ({"X-CSRF-Token": csrf, "Origin": "http://evil.example"}, "cross-site request refused"),
        ({"X-CSRF-Token": csrf, "Origin": "null"}, "cross-site request refused"),
    ]
    for headers, why in forged:
        answer = session.post(scale, json={"n": 3}, headers=headers, timeout=TIMEOUT)
        assert (answer.status_code, answer.json()) == (403, {"error": why}), headers
    assert swarm.status()["roles"]["worker"]["target"] == 1
    # A login form posted from another site sets no session.
    foreign = requests.post(
        f"{url}/login",
        data={"token": OPERATE},
        headers={"Origin": "http://evil.example"},
        allow_redirects=False,
    )
    assert foreign.status_code == 403 and "set-cookie" not in foreign.headers
    ok = session.post(scale, json={"n": 3}, headers={"X-CSRF-Token": csrf, "Origin": url})
    assert ok.status_code == 200
    assert [e["detail"]["via"] for e in swarm.events("http_command")] == ["session"]


def test_the_login_sets_a_strict_http_only_cookie_and_logout_ends_it(
    web: tuple[Swarm, str],
) -> None:
    _, url = web
    wrong = requests.post(f"{url}/login", data={"token": "nope"}, allow_redirects=False)
    assert wrong.status_code == 401 and "set-cookie" not in wrong.headers
    assert "That token is not valid." in wrong.text
    answer = requests.post(f"{url}/login", data={"token": READ}, allow_redirects=False)
    assert answer.status_code == 303 and answer.headers["location"] == "/"
    cookie = answer.headers["set-cookie"]
    assert "HttpOnly" in cookie and "SameSite=strict" in cookie and "Path=/" in cookie
    assert READ not in cookie
    session = requests.Session()
    session.cookies.update(answer.cookies)
    assert session.get(f"{url}/v1/agents", timeout=TIMEOUT).status_code == 200
    session.post(f"{url}/logout", timeout=TIMEOUT)
    stale = requests.get(f"{url}/v1/agents", cookies=answer.cookies, timeout=TIMEOUT)
    assert stale.status_code == 401


def test_a_foreign_host_name_is_refused(web: tuple[Swarm, str]) -> None:
    """A page whose name an attacker points at 127.0.0.1 (DNS rebinding) gets nothing."""
    _, url = web
    answer = requests.get(
        f"{url}/v1/agents", headers={**bearer(READ), "Host": "evil.example"}, timeout=TIMEOUT
    )
    assert answer.status_code == 421
    port = url.rsplit(":", 1)[1]
    local = requests.get(
        f"{url}/v1/agents", headers={**bearer(READ), "Host": f"localhost:{port}"}, timeout=TIMEOUT
    )
    assert local.status_code == 200


# --- listening -------------------------------------------------------------------------------


def _has_ipv6_loopback() -> bool:
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as s:
            s.bind(("::1", 0))
        return True
    except OSError:
        return False


@pytest.mark.skipif(not _has_ipv6_loopback(), reason="this host has no IPv6 loopback")
def test_it_listens_on_ipv6_and_lets_loopback_read_when_told_to(tmp_path: Path) -> None:
    swarm = start_web(
        tmp_path,
        role_yaml("worker", min_idle=0),
        listen="[::1]:0",
        extra="  allow_loopback_without_token: true\n",
    )
    try:
        url = url_of(swarm)
        assert url.startswith("http://[::1]:")
        answer = requests.get(f"{url}/v1/roles", timeout=TIMEOUT)
        assert answer.status_code == 200 and "worker" in answer.json()["roles"]
        # Loopback may look, never act, and a wrong token is not let in as loopback.
        act = requests.post(f"{url}/v1/roles/worker/scale", json={"n": 1}, timeout=TIMEOUT)
        assert act.status_code == 403 and act.json() == {"error": "loopback access is read-only"}
        assert requests.get(f"{url}/v1/roles", headers=bearer("x" * 20)).status_code == 401
    finally:
        swarm.close()
    assert swarm.leftovers() == NOTHING


def test_a_taken_port_stops_the_start_in_one_line(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        swarm = Swarm(
            tmp_path,
            swarm_yaml(role_yaml("worker", min_idle=0))
            + http_yaml(tmp_path, listen=f"127.0.0.1:{port}"),
        )
        with pytest.raises(AssertionError, match="no READY=1"):
            swarm.start(timeout=WAIT)
        assert swarm.proc is not None and swarm.proc.wait(TIMEOUT) != 0
    assert f"http.listen 127.0.0.1:{port}: Address already in use" in swarm.tail()
    swarm.close()
    assert swarm.leftovers() == NOTHING


def test_with_no_tokens_listed_a_read_token_is_made_for_the_owner(tmp_path: Path) -> None:
    swarm = Swarm(
        tmp_path, swarm_yaml(role_yaml("worker", min_idle=0)) + 'http: {listen: "127.0.0.1:0"}\n'
    )
    swarm.start()
    try:
        made = swarm.state / "secrets" / "http-token"
        assert made.stat().st_mode & 0o777 == 0o600
        token = made.read_text().strip()
        url = url_of(swarm)
        assert requests.get(f"{url}/v1/roles", timeout=TIMEOUT).status_code == 401
        assert requests.get(f"{url}/v1/roles", headers=bearer(token)).status_code == 200
        act = requests.post(f"{url}/v1/roles/worker/scale", json={"n": 1}, headers=bearer(token))
        assert act.status_code == 403
        assert token not in swarm.tail(200)
    finally:
        swarm.close()
    assert swarm.leftovers() == NOTHING


def test_after_kill_9_the_next_supervisor_listens_on_the_same_port(tmp_path: Path) -> None:
    """The listening socket dies with the process: nothing to reclaim, the port is free."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    swarm = start_web(tmp_path, role_yaml("worker", min_idle=0), listen=f"127.0.0.1:{port}")
    try:
        assert url_of(swarm) == f"http://127.0.0.1:{port}"
        swarm.kill9()
        swarm.start()
        assert requests.get(f"http://127.0.0.1:{port}/v1/health", headers=bearer(READ)).ok
    finally:
        swarm.close()
    assert swarm.leftovers() == NOTHING
    with pytest.raises(requests.ConnectionError):
        requests.get(f"http://127.0.0.1:{port}/v1/health", timeout=TIMEOUT)


def test_guessing_at_the_login_form_is_slowed(web: tuple[Swarm, str]) -> None:
    _, url = web
    for _ in range(LOGIN_FAILURES_BURST):
        wrong = requests.post(f"{url}/login", data={"token": "guess"}, timeout=TIMEOUT)
        assert wrong.status_code == 401
    held = requests.post(f"{url}/login", data={"token": READ}, allow_redirects=False)
    assert held.status_code == 429 and "set-cookie" not in held.headers
    assert re.fullmatch(r"too many failed logins: try again in ([1-9]|10) s", held.json()["error"])
    # A monitor's bearer token is not held up by someone guessing at the form.
    assert requests.get(f"{url}/v1/health", headers=bearer(READ), timeout=TIMEOUT).ok


def test_an_operator_invokes_and_destroys_a_named_agent(web: tuple[Swarm, str]) -> None:
    swarm, url = web
    made = requests.post(
        f"{url}/v1/agents", json={"role": "worker", "name": "ada"}, headers=bearer(OPERATE)
    )
    assert made.status_code == 200 and made.json()["name"] == "ada"
    agent = requests.get(f"{url}/v1/agents/ada", headers=bearer(READ), timeout=TIMEOUT).json()
    assert agent["agent"] == "ada" and agent["role"] == "worker"
    again = requests.post(
        f"{url}/v1/agents", json={"role": "worker", "name": "ada"}, headers=bearer(OPERATE)
    )
    assert again.status_code == 409
    gone = requests.delete(f"{url}/v1/agents/ada", headers=bearer(OPERATE), timeout=TIMEOUT)
    assert gone.status_code == 200 and gone.json() == {"name": "ada", "destroyed": True}
    swarm.wait_for("ada gone", lambda s: all(a["agent"] != "ada" for a in s["agents"]))
    commands = [e["detail"]["command"] for e in swarm.events("http_command")]
    assert commands == ["invoke worker ada", "invoke worker ada", "destroy ada"]


def test_a_changed_http_section_waits_for_the_next_start(web: tuple[Swarm, str]) -> None:
    swarm, url = web
    swarm.config.write_text(swarm.config.read_text().replace("127.0.0.1:0", "127.0.0.1:1"))
    answer = swarm.api.post("/reload", {})
    assert answer["ok"] is True
    assert "http changes take effect at the next start" in answer["notes"]
    assert swarm.status()["http"] == url
    assert requests.get(f"{url}/v1/health", headers=bearer(READ), timeout=TIMEOUT).ok


def test_the_live_stream_sends_a_small_view_of_the_fleet(web: tuple[Swarm, str]) -> None:
    swarm, url = web
    long_prompt = "p" * 5000
    task = swarm.api.post("/tasks", {"role": "worker", "prompt": long_prompt})
    swarm.wait_for("the task done", lambda s: (s["tasks"] or {}).get("done") == 1)
    # Quiet: the task's VM gone and its place refilled, so the fleet holds still.
    swarm.wait_for("one idle VM", lambda s: [a["state"] for a in s["agents"]] == ["idle"])
    for _ in range(60):  # more events than a view holds: the newest are found
        swarm.api.post("/scale", {"role": "worker", "n": 1})
    session, _ = login(url, READ)
    with session.get(f"{url}/v1/stream", stream=True, timeout=TIMEOUT) as stream:
        assert stream.headers["content-type"].startswith("text/event-stream")
        lines = stream.iter_lines(decode_unicode=True)
        assert next(lines) == "event: view"
        view = json.loads(next(lines).removeprefix("data: "))
    assert set(view) >= {"roles", "agents", "tasks", "queue", "events", "budget"}
    assert [a["name"] for a in view["agents"]] == [a["name"] for a in swarm.status()["agents"]]
    (line,) = [t for t in view["queue"] if t["id"] == task["id"]]
    assert "result" not in line and len(line["prompt"]) == 201 and line["prompt"].endswith("…")
    # The newest events as of the view, oldest first, none missing in between.
    ids = [e["id"] for e in swarm.events()]
    shown = [e["id"] for e in view["events"]]
    assert len(ids) > 60 and shown == ids[: ids.index(shown[-1]) + 1][-50:]
    assert "http_login" in [e["kind"] for e in view["events"]]


def test_a_token_file_others_may_read_stops_the_start_in_one_line(tmp_path: Path) -> None:
    config = swarm_yaml(role_yaml("worker", min_idle=0)) + http_yaml(tmp_path)
    (tmp_path / "read.token").chmod(0o644)
    swarm = Swarm(tmp_path, config)
    with pytest.raises(AssertionError, match="no READY=1"):
        swarm.start(timeout=WAIT)
    assert swarm.proc is not None and swarm.proc.wait(TIMEOUT) != 0
    path = tmp_path / "read.token"
    assert f"http: {path}: group or others may use it (mode 0644); chmod 600 {path}" in swarm.tail()
    assert READ not in swarm.tail(200)
    swarm.close()
    assert swarm.leftovers() == NOTHING


def test_usage_and_chat_answer_off_irc_and_refuse_bad_queries_in_one_line(
    web: tuple[Swarm, str],
) -> None:
    _, url = web
    usage = requests.get(f"{url}/v1/usage", headers=bearer(READ), timeout=TIMEOUT).json()
    assert usage["roles"] == {} and usage["buckets"] == 30 and usage["step"] == 120
    chat = requests.get(f"{url}/v1/chat?wait=30", headers=bearer(READ), timeout=TIMEOUT).json()
    assert chat == {"channel": None, "last": 0, "lines": []}  # off IRC: at once, not waited
    for path, message in [
        ("/v1/usage?window=59", "query parameter window must be an integer from 60 to 604800"),
        ("/v1/usage?buckets=61", "query parameter buckets must be an integer from 1 to 60"),
        ("/v1/chat?wait=31", "query parameter wait must be an integer from 0 to 30"),
        (
            "/v1/chat?after=-1",
            "query parameter after must be an integer from 0 to 9223372036854775807",
        ),
        ("/v1/chat?since=1", "unknown query parameter 'since'"),
    ]:
        answer = requests.get(url + path, headers=bearer(READ), timeout=TIMEOUT)
        assert (answer.status_code, answer.json()) == (400, {"error": message}), path
