"""The one fast path to a client's socket (sseproxy/sink.py), pinned to the Tornado versions
it supports: frames after the headers bypass RequestHandler.flush, and the bytes a client
reads are exactly the chunked stream Tornado itself would have written."""

from __future__ import annotations

from typing import Any

import pytest
import tornado
import tornado.web
from servers import running, stream

from sseproxy.handlers import StreamingHandler
from sseproxy.mockupstream import Scenario, make_tokens
from sseproxy.sink import ConnectionSink


def test_the_fast_path_is_tested_on_this_tornado() -> None:
    # The adapter uses HTTP1Connection.stream and IOStream's public calls; a Tornado
    # outside this range needs this file's tests to be read again.
    assert (6, 4) <= tornado.version_info[:2] < (7, 0)


@pytest.mark.parametrize("path", ["/v1/chat/stream?prompt=hi", "/v1/chat/completions"])
async def test_frames_after_the_headers_go_straight_to_the_socket(
        io_loop: Any, monkeypatch: pytest.MonkeyPatch, path: str) -> None:
    flushes = 0
    flush = tornado.web.RequestHandler.flush

    def counting(self: tornado.web.RequestHandler, *args: Any, **kwargs: Any) -> Any:
        nonlocal flushes
        if isinstance(self, StreamingHandler):  # (the simulator's flushes do not count)
            flushes += 1
        return flush(self, *args, **kwargs)

    monkeypatch.setattr(tornado.web.RequestHandler, "flush", counting)
    scenario = Scenario(rate=200, tokens=40)
    async with running(scenario) as r:
        if path.startswith("/v1/chat/stream"):
            got = await stream("GET", r.url + path)
        else:
            got = await stream("POST", r.url + path, json={
                "model": scenario.to_model(), "stream": True,
                "messages": [{"role": "user", "content": "hi"}]})
    assert got.complete and got.content() == "".join(make_tokens(scenario))
    assert flushes <= 2  # the headers, and finish(): every frame went by the fast path


async def test_frames_of_a_caught_up_stream_are_written_from_the_upstream_read(
        io_loop: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    # issue 14 (performance guard): a subscriber that waits, caught up, has its frames
    # written from the upstream's read callback, without a wake-up of its loop per token.
    direct = looped = 0
    send_now, send = ConnectionSink.send_now, ConnectionSink.send

    def counting_now(self: ConnectionSink, data: bytes) -> bool:
        nonlocal direct
        direct += 1
        return send_now(self, data)

    async def counting(self: ConnectionSink, data: bytes) -> None:
        nonlocal looped
        looped += 1
        await send(self, data)

    monkeypatch.setattr(ConnectionSink, "send_now", counting_now)
    monkeypatch.setattr(ConnectionSink, "send", counting)
    scenario = Scenario(rate=100, tokens=40)
    async with running(scenario) as r:
        got = await stream("POST", r.url + "/v1/chat/completions", json={
            "model": scenario.to_model(), "stream": True,
            "messages": [{"role": "user", "content": "hi"}]})
    assert got.complete and got.content() == "".join(make_tokens(scenario))
    # the headers, the role, the end and a few tokens may take the loop; most tokens not
    assert direct >= 20 and looped <= 20
