"""`GET /v1/models` and `GET /v1/personas` through a real sseproxy, with the official
`openai` SDK where it has a call for it (issue 12, point 2)."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import httpx
import openai
import pytest
import tornado.httpserver
import tornado.web
from servers import running
from tornado.testing import bind_unused_port

from sseproxy import models
from sseproxy.config import Persona

PERSONAS = {
    "pirate": Persona("SECRET-PIRATE-PROMPT talk like a pirate", title="Pirate"),
    "poet": Persona("SECRET-POET-PROMPT answer in verse", model="gpt-poet"),
    "judge": Persona("SECRET-JUDGE-PROMPT be fair", model="gpt-4o-mini"),
}
UPSTREAM_LIST = {"object": "list", "data": [
    {"id": "gpt-4o", "object": "model", "created": 1715367049, "owned_by": "system"},
    {"id": "o3", "object": "model", "created": 1744225308, "owned_by": "system",
     "extra": {"kept": True}},
]}


class ModelsUpstream:
    """An upstream whose ``GET /v1/models`` answers ``status`` with ``body``, or nothing at
    all until released (``hang``); it counts the requests and keeps their headers."""

    def __init__(self, status: int = 200, body: Any = UPSTREAM_LIST, hang: bool = False):
        self.status, self.body, self.hang = status, body, hang
        self.headers: list[dict[str, str]] = []
        self.release = asyncio.Event()

    def app(self) -> tornado.web.Application:
        upstream = self

        class Models(tornado.web.RequestHandler):
            async def get(self) -> None:
                upstream.headers.append(dict(self.request.headers))
                if upstream.hang:
                    await upstream.release.wait()
                self.set_status(upstream.status)
                self.set_header("Content-Type", "application/json")
                self.finish(json.dumps(upstream.body))

        return tornado.web.Application([(r"/v1/models", Models)])


@asynccontextmanager
async def serving(upstream: ModelsUpstream) -> AsyncIterator[str]:
    server = tornado.httpserver.HTTPServer(upstream.app())
    sock, port = bind_unused_port()
    server.add_sockets([sock])
    try:
        yield f"http://127.0.0.1:{port}/v1"
    finally:
        upstream.release.set()
        server.stop()
        await server.close_all_connections()


def sdk(url: str) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=url + "/v1", api_key="unused", max_retries=0)


async def test_openai_sdk_lists_the_built_in_simulator_models(io_loop: Any) -> None:
    async with running() as r:
        async with sdk(r.url) as client:
            page = await client.models.list()
    assert [m.id for m in page.data] == ["mock"]
    assert page.data[0].object == "model"


async def test_the_upstream_model_list_is_relayed_and_fetched_once_while_fresh(
    io_loop: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("OPENAI_API_KEY", "sk-upstream-only")
    upstream = ModelsUpstream()
    async with serving(upstream) as url:
        async with running(upstream_url=url, upstream__kind="openai") as r:
            async with sdk(r.url) as client:
                pages = await asyncio.gather(*(client.models.list() for _ in range(5)))
            async with httpx.AsyncClient() as c:
                raw = await c.get(r.url + "/v1/models")
    assert [m.id for m in pages[0].data] == ["gpt-4o", "o3"]
    assert all(p.data == pages[0].data for p in pages)
    assert raw.json() == UPSTREAM_LIST  # each entry as the upstream wrote it
    assert "sk-upstream-only" not in raw.text
    assert len(upstream.headers) == 1, "concurrent and later requests share one fetch"
    assert upstream.headers[0]["Authorization"] == "Bearer sk-upstream-only"


async def test_without_an_upstream_list_the_configured_and_persona_models_are_listed(
    io_loop: Any,
) -> None:
    upstream = ModelsUpstream(status=404, body={"error": {"message": "no such URL"}})
    async with serving(upstream) as url:
        async with running(upstream_url=url, upstream__model="gpt-4o-mini",
                           personas=PERSONAS) as r:
            async with sdk(r.url) as client:
                first = await client.models.list()
                again = await client.models.list()
    assert [m.id for m in first.data] == ["gpt-4o-mini", "gpt-poet"]
    assert all(m.object == "model" and m.owned_by == "sseproxy" for m in first.data)
    assert again.data == first.data
    assert len(upstream.headers) == 1, "a failed fetch is not repeated at once"


@pytest.mark.parametrize("body", [
    "not json", {"data": "gpt-4o"}, {"data": [{"name": "no id"}]}, ["gpt-4o"],
])
async def test_an_upstream_answer_that_is_not_a_model_list_falls_back(
    io_loop: Any, body: Any
) -> None:
    async with serving(ModelsUpstream(body=body)) as url:
        async with running(upstream_url=url, upstream__model="m1") as r:
            async with sdk(r.url) as client:
                page = await client.models.list()
    assert [m.id for m in page.data] == ["m1"]


async def test_an_upstream_that_is_down_falls_back_to_the_configured_models(
    io_loop: Any,
) -> None:
    sock, port = bind_unused_port()
    sock.close()  # nothing listens there
    async with running(upstream_url=f"http://127.0.0.1:{port}/v1", upstream__model="m1",
                       personas=PERSONAS) as r:
        async with sdk(r.url) as client:
            page = await client.models.list()
    assert [m.id for m in page.data] == ["m1", "gpt-4o-mini", "gpt-poet"]


async def test_an_upstream_that_does_not_answer_falls_back_after_the_fetch_timeout(
    io_loop: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(models, "FETCH_TIMEOUT_S", 0.3)
    upstream = ModelsUpstream(hang=True)
    async with serving(upstream) as url:
        async with running(upstream_url=url, upstream__model="m1") as r:
            async with sdk(r.url) as client:
                page = await client.models.list()
            assert len(upstream.headers) == 1 and not upstream.release.is_set()
    assert [m.id for m in page.data] == ["m1"]


async def test_personas_list_names_titles_and_models_never_the_prompts(io_loop: Any) -> None:
    async with running(upstream__model="gpt-4o-mini", personas=PERSONAS) as r:
        async with httpx.AsyncClient() as c:
            answer = await c.get(r.url + "/v1/personas")
    assert answer.status_code == 200
    assert answer.headers["Content-Type"].startswith("application/json")
    assert answer.json() == {"object": "list", "data": [
        {"id": "pirate", "object": "persona", "title": "Pirate", "model": "gpt-4o-mini"},
        {"id": "poet", "object": "persona", "title": "poet", "model": "gpt-poet"},
        {"id": "judge", "object": "persona", "title": "judge", "model": "gpt-4o-mini"},
    ]}
    assert "SECRET" not in answer.text


async def test_the_example_personas_are_listed_without_a_config_file(io_loop: Any) -> None:
    async with running() as r:
        async with httpx.AsyncClient() as c:
            answer = await c.get(r.url + "/v1/personas")
    assert [p["id"] for p in answer.json()["data"]] == ["fortune-teller", "pirate", "concise"]
    assert "prophecy" not in answer.text and "system" not in answer.text


async def test_openai_sdk_retrieves_one_model_of_the_upstream_list(
    io_loop: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    # GET /v1/models/{id}, the SDK's models.retrieve: tools check a model before using it
    monkeypatch.setenv("OPENAI_API_KEY", "sk-upstream-only")
    body = {"object": "list", "data": [*UPSTREAM_LIST["data"], {
        "id": "meta-llama/Llama-3.1-8B", "object": "model", "created": 1, "owned_by": "meta"}]}
    upstream = ModelsUpstream(body=body)
    async with serving(upstream) as url:
        async with running(upstream_url=url, upstream__kind="openai") as r:
            async with sdk(r.url) as client:
                o3 = await client.models.retrieve("o3")
                llama = await client.models.retrieve("meta-llama/Llama-3.1-8B")
                with pytest.raises(openai.NotFoundError) as info:
                    await client.models.retrieve("gpt-5-nonexistent")
            async with httpx.AsyncClient() as c:
                raw = await c.get(r.url + "/v1/models/o3")
    assert o3.id == "o3" and raw.json() == UPSTREAM_LIST["data"][1]  # as the upstream wrote it
    assert (llama.id, llama.owned_by) == ("meta-llama/Llama-3.1-8B", "meta")
    error = info.value.body
    assert isinstance(error, dict)
    assert (error["type"], error["code"]) == ("invalid_request_error", "model_not_found")
    assert "gpt-5-nonexistent" in error["message"]
    assert len(upstream.headers) == 1, "one fetch serves the list and its entries"


async def test_without_an_upstream_list_a_persona_model_can_be_retrieved(io_loop: Any) -> None:
    async with serving(ModelsUpstream(status=404, body={})) as url:
        async with running(upstream_url=url, upstream__model="m1", personas=PERSONAS) as r:
            async with sdk(r.url) as client:
                poet = await client.models.retrieve("gpt-poet")
                with pytest.raises(openai.NotFoundError):
                    await client.models.retrieve("poet")  # a persona is not a model
    assert (poet.id, poet.object, poet.owned_by) == ("gpt-poet", "model", "sseproxy")
