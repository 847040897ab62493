"""The control API against its own OpenAPI document, on a live supervisor.

schemathesis generates requests from the document the supervisor serves at
``/openapi.json`` (valid ones and ones that break it), sends them over the real
unix socket and checks every answer: no 5xx, the status and content type the
document lists, the body its schema, within a bounded time. The supervisor must
still be healthy afterwards and stop cleanly, leaving nothing behind.

Left out of the generated traffic: ``POST /down`` (it would end the run) and
``POST /run`` (on the process backend it runs the generated argv on the host);
both have their own tests. A generated ``/status`` long poll is kept short.

``FIRECLAW_FUZZ_EXAMPLES=N`` sets the examples per operation (default 25).
"""

from __future__ import annotations

import os
import urllib.parse
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests
import schemathesis
from fireclaw.supervisor.openapi import document
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from requests_unixsocket.adapters import UnixAdapter
from swarmctl import NOTHING, Swarm, role_yaml, swarm_yaml

EXAMPLES = int(os.environ.get("FIRECLAW_FUZZ_EXAMPLES", "25"))
SKIPPED = {("POST", "/down"), ("POST", "/run")}
#: Longest a generated status long poll may wait.
SHORT_WAIT = "0.2"
#: Generous for one local request on a loaded machine; a hang fails the test.
REQUEST_TIMEOUT = 30.0


@pytest.fixture(scope="module")
def swarm(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Swarm]:
    root = tmp_path_factory.mktemp("api-schema")
    swarm = Swarm(root, swarm_yaml(role_yaml("worker", min_idle=1, max_active=2)))
    swarm.start()
    try:
        yield swarm
    finally:
        swarm.close()


#: The host name requests to the API socket go to (it is never resolved).
API_HOST = "http://fireclaw-api"


class _SocketAdapter(UnixAdapter):  # type: ignore[misc]
    """requests' way to the supervisor's unix socket, whatever host a URL names."""

    def __init__(self, socket_path: Path) -> None:
        super().__init__(timeout=REQUEST_TIMEOUT)
        self._socket_url = "http+unix://" + urllib.parse.quote(str(socket_path), safe="")

    def get_connection(self, url: str, proxies: object = None) -> object:
        return super().get_connection(self._socket_url, proxies)


def _session(socket_path: Path) -> requests.Session:
    session = requests.Session()
    session.mount(API_HOST, _SocketAdapter(socket_path))
    return session


def test_the_served_document_is_the_generated_one(swarm: Swarm) -> None:
    served = swarm.api.get("/openapi.json")
    assert served == document()
    assert served["openapi"] == "3.1.0"
    routes = {(m.upper(), path) for path, ops in served["paths"].items() for m in ops}
    assert ("POST", "/tasks") in routes and ("GET", "/events") in routes


OPERATIONS = [
    (method, path)
    for path, ops in document()["paths"].items()
    for method in (m.upper() for m in ops)
    if (method, path) not in SKIPPED
]


@pytest.mark.parametrize(("method", "path"), OPERATIONS, ids=[f"{m} {p}" for m, p in OPERATIONS])
def test_generated_requests_get_documented_answers(swarm: Swarm, method: str, path: str) -> None:
    schema = schemathesis.openapi.from_dict(swarm.api.get("/openapi.json"))
    operation = schema[path][method]
    session = _session(swarm.state / "api.sock")

    @settings(
        max_examples=EXAMPLES,
        deadline=None,
        suppress_health_check=list(HealthCheck),
        database=None,
    )
    @given(case=operation.as_strategy(), data=st.data())
    def run(case: schemathesis.Case, data: st.DataObject) -> None:
        if path == "/status" and case.query and "since" in case.query:
            case.query = {**case.query, "wait": SHORT_WAIT}
        case.call_and_validate(session=session, base_url=API_HOST, timeout=REQUEST_TIMEOUT)

    run()
    assert swarm.api.get("/health")["ok"] is True


def test_after_the_traffic_the_supervisor_stops_cleanly(swarm: Swarm) -> None:
    status = swarm.status()
    assert status["pid"] == swarm.proc.pid if swarm.proc else False
    assert swarm.stop() == 0
    assert swarm.leftovers() == NOTHING
