"""The HTTP listener's ``/v1`` against its own OpenAPI document, on a live supervisor.

As tests/test_api_schema.py does for the unix-socket API: schemathesis generates
requests (valid ones and ones that break them) from the document served at
``/v1/openapi.json``, sends them with a read token, and checks every answer: no
5xx, a documented status and content type, a body its schema allows. Then the
same operations without a token must all be 401.

``FIRECLAW_FUZZ_EXAMPLES=N`` sets the examples per operation (default 25).
"""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest
import requests
import schemathesis
from fireclaw.supervisor.web_openapi import document
from hypothesis import HealthCheck, given, settings
from swarmctl import NOTHING, Swarm, idle, role_yaml
from test_web import READ, TIMEOUT, bearer, start_web, url_of

EXAMPLES = int(os.environ.get("FIRECLAW_FUZZ_EXAMPLES", "25"))
OPERATIONS = [(method.upper(), path) for path, ops in document()["paths"].items() for method in ops]


@pytest.fixture(scope="module")
def web(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Swarm, str]]:
    root = tmp_path_factory.mktemp("web-schema")
    swarm = start_web(root, role_yaml("worker", min_idle=1, max_active=2))
    try:
        swarm.wait_for("an idle worker", idle("worker", 1))
        swarm.api.post("/tasks", {"role": "worker", "prompt": "something to list"})
        yield swarm, url_of(swarm)
    finally:
        swarm.close()
    assert swarm.leftovers() == NOTHING


def test_the_served_document_is_the_generated_one(web: tuple[Swarm, str]) -> None:
    _, url = web
    served = requests.get(f"{url}/v1/openapi.json", headers=bearer(READ), timeout=TIMEOUT)
    assert served.json() == document()
    assert served.json()["openapi"] == "3.1.0"


@pytest.mark.parametrize(("method", "path"), OPERATIONS, ids=[f"{m} {p}" for m, p in OPERATIONS])
def test_generated_requests_get_documented_answers(
    web: tuple[Swarm, str], method: str, path: str
) -> None:
    swarm, url = web
    schema = schemathesis.openapi.from_dict(document())
    operation = schema[path][method]
    session = requests.Session()
    session.headers.update(bearer(READ))

    @settings(
        max_examples=EXAMPLES,
        deadline=None,
        suppress_health_check=list(HealthCheck),
        database=None,
    )
    @given(case=operation.as_strategy())
    def run(case: schemathesis.Case) -> None:
        case.call_and_validate(session=session, base_url=url, timeout=TIMEOUT)

    run()
    assert requests.get(f"{url}/v1/health", headers=bearer(READ), timeout=TIMEOUT).json()["ok"]


@pytest.mark.parametrize(("method", "path"), OPERATIONS, ids=[f"{m} {p}" for m, p in OPERATIONS])
def test_without_a_token_each_operation_is_401(
    web: tuple[Swarm, str], method: str, path: str
) -> None:
    _, url = web
    answer = requests.request(method, url + path.replace("{name}", "worker-0"), timeout=TIMEOUT)
    assert answer.status_code == 401
