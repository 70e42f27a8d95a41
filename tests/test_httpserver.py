"""Request heads and bodies at the limits, through a real server on 127.0.0.1 with raw
sockets: 414 for a long request line, 431 for large headers, 408 for a late body, a closed
connection for a late head (issue 12 point 3, issue 13 point 6)."""

from __future__ import annotations

import asyncio
import json
from typing import Any
from urllib.parse import quote

import httpx
import pytest
from servers import Running, running
from structlog.testing import capture_logs

from sseproxy import errors
from sseproxy.httpserver import HeadLimits
from sseproxy.mockupstream import Scenario

FAST = Scenario(rate=0, tokens=5)


def port_of(r: Running) -> int:
    return int(r.url.rsplit(":", 1)[1])


async def exchange(r: Running, request: bytes, within: float = 20.0) -> bytes:
    """Send ``request`` on a new connection (while reading) and return all that comes back
    until the server ends the connection."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port_of(r))

    async def send() -> None:
        try:
            writer.write(request)
            await writer.drain()
        except ConnectionError:
            pass  # the server closed while we were still sending: the reader tells

    sending = asyncio.create_task(send())
    try:
        return await asyncio.wait_for(reader.read(-1), within)
    finally:
        sending.cancel()
        writer.close()


def parse(raw: bytes) -> tuple[int, dict[str, str], Any]:
    """Status, headers (lower-case names) and JSON body of one response."""
    head, _, body = raw.partition(b"\r\n\r\n")
    status_line, *lines = head.decode("latin-1").split("\r\n")
    headers = {k.lower(): v.strip() for k, _, v in (line.partition(":") for line in lines)}
    is_json = headers.get("content-type", "").startswith("application/json")
    return int(status_line.split(" ")[1]), headers, json.loads(body) if is_json else body


def get(target: str, headers: bytes = b"") -> bytes:
    return b"GET " + target.encode() + b" HTTP/1.1\r\nHost: x\r\n" + headers + b"\r\n"


# --- 414: a request line over limits.max_url_bytes -------------------------------------------


@pytest.mark.parametrize("prompt", [
    "a" * 70_000,  # under Tornado's head limit of both limits: judged whole
    "说" * 8_000,  # 72 KB percent-encoded
    "a" * 200_000,  # past both limits together: judged from its start, still 414
], ids=["70k-ascii", "8k-cjk", "200k-ascii"])
async def test_a_prompt_too_long_for_the_url_is_414_telling_to_post_it(
    io_loop: Any, prompt: str
) -> None:
    # issue 12 point 3: the connection closed with nothing sent
    # (raw: httpx refuses to send a query over 64 KiB)
    async with running(FAST) as r:
        with capture_logs() as logs:
            raw = await exchange(r, get("/v1/chat/stream?prompt=" + quote(prompt)))
        assert (await r.mock_stats())["requests"] == 0
    status, headers, body = parse(raw)
    assert status == 414
    assert headers["content-type"] == "application/json; charset=utf-8"
    error = body["error"]
    assert error["type"] == "invalid_request_error" and error["code"] == "uri_too_long"
    assert "65536 bytes" in error["message"]
    assert "POST /v1/chat/completions" in error["message"]
    refused = [e for e in logs if e["event"] == "request_refused"]
    assert [(e["status"], e["error_code"]) for e in refused] == [(414, "uri_too_long")]


async def test_a_prompt_that_fits_the_url_streams(io_loop: Any) -> None:
    prompt = "a" * 60_000  # near limits.max_url_bytes, far under limits.max_prompt_chars
    async with running(FAST) as r:
        async with httpx.AsyncClient(timeout=20) as c:
            resp = await c.get(r.url + "/v1/chat/stream", params={"prompt": prompt})
    assert resp.status_code == 200 and "event: done" in resp.text


async def test_max_url_bytes_is_the_limit_of_the_request_line(io_loop: Any) -> None:
    async with running(FAST, limits__max_url_bytes=2048) as r:
        line = "/v1/chat/stream?prompt="
        fits = line + "a" * (2048 - len("GET  HTTP/1.1") - len(line))
        status, _, _ = parse(await exchange(r, get(fits, b"Connection: close\r\n")))
        assert status == 200
        status, _, body = parse(await exchange(r, get(fits + "a")))
    assert status == 414 and body["error"]["code"] == "uri_too_long"


# --- 431: header fields over limits.max_header_bytes ---------------------------------------


@pytest.mark.parametrize("size", [70_000, 10_000_000], ids=["70kB", "10MB"])
async def test_headers_over_the_limit_are_431(io_loop: Any, size: int) -> None:
    # issue 13 point 6: a 10 MB header got a connection reset
    async with running(FAST) as r:
        raw = await exchange(r, get("/healthz", b"X-Big: " + b"b" * size + b"\r\n"))
    status, headers, body = parse(raw)
    assert status == 431
    assert headers["connection"] == "close"
    assert body["error"]["type"] == "invalid_request_error"
    assert body["error"]["code"] == "headers_too_large"
    assert "65536 bytes" in body["error"]["message"]


async def test_max_header_bytes_counts_the_header_fields(io_loop: Any) -> None:
    async with running(FAST, limits__max_header_bytes=2048) as r:
        fields = b"Host: x\r\nConnection: close\r\n"
        filler = b"X-Fill: " + b"f" * (2048 - len(fields) - len(b"X-Fill: \r\n")) + b"\r\n"
        request = b"GET /healthz HTTP/1.1\r\n" + fields + filler + b"\r\n"
        status, _, _ = parse(await exchange(r, request))
        assert status == 200
        status, _, body = parse(await exchange(r, request.replace(b"X-Fill: ", b"X-Fill: f")))
    assert status == 431 and body["error"]["code"] == "headers_too_large"


async def test_a_kept_alive_connection_gets_414_for_its_second_request(io_loop: Any) -> None:
    async with running(FAST) as r:
        reader, writer = await asyncio.open_connection("127.0.0.1", port_of(r))
        try:
            writer.write(get("/healthz"))
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
            assert head.startswith(b"HTTP/1.1 200")
            length = int(head.lower().split(b"content-length: ")[1].split(b"\r\n")[0])
            await asyncio.wait_for(reader.readexactly(length), 10)
            writer.write(get("/healthz?" + "q" * 70_000))
            rest = await asyncio.wait_for(reader.read(-1), 20)
        finally:
            writer.close()
    assert parse(rest)[0] == 414


@pytest.mark.parametrize("head, status", [
    (b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", None),
    (b"GET /" + b"u" * 1010 + b" HTTP/1.1\r\n\r\n", None),  # a line of 1024 bytes
    (b"GET /" + b"u" * 1011 + b" HTTP/1.1\r\n\r\n", 414),
    (b"\r\nGET /" + b"u" * 1011 + b" HTTP/1.1\n\n", 414),
    (b"GET / HTTP/1.1\r\nX: " + b"h" * 1019 + b"\r\n\r\n", None),  # fields of 1024 bytes
    (b"GET / HTTP/1.1\r\nX: " + b"h" * 1020 + b"\r\n\r\n", 431),
    (b"GET / HTTP/1.1\nX: " + b"h" * 1021 + b"\n\n", 431),
])
def test_judge_a_whole_head(head: bytes, status: int | None) -> None:
    refusal = HeadLimits(1024, 1024).judge(head, complete=True)
    assert (refusal.http_status() if refusal else None) == status


@pytest.mark.parametrize("start, error", [
    (b"GET /" + b"u" * 3000, errors.UriTooLong),
    (b"GET / HTTP/1.1\r\nX: " + b"h" * 3000, errors.HeadersTooLarge),
])
def test_judge_the_start_of_a_head_past_both_limits(
    start: bytes, error: type[errors.RequestError]
) -> None:
    assert isinstance(HeadLimits(1024, 1024).judge(start, complete=False), error)


# --- timeouts: limits.header_timeout_s, limits.body_timeout_s ----------------------------------


async def test_a_head_that_does_not_end_is_closed_after_the_header_timeout(io_loop: Any) -> None:
    async with running(FAST, limits__header_timeout_s=0.3) as r:
        loop = asyncio.get_running_loop()
        start = loop.time()
        raw = await exchange(r, b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Slow: ", within=20)
        took = loop.time() - start
    assert raw == b""
    assert took < 10  # 0.3 s and a generous margin (Tornado's default was 75 s)


async def test_a_body_that_does_not_arrive_in_time_is_408(io_loop: Any) -> None:
    # issue 13 point 6: a body trickled at 1 byte per 2 s was still open after 400 s
    async with running(FAST, limits__body_timeout_s=0.5) as r:
        reader, writer = await asyncio.open_connection("127.0.0.1", port_of(r))

        async def trickle() -> None:
            try:
                while True:
                    writer.write(b" ")
                    await writer.drain()
                    await asyncio.sleep(0.1)  # the slow client's pace, not a synchronisation
            except ConnectionError:
                pass

        loop = asyncio.get_running_loop()
        start = loop.time()
        with capture_logs() as logs:
            writer.write(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n"
                         b"Content-Type: application/json\r\nContent-Length: 100000\r\n\r\n{")
            trickling = asyncio.create_task(trickle())
            try:
                raw = await asyncio.wait_for(reader.read(-1), 20)
            finally:
                trickling.cancel()
                writer.close()
        took = loop.time() - start
        assert (await r.mock_stats())["requests"] == 0
    status, _, body = parse(raw)
    assert status == 408
    assert body["error"]["code"] == "request_timeout"
    assert body["error"]["type"] == "invalid_request_error"
    assert took < 10
    streams = [e for e in logs if e["event"] == "stream"]
    assert [(e["outcome"], e["error_code"]) for e in streams] == [("rejected", "request_timeout")]


async def test_a_body_in_time_is_served(io_loop: Any) -> None:
    async with running(FAST, limits__body_timeout_s=0.5) as r:
        async with httpx.AsyncClient(timeout=20) as c:
            resp = await c.post(r.url + "/v1/chat/completions",
                                json={"messages": [{"role": "user", "content": "hi"}]})
    assert resp.status_code == 200


async def test_a_late_body_on_a_url_without_one_is_closed(io_loop: Any) -> None:
    async with running(FAST, limits__body_timeout_s=0.3) as r:
        loop = asyncio.get_running_loop()
        start = loop.time()
        raw = await exchange(r, b"GET /healthz HTTP/1.1\r\nHost: x\r\nContent-Length: 10\r\n\r\n")
        took = loop.time() - start
    assert raw == b""
    assert took < 10
