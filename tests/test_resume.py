"""Resumable streams through a real sseproxy and the simulator (issue 14).

A client reads up to event k, its connection is cut, it reconnects with ``Last-Event-ID``
and gets events k+1…end exactly once; the simulator saw one upstream request.
"""

from __future__ import annotations

import json
from typing import Any

import httpx
import pytest
from servers import Received, Running, running, stream

from sseproxy.mockupstream import Scenario, make_tokens

SLOW = Scenario(rate=40, tokens=60)
CHAT = [{"role": "user", "content": "hi"}]


def ids(got: Received) -> list[int]:
    return [int(e.id.rsplit(".", 1)[1]) for e in got.events]


async def first_connect(r: Running, endpoint: str, k: int) -> tuple[Received, str]:
    """Start a stream on ``endpoint`` and read its first ``k`` events; the URL to resume."""
    if endpoint == "streams":
        async with httpx.AsyncClient() as c:
            created = await c.post(r.url + "/v1/streams", json={"messages": CHAT})
        assert created.status_code == 201
        body = created.json()
        assert len(body["id"]) == 32 and body["events_url"] == f"/v1/streams/{body['id']}"
        url = r.url + body["events_url"]
    else:
        url = r.url + "/v1/chat/stream?prompt=hi"
    got = await stream("GET", url, stop_after=k)
    got.events = got.events[:k]  # one read may have carried more: this client saw k
    return got, url


@pytest.mark.parametrize("endpoint", ["streams", "chat_stream"])
async def test_a_cut_connection_resumes_after_its_last_event_exactly_once(
        io_loop: Any, endpoint: str) -> None:
    async with running(SLOW) as r:
        whole = await stream("GET", r.url + "/v1/chat/stream?prompt=hi")
        first, url = await first_connect(r, endpoint, k=5)
        assert first.status == 200 and len(first.events) == 5
        rest = await stream("GET", url, headers={"Last-Event-ID": first.events[-1].id})
        stats = await r.mock_stats()
        resumes = r.deps.metrics.resumes._value.get()
    assert rest.status == 200 and rest.complete
    assert ids(first) + ids(rest) == list(range(1, len(whole.events) + 1))
    assert [e.event for e in rest.events].count("done") == 1
    assert rest.events[-1].event == "done"
    assert first.content() + rest.content() == whole.content() == "".join(make_tokens(SLOW))
    assert stats["requests"] == 2  # one for the uninterrupted run, one for the resumed one
    assert resumes == 1


async def test_a_browser_reconnect_after_the_end_gets_its_missing_tail(io_loop: Any) -> None:
    fast = Scenario(rate=0, tokens=20)
    async with running(fast) as r:
        first, url = await first_connect(r, "streams", k=3)
        await r.wait_mock("completed", 1, within=5)
        sid = url.rsplit("/", 1)[1]
        tail = await stream("GET", url + f"?last_event_id={first.events[-1].id}")
        again = await stream("GET", url, headers={"Last-Event-ID": tail.events[-1].id})
    assert ids(first) + ids(tail) == list(range(1, 22))
    assert tail.events[-1].event == "done"
    assert first.content() + tail.content() == "".join(make_tokens(fast))
    assert again.status == 204  # its last event was delivered: EventSource stops for good
    assert all(e.id.startswith(sid + ".") for e in tail.events)


async def test_unknown_streams_and_bad_event_ids_are_refused(io_loop: Any) -> None:
    async with running() as r:
        unknown = "ab" * 16
        got = await stream("GET", r.url + f"/v1/streams/{unknown}")
        resumed = await stream("GET", r.url + "/v1/chat/stream?prompt=hi",
                               headers={"Last-Event-ID": f"{unknown}.3"})
        async with httpx.AsyncClient() as c:
            bad = await c.get(r.url + "/v1/chat/stream?prompt=hi",
                              headers={"Last-Event-ID": "not-an-id"})
            gone = await c.delete(r.url + f"/v1/streams/{unknown}")
        stats = await r.mock_stats()
    assert got.status == 204 and resumed.status == 204
    assert bad.status_code == 400 and bad.json()["error"]["type"] == "invalid_request_error"
    assert gone.status_code == 404 and gone.json()["error"]["code"] == "stream_not_found"
    assert stats["requests"] == 0  # a reconnect never starts a generation


async def test_delete_stops_the_generation_and_its_subscribers_see_cancelled(io_loop: Any
                                                                             ) -> None:
    slow = Scenario(rate=10, tokens=1000)
    async with running(slow) as r:
        first, url = await first_connect(r, "streams", k=2)
        async with httpx.AsyncClient() as c:
            deleted = await c.delete(url)
            took = await r.wait_mock("open", 0, within=3)
            again = await c.delete(url)
        tail = await stream("GET", url, headers={"Last-Event-ID": first.events[-1].id})
        stats = await r.mock_stats()
    assert deleted.status_code == 204 and again.status_code == 204
    assert took < 1.0 and stats["cancelled"] == 1
    assert tail.events[-1].event == "error"
    assert json.loads(tail.events[-1].data)["error"]["code"] == "cancelled"


async def test_a_stream_start_is_validated_before_any_upstream_call(io_loop: Any) -> None:
    async with running() as r:
        async with httpx.AsyncClient() as c:
            empty = await c.post(r.url + "/v1/streams", content=b"{oops")
            persona = await c.post(r.url + "/v1/streams",
                                   json={"messages": CHAT, "persona": "nobody"})
        stats = await r.mock_stats()
    assert empty.status_code == 400 and persona.status_code == 400
    assert stats["requests"] == 0


async def test_two_clients_following_one_stream_both_get_it_whole(io_loop: Any) -> None:
    async with running(Scenario(rate=50, tokens=40)) as r:
        first, url = await first_connect(r, "streams", k=1)
        import asyncio
        a, b = await asyncio.gather(
            stream("GET", url, headers={"Last-Event-ID": first.events[-1].id}),
            stream("GET", url, headers={"Last-Event-ID": first.events[-1].id}))
        stats = await r.mock_stats()
    assert a.content() == b.content() and ids(a) == ids(b) == list(range(2, 42))
    assert stats["requests"] == 1
