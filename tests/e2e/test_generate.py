"""Triton's generate extension through the real server, with plain HTTP clients (``requests``
and ``aiohttp``): /generate and /generate_stream (Server-Sent Events) on a streaming
(decoupled) text model and on a tensor model, and their errors; through the router and through
frontend processes."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from typing import Any

import aiohttp
import pytest
import requests

from tests.e2e.server import ServerProcess, served

pytestmark = pytest.mark.timeout(120)


@pytest.fixture(scope="module", params=["router", "frontends"])
def server(tmp_path_factory: pytest.TempPathFactory, request: pytest.FixtureRequest) -> Iterator[ServerProcess]:
    """The router's own frontend, and frontend processes (which answer generate themselves for
    models published on lanes, ``frontproc.process.http_generate``, and send the rest to the
    router): every test, the same answers."""
    args = ("--frontend-processes", "2") if request.param == "frontends" else ()
    yield from served(tmp_path_factory, ("tokens", "add_sub", "repeat"), *args)


def _url(server: ServerProcess, model: str, what: str) -> str:
    return f"http://{server.url}/v2/models/{model}/{what}"


def _events(resp: requests.Response) -> list[dict[str, Any]]:
    assert resp.headers["Content-Type"].startswith("text/event-stream")
    out = []
    for block in resp.text.split("\n\n"):
        if block.strip():
            assert block.startswith("data: "), block
            out.append(json.loads(block[len("data: ") :]))
    return out


def test_generate_stream_sends_one_event_per_response(server: ServerProcess) -> None:
    r = requests.post(_url(server, "tokens", "generate_stream"), json={"text_input": "the quick brown fox"}, timeout=30)
    assert r.status_code == 200
    events = _events(r)
    assert [e["text_output"] for e in events] == ["the", "quick", "brown", "fox"]
    assert [e["index"] for e in events] == [0, 1, 2, 3]
    assert all(e["model_name"] == "tokens" and e["model_version"] == "1" for e in events)


def test_generate_stream_parameters_reach_the_model(server: ServerProcess) -> None:
    body = {"text_input": "a b c d e", "parameters": {"max_tokens": 2}}
    events = _events(requests.post(_url(server, "tokens", "generate_stream"), json=body, timeout=30))
    assert [e["text_output"] for e in events] == ["a", "b"]
    # a key that is not an input is a parameter too
    body2 = {"text_input": "x y z", "max_tokens": 1}
    events = _events(requests.post(_url(server, "tokens", "generate_stream"), json=body2, timeout=30))
    assert [e["text_output"] for e in events] == ["x"]


def test_generate_stream_error_after_two_events(server: ServerProcess) -> None:
    body = {"text_input": "one two three four", "parameters": {"fail_after": 2}}
    r = requests.post(_url(server, "tokens", "generate_stream"), json=body, timeout=30)
    assert r.status_code == 200  # the status went out with the first event
    events = _events(r)
    assert [e.get("text_output") for e in events[:2]] == ["one", "two"]
    assert events[2] == {"error": "tokenizer broke"}
    assert len(events) == 3


def test_generate_on_a_tensor_model(server: ServerProcess) -> None:
    body = {"INPUT0": [1.0, 2.0, 3.0, 4.0], "INPUT1": [1, 1, 1, 1]}
    r = requests.post(_url(server, "add_sub", "generate"), json=body, timeout=30)
    assert r.status_code == 200, r.text
    doc = r.json()
    assert doc["OUTPUT0"] == [2.0, 3.0, 4.0, 5.0] and doc["OUTPUT1"] == [0.0, 1.0, 2.0, 3.0]
    assert doc["model_name"] == "add_sub" and doc["model_version"] == "1"
    events = _events(requests.post(_url(server, "add_sub", "generate_stream"), json=body, timeout=30))
    assert len(events) == 1 and events[0]["OUTPUT0"] == [2.0, 3.0, 4.0, 5.0]


def test_generate_on_a_streaming_model(server: ServerProcess) -> None:
    r = requests.post(_url(server, "tokens", "generate"), json={"text_input": "single"}, timeout=30)
    assert r.status_code == 200, r.text
    assert r.json()["text_output"] == "single"
    r = requests.post(_url(server, "tokens", "generate"), json={"text_input": "two words"}, timeout=30)
    assert r.status_code == 400 and "more than one response" in r.json()["error"]


@pytest.mark.parametrize(
    ("model", "body", "status", "words"),
    [
        ("tokens", b"{not json", 400, "failed to parse"),
        ("tokens", b"[1, 2]", 400, "must be a JSON object"),
        ("nope", b'{"text_input": "x"}', 400, "Request for unknown model: 'nope' is not found"),
        ("tokens", b'{"text_input": 5}', 400, "must be a string"),
        ("tokens", b'{"text_input": {"a": 1}}', 400, "flat list of scalars"),
        ("add_sub", b'{"INPUT0": ["a", "b", "c", "d"], "INPUT1": [1, 1, 1, 1]}', 400, "must be a number"),
        ("add_sub", b'{"INPUT0": [1, 2, 3, 4]}', 400, "INPUT1"),
        ("tokens", b'{"text_input": "x", "parameters": {"triton_x": 1}}', 400, "reserved"),
    ],
)
def test_bad_generate_requests_get_json_errors(
    server: ServerProcess, model: str, body: bytes, status: int, words: str
) -> None:
    for what in ("generate", "generate_stream"):
        r = requests.post(_url(server, model, what), data=body, timeout=30)
        assert r.status_code == status, (what, r.text)
        assert r.headers["Content-Type"].startswith("application/json")
        assert words in r.json()["error"], r.json()


def test_generate_stream_with_aiohttp_and_a_client_that_leaves(server: ServerProcess) -> None:
    async def main() -> tuple[list[str], dict[str, Any]]:
        async with aiohttp.ClientSession() as session:
            words = " ".join(f"w{i}" for i in range(50))
            async with session.post(_url(server, "tokens", "generate_stream"), json={"text_input": words}) as resp:
                got = []
                async for line in resp.content:
                    if line.startswith(b"data: "):
                        got.append(json.loads(line[6:])["text_output"])
                    if len(got) == 3:
                        break  # leave mid-stream: the connection is dropped
            async with session.post(_url(server, "tokens", "generate"), json={"text_input": "after"}) as resp:
                return got, await resp.json()

    got, after = asyncio.run(main())
    assert got == ["w0", "w1", "w2"] and after["text_output"] == "after"
