"""An upstream that speaks the Responses API (``upstream.api = "responses"``, issue 17):
every endpoint keeps working, and ``/v1/responses`` relays the upstream's own events."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Iterator
from typing import Any

import httpx
import openai
import pytest
from redisserver import RedisServer, redis_server
from scripted import Server, chunked, serving
from servers import eventually, instance, running, simulator, stream

from sseproxy.mockupstream import Scenario, make_tokens

#: Every test here runs on both upstream transports (see conftest.py).
pytestmark = pytest.mark.usefixtures("upstream_transport")

API: dict[str, Any] = {"upstream__api": "responses"}
CHAT: Any = [{"role": "user", "content": "hi"}]


def sdk(url: str) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=url + "/v1", api_key="unused", max_retries=0)


def sse_event(obj: dict[str, Any]) -> bytes:
    return f"event: {obj['type']}\ndata: {json.dumps(obj)}\n\n".encode()


async def test_chat_completions_work_against_a_responses_upstream(io_loop: Any) -> None:
    scenario = Scenario(rate=0, tokens=15, text="mixed")
    async with running(**API) as r:
        client = sdk(r.url)
        chunks = [c async for c in await client.chat.completions.create(
            model=scenario.to_model(), messages=CHAT, stream=True,
            stream_options={"include_usage": True})]
        whole = await client.chat.completions.create(model=scenario.to_model(), messages=CHAT,
                                                     max_tokens=4)
        await client.close()
    expected = "".join(make_tokens(scenario))
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == expected
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "stop"
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 15
    assert whole.choices[0].message.content == "".join(make_tokens(scenario)[:4])
    assert whole.choices[0].finish_reason == "length"


async def test_the_eventsource_endpoints_work_against_a_responses_upstream(
        io_loop: Any) -> None:
    scenario = Scenario(rate=0, tokens=10)
    async with running(scenario, **API) as r:
        got = await stream("GET", r.url + "/v1/chat/stream?prompt=hi")
        async with httpx.AsyncClient() as c:
            created = await c.post(r.url + "/v1/streams", json={"messages": CHAT})
        again = await stream("GET", r.url + created.json()["events_url"])
    for received in (got, again):
        assert received.content() == "".join(make_tokens(scenario))
        done = json.loads(received.events[-1].data)
        assert received.events[-1].event == "done"
        assert done["finish_reason"] == "stop" and done["usage"]["completion_tokens"] == 10


async def test_a_failed_response_upstream_is_an_error_event_on_eventsource(
        io_loop: Any) -> None:
    scenario = Scenario(rate=0, tokens=10, error_at=3)
    async with running(scenario, **API) as r:
        got = await stream("GET", r.url + "/v1/chat/stream?prompt=hi")
    assert got.content() == "".join(make_tokens(scenario)[:3])
    assert got.events[-1].event == "error"
    assert json.loads(got.events[-1].data)["error"]["code"] == "server_error"


async def test_a_chat_parameter_the_responses_api_lacks_is_a_400(io_loop: Any) -> None:
    async with running(**API) as r:
        client = sdk(r.url)
        with pytest.raises(openai.BadRequestError, match="'stop'"):
            await client.chat.completions.create(model="mock", messages=CHAT, stop=["x"])
        stats = await r.mock_stats()
        await client.close()
    assert stats["requests"] == 0


async def test_a_failed_upstream_response_is_relayed_as_it_came(io_loop: Any) -> None:
    scenario = Scenario(rate=0, tokens=10, error_at=3)
    async with running(**API) as r:
        client = sdk(r.url)
        events: list[Any] = [e async for e in await client.responses.create(
            model=scenario.to_model(), input="hi", stream=True)]
        await client.close()
    assert [e.sequence_number for e in events] == list(range(len(events)))
    failed = events[-1]
    assert failed.type == "response.failed"
    assert failed.response.error is not None
    assert failed.response.error.message.endswith("(simulated).")
    assert failed.response.id.startswith("resp_") and "mock" not in failed.response.id


def upstream_events(unknown: list[dict[str, Any]], error: bool = False) -> bytes:
    """A Responses stream with an unknown event before, between and after the text."""
    rid, item = "resp_up", "msg_up"
    where = {"item_id": item, "output_index": 0, "content_index": 0}
    response = {"id": rid, "object": "response", "created_at": 1, "status": "in_progress",
                "model": "m", "output": [], "parallel_tool_calls": False,
                "tool_choice": "auto", "tools": []}
    events: list[dict[str, Any]] = [
        {"type": "response.created", "response": response},
        unknown[0],
        {"type": "response.output_text.delta", **where, "delta": "Hello "},
        unknown[1],
        {"type": "response.output_text.delta", **where, "delta": "world"},
        unknown[2],
    ]
    if error:
        events.append({"type": "error", "code": "overloaded", "message": "busy",
                       "param": None})
    else:
        done = dict(response, status="completed", usage={
            "input_tokens": 2, "output_tokens": 2, "total_tokens": 4,
            "input_tokens_details": {"cached_tokens": 0},
            "output_tokens_details": {"reasoning_tokens": 0}})
        events.append({"type": "response.completed", "response": done})
    for i, event in enumerate(events):
        event["sequence_number"] = 100 + i  # the upstream's numbers are its own
    return b"".join(sse_event(e) for e in events)


@pytest.mark.parametrize("mode", ["off", "smooth"])
async def test_unknown_upstream_event_types_pass_through_unchanged_and_in_order(
        io_loop: Any, mode: str) -> None:
    unknown = [{"type": f"response.future_thing.{i}", "payload": {"k": [i, "é"]}}
               for i in range(3)]
    body = upstream_events([dict(u) for u in unknown])

    async def script(server: Server, reader: asyncio.StreamReader,
                     writer: asyncio.StreamWriter) -> None:
        await server.read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n"
                     b"Transfer-Encoding: chunked\r\n\r\n" + chunked(body))
        await writer.drain()
        await reader.read()

    async with serving(script) as upstream:
        url = f"http://127.0.0.1:{upstream.port}/v1"
        async with running(upstream_url=url, pacing__mode=mode, **API) as r:
            got = await stream("POST", r.url + "/v1/responses",
                               json={"model": "m", "input": "hi", "stream": True})
        sent = json.loads(upstream.requests[0].split(b"\r\n\r\n", 1)[1])
    assert sent["input"] == [{"role": "user", "content": "hi"}] and sent["stream"] is True
    data = [json.loads(e.data) for e in got.events]
    assert [d["sequence_number"] for d in data] == list(range(len(data)))
    kinds = [d["type"] for d in data]
    assert kinds[0] == "response.created" and kinds[-1] == "response.completed"
    assert [k for k in kinds if "future" in k] == [u["type"] for u in unknown]
    # in order around the text: each unknown event after the text that preceded it
    text_before = []
    seen = ""
    for d in data:
        if d["type"] == "response.output_text.delta":
            seen += d["delta"]
        elif "future" in d["type"]:
            text_before.append(seen)
            d.pop("sequence_number")
            assert d == unknown[len(text_before) - 1]  # unchanged otherwise
    assert text_before == ["", "Hello ", "Hello world"]
    assert data[-1]["response"]["id"].startswith("resp_")
    assert data[-1]["response"]["id"] != "resp_up"


async def test_an_upstream_error_event_is_relayed_and_ends_the_stream(io_loop: Any) -> None:
    unknown = [{"type": f"x.{i}"} for i in range(3)]
    body = upstream_events(unknown, error=True)

    async def script(server: Server, reader: asyncio.StreamReader,
                     writer: asyncio.StreamWriter) -> None:
        await server.read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n"
                     b"Transfer-Encoding: chunked\r\n\r\n" + chunked(body))
        await writer.drain()
        await reader.read()

    async with serving(script) as upstream:
        url = f"http://127.0.0.1:{upstream.port}/v1"
        async with running(upstream_url=url, **API) as r:
            got = await stream("POST", r.url + "/v1/responses",
                               json={"model": "m", "input": "hi", "stream": True})
    data = [json.loads(e.data) for e in got.events]
    assert [d["sequence_number"] for d in data] == list(range(len(data)))
    assert data[-1]["type"] == "error" and data[-1]["code"] == "overloaded"
    assert got.events[-1].event == "error"
    assert sum(d["type"] in ("error", "response.failed") for d in data) == 1


@pytest.fixture(scope="module")
def redis() -> Iterator[RedisServer]:
    with redis_server() as server:
        yield server


@pytest.mark.parametrize("live", [False, True], ids=["after the end", "while running"])
async def test_a_background_response_resumes_from_another_instance_on_redis(
        io_loop: Any, redis: RedisServer, live: bool) -> None:
    # Cut after the first text delta, then resumed on B: after A finished (B reads it all
    # from Redis), or while A still generates (B replays from Redis, then follows).
    scenario = Scenario(rate=20, tokens=40) if live else Scenario(rate=50, tokens=30)
    keys = {"store__backend": "redis", "store__redis_url": redis.url, **API}
    async with simulator() as mock_url:
        async with instance(mock_url, **keys) as a, instance(mock_url, **keys) as b:
            client_a, client_b = sdk(a.url), sdk(b.url)
            first: list[Any] = []
            stream_a = await client_a.responses.create(
                model=scenario.to_model(), input="hi", stream=True, background=True)
            async for event in stream_a:
                first.append(event)
                if event.type == "response.output_text.delta":
                    break
            await stream_a.close()
            cut = first[-1].sequence_number
            response_id = first[0].response.id
            if live:
                assert a.deps.registry.get(response_id) is not None  # still running on A
            else:
                await a.wait_mock("completed", 1, within=10.0)  # it ran on without a client
                await eventually(lambda: a.deps.registry.get(response_id) is None,
                                 what="the end")
            rest: list[Any] = [e async for e in await client_b.responses.retrieve(
                response_id, stream=True, starting_after=cut)]
            # A's last events reach Redis a moment after its generation ended: until then
            # B truthfully reports the response in progress.
            deadline = time.monotonic() + 10
            while (stored := await client_b.responses.retrieve(response_id)).status != \
                    "completed" and time.monotonic() < deadline:
                await asyncio.sleep(0.02)
            await client_a.close()
            await client_b.close()
    numbers = [e.sequence_number for e in first + rest]
    assert numbers == list(range(len(numbers)))
    text = "".join(e.delta for e in first + rest if e.type == "response.output_text.delta")
    assert text == "".join(make_tokens(scenario)) == stored.output_text
    assert rest[-1].type == "response.completed" and stored.status == "completed"
