"""Per-key limits end to end (issue 18): real servers, the simulator, the OpenAI SDK.

A key over a limit gets ``429`` (API) or ``200`` + ``event: error`` ``rate_limited``
(EventSource) and the simulator sees no request; the tokens-per-minute budget is judged on
an injected clock (no minute is waited for); the permit of a paced stream is held until
its drain ends, and a background response's until it ends.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

import httpx
import openai
import pytest
from servers import Running, eventually, running, stream

from sseproxy import keys
from sseproxy.mockupstream import Scenario

LONG = Scenario(rate=10, tokens=1000)
CHAT = [{"role": "user", "content": "hi"}]


def sdk(r: Running) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=r.url + "/v1", api_key="unused", max_retries=0)


async def start(r: Running, client: httpx.AsyncClient) -> str:
    created = await client.post(r.url + "/v1/streams", json={"messages": CHAT})
    assert created.status_code == 201, created.text
    return str(created.json()["id"])


async def test_a_key_at_its_stream_limit_is_refused_on_every_endpoint_without_an_upstream_call(
        io_loop: Any) -> None:
    async with running(LONG, limits__key_max_streams=1) as r, httpx.AsyncClient() as c:
        sid = await start(r, c)
        await r.wait_mock("open", 1, within=10)
        chat = await c.post(r.url + "/v1/chat/completions",
                            json={"model": "m", "messages": CHAT, "stream": True})
        streams = await c.post(r.url + "/v1/streams", json={"messages": CHAT})
        responses = await c.post(r.url + "/v1/responses", json={"model": "m", "input": "hi"})
        page = await stream("GET", r.url + "/v1/chat/stream?prompt=hi")
        stats = await r.mock_stats()
        await c.delete(r.url + f"/v1/streams/{sid}")
        await eventually(lambda: not r.deps.registry.generations, what="the stream ended")
        after = await c.post(r.url + "/v1/chat/completions",
                             json={"model": "m", "messages": CHAT, "max_tokens": 2})
    assert stats["requests"] == 1, "the refused requests never reached the upstream"
    for refused in (chat, streams, responses):
        assert refused.status_code == 429
        assert refused.headers["Retry-After"] == "1"
        error = refused.json()["error"]
        assert error["code"] == "rate_limit_exceeded" and error["type"] == "streams"
    assert page.status == 200
    assert page.raw.startswith(b"retry: 3000\n\n")  # the stream's usual opening
    [event] = page.events
    assert event.event == "error" and event.id == ""  # no id: a retry starts afresh
    assert b"event: error\nretry: 1000\n" in page.raw or b"retry: 1000\n" in page.raw
    data = json.loads(event.data)["error"]
    assert data["code"] == "rate_limited" and data["retry_after_s"] == 1.0
    assert after.status_code == 200, "the permit came back when the stream ended"


class Clock:
    def __init__(self) -> None:
        self.now = 1_700_000_000.0

    def __call__(self) -> float:
        return self.now


async def test_a_key_over_its_tokens_per_minute_is_refused_until_the_budget_refilled(
        io_loop: Any) -> None:
    # The reply uses 150 completion tokens; the budget is 100 per minute.
    reply = Scenario(rate=0, tokens=150)
    async with running(reply, limits__key_tokens_per_minute=100,
                       limits__estimate_output_tokens=10) as r:
        clock = Clock()
        assert r.deps.limiter is not None
        r.deps.limiter.clock = clock
        client = sdk(r)
        async with client:
            first = await client.chat.completions.with_raw_response.create(
                model=reply.to_model(), messages=[{"role": "user", "content": "hi"}])
            usage = first.parse().usage
            assert usage is not None
            with pytest.raises(openai.RateLimitError) as refused:
                await client.chat.completions.create(model="m", messages=[
                    {"role": "user", "content": "hi"}])
            wait = float(refused.value.response.headers["Retry-After"])
            clock.now += wait - 1.0
            with pytest.raises(openai.RateLimitError):
                await client.chat.completions.create(model="m", messages=[
                    {"role": "user", "content": "hi"}])
            clock.now += 1.0
            again = await client.chat.completions.with_raw_response.create(
                model="m", messages=[{"role": "user", "content": "hi"}])
        stats = await r.mock_stats()
    # admitted with 1 + 10 tokens estimated
    assert first.headers["x-ratelimit-limit-tokens"] == "100"
    assert first.headers["x-ratelimit-remaining-tokens"] == "89"
    assert refused.value.status_code == 429
    assert refused.value.code == "rate_limit_exceeded"
    headers = refused.value.response.headers
    assert headers["x-ratelimit-remaining-tokens"] == "0"
    # the real usage was charged at the stream's end: the budget refills at 100 per minute
    assert 150 <= usage.total_tokens
    assert wait >= 0.6 * (usage.total_tokens - 100)
    assert again.http_response.status_code == 200
    assert stats["requests"] == 2, "the refused requests never reached the upstream"


async def test_openai_sdk_reads_the_rate_limit_headers_and_raises_rate_limit_error(
        io_loop: Any) -> None:
    async with running(Scenario(rate=0, tokens=3), limits__key_requests_per_minute=2,
                       limits__key_tokens_per_minute=100_000) as r:
        messages: Any = [{"role": "user", "content": "hi"}]
        async with sdk(r) as client:
            first = await client.chat.completions.with_raw_response.create(
                model="m", messages=messages, stream=True)
            async for _ in first.parse():
                pass
            second = await client.chat.completions.with_raw_response.create(
                model="m", messages=messages)
            with pytest.raises(openai.RateLimitError) as refused:
                await client.chat.completions.create(model="m", messages=messages)
    assert first.headers["x-ratelimit-limit-requests"] == "2"
    assert first.headers["x-ratelimit-remaining-requests"] == "1"
    assert first.headers["x-ratelimit-reset-requests"] == "30s"
    assert first.headers["x-ratelimit-limit-tokens"] == "100000"
    assert second.headers["x-ratelimit-remaining-requests"] == "0"
    assert 0 < int(refused.value.response.headers["Retry-After"]) <= 30
    assert refused.value.body["type"] == "requests"  # type: ignore[index]


async def test_the_permit_of_a_paced_stream_is_held_until_its_drain_ends(io_loop: Any) -> None:
    # The upstream sends 8 KB at once and ends; the pacer lets them out over ~3 s.
    burst = Scenario(rate=0, tokens=1400, burst=1 << 20)
    async with running(burst, limits__key_max_streams=1, pacing__mode="smooth",
                       pacing__target_lag_s=3.0, pacing__max_lag_s=3.0,
                       pacing__drain_s=3.0) as r, httpx.AsyncClient() as c:
        body = {"model": burst.to_model(), "messages": CHAT, "stream": True}
        first = asyncio.ensure_future(stream("POST", r.url + "/v1/chat/completions", json=body))
        await r.wait_mock("completed", 1, within=10)  # the upstream is done: the drain runs
        during = await c.post(r.url + "/v1/chat/completions", json=body)
        draining = not first.done()
        got = await first
        after = await c.post(r.url + "/v1/chat/completions", json={**body, "stream": False})
        stats = await r.mock_stats()
    assert draining, "the first stream was still draining when the second was refused"
    assert during.status_code == 429 and during.json()["error"]["type"] == "streams"
    assert got.complete and got.events[-1].data == "[DONE]"
    assert after.status_code == 200
    assert stats["requests"] == 2


async def test_a_background_response_holds_its_permit_until_it_ends(io_loop: Any) -> None:
    async with running(Scenario(rate=20, tokens=40), limits__key_max_streams=1) as r, \
            httpx.AsyncClient() as c:
        created = await c.post(r.url + "/v1/responses",
                               json={"model": "m", "input": "hi", "background": True})
        assert created.status_code == 200, created.text
        during = await c.post(r.url + "/v1/responses", json={"model": "m", "input": "hi"})
        await eventually(lambda: not r.deps.registry.generations, what="the response ended")
        after = await c.post(r.url + "/v1/responses", json={"model": "m", "input": "hi"})
    assert during.status_code == 429
    assert after.status_code == 200


async def test_each_key_has_its_own_budget_and_override(io_loop: Any, tmp_path: Any) -> None:
    # Real client keys (auth.mode = keys): the budget is the key's, by its name.
    secrets = {name: keys.new_key() for name in ("a", "big")}
    keys_file = tmp_path / "keys"
    keys_file.write_text("".join(keys.key_line(n, k) + "\n" for n, k in secrets.items()))
    path = tmp_path / "limits.toml"
    path.write_text("[pacing]\nmode = \"off\"\n[limits]\nkey_requests_per_minute = 1\n"
                    "[limits.keys.big]\nrequests_per_minute = 3\n"
                    f"[auth]\nmode = \"keys\"\nkeys_file = \"{keys_file}\"\n")
    async with running(Scenario(rate=0, tokens=2), config_file=str(path)) as r, \
            httpx.AsyncClient() as c:
        async def post(key: str | None) -> int:
            headers = {"Authorization": f"Bearer {key}"} if key else {}
            got = await c.post(r.url + "/v1/chat/completions", headers=headers,
                               json={"model": "m", "messages": CHAT})
            return got.status_code

        statuses = {name: [await post(secrets.get(name or "")) for _ in range(4)]
                    for name in ("a", "big", None)}
        stats = await r.mock_stats()
    assert statuses == {"a": [200, 429, 429, 429], "big": [200, 200, 200, 429],
                        None: [401, 401, 401, 401]}
    assert stats["requests"] == 4


async def test_without_client_keys_every_client_shares_the_anonymous_budget(
        io_loop: Any) -> None:
    async with running(Scenario(rate=0, tokens=2), limits__key_requests_per_minute=2) as r, \
            httpx.AsyncClient() as c:
        statuses = [(await c.post(r.url + "/v1/chat/completions", headers=headers,
                                  json={"model": "m", "messages": CHAT})).status_code
                    for headers in ({}, {"X-Forwarded-For": "10.0.0.9"}, {})]
    assert statuses == [200, 200, 429]
