"""End to end through real servers: the simulator, sseproxy, and real HTTP clients (issue 2).

Timing assertions check order and overlap with generous margins, never speed.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import struct
import time
from collections.abc import AsyncGenerator, MutableMapping
from typing import Any, cast
from urllib.parse import quote

import httpx
import openai
import pytest
from openai.types.chat import ChatCompletionMessageParam
from servers import eventually, running, silent_client, stream, stream_logged
from structlog.testing import capture_logs

from sseproxy import app, sse
from sseproxy.config import Persona
from sseproxy.mockupstream import Scenario, make_tokens

# The relay suites run on both upstream transports (issue 18; see conftest.py).
pytestmark = pytest.mark.usefixtures("upstream_transport")

FAST = Scenario(rate=0, tokens=12)
CHAT: list[ChatCompletionMessageParam] = [{"role": "user", "content": "hi"}]


def es_url(base: str, prompt: str = "hi", **query: str) -> str:
    extra = "".join(f"&{k}={quote(v)}" for k, v in query.items())
    return f"{base}/v1/chat/stream?prompt={quote(prompt)}{extra}"


def chat_body(scenario: Scenario, **fields: Any) -> dict[str, Any]:
    return {"model": scenario.to_model(), "messages": CHAT, "stream": True, **fields}


# --- (a) frames are flushed one by one ------------------------------------------------


async def test_eventsource_tokens_arrive_before_the_upstream_pause_ends(io_loop: Any) -> None:
    scenario = Scenario(rate=0, tokens=6, stall_at=3, stall_s=2.0)
    async with running(scenario) as r:
        got = await stream("GET", es_url(r.url))
    deltas = [t for e, t in zip(got.events, got.times, strict=True) if e.event == "message"]
    assert len(deltas) == 6
    # the first three were delivered, then nothing until the simulator's 2 s pause ended
    assert deltas[3] - deltas[2] > 1.5
    assert got.content() == "".join(make_tokens(scenario))


async def test_openai_tokens_arrive_before_the_upstream_pause_ends(io_loop: Any) -> None:
    scenario = Scenario(rate=0, tokens=6, stall_at=3, stall_s=2.0)
    async with running() as r:
        got = await stream("POST", r.url + "/v1/chat/completions", json=chat_body(scenario))
    content_times = [t for d, t in zip(got.data(), got.times, strict=True)
                     if isinstance(d, dict) and d["choices"] and d["choices"][0]["delta"].get(
                         "content")]
    assert len(content_times) == 6
    assert content_times[3] - content_times[2] > 1.5
    assert got.data()[-1] == "[DONE]"


async def test_headers_go_out_before_the_first_token(io_loop: Any) -> None:
    scenario = Scenario(rate=0, tokens=3, first_delay_s=3)
    async with running(scenario) as r:
        es, oa = await asyncio.gather(
            stream("GET", es_url(r.url)),
            stream("POST", r.url + "/v1/chat/completions", json=chat_body(scenario)))
    for got in (es, oa):
        assert got.status == 200
        assert got.times[-1] - got.headers_at > 1.5
    assert es.raw.startswith(b"retry: 3000\n\n")


# --- (b) the official OpenAI SDK -------------------------------------------------------


def sdk(r: Any, **kwargs: Any) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=r.url + "/v1", api_key="unused", max_retries=0, **kwargs)


async def test_openai_sdk_streams_the_exact_text(io_loop: Any) -> None:
    scenario = Scenario(rate=200, tokens=40, text="mixed")
    async with running() as r:
        client = sdk(r)
        stream_ = await client.chat.completions.create(
            model=scenario.to_model(), messages=CHAT, stream=True,
            stream_options={"include_usage": True})
        pieces, finish, usage, ids = [], None, None, set()
        async for chunk in stream_:
            ids.add(chunk.id)
            if chunk.usage:
                usage = chunk.usage
            for choice in chunk.choices:
                pieces.append(choice.delta.content or "")
                finish = choice.finish_reason or finish
        await client.close()
    assert "".join(pieces) == "".join(make_tokens(scenario))
    assert finish == "stop"
    assert usage is not None and usage.completion_tokens == 40
    assert len(ids) == 1 and ids.pop().startswith("chatcmpl-")


async def test_openai_sdk_without_streaming(io_loop: Any) -> None:
    scenario = Scenario(rate=0, tokens=10, text="cjk")
    async with running() as r:
        client = sdk(r)
        reply = await client.chat.completions.create(
            model=scenario.to_model(), messages=CHAT)
        await client.close()
    assert reply.choices[0].message.content == "".join(make_tokens(scenario))
    assert reply.choices[0].finish_reason == "stop"
    assert reply.usage is not None and reply.usage.completion_tokens == 10


async def test_a_reply_cut_by_max_tokens_ends_with_finish_reason_length(io_loop: Any) -> None:
    # issue 12: the simulator stops at max_tokens as real models do; sseproxy relays "length"
    scenario = Scenario(rate=0, tokens=12)
    async with running(pacing__mode="smooth") as r:
        client = sdk(r)
        stream_ = await client.chat.completions.create(
            model=scenario.to_model(), messages=CHAT, stream=True,
            max_tokens=4)
        pieces, finish = [], None
        async for chunk in stream_:
            for choice in chunk.choices:
                pieces.append(choice.delta.content or "")
                finish = choice.finish_reason or finish
        whole = await client.chat.completions.create(
            model=scenario.to_model(), messages=CHAT,
            max_completion_tokens=4)
        await client.close()
    assert "".join(pieces) == "".join(make_tokens(scenario)[:4])
    assert finish == "length" == whole.choices[0].finish_reason


async def test_openai_sdk_sees_upstream_errors_as_its_own_exceptions(io_loop: Any) -> None:
    async with running() as r:
        client = sdk(r)
        with pytest.raises(openai.RateLimitError) as limited:
            await client.chat.completions.create(
                model=Scenario(error_status=429, retry_after=3).to_model(), messages=CHAT,
                stream=True)
        assert limited.value.response.headers["Retry-After"] == "3"
        with pytest.raises(openai.APIError) as mid_stream:
            s = await client.chat.completions.create(
                model=Scenario(rate=0, error_at=2, error_code="overloaded_now").to_model(),
                messages=CHAT, stream=True)
            async for _ in s:
                pass
        assert mid_stream.value.code == "overloaded_now"
        with pytest.raises(openai.BadRequestError, match="unknown persona"):
            await client.chat.completions.create(
                model="x", messages=CHAT, extra_body={"persona": "ninja"})
        await client.close()


# --- (c) a client that leaves cancels the upstream -------------------------------------


@pytest.mark.parametrize("endpoint", ["eventsource", "openai"])
async def test_client_closing_mid_stream_cancels_the_upstream(io_loop: Any, endpoint: str) -> None:
    # The OpenAI endpoint cancels at once; an EventSource stream after store.orphan_grace_s
    # (issue 14: a reconnect within it resumes the running generation).
    scenario = Scenario(rate=20, tokens=1000)
    async with running(scenario, store__orphan_grace_s=0.3) as r:
        if endpoint == "eventsource":
            got = await stream("GET", es_url(r.url), stop_after=3)
        else:
            got = await stream("POST", r.url + "/v1/chat/completions",
                               json=chat_body(scenario), stop_after=3)
        assert got.status == 200
        took = await r.wait_mock("open", 0, within=3.0)
        stats = await r.mock_stats()
    assert stats["cancelled"] == 1 and stats["completed"] == 0
    assert took < (1.0 if endpoint == "openai" else 3.0)  # grace 0.3 s + a wide margin


async def test_client_closing_while_the_model_thinks_cancels_the_upstream(io_loop: Any) -> None:
    # Nothing is being written, so only Tornado's close notification can tell; with nobody
    # following after store.orphan_grace_s the generation is abandoned.
    scenario = Scenario(rate=0, tokens=5, first_delay_s=30)
    async with running(scenario, heartbeat__interval_s=60, store__orphan_grace_s=0.3) as r:
        with capture_logs() as logs:
            async with httpx.AsyncClient() as c:
                async with c.stream("GET", es_url(r.url)) as resp:
                    assert resp.status_code == 200
                    await r.wait_mock("open", 1, within=2.0)
            took = await r.wait_mock("open", 0, within=3.0)
            await eventually(stream_logged(logs))
        assert (await r.mock_stats())["cancelled"] == 1
    assert took < 3.0  # grace 0.3 s + a wide margin
    assert [e["outcome"] for e in logs if e["event"] == "stream"] == ["abandoned"]


@pytest.mark.parametrize("scenario, stream_", [
    (Scenario(header_delay_s=30), True),   # before the upstream accepted: no headers yet
    (Scenario(rate=5, tokens=100), False),  # stream: false, mid-generation
])
async def test_openai_client_leaving_without_a_write_cancels_the_upstream(
    io_loop: Any, scenario: Scenario, stream_: bool
) -> None:
    async with running() as r:
        with capture_logs() as logs:
            async with httpx.AsyncClient() as c:
                request = asyncio.create_task(c.post(
                    r.url + "/v1/chat/completions",
                    json={**chat_body(scenario), "stream": stream_}))
                await r.wait_mock("open", 1, within=3)
                request.cancel()
                await asyncio.gather(request, return_exceptions=True)
            took = await r.wait_mock("open", 0, within=3)
            await eventually(stream_logged(logs))
        assert (await r.mock_stats())["cancelled"] == 1
    assert took < 1.0
    assert [e["outcome"] for e in logs if e["event"] == "stream"] == ["client_closed"]


async def test_a_client_that_stops_reading_is_dropped_and_its_upstream_cancelled(
    io_loop: Any,
) -> None:
    # The OpenAI endpoint: one client, so a client that stops reading ends the stream.
    flood = Scenario(rate=0, tokens=400_000, text="lorem")
    async with running(flood, stall__client_timeout_s=1.0, sndbuf=8192) as r:
        body = json.dumps(chat_body(flood)).encode()
        request = (b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n"
                   b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n%b"
                   % (len(body), body))
        with capture_logs() as logs:
            async with silent_client(r, request=request):
                await r.wait_mock("open", 1, within=5)
                await r.wait_mock("open", 0, within=20)
                await eventually(stream_logged(logs))
        stats = await r.mock_stats()
        active = r.deps.registry.active
    assert stats["cancelled"] == 1 and stats["completed"] == 0
    assert active == 0
    assert [e["outcome"] for e in logs if e["event"] == "stream"] == ["client_stalled"]


async def test_an_eventsource_subscriber_that_stops_reading_is_dropped_alone(
    io_loop: Any,
) -> None:
    # Issue 14: a subscriber that stops reading is dropped after stall.client_timeout_s
    # without slowing the generation, which completes into the log for a later reconnect.
    flood = Scenario(rate=0, tokens=20_000, text="lorem")
    async with running(flood, stall__client_timeout_s=1.0, stall__threshold_s=0.5,
                       sndbuf=8192) as r:
        with capture_logs() as logs:
            async with silent_client(r):
                await r.wait_mock("completed", 1, within=10)
                for _ in range(800):  # bounded: dropped within client_timeout_s + margin
                    if not r.deps.registry.subscribers and not r.deps.registry.active:
                        break
                    await asyncio.sleep(0.025)
        assert not r.deps.registry.subscribers
        assert (await r.mock_stats())["cancelled"] == 0
    line = [e for e in logs if e["event"] == "stream"]
    assert [e["outcome"] for e in line] == ["completed"]
    assert line[0]["subscribers"] == 1 and line[0]["stalls"] >= 1


# --- (d) every upstream failure has its status or error event --------------------------


@pytest.mark.parametrize(
    "scenario, status, code",
    [
        (Scenario(error_status=429, retry_after=5), 429, "rate_limit_exceeded"),
        (Scenario(error_status=400, error_code="context_length_exceeded"), 400,
         "context_length_exceeded"),
        (Scenario(error_status=500), 502, None),
        (Scenario(error_status=503), 502, None),
        (Scenario(error_status=401), 502, "upstream_auth_failed"),
        (Scenario(header_delay_s=10), 504, "upstream_timeout"),
    ],
)
async def test_openai_endpoint_turns_upstream_refusals_into_http_errors(
    io_loop: Any, scenario: Scenario, status: int, code: str | None
) -> None:
    # Deadlines generous enough for a simulator slowed by a busy machine.
    async with running(upstream__first_token_timeout_s=1.5) as r:
        async with httpx.AsyncClient() as c:
            resp = await c.post(r.url + "/v1/chat/completions", json=chat_body(scenario))
    assert resp.status_code == status
    err = resp.json()["error"]
    assert set(err) == {"type", "code", "message"}
    if code:
        assert err["code"] == code
    if status == 429:
        assert resp.headers["Retry-After"] == "5"
    assert "text/event-stream" not in resp.headers["Content-Type"]


@pytest.mark.parametrize("upstream_status", [401, 403])
async def test_a_refused_upstream_key_is_a_server_error_on_both_endpoints(
    io_loop: Any, upstream_status: int
) -> None:
    # issue 12: sseproxy's own key was refused; the client's request was fine
    async with running(Scenario(error_status=upstream_status)) as r:
        async with httpx.AsyncClient() as c:
            resp = await c.post(r.url + "/v1/chat/completions", json={"messages": CHAT})
        es = await stream("GET", es_url(r.url))
    assert resp.status_code == 502
    assert resp.json()["error"]["type"] == "server_error"
    assert resp.json()["error"]["code"] == "upstream_auth_failed"
    error = json.loads(es.events[-1].data)["error"]
    assert (error["type"], error["code"]) == ("server_error", "upstream_auth_failed")


async def test_unreachable_upstream_is_502(io_loop: Any) -> None:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()  # nothing listens there now
    async with running(upstream_url=f"http://127.0.0.1:{port}/v1") as r:
        async with httpx.AsyncClient() as c:
            resp = await c.post(r.url + "/v1/chat/completions", json=chat_body(FAST))
        es = await stream("GET", es_url(r.url))
    assert resp.status_code == 502 and resp.json()["error"]["code"] == "upstream_unreachable"
    assert es.status == 200 and es.complete
    assert es.events[-1].event == "error"
    assert json.loads(es.events[-1].data)["error"]["code"] == "upstream_unreachable"


FAILURES = [
    (Scenario(error_status=429), "rate_limit_exceeded", 0),
    (Scenario(error_status=500), "upstream_http_500", 0),
    (Scenario(rate=0, tokens=5, first_delay_s=10), "upstream_timeout", 0),
    (Scenario(rate=0, tokens=5, stall_at=2, stall_s=10), "upstream_timeout", 2),
    (Scenario(rate=0, tokens=5, error_at=2, error_code="server_overloaded"),
     "server_overloaded", 2),
    (Scenario(rate=0, tokens=5, drop_at=2), "upstream_incomplete", 2),
    (Scenario(rate=0, tokens=5, no_done=True), "upstream_incomplete", 5),
    (Scenario(rate=0, tokens=5, malformed_at=2), "upstream_protocol_error", 2),
]


@pytest.mark.parametrize("scenario, code, tokens", FAILURES)
async def test_eventsource_failures_are_error_events_and_a_clean_end(
    io_loop: Any, scenario: Scenario, code: str, tokens: int
) -> None:
    async with running(scenario, upstream__first_token_timeout_s=1.5,
                       upstream__idle_timeout_s=1.0) as r:
        with capture_logs() as logs:
            got = await stream("GET", es_url(r.url))
    assert got.status == 200 and got.complete
    kinds = [e.event for e in got.events]
    assert kinds == ["message"] * tokens + ["error"]
    assert [e.id for e in got.events] == [f"{got.headers['X-Stream-ID']}.{n}"
                                          for n in range(1, tokens + 2)]
    error = json.loads(got.events[-1].data)["error"]
    assert error["code"] == code and error["message"]
    outcome = [e["outcome"] for e in logs if e["event"] == "stream"]
    assert outcome == ["upstream_timeout" if code == "upstream_timeout" else "upstream_error"]


@pytest.mark.parametrize("scenario, code, tokens", FAILURES[2:])
async def test_openai_failures_after_the_headers_are_error_frames(
    io_loop: Any, scenario: Scenario, code: str, tokens: int
) -> None:
    async with running(upstream__first_token_timeout_s=1.5, upstream__idle_timeout_s=1.0) as r:
        got = await stream("POST", r.url + "/v1/chat/completions", json=chat_body(scenario))
    assert got.status == 200 and got.complete
    data = got.data()
    assert data[-1]["error"]["code"] == code
    assert "[DONE]" not in data
    assert got.content() == "".join(make_tokens(scenario)[:tokens])


# --- (e) headers ---------------------------------------------------------------------------


async def test_stream_headers_with_compress_response_on(io_loop: Any) -> None:
    big = Scenario(rate=0, tokens=400)
    async with running(FAST) as r:
        assert r.settings.server.compress_response
        gz = {"Accept-Encoding": "gzip"}
        es = await stream("GET", es_url(r.url), headers=gz)
        oa = await stream("POST", r.url + "/v1/chat/completions", json=chat_body(FAST), headers=gz)
        async with httpx.AsyncClient() as c:
            # An ordinary response of the same app is compressed, so the transform is on.
            plain = await c.post(r.url + "/v1/chat/completions", headers=gz,
                                 json={"model": big.to_model(), "messages": CHAT})
    for got in (es, oa):
        h = got.headers
        assert h["Content-Type"] == "text/event-stream; charset=utf-8"
        assert h["Cache-Control"] == "no-cache, no-transform"
        assert h["X-Accel-Buffering"] == "no"
        for absent in ("ETag", "Content-Length", "Content-Encoding"):
            assert absent not in h
        assert h["Transfer-Encoding"] == "chunked"
        assert got.raw.startswith((b"retry:", b"data:"))  # not gzip bytes
    assert plain.headers["Content-Encoding"] == "gzip"
    assert plain.json()["choices"][0]["message"]["content"]  # httpx undid the gzip


# --- (f) heartbeats -------------------------------------------------------------------------


async def test_heartbeat_comment_during_a_long_pause(io_loop: Any) -> None:
    scenario = Scenario(rate=0, tokens=4, stall_at=2, stall_s=3)
    async with running(scenario, heartbeat__interval_s=0.5) as r:
        es, oa = await asyncio.gather(
            stream("GET", es_url(r.url)),
            stream("POST", r.url + "/v1/chat/completions", json=chat_body(scenario)))
    for got in (es, oa):
        assert got.pings, got.raw
        assert got.content() == "".join(make_tokens(scenario))
        token_times = [t for t, d in zip(got.times, got.data(), strict=True)
                       if d != "[DONE]" and (d.get("content") or (
                           d.get("choices") and d["choices"][0]["delta"].get("content")))]
        assert len(token_times) == 4
        # every ping came during the simulator's pause, between the 2nd and 3rd token
        assert all(token_times[1] <= p <= token_times[2] for p in got.pings)
    assert b"\n\n: ping\n\n" in es.raw


# --- (g) reconnects never start a new generation -----------------------------------------


async def test_reconnect_with_last_event_id_is_204_and_starts_nothing(io_loop: Any) -> None:
    async with running(FAST) as r:
        first = await stream("GET", es_url(r.url))
        last_id = first.events[-1].id
        async with httpx.AsyncClient() as c:
            again = await c.get(es_url(r.url), headers={"Last-Event-ID": last_id})
            by_query = await c.get(es_url(r.url, last_event_id=last_id))
        stats = await r.mock_stats()
    assert again.status_code == 204 and by_query.status_code == 204
    assert again.content == b""
    assert stats["requests"] == 1


# --- frames reach the socket whole and in order ------------------------------------------
# Once the headers are out, a frame is sent on the socket directly; what the kernel does not
# take goes through Tornado's write buffer, and the next frame waits behind it.


def dechunk(body: bytes) -> tuple[bytes, bool]:
    """The payload of a chunked body, and whether its last chunk was there."""
    out, at = bytearray(), 0
    while True:
        line_end = body.index(b"\r\n", at)
        size = int(body[at:line_end], 16)
        if size == 0:
            return bytes(out), True
        start = line_end + 2
        out += body[start:start + size]
        assert body[start + size:start + size + 2] == b"\r\n"
        at = start + size + 2


async def test_a_reader_that_lags_gets_every_frame_whole_and_in_order(io_loop: Any) -> None:
    # ~1.2 MB of events through an 8 KiB send buffer to a client with a 4 KiB receive buffer
    # that reads nothing until the generation has finished into the log: the direct sends
    # fill the socket, the rest waits in the write buffer, later frames queue behind it.
    flood = Scenario(rate=0, tokens=20_000)
    async with running(flood, sndbuf=8192) as r:
        async with silent_client(r) as sock:
            await r.wait_mock("completed", 1, within=10)
            loop = asyncio.get_running_loop()
            raw = bytearray()
            while not raw.endswith(b"\r\n0\r\n\r\n"):
                data = await asyncio.wait_for(loop.sock_recv(sock, 65536), 10)
                assert data, "the server closed before the last chunk"
                raw += data
    head, _, body = bytes(raw).partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200") and b"transfer-encoding: chunked" in head.lower()
    payload, ended = dechunk(body)
    assert ended and len(payload) > 1_000_000
    events = sse.Decoder().feed(payload)
    assert events[-1].event == "done"
    text = [e for e in events if e.event == "message"]
    assert "".join(json.loads(e.data)["content"] for e in text) == "".join(make_tokens(flood))
    seq = [int(e.id.rsplit(".", 1)[1]) for e in text]
    assert seq == list(range(seq[0], seq[0] + len(seq)))  # every event, once, in order


@pytest.mark.parametrize("connection", [b"", b"Connection: keep-alive\r\n"])
async def test_an_http_1_0_client_gets_a_close_delimited_stream(
        io_loop: Any, connection: bytes) -> None:
    # No chunked framing for HTTP/1.0: the body is the events, ended by closing the socket,
    # also when the client asked for keep-alive (there is no other way to end it).
    async with running(FAST) as r:
        reader, writer = await asyncio.open_connection("127.0.0.1", int(r.url.rsplit(":")[-1]))
        try:
            writer.write(b"GET /v1/chat/stream?prompt=hi HTTP/1.0\r\n" + connection + b"\r\n")
            raw = await asyncio.wait_for(reader.read(-1), 10)  # until the server closes
        finally:
            writer.close()
    head, _, body = raw.partition(b"\r\n\r\n")
    assert head.split(b" ", 2)[1] == b"200"
    assert b"chunked" not in head.lower()
    assert b"connection: close" in head.lower() and b"keep-alive" not in head.lower()
    assert b"\r\n" not in body  # frames end in \n: no chunk framing crept in
    events = sse.Decoder().feed(body)
    assert events[-1].event == "done"
    assert "".join(json.loads(e.data)["content"] for e in events
                   if e.event == "message") == "".join(make_tokens(FAST))


async def test_a_client_that_resets_mid_stream_ends_it_as_client_closed(io_loop: Any) -> None:
    # A reset (not a clean close) while frames are being sent: the next send fails, the
    # stream ends as client_closed and the upstream is cancelled.
    flood = Scenario(rate=500, tokens=100_000)
    async with running(flood, store__orphan_grace_s=0.3) as r:
        with capture_logs() as logs:
            async with silent_client(r) as sock:
                await r.wait_mock("open", 1, within=5)
                loop = asyncio.get_running_loop()
                assert await asyncio.wait_for(loop.sock_recv(sock, 4096), 5)
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            took = await r.wait_mock("open", 0, within=5)
            await eventually(stream_logged(logs))
        assert (await r.mock_stats())["cancelled"] == 1
        assert r.deps.registry.active == 0
    assert took < 3.5
    assert [e["outcome"] for e in logs if e["event"] == "stream"] == ["abandoned"]


# --- bad input never reaches the upstream --------------------------------------------------


@pytest.mark.parametrize(
    "content, status, needle",
    [
        (b"{oops", 400, "not valid JSON"),
        # issue 13 point 7: a UTF-8-encoded surrogate was a 500 with a traceback
        (b'{"messages": [{"role": "user", "content": "\xed\xa0\x80"}]}', 400, "not UTF-8"),
        (json.dumps({"messages": []}).encode(), 400, "'messages'"),
        (json.dumps({"messages": CHAT, "persona": "ninja"}).encode(), 400, "pirate"),
        (json.dumps({"messages": [{"role": "user", "content": "x" * 3000}]}).encode(), 413,
         "at most 2048"),
    ],
)
async def test_invalid_requests_are_rejected_before_the_upstream(
    io_loop: Any, content: bytes, status: int, needle: str
) -> None:
    async with running(limits__max_body_bytes=2048,
                       personas={"pirate": Persona("Arr.")}) as r:
        async with httpx.AsyncClient() as c:
            resp = await c.post(r.url + "/v1/chat/completions", content=content,
                                headers={"Content-Type": "application/json"})
        stats = await r.mock_stats()
    assert resp.status_code == status
    assert needle in resp.json()["error"]["message"]
    assert stats["requests"] == 0


async def test_chunked_oversized_body_is_413(io_loop: Any) -> None:
    async def body() -> Any:
        for _ in range(10):
            yield b"x" * 1000

    async with running(limits__max_body_bytes=2048) as r:
        async with httpx.AsyncClient() as c:
            resp = await c.post(r.url + "/v1/chat/completions", content=body())
        assert (await r.mock_stats())["requests"] == 0
    assert resp.status_code == 413 and resp.json()["error"]["code"] == "body_too_large"


async def test_eventsource_validation_errors_are_400(io_loop: Any) -> None:
    async with running(personas={"pirate": Persona("Arr.")}) as r:
        async with httpx.AsyncClient() as c:
            missing = await c.get(r.url + "/v1/chat/stream")
            persona = await c.get(es_url(r.url, persona="ninja"))
    assert missing.status_code == 400 and "'prompt'" in missing.json()["error"]["message"]
    assert persona.status_code == 400
    assert persona.json()["error"] == {
        "type": "invalid_request_error", "code": "unknown_persona",
        "message": "unknown persona 'ninja'; valid personas: pirate"}


async def test_persona_system_prompt_is_added_on_the_server_only(io_loop: Any) -> None:
    scenario = Scenario(rate=0, text="echo", tokens=50)
    async with running(scenario, personas={"pirate": Persona("SECRET-SYSTEM-PROMPT")}) as r:
        got = await stream("GET", es_url(r.url, prompt="ahoy", persona="pirate"))
    # the echo simulator repeats the last user message; the system prompt never shows
    assert "ahoy" in got.content()
    assert b"SECRET" not in got.raw


async def test_too_many_streams(io_loop: Any) -> None:
    slow = Scenario(rate=1, tokens=100)
    async with running(slow, limits__max_streams=1, store__orphan_grace_s=0.2) as r:
        first = asyncio.create_task(stream("GET", es_url(r.url)))
        try:
            await r.wait_mock("open", 1, within=3)
            async with httpx.AsyncClient() as c:
                api = await c.post(r.url + "/v1/chat/completions", json=chat_body(FAST))
            es = await stream("GET", es_url(r.url))
        finally:
            first.cancel()
            await asyncio.gather(first, return_exceptions=True)
        await r.wait_mock("open", 0, within=3)
        async with httpx.AsyncClient() as c:
            after = await c.post(r.url + "/v1/chat/completions",
                                 json={**chat_body(FAST), "stream": False})
    assert api.status_code == 429 and api.headers["Retry-After"] == "1"
    assert api.json()["error"]["code"] == "overloaded"
    assert es.status == 200 and es.complete
    assert [e.event for e in es.events] == ["error"]
    assert json.loads(es.events[0].data)["error"]["code"] == "overloaded"
    assert after.status_code == 200  # the slot was given back


# --- the rest of the surface --------------------------------------------------------------


async def test_health_ready_and_json_404(io_loop: Any) -> None:
    async with running() as r:
        async with httpx.AsyncClient() as c:
            health = await c.get(r.url + "/healthz")
            ready = await c.get(r.url + "/readyz")
            missing = await c.get(r.url + "/nope")
            wrong_method = await c.delete(r.url + "/v1/chat/completions")
    assert health.status_code == 200 and health.json()["status"] == "ok"
    assert ready.status_code == 200 and ready.json()["status"] == "ready"
    assert missing.status_code == 404 and missing.json()["error"]["code"] == "not_found"
    assert wrong_method.status_code == 405 and "error" in wrong_method.json()


async def test_request_id_is_echoed_and_logged_and_prompts_are_not(io_loop: Any) -> None:
    async with running(FAST) as r:
        with capture_logs() as logs:
            got = await stream("GET", es_url(r.url, prompt="my secret question"),
                               headers={"X-Request-ID": "req-123"})
    assert got.headers["X-Request-ID"] == "req-123"
    line = [e for e in logs if e["event"] == "stream"][0]
    assert line["outcome"] == "completed" and line["events"] == 13
    assert line["stream_id"] == got.headers["X-Stream-ID"]
    assert line["upstream_status"] == 200 and line["ttft_s"] is not None
    assert "my secret question" not in json.dumps(logs, default=str)


async def test_the_api_key_never_reaches_a_client_or_a_log(
    io_loop: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("OPENAI_API_KEY", "sk-secret-123")
    async with running(FAST, upstream__kind="openai") as r:
        assert r.deps.upstream._headers["Authorization"] == "Bearer sk-secret-123"
        with capture_logs() as logs:
            ok = await stream("GET", es_url(r.url))
            async with httpx.AsyncClient() as c:
                denied = await c.post(r.url + "/v1/chat/completions",
                                      json=chat_body(Scenario(error_status=401)))
    assert ok.events[-1].event == "done"
    assert denied.status_code == 502
    assert denied.json()["error"]["code"] == "upstream_auth_failed"
    for seen in (ok.raw, denied.content, json.dumps(logs, default=str).encode(),
                 json.dumps(dict(denied.headers)).encode()):
        assert b"sk-secret-123" not in seen


# --- pacing (issue 3) -----------------------------------------------------------------------

BURST = Scenario(rate=0, tokens=1400, burst=8192, first_delay_s=1.0)


async def test_an_8kb_burst_leaves_as_a_smooth_stream_of_pieces(io_loop: Any) -> None:
    # The seed's case: the model pauses, then 8 KB arrive in one write.
    async with running(BURST, pacing__mode="smooth") as r:
        pacing = r.settings.pacing
        got = await stream("GET", es_url(r.url))
    deltas = [(e, t) for e, t in zip(got.events, got.times, strict=True) if e.event == "message"]
    text = "".join(json.loads(e.data)["content"] for e, _ in deltas)
    assert text == "".join(make_tokens(BURST))
    assert len(text.encode()) > 8192
    assert got.events[-1].event == "done"
    sizes = [len(json.loads(e.data)["content"].encode()) for e, _ in deltas]
    assert len(deltas) >= 10 and max(sizes) < 8192 / 4  # many pieces, not one 8 KB jump
    first, last = deltas[0][1], deltas[-1][1]
    # spread over time (many separate reads, not one), and done within max_lag_s; the
    # margins allow for a loaded machine, where a late loop merges pieces
    assert len({t for _, t in deltas}) >= 5
    assert last - first >= pacing.target_lag_s / 4
    assert last - first <= pacing.max_lag_s + 3.0


async def test_the_same_burst_without_pacing_is_one_jump(io_loop: Any) -> None:
    # The burst ends the reply, so the pacer spreads it over drain_s: 3 s here, so that the
    # unpaced run (tens of milliseconds when idle) has a wide margin on a loaded machine.
    spreads = {}
    for mode in ("off", "smooth"):
        async with running(BURST, pacing__mode=mode, pacing__target_lag_s=3.0,
                           pacing__max_lag_s=4.0, pacing__drain_s=3.0) as r:
            got = await stream("GET", es_url(r.url))
        times = [t for e, t in zip(got.events, got.times, strict=True) if e.event == "message"]
        spreads[mode] = times[-1] - times[0]
        if mode == "off":
            assert len(times) == 1400  # one event per upstream delta
        else:
            assert len(times) < 200  # a few pieces per tick
    # measured in the same run: without pacing the burst lands at once, with pacing it is
    # spread over (nearly) the whole drain
    assert spreads["off"] < 1.0 < 2.0 < spreads["smooth"], spreads


async def test_paced_openai_chunks_keep_id_model_created_and_an_intact_end(io_loop: Any) -> None:
    async with running(pacing__mode="smooth") as r:
        got = await stream("POST", r.url + "/v1/chat/completions",
                           json=chat_body(BURST, stream_options={"include_usage": True}))
    data = got.data()
    chunks = data[:-1]
    assert data[-1] == "[DONE]"
    assert len({(c["id"], c["model"], c["created"]) for c in chunks}) == 1
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert chunks[-2]["choices"] == [{"index": 0, "delta": {}, "finish_reason": "stop"}]
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] == 1400
    assert 10 <= len(chunks) < 1400
    assert got.content() == "".join(make_tokens(BURST))


@pytest.mark.parametrize("scenario, code", [
    (Scenario(rate=0, tokens=1400, burst=8192, drop_at=1300), "upstream_incomplete"),
    (Scenario(rate=0, tokens=1400, burst=8192, error_at=1300), "server_error"),
])
async def test_a_failure_after_a_burst_drains_the_text_then_sends_the_error(
    io_loop: Any, scenario: Scenario, code: str
) -> None:
    async with running(scenario, pacing__mode="smooth") as r:
        got = await stream("GET", es_url(r.url))
    assert got.events[-1].event == "error"
    assert json.loads(got.events[-1].data)["error"]["code"] == code
    text = "".join(json.loads(e.data)["content"] for e in got.events[:-1])
    assert text == "".join(make_tokens(scenario)[:1300])


def done_of(got: Any) -> dict[str, Any]:
    assert got.events[-1].event == "done", got.raw[-300:]
    return dict(json.loads(got.events[-1].data))


async def test_the_done_event_says_how_many_characters_of_a_burst_pacing_smoothed(
    io_loop: Any,
) -> None:
    # issue 15: only the server knows whether the upstream burst and the pacer smoothed it
    bursty = Scenario(rate=200, tokens=300, burst=1024)
    async with running(bursty, pacing__mode="smooth") as r:
        paced = await stream("GET", es_url(r.url))
        async with httpx.AsyncClient() as c:
            started = await c.post(r.url + "/v1/streams", json={
                "messages": CHAT, "model": bursty.to_model(), "pacing": "off"})
        unpaced = await stream("GET", r.url + started.json()["events_url"])
        openai_frames = await stream("POST", r.url + "/v1/chat/completions",
                                     json=chat_body(bursty))
    done = done_of(paced)
    assert done["finish_reason"] == "stop" and done["usage"]["completion_tokens"] == 300
    assert set(done["pacing"]) == {"mode", "smoothed_chars", "max_lag_s"}
    assert done["pacing"]["mode"] == "smooth"
    text = paced.content()
    assert 0 < done["pacing"]["smoothed_chars"] < len(text)
    assert 0 < done["pacing"]["max_lag_s"] <= r.settings.pacing.max_lag_s + 0.5
    assert done_of(unpaced)["pacing"] == {"mode": "off", "smoothed_chars": 0, "max_lag_s": 0}
    assert unpaced.content() == text
    # An addition to the EventSource format only: the OpenAI frames are as they were.
    assert openai_frames.content() == text and b"pacing" not in openai_frames.raw


async def test_the_done_event_of_a_steady_stream_says_pacing_smoothed_nothing(
    io_loop: Any,
) -> None:
    # issue 15. Fewer words than the threshold: a loaded machine that merges reads still
    # makes no burst of them.
    steady = Scenario(rate=20, tokens=30)
    async with running(steady, pacing__mode="smooth", pacing__burst_threshold=64) as r:
        got = await stream("GET", es_url(r.url))
    assert got.content() == "".join(make_tokens(steady))
    pacing = done_of(got)["pacing"]
    assert pacing["mode"] == "smooth" and pacing["smoothed_chars"] == 0
    assert pacing["max_lag_s"] <= r.settings.pacing.max_lag_s


async def test_a_reload_applies_to_new_streams_only(io_loop: Any, tmp_path: Any) -> None:
    path = tmp_path / "sseproxy.toml"
    path.write_text('[pacing]\nmode = "off"\n')
    async with running(BURST, config_file=str(path)) as r:
        before = asyncio.create_task(stream("GET", es_url(r.url)))
        await r.wait_mock("open", 1, within=3)
        path.write_text('[pacing]\nmode = "smooth"\n')
        assert app.reload_settings(r.deps, r.overrides)
        old_stream = await before
        new_stream = await stream("GET", es_url(r.url))
    assert len(old_stream.events) == 1401  # started before the reload: unpaced
    assert len(new_stream.events) < 200  # started after it: paced


# --- who pays when a client leaves (issue 12 point 5) ----------------------------------------


async def stream_line(logs: list[MutableMapping[str, Any]], within: float = 10.0
                      ) -> MutableMapping[str, Any]:
    """The canonical ``stream`` log line, once it has been written."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + within
    while not any(e["event"] == "stream" for e in logs):
        assert loop.time() < deadline, "no stream line was logged"
        await asyncio.sleep(0.02)
    return next(e for e in logs if e["event"] == "stream")


@pytest.mark.parametrize("method, path, body", [
    ("GET", "/v1/chat/stream?prompt=hi", None),
    ("POST", "/v1/chat/completions", {"messages": CHAT, "stream": True}),
])
async def test_the_stream_line_of_a_client_that_left_says_the_upstream_was_cancelled(
    io_loop: Any, method: str, path: str, body: dict[str, Any] | None
) -> None:
    # EventSource: the generation is cancelled after store.orphan_grace_s (issue 14).
    async with running(Scenario(rate=20, tokens=10_000), store__orphan_grace_s=0.3) as r:
        with capture_logs() as logs:
            got = await stream(method, r.url + path, json=body, stop_after=2)
            line = await stream_line(logs)
        await r.wait_mock("cancelled", 1, within=5)
    assert len(got.events) == 2
    assert line["outcome"] == ("client_closed" if method == "POST" else "abandoned")
    assert line["upstream_cancelled"] is True
    assert 0 <= line["cancel_after_s"] < (1.0 if method == "POST" else 3.0)


async def test_the_stream_line_says_no_upstream_was_cancelled_when_it_had_finished(
    io_loop: Any,
) -> None:
    # The whole reply arrived at once and is being paced out when the client leaves:
    # the client left, but the upstream request had already been paid in full.
    slow_pacing: dict[str, Any] = {"pacing__mode": "smooth", "pacing__target_lag_s": 30,
                                   "pacing__max_lag_s": 60, "pacing__drain_s": 60}
    async with running(Scenario(rate=0, tokens=1400, burst=8192), store__orphan_grace_s=0.3,
                       **slow_pacing) as r:
        with capture_logs() as logs:
            async with httpx.AsyncClient(timeout=10) as c:
                async with c.stream("GET", r.url + "/v1/chat/stream?prompt=hi") as resp:
                    raw = cast(AsyncGenerator[bytes, None], resp.aiter_raw())
                    async with contextlib.aclosing(raw) as chunks:
                        await anext(chunks)
                        await r.wait_mock("completed", 1, within=5)
            line = await stream_line(logs)
    assert line["outcome"] == "abandoned"  # nobody came back within store.orphan_grace_s
    assert line["upstream_cancelled"] is False and line["cancel_after_s"] is None


async def test_the_stream_line_of_a_completed_stream_cancelled_nothing(io_loop: Any) -> None:
    async with running(FAST) as r:
        with capture_logs() as logs:
            await stream("GET", r.url + "/v1/chat/stream?prompt=hi")
            line = await stream_line(logs)
    assert line["outcome"] == "completed"
    assert line["upstream_cancelled"] is False and line["cancel_after_s"] is None


async def test_cancel_after_s_counts_from_the_last_client_that_left(io_loop: Any) -> None:
    # A client leaves, resumes with Last-Event-ID, reads on, and leaves again: the upstream
    # is cancelled store.orphan_grace_s after the second leave, and cancel_after_s is
    # measured from that leave, not from the first one (which was seconds earlier).
    grace = 0.5
    async with running(Scenario(rate=20, tokens=10_000), store__orphan_grace_s=grace) as r:
        with capture_logs() as logs:
            first = await stream("GET", es_url(r.url), stop_after=2)
            decoder = sse.Decoder()
            events: list[sse.Event] = []
            async with httpx.AsyncClient(timeout=20) as c:
                async with c.stream("GET", es_url(r.url),
                                    headers={"Last-Event-ID": first.events[-1].id}) as resp:
                    raw = cast(AsyncGenerator[bytes, None], resp.aiter_raw())
                    async with contextlib.aclosing(raw) as chunks:
                        async for chunk in chunks:
                            events += decoder.feed(chunk)
                            if len(events) >= 20:  # about a second after the first leave
                                break
                    left = time.monotonic()  # the server sees this client leave after this
            line = await stream_line(logs)
            logged = time.monotonic()
        await r.wait_mock("cancelled", 1, within=5)
    assert line["outcome"] == "abandoned" and line["upstream_cancelled"] is True
    # Both bounds follow from the order of events on one clock, whatever the load.
    assert grace - 0.001 <= line["cancel_after_s"] <= logged - left + 0.001
