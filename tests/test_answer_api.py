"""``POST /answers`` on the control API (the real server on its unix socket, a
controller stand-in, as ``test_api.py``): the body it takes, what it refuses
in one line, and the controller's refusal passed on with its status."""

from __future__ import annotations

import pathlib
from collections.abc import AsyncIterator

import pytest
import trio
from fireclaw.supervisor.api import ControllerError, serve_api
from fireclaw.supervisor.client import ApiClient, ApiError
from test_api import FakeController, in_thread


class Answering(FakeController):
    """The stand-in, answering: task-7 waits; anything else is refused as the
    supervisor refuses it."""

    async def answer(self, name: str, text: str) -> dict[str, object]:
        self.calls.append(("answer", (name, text)))
        if name != "task-7":
            raise ControllerError(f"no task or agent named {name!r} is waiting for an answer", 404)
        return {"id": 7, "state": "queued", "answer": text}


@pytest.fixture
async def client(nursery: trio.Nursery, tmp_path: pathlib.Path) -> AsyncIterator[ApiClient]:
    path = await nursery.start(serve_api, tmp_path / "api.sock", Answering())
    yield ApiClient(path)


async def test_an_answer_reaches_the_controller_whole(client: ApiClient) -> None:
    body = {"name": "task-7", "text": "yes, remove build/\nthen rebuild"}
    answered = await in_thread(client.post, "/answers", body)
    assert answered == {"id": 7, "state": "queued", "answer": "yes, remove build/\nthen rebuild"}


@pytest.mark.parametrize(
    ("body", "status", "says"),
    [
        ({"name": "task-7"}, 400, "missing required field `text`"),
        ({"name": "task-7", "text": ""}, 400, "Expected `str` of length >= 1"),
        ({"name": "task-7", "text": " \t\n"}, 400, "Expected `str` matching regex"),
        ({"name": "task-7", "text": "y", "force": True}, 400, "unknown field `force`"),
        ({"name": "", "text": "y"}, 400, "length >= 1"),
        ({"name": "bob", "text": "y"}, 404, "no task or agent named 'bob' is waiting"),
    ],
)
async def test_a_bad_answer_is_one_line_with_its_status(
    client: ApiClient, body: dict[str, object], status: int, says: str
) -> None:
    with pytest.raises(ApiError) as refused:
        await in_thread(client.post, "/answers", body)
    assert refused.value.status == status
    assert says in str(refused.value) and "\n" not in str(refused.value)
