"""The upstream client on httpx's MockTransport: parsing and the error map (issue 2, point 3)."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import httpx
import pytest
from fakes import GOOD, SSE, URL, Body, chunk, client, responder
from scripted import CHUNKED, Server, answer, chunked, serving

from sseproxy import __version__, config, errors, upstream
from sseproxy.upstream import Delta, UpstreamClient, make_transport


async def collect(up: UpstreamClient, body: dict[str, Any] | None = None) -> list[Delta]:
    got: list[Delta] = []
    async with up.open(body or {"model": "m", "messages": []}) as stream:
        await stream.run(got.append)
    return got


async def test_request_shape_and_deltas(io_loop: Any) -> None:
    seen: list[httpx.Request] = []

    async def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return httpx.Response(200, headers=SSE, stream=Body(GOOD))

    up = client(handler, api_key="sk-test")
    deltas = await collect(up, {"model": "m", "messages": [{"role": "user", "content": "x"}]})
    request = seen[0]
    assert str(request.url) == URL + "/chat/completions"
    assert request.headers["Authorization"] == "Bearer sk-test"
    assert request.headers["Content-Type"] == "application/json"
    assert request.headers["User-Agent"] == f"sseproxy/{__version__}"
    assert request.headers["Accept-Encoding"] == "identity"
    assert request.headers["Content-Length"] == str(len(request.content))
    assert json.loads(request.content) == {
        "model": "m", "messages": [{"role": "user", "content": "x"}], "stream": True,
        "stream_options": {"include_usage": True}}
    assert deltas == [
        Delta(role="assistant"), Delta("Hel"), Delta("lo"), Delta(finish_reason="stop"),
        Delta(usage={"prompt_tokens": 1, "completion_tokens": 2, "total_tokens": 3}),
    ]


async def test_no_authorization_header_without_a_key(io_loop: Any) -> None:
    seen: list[httpx.Request] = []

    async def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return httpx.Response(200, headers=SSE, stream=Body(GOOD))

    await collect(client(handler))
    assert "Authorization" not in seen[0].headers


async def test_on_read_follows_the_deltas_of_each_read(io_loop: Any) -> None:
    handler, _ = responder(parts=[chunk("a") + chunk("b"), chunk("c"),
                                  b"data: [DONE]\n\n"])
    seen: list[str] = []
    async with client(handler).open({"model": "m", "messages": []}) as s:
        await s.run(lambda d: seen.append(d.content), lambda: seen.append("|"))
    assert seen == ["a", "b", "|", "c", "|", "|"]


async def test_on_read_runs_when_a_read_breaks_the_reply(io_loop: Any) -> None:
    handler, _ = responder(parts=[chunk("a") + b"data: {broken\n\n"])
    seen: list[str] = []
    with pytest.raises(errors.MalformedFrame):
        async with client(handler).open({"model": "m", "messages": []}) as s:
            await s.run(lambda d: seen.append(d.content), lambda: seen.append("|"))
    assert seen == ["a", "|"]


async def test_no_cookie_from_one_request_reaches_the_next(io_loop: Any) -> None:
    # The upstream client is shared by every user of the process: what the API sets for
    # one request (a load balancer's cookie, say) must not ride along on the next.
    seen: list[httpx.Request] = []

    async def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return httpx.Response(200, headers={**SSE, "Set-Cookie": "lb=abc; Path=/"},
                              stream=Body(GOOD))

    up = client(handler)
    await collect(up)
    await collect(up)
    assert len(seen) == 2 and "Cookie" not in seen[1].headers


async def test_frames_split_anywhere_give_the_same_deltas(io_loop: Any) -> None:
    whole = b"".join(GOOD)
    handler, _ = responder(parts=[whole[i:i + 7] for i in range(0, len(whole), 7)])
    assert [d.content for d in await collect(client(handler))] == ["", "Hel", "lo", "", ""]


def error_body(code: str | None, message: str, etype: str = "invalid_request_error") -> bytes:
    return json.dumps({"error": {"code": code, "message": message, "type": etype}}).encode()


@pytest.mark.parametrize(
    "status, body, headers, http_status, code, message",
    [
        (400, error_body("context_length_exceeded", "too long"), {}, 400,
         "context_length_exceeded", "too long"),
        (404, error_body("model_not_found", "no such model"), {}, 404, "model_not_found",
         "no such model"),
        (401, error_body("invalid_api_key", "Incorrect API key sk-abc"), {}, 502,
         "upstream_auth_failed", "the upstream rejected sseproxy's credentials"),
        (429, error_body("rate_limit_exceeded", "slow down"), {"Retry-After": "7"}, 429,
         "rate_limit_exceeded", "slow down"),
        (429, b"", {}, 429, "rate_limited", "the upstream answered HTTP 429"),
        (429, b"", {"retry-after-ms": "2500"}, 429, "rate_limited",
         "the upstream answered HTTP 429"),
        (301, b"", {"Location": "https://elsewhere.test/"}, 502, "upstream_http_301",
         "the upstream answered HTTP 301"),
        (500, error_body(None, "boom", "server_error"), {}, 502, "upstream_http_500", "boom"),
        (503, b"<html>busy</html>", {}, 502, "upstream_http_503",
         "the upstream answered HTTP 503"),
    ],
)
async def test_error_statuses_keep_code_and_message_but_not_headers(
    io_loop: Any, status: int, body: bytes, headers: dict[str, str], http_status: int,
    code: str, message: str,
) -> None:
    resp_headers = {"Set-Cookie": "secret=1", "X-Upstream-Internal": "x", **headers}
    handler, stream = responder(status, [body], resp_headers)
    with pytest.raises(errors.UpstreamStatusError) as info:
        await collect(client(handler))
    err = info.value
    assert (err.http_status(), err.error_code(), err.message) == (http_status, code, message)
    expected = {429: {"Retry-After": "7" if "Retry-After" in headers else
                      "3" if "retry-after-ms" in headers else "1"}}.get(status, {})
    assert err.headers() == expected
    assert "secret" not in json.dumps(err.to_body())
    assert stream.closed


async def test_connect_failure_is_unreachable(io_loop: Any) -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError("connection refused", request=request)

    with pytest.raises(errors.UpstreamUnreachable) as info:
        await collect(client(handler))
    assert info.value.http_status() == 502


@pytest.mark.parametrize(
    "parts, error, needle",
    [
        ([chunk("a"), b"data: {not json\n\n"], errors.MalformedFrame, "not JSON"),
        ([b"data: [1]\n\n"], errors.MalformedFrame, "not a JSON object"),
        ([b'data: {"choices": "x"}\n\n'], errors.MalformedFrame, "choices"),
        ([b'data: {"choices": [{"delta": {"content": 5}}]}\n\n'], errors.MalformedFrame,
         "wrong shape"),
        ([chunk("a"), b'data: {"error": {"code": "overloaded", "message": "busy"}}\n\n'],
         errors.UpstreamStreamError, "busy"),
        ([chunk("a"), chunk("b")], errors.IncompleteStream, "without [DONE]"),
        ([chunk("a"), httpx.ReadError("reset")], errors.IncompleteStream, "broke mid-reply"),
    ],
)
async def test_broken_streams_map_into_the_error_tree(
    io_loop: Any, parts: list[bytes | Exception], error: type[Exception], needle: str
) -> None:
    handler, stream = responder(parts=list(parts))
    with pytest.raises(error) as info:
        await collect(client(handler, max_keepalive_connections=1))
    assert needle in str(info.value)
    assert stream.closed


async def test_error_object_keeps_the_upstream_code(io_loop: Any) -> None:
    handler, _ = responder(parts=[b'data: {"error": {"code": "overloaded", "message": "x"}}\n\n'])
    with pytest.raises(errors.UpstreamStreamError) as info:
        await collect(client(handler))
    assert info.value.error_code() == "overloaded"


async def test_event_size_limit_comes_from_config(io_loop: Any) -> None:
    settings = config.Settings(
        upstream=config.UpstreamSettings(kind="openai", base_url=URL),
        limits=config.LimitsSettings(max_event_bytes=2048),
    )
    handler, _ = responder(parts=[chunk("x" * 3000)])
    with pytest.raises(errors.MalformedFrame, match="max_event_bytes = 2048"):
        await collect(UpstreamClient(settings, httpx.MockTransport(handler)))


async def test_event_size_limit_counts_characters_not_utf8_bytes(io_loop: Any) -> None:
    # issue 12: limits.max_event_bytes counts code points, as README and sseproxy.toml say
    settings = config.Settings(
        upstream=config.UpstreamSettings(kind="openai", base_url=URL),
        limits=config.LimitsSettings(max_event_bytes=2048),
    )
    frame = chunk("字" * 1800).decode("unicode_escape").encode()  # raw UTF-8, not \u escapes
    assert len(frame.decode()) < 2048 < len(frame)  # under the bound in characters only
    handler, _ = responder(parts=[frame, chunk(finish="stop")])
    deltas = await collect(UpstreamClient(settings, httpx.MockTransport(handler)))
    assert deltas[0].content == "字" * 1800


async def test_finish_reason_without_done_is_complete(io_loop: Any) -> None:
    handler, _ = responder(parts=[chunk("a"), chunk(finish="length")])
    deltas = await collect(client(handler))
    assert deltas[-1].finish_reason == "length"


async def test_first_token_timeout(io_loop: Any) -> None:
    handler, stream = responder(parts=[0.5, chunk("late")])
    with pytest.raises(errors.FirstTokenTimeout) as info:
        await collect(client(handler, first_token_timeout_s=0.05, idle_timeout_s=5))
    assert info.value.http_status() == 504 and info.value.error_code() == "upstream_timeout"
    assert stream.closed


async def test_first_token_timeout_also_covers_a_slow_status(io_loop: Any) -> None:
    async def handler(request: httpx.Request) -> httpx.Response:
        await asyncio.sleep(0.5)
        return httpx.Response(200, headers=SSE, stream=Body(GOOD))

    with pytest.raises(errors.FirstTokenTimeout):
        await collect(client(handler, first_token_timeout_s=0.05))


async def test_idle_timeout_between_frames(io_loop: Any) -> None:
    handler, stream = responder(parts=[chunk("a"), 0.5, chunk("b")])
    up = client(handler, first_token_timeout_s=5, idle_timeout_s=0.05)
    got: list[str] = []
    with pytest.raises(errors.IdleTimeout):
        async with up.open({"model": "m", "messages": []}) as s:
            await s.run(lambda d: got.append(d.content))
    assert got == ["a"]
    assert stream.closed


async def test_cancelling_mid_stream_closes_the_response(io_loop: Any) -> None:
    handler, stream = responder(parts=[chunk("a"), 30.0, chunk("b")])
    up = client(handler)
    first = asyncio.Event()

    async def consume() -> None:
        async with up.open({"model": "m", "messages": []}) as s:
            await s.run(lambda d: first.set())

    task = asyncio.create_task(consume())
    await asyncio.wait_for(first.wait(), 5)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert stream.closed


async def test_a_body_that_is_not_an_event_stream_is_refused_before_acceptance(
    io_loop: Any,
) -> None:
    async def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, json={"choices": []})

    with pytest.raises(errors.UpstreamProtocolError, match="application/json"):
        await collect(client(handler))


async def test_a_compressed_event_stream_is_refused_on_any_transport(io_loop: Any) -> None:
    # Issue 18: httpx would inflate a pulled body without a bound (a gzip bomb); sseproxy
    # asks for identity and refuses anything else, whichever transport reads the body.
    handler, _ = responder(parts=[b"this is not gzip"],
                           headers={"Content-Type": "text/event-stream",
                                    "Content-Encoding": "gzip"})
    with pytest.raises(errors.UpstreamProtocolError, match="compressed its event stream"):
        await collect(client(handler))


async def test_a_role_chunk_does_not_end_the_first_token_deadline(io_loop: Any) -> None:
    # Servers send {"role": "assistant"} at once, then think: the first-token budget holds.
    handler, _ = responder(parts=[chunk("", role="assistant"), 0.3, chunk("late"),
                                  chunk(finish="stop"), b"data: [DONE]\n\n"])
    deltas = await collect(client(handler, first_token_timeout_s=5, idle_timeout_s=0.1))
    assert [d.content for d in deltas] == ["", "late", ""]


# --- on sseproxy's own transport (bytes pushed from a scripted server on loopback) -------


def loopback_client(port: int, transport: str, **upstream: Any) -> UpstreamClient:
    settings = config.Settings(upstream=config.UpstreamSettings(
        kind="openai", base_url=f"http://127.0.0.1:{port}/v1", transport=transport,
        **upstream))
    return UpstreamClient(settings, make_transport(settings))


async def test_the_idle_deadline_starts_at_the_first_token_not_the_first_token_budget(
    io_loop: Any, upstream_transport: str,
) -> None:
    # A generous first-token budget (thinking models) must not delay the idle timeout once
    # tokens flow: one token, then silence, is an idle timeout after idle_timeout_s.
    async def script(server: Server, reader: asyncio.StreamReader,
                     writer: asyncio.StreamWriter) -> None:
        await server.read_request(reader)
        writer.write(CHUNKED + b"%x\r\n%s\r\n" % (len(GOOD[1]), GOOD[1]))
        await writer.drain()
        await reader.read()

    async with serving(script) as server:
        up = loopback_client(server.port, upstream_transport, first_token_timeout_s=5,
                             idle_timeout_s=0.2)
        loop = asyncio.get_running_loop()
        started = loop.time()
        got: list[str] = []
        with pytest.raises(errors.IdleTimeout):
            async with up.open({"model": "m", "messages": []}) as s:
                await s.run(lambda d: got.append(d.content))
        assert got == ["Hel"]
        assert loop.time() - started < 2.0
        await up.aclose()


class Watch:
    def __init__(self) -> None:
        self.calls: list[str] = []

    def begin(self) -> None:
        self.calls.append("begin")

    def end(self) -> None:
        self.calls.append("end")


# On httpx's transport a paused stream stops pulling until it is resumed, as it should.
@pytest.mark.fast_transport
async def test_pause_and_resume_do_nothing_once_the_reply_ended(
    io_loop: Any, upstream_transport: str,
) -> None:
    # A reply can fill the channel (pause) and end in one read; resuming later must not
    # touch the connection (another stream may own it now) nor start an upstream wait.
    async with serving(answer(CHUNKED + chunked(*GOOD))) as server:
        up = loopback_client(server.port, upstream_transport)
        watch = Watch()
        async with up.open({"model": "m", "messages": []}) as s:
            s.waits = watch
            await s.run(lambda d: s.pause())
        calls = len(watch.calls)
        s.resume()
        s.pause()
        assert watch.calls[calls:] == [] and watch.calls[-1] == "end"
        await up.aclose()


@pytest.mark.parametrize("raw, expected", [
    ([(b"Retry-After", b"7")], "7"),
    ([(b"Retry-After", b" 0 ")], "1"),
    ([(b"Retry-After", b"86400")], "3600"),
    ([(b"Retry-After", b"9" * 60_000)], "3600"),
    ([(b"Retry-After", b"5\r7")], None),
    ([(b"Retry-After", b"5\xff")], None),
    ([(b"Retry-After", b"-3")], None),
    ([(b"Retry-After", b"Wed, 21 Oct 2015 07:28:00 GMT")], "1"),  # in the past
    ([(b"Retry-After", b"Wed, 21 Oct 2015 07:30:00 GMT")], "120"),
    ([(b"Retry-After", b"x" * 60_000)], None),
    ([(b"retry-after-ms", b"1500")], "2"),
    ([(b"retry-after-ms", b"nan")], None),
    ([(b"retry-after-ms", b"1e400")], None),
    ([(b"Retry-After", b"garbage"), (b"retry-after-ms", b"2500")], "3"),
    ([], None),
])
def test_retry_after_is_whole_seconds_in_range_or_dropped(
    raw: list[tuple[bytes, bytes]], expected: str | None,
) -> None:
    # Issue 13: a bare CR or a non-ASCII byte was a 500; 60,000 characters passed on.
    now = 1445412480.0  # Wed, 21 Oct 2015 07:28:00 GMT
    assert upstream.retry_after(httpx.Headers(raw), now=now) == expected


async def test_the_httpx_transport_goes_through_the_proxy_the_environment_names(
    io_loop: Any, monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Issue 18: an operator behind an egress proxy sets HTTPS_PROXY (here HTTP_PROXY, for a
    # plain-HTTP upstream); the fast transport has no proxies, httpx's own takes it.
    async with serving(answer(CHUNKED + chunked(*GOOD))) as proxy:
        for name in ("NO_PROXY", "no_proxy", "ALL_PROXY", "all_proxy", "http_proxy"):
            monkeypatch.delenv(name, raising=False)
        monkeypatch.setenv("HTTP_PROXY", f"http://127.0.0.1:{proxy.port}")
        settings = config.Settings(upstream=config.UpstreamSettings(
            kind="openai", base_url="http://upstream.invalid/v1", transport="httpx"))
        up = UpstreamClient(settings, make_transport(settings))
        try:
            deltas = await collect(up)
        finally:
            await up.aclose()
    assert "".join(d.content for d in deltas) == "Hello"
    assert proxy.requests[0].startswith(
        b"POST http://upstream.invalid/v1/chat/completions HTTP/1.1\r\n")
