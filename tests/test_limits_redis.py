"""Per-key limits shared through a real redis-server by two instances (issue 18).

A key's concurrent streams and requests per minute hold across instances; the Lua
scripts decide as the pure core does; with Redis away each instance enforces the limits
by itself (fail-open to per-instance counters).
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from contextlib import AbstractAsyncContextManager
from typing import Any

import httpx
import pytest
from redis.asyncio import Redis
import redisserver
from redisserver import RedisServer, redis_server
from servers import Running

from sseproxy import limits
from sseproxy.limiter import MemoryCounters, RedisCounters
from sseproxy.limits import KeyLimits
from sseproxy.mockupstream import Scenario

LONG = Scenario(rate=10, tokens=1000)
CHAT = [{"role": "user", "content": "hi"}]


@pytest.fixture(scope="module")
def redis() -> Iterator[RedisServer]:
    with redis_server() as server:
        yield server


def pair(redis: RedisServer, scenario: Scenario = LONG,
         **overrides: Any) -> AbstractAsyncContextManager[tuple[Running, Running]]:
    """Instances A and B in front of one simulator, sharing ``redis``."""
    return redisserver.pair(redis, scenario, **overrides)


def chat(stream: bool = False) -> dict[str, Any]:
    return {"model": LONG.to_model() if stream else "mock?tokens=2&rate=0",
            "messages": CHAT, "stream": stream}


async def test_a_keys_stream_limit_holds_across_two_instances(
        io_loop: Any, redis: RedisServer) -> None:
    async with pair(redis, limits__key_max_streams=1) as (a, b), httpx.AsyncClient() as c:
        async with c.stream("POST", a.url + "/v1/chat/completions", json=chat(True)) as held:
            assert held.status_code == 200
            await a.wait_mock("open", 1, within=10)
            on_b = await c.post(b.url + "/v1/chat/completions", json=chat())
            page = await c.get(b.url + "/v1/chat/stream?prompt=hi")
            stats = await b.mock_stats()
        # the client left: A cancels its generation and frees the permit in Redis
        await a.wait_mock("open", 0, within=10)
        for _ in range(200):  # the release is written by a task: poll, bounded
            after = await c.post(b.url + "/v1/chat/completions", json=chat())
            if after.status_code != 429:
                break
            await asyncio.sleep(0.02)
    assert on_b.status_code == 429 and on_b.json()["error"]["type"] == "streams"
    assert page.status_code == 200 and '"code":"rate_limited"' in page.text
    assert stats["requests"] == 1, "B never called the upstream for the refused requests"
    assert after.status_code == 200


async def test_a_keys_requests_per_minute_hold_across_two_instances(
        io_loop: Any, redis: RedisServer) -> None:
    async with pair(redis, limits__key_requests_per_minute=3) as (a, b), \
            httpx.AsyncClient() as c:
        got = []
        for r in (a, b, a, b):
            answer = await c.post(r.url + "/v1/chat/completions", json=chat())
            got.append((answer.status_code, answer.headers.get("x-ratelimit-remaining-requests")))
        stats = await a.mock_stats()
    assert got == [(200, "2"), (200, "1"), (200, "0"), (429, "0")]
    assert stats["requests"] == 3


async def test_the_lua_scripts_decide_as_the_pure_core(io_loop: Any, redis: RedisServer) -> None:
    client = Redis.from_url(redis.url, decode_responses=True)
    shared, memory = RedisCounters(client, 1.0), MemoryCounters()
    key = KeyLimits(max_streams=2, requests_per_minute=5, tokens_per_minute=100)
    name = "lua-check-" + str(id(client))
    steps: list[tuple[str, float, int, int]] = [
        # (what, now, tokens (cost or difference), permit)
        ("admit", 0.0, 30, 1), ("admit", 1.0, 30, 2), ("admit", 2.0, 30, 3),
        ("release", 3.0, 90, 1), ("admit", 3.0, 10, 4), ("admit", 40.0, 10, 5),
        ("release", 41.0, -25, 2), ("admit", 41.0, 60, 6), ("admit", 200.0, 500, 7),
        ("admit", 200.5, 1, 8), ("release", 201.0, 0, 7), ("admit", 260.0, 1, 9),
    ]
    base = 1_700_000_000.0
    try:
        for what, now, tokens, permit in steps:
            if what == "admit":
                got = [await c.admit(name, key, tokens, str(permit), base + now, 60.0, 1000.0)
                       for c in (shared, memory)]
                assert got[0].admitted == got[1].admitted, (what, now)
                assert got[0].limit == got[1].limit, (what, now)
                assert got[0].retry_after_s == pytest.approx(got[1].retry_after_s, abs=1e-6)
                assert limits.headers(got[0]) == limits.headers(got[1]), (what, now)
            else:
                for c in (shared, memory):
                    await c.reconcile(name, key, str(permit), tokens, base + now, 60.0)
    finally:
        await client.aclose()


async def test_with_redis_away_each_instance_enforces_the_limits_by_itself(
        io_loop: Any) -> None:
    with redis_server() as server:
        async with pair(server, limits__key_max_streams=1) as (a, b), \
                httpx.AsyncClient() as c:
            await asyncio.to_thread(server.stop)
            async with c.stream("POST", a.url + "/v1/chat/completions",
                                json=chat(True)) as held:
                assert held.status_code == 200  # fail-open: admitted by A's own counters
                await a.wait_mock("open", 1, within=10)
                on_a = await c.post(a.url + "/v1/chat/completions", json=chat())
                on_b = await c.post(b.url + "/v1/chat/completions", json=chat())
            errors = a.deps.metrics.store_errors.labels("limits")._value.get()
    assert on_a.status_code == 429, "A still holds its one stream, counted in memory"
    assert on_b.status_code == 200, "B counts alone while Redis is away"
    assert errors >= 1
