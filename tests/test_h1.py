"""sseproxy's HTTP/1.1 transport for httpx, against scripted servers on loopback."""

from __future__ import annotations

import asyncio
import gzip
import shutil
import ssl
import subprocess
from pathlib import Path
from collections.abc import Awaitable, Callable
from typing import Any

import httpx
import pytest
from scripted import CHUNKED, OK_HEAD, Server, answer, chunked, serving

from sseproxy import h1


def client(**limits: Any) -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=h1.H1Transport(limits=httpx.Limits(**limits)),
                             timeout=httpx.Timeout(5.0))


async def pushed(response: httpx.Response) -> tuple[list[bytes], BaseException | None]:
    """Push the body to a callback; return the pieces and how it ended."""
    body = response.extensions["sseproxy_body"]
    pieces: list[bytes] = []
    done: asyncio.Future[BaseException | None] = asyncio.get_running_loop().create_future()

    def on_end(error: BaseException | None) -> None:
        if not done.done():
            done.set_result(error)

    body.push(pieces.append, on_end)
    error = await asyncio.wait_for(done, 5)
    return pieces, error


# --- framing ------------------------------------------------------------------------------

WHOLE = CHUNKED + chunked(b"data: one\n\n", b"data: two\n\n", b"x" * 300)


@pytest.mark.parametrize("step", [1, 2, 3, 7, 64, len(WHOLE)])
async def test_a_chunked_body_split_anywhere_arrives_whole(io_loop: Any, step: int) -> None:
    async def script(server: Server, reader: asyncio.StreamReader,
                     writer: asyncio.StreamWriter) -> None:
        for _ in range(2):
            await server.read_request(reader)
            for i in range(0, len(WHOLE), step):
                writer.write(WHOLE[i:i + step])
                await writer.drain()
                await asyncio.sleep(0)
        await reader.read()

    async with serving(script) as server, client() as http:
        url = f"http://127.0.0.1:{server.port}/v1/x"
        async with http.stream("POST", url, json={"a": 1}) as response:
            assert response.status_code == 200
            assert response.headers["content-type"] == "text/event-stream"
            pieces, error = await pushed(response)
        assert error is None
        assert b"".join(pieces) == b"data: one\n\ndata: two\n\n" + b"x" * 300
        async with http.stream("POST", url, json={"a": 1}) as response:
            pulled = b"".join([part async for part in response.aiter_raw()])
        assert pulled == b"data: one\n\ndata: two\n\n" + b"x" * 300
        request = server.requests[0]
        assert request.startswith(b"POST /v1/x HTTP/1.1\r\n")
        assert b"\r\nhost: 127.0.0.1:" in request.lower() and request.endswith(b'{"a":1}')


@pytest.mark.parametrize("response, expected", [
    (b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello", b"hello"),
    (b"HTTP/1.1 204 No Content\r\n\r\n", b""),
    (b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok", b"ok"),
    (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
     b"3;ext=1\r\nabc\r\n0\r\nX-Trailer: t\r\n\r\n", b"abc"),
    (b"\r\n\r\nHTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok", b"ok"),
])
async def test_bodies_by_length_none_interim_and_trailers(
    io_loop: Any, response: bytes, expected: bytes,
) -> None:
    async with serving(answer(response, response)) as server, client() as http:
        url = f"http://127.0.0.1:{server.port}/"
        got = await http.post(url, content=b"q")
        assert got.content == expected
        async with http.stream("POST", url, content=b"q") as streamed:
            pieces, error = await pushed(streamed)
        assert (b"".join(pieces), error) == (expected, None)
        assert server.connections == 1  # both bodies ended cleanly: one kept-alive connection


async def test_a_body_that_ends_with_the_connection(io_loop: Any) -> None:
    async def script(server: Server, reader: asyncio.StreamReader,
                     writer: asyncio.StreamWriter) -> None:
        await server.read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\n\r\nuntil the end")
        await writer.drain()

    async with serving(script) as server, client() as http:
        got = await http.get(f"http://127.0.0.1:{server.port}/")
        assert got.content == b"until the end"
        await http.get(f"http://127.0.0.1:{server.port}/")
        assert server.connections == 2  # such a connection is never reused


@pytest.mark.parametrize("response, needle", [
    (b"HTTP/2 200 OK\r\n\r\n", "malformed status line"),
    (b"HTTP/1.1 2000 OK\r\n\r\n", "malformed status line"),
    (b"HTTP/1.1 200 OK\r\nno colon here\r\n\r\n", "malformed header line"),
    (b"HTTP/1.1 200 OK\r\nContent-Length: 1, 2\r\n\r\n", "Content-Length"),
    (b"HTTP/1.1 200 OK\r\nX: " + b"a" * (h1.MAX_HEAD_BYTES + 10), "too large"),
    (b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: x\r\n\r\n", "switched protocols"),
    # h11 refuses these too (issue 13, point 7)
    (b"HTTP/1.1 000 Zero\r\nContent-Length: 0\r\n\r\n", "malformed status line"),
    (b"HTTP/1.1 099 Low\r\nContent-Length: 0\r\n\r\n", "malformed status line"),
    (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip, chunked\r\n\r\n", "Transfer-Encoding"),
    (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: identity\r\n\r\nx", "Transfer-Encoding"),
    (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n\r\n",
     "Transfer-Encoding"),
    # Issue 18: llhttp is stricter than h11 here, and sseproxy keeps its strictness: bare
    # LF line ends, obsolete line folding, framing given twice (Transfer-Encoding and
    # Content-Length) and a repeated Content-Length are refused, not guessed at.
    (b"HTTP/1.1 200 OK\nContent-Length: 2\n\nok", "malformed status line"),
    (b"HTTP/1.1 200 OK\r\nContent-Length: 2\nX: a\r\n\r\nok", "malformed header line"),
    (b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nX-Folded: a\r\n b\r\n\r\nok",
     "malformed header line"),
    (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nContent-Length: 99\r\n\r\n",
     "Content-Length"),
    (b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nContent-Length: 2\r\n\r\nok",
     "Content-Length"),
    (b"HTTP/2.0 200 OK\r\nContent-Length: 0\r\n\r\n", "malformed status line"),
])
async def test_a_broken_head_is_a_protocol_error(io_loop: Any, response: bytes,
                                                 needle: str) -> None:
    async with serving(answer(response)) as server, client() as http:
        with pytest.raises(httpx.RemoteProtocolError, match=needle):
            await http.get(f"http://127.0.0.1:{server.port}/")


@pytest.mark.parametrize("body, needle", [
    (b"zz\r\nabc\r\n", "malformed chunk size"),
    (b"0x3\r\nabc\r\n0\r\n\r\n", "malformed chunk size"),
    (b"3\r\nabcX\r\n", "did not end with CRLF"),
    (b"1" * 17 + b"\r\n", "malformed chunk size"),
    (b"3 \r\nabc\r\n", "malformed chunk size"),
    # llhttp reads chunk extensions without keeping them; sseproxy bounds the framing bytes
    # between two pieces of body, counted per read (a read is at most 64 KiB).
    (b"1;" + b"x" * (h1.MAX_LINE_BYTES + 2 * 65536), "too long"),
    (b"1\r\nx\r\n0\r\nX-Trailer: " + b"t" * (h1.MAX_LINE_BYTES + 2 * 65536), "too long"),
])
async def test_broken_chunked_framing_ends_the_body_with_an_error(
    io_loop: Any, body: bytes, needle: str,
) -> None:
    async with serving(answer(CHUNKED + body)) as server, client() as http:
        async with http.stream("GET", f"http://127.0.0.1:{server.port}/") as response:
            pieces, error = await pushed(response)
        assert isinstance(error, httpx.RemoteProtocolError) and needle in str(error)
        await asyncio.wait_for(server.closed.wait(), 5)  # the connection is dropped


@pytest.mark.parametrize("mode", ["push", "pull"])
async def test_a_connection_lost_mid_body_is_a_read_error(io_loop: Any, mode: str) -> None:
    async def script(server: Server, reader: asyncio.StreamReader,
                     writer: asyncio.StreamWriter) -> None:
        await server.read_request(reader)
        writer.write(CHUNKED + b"5\r\nhello\r\n")
        await writer.drain()

    async with serving(script) as server, client() as http:
        async with http.stream("GET", f"http://127.0.0.1:{server.port}/") as response:
            if mode == "push":
                pieces, error = await pushed(response)
                assert pieces == [b"hello"]
                assert isinstance(error, httpx.ReadError)
            else:
                with pytest.raises(httpx.ReadError):
                    async for _ in response.aiter_raw():
                        pass


async def test_a_refused_connection_is_a_connect_error(io_loop: Any) -> None:
    async with serving(answer()) as server:
        port = server.port
    async with client() as http:
        with pytest.raises(httpx.ConnectError):
            await http.get(f"http://127.0.0.1:{port}/")


async def test_a_server_that_never_answers_times_out_reading(io_loop: Any) -> None:
    async def script(server: Server, reader: asyncio.StreamReader,
                     writer: asyncio.StreamWriter) -> None:
        await reader.read()

    async with serving(script) as server:
        http = httpx.AsyncClient(transport=h1.H1Transport(limits=httpx.Limits()),
                                 timeout=httpx.Timeout(5.0, read=0.1))
        async with http:
            with pytest.raises(httpx.ReadTimeout):
                await http.get(f"http://127.0.0.1:{server.port}/")


# --- the consumer's side ----------------------------------------------------------------


async def test_a_consumer_error_ends_the_body_and_drops_the_connection(io_loop: Any) -> None:
    async with serving(answer(CHUNKED + chunked(b"a", b"b"))) as server, client() as http:
        async with http.stream("GET", f"http://127.0.0.1:{server.port}/") as response:
            body = response.extensions["sseproxy_body"]
            done: asyncio.Future[BaseException | None] = asyncio.Future()

            def refuse(data: bytes) -> None:
                raise ValueError("bad frame")

            body.push(refuse, done.set_result)
            error = await asyncio.wait_for(done, 5)
        assert isinstance(error, ValueError)
        await asyncio.wait_for(server.closed.wait(), 5)


async def test_pause_stops_reading_until_resume(io_loop: Any) -> None:
    release = asyncio.Event()

    async def script(server: Server, reader: asyncio.StreamReader,
                     writer: asyncio.StreamWriter) -> None:
        await server.read_request(reader)
        writer.write(CHUNKED + b"5\r\nfirst\r\n")
        await writer.drain()
        await release.wait()
        writer.write(b"6\r\nsecond\r\n0\r\n\r\n")
        await writer.drain()
        await reader.read()

    async with serving(script) as server, client() as http:
        async with http.stream("GET", f"http://127.0.0.1:{server.port}/") as response:
            body = response.extensions["sseproxy_body"]
            pieces: list[bytes] = []
            done: asyncio.Future[BaseException | None] = asyncio.Future()

            def take(data: bytes) -> None:
                pieces.append(data)
                body.pause()

            body.push(take, done.set_result)
            while not pieces:
                await asyncio.sleep(0.01)
            release.set()
            await asyncio.sleep(0.2)
            assert pieces == [b"first"] and not done.done()  # paused: nothing read
            body.resume()
            await asyncio.sleep(0.05)
            body.resume()
            assert await asyncio.wait_for(done, 5) is None
        assert pieces == [b"first", b"second"]


@pytest.mark.parametrize("encoding", [b"gzip", b"deflate", b"br", b"gzip, gzip"])
async def test_a_compressed_body_is_refused_when_pushed_and_pulled_as_sent(
    io_loop: Any, encoding: bytes,
) -> None:
    # Issue 13: one 64 KB read of a gzip bomb inflated to 16-64 MB in one call. A pushed
    # body is never inflated; pulled, it is the server's bytes (httpx decodes, if asked).
    packed = gzip.compress(b"data: zipped\n\n")
    response = (OK_HEAD + b"Content-Encoding: " + encoding
                + b"\r\nTransfer-Encoding: chunked\r\n\r\n" + chunked(packed))
    async with serving(answer(response, response)) as server, client() as http:
        url = f"http://127.0.0.1:{server.port}/"
        async with http.stream("GET", url) as streamed:
            pieces, error = await pushed(streamed)
        assert pieces == [] and isinstance(error, httpx.DecodingError)
        async with http.stream("GET", url) as streamed:
            assert b"".join([part async for part in streamed.aiter_raw()]) == packed


async def test_closing_an_unfinished_body_closes_the_connection(io_loop: Any) -> None:
    # A client that leaves must stop the generation: the upstream sees its connection end.
    async def script(server: Server, reader: asyncio.StreamReader,
                     writer: asyncio.StreamWriter) -> None:
        await server.read_request(reader)
        writer.write(CHUNKED + b"5\r\nhello\r\n")
        await writer.drain()
        await reader.read()

    async with serving(script) as server, client() as http:
        async with http.stream("GET", f"http://127.0.0.1:{server.port}/") as response:
            async for _ in response.aiter_raw():
                break
        await asyncio.wait_for(server.closed.wait(), 5)


async def test_drain_reads_the_last_chunk_and_keeps_the_connection(io_loop: Any) -> None:
    async def script(server: Server, reader: asyncio.StreamReader,
                     writer: asyncio.StreamWriter) -> None:
        for _ in range(2):
            await server.read_request(reader)
            writer.write(CHUNKED + b"5\r\nhello\r\n")
            await writer.drain()
            await asyncio.sleep(0.1)  # the final zero chunk comes a little later
            writer.write(b"0\r\n\r\n")
            await writer.drain()
        await reader.read()

    async with serving(script) as server, client() as http:
        for _ in range(2):
            async with http.stream("GET", f"http://127.0.0.1:{server.port}/") as response:
                body = response.extensions["sseproxy_body"]
                body.push(lambda data: body.drain(), lambda error: None)
                await asyncio.sleep(0.3)
        assert server.connections == 1


# --- the pool -------------------------------------------------------------------------------


def drop_the_second_request(ok: bytes) -> Callable[..., Awaitable[None]]:
    """The first connection answers one request, then reads the next and closes unanswered."""

    async def script(server: Server, reader: asyncio.StreamReader,
                     writer: asyncio.StreamWriter) -> None:
        await server.read_request(reader)
        writer.write(ok)
        await writer.drain()
        if server.connections == 1:
            await server.read_request(reader)  # read, maybe processed: then the line drops
            return
        await reader.read()
    return script


OK2 = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"


async def test_a_post_the_server_may_have_read_is_never_sent_twice(io_loop: Any) -> None:
    # Sending it again could start (and bill) a second generation upstream.
    async with serving(drop_the_second_request(OK2)) as server, client() as http:
        url = f"http://127.0.0.1:{server.port}/"
        assert (await http.post(url, content=b"1")).content == b"ok"
        with pytest.raises(httpx.RemoteProtocolError, match="without sending a response"):
            await http.post(url, content=b"2")
        assert len(server.requests) == 2 and server.connections == 1


@pytest.mark.parametrize("method, headers", [("GET", {}), ("PUT", {}),
                                             ("POST", {"Idempotency-Key": "k1"})])
async def test_a_replayable_request_is_retried_once_on_a_new_connection(
    io_loop: Any, method: str, headers: dict[str, str],
) -> None:
    async with serving(drop_the_second_request(OK2)) as server, client() as http:
        url = f"http://127.0.0.1:{server.port}/"
        assert (await http.request(method, url, headers=headers)).content == b"ok"
        assert (await http.request(method, url, headers=headers)).content == b"ok"
        assert server.connections == 2 and len(server.requests) == 3


async def test_an_idle_connection_the_server_closed_is_not_reused(io_loop: Any) -> None:
    # The server (a thread, so it needs no turn of this loop) closes the kept-alive
    # connection after its answer; the close reaches the client's socket while its loop is
    # busy. The pool asks the socket before reusing it, so the POST goes on a new
    # connection instead of into the closed one (where it could not be sent again).
    import socket
    import threading
    import time

    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    requests: list[bytes] = []

    def serve() -> None:
        for _ in range(2):
            conn, _addr = listener.accept()
            with conn:
                data = b""
                while not data.endswith(b"1") and not data.endswith(b"2"):
                    data += conn.recv(65536)
                requests.append(data)
                conn.sendall(OK2)

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        async with client() as http:
            url = f"http://127.0.0.1:{port}/"
            assert (await http.post(url, content=b"1")).content == b"ok"
            time.sleep(0.2)  # the server closes; this loop does not run meanwhile
            assert (await http.post(url, content=b"2")).content == b"ok"
    finally:
        listener.close()
        thread.join(5)
    assert len(requests) == 2


async def test_a_fresh_connection_that_closes_unanswered_is_an_error(io_loop: Any) -> None:
    async def script(server: Server, reader: asyncio.StreamReader,
                     writer: asyncio.StreamWriter) -> None:
        await server.read_request(reader)

    async with serving(script) as server, client() as http:
        with pytest.raises(httpx.RemoteProtocolError, match="without sending a response"):
            await http.get(f"http://127.0.0.1:{server.port}/")
        assert server.connections == 1


async def test_the_pool_waits_for_a_free_connection_within_its_timeout(io_loop: Any) -> None:
    release = asyncio.Event()

    async def script(server: Server, reader: asyncio.StreamReader,
                     writer: asyncio.StreamWriter) -> None:
        while True:
            await server.read_request(reader)
            writer.write(CHUNKED + b"2\r\nhi\r\n")
            await writer.drain()
            await release.wait()
            writer.write(b"0\r\n\r\n")
            await writer.drain()

    async with serving(script) as server:
        http = httpx.AsyncClient(
            transport=h1.H1Transport(limits=httpx.Limits(max_connections=1)),
            timeout=httpx.Timeout(5.0, pool=0.2))
        url = f"http://127.0.0.1:{server.port}/"
        async with http:
            first = await http.send(http.build_request("GET", url), stream=True)
            with pytest.raises(httpx.PoolTimeout):
                await http.get(url)
            waiting = asyncio.create_task(http.get(url))
            await asyncio.sleep(0.05)
            release.set()
            await first.aread()
            await first.aclose()
            assert (await asyncio.wait_for(waiting, 5)).content == b"hi"
        assert server.connections == 1


def make_certificate(tmp: Path) -> tuple[Path, Path]:
    openssl = shutil.which("openssl")
    assert openssl, "openssl is needed for the TLS test (.ci/run installs it)"
    key, cert = tmp / "key.pem", tmp / "cert.pem"
    subprocess.run([openssl, "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
                    "-subj", "/CN=localhost", "-addext", "subjectAltName=DNS:localhost",
                    "-keyout", str(key), "-out", str(cert)], check=True, capture_output=True)
    return key, cert


async def test_https_with_the_servers_certificate_checked(io_loop: Any, tmp_path: Path) -> None:
    key, cert = make_certificate(tmp_path)
    server_context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_context.load_cert_chain(cert, key)
    response = CHUNKED + chunked(b"data: secure\n\n")
    async with serving(answer(response, response), server_context) as server:
        trusting = ssl.create_default_context(cafile=str(cert))
        url = f"https://localhost:{server.port}/"
        async with httpx.AsyncClient(transport=h1.H1Transport(
                limits=httpx.Limits(), ssl_context=trusting)) as http:
            async with http.stream("GET", url) as streamed:
                pieces, error = await pushed(streamed)
            assert (b"".join(pieces), error) == (b"data: secure\n\n", None)
        async with httpx.AsyncClient(transport=h1.H1Transport(limits=httpx.Limits())) as http:
            with pytest.raises(httpx.ConnectError, match="CERTIFICATE_VERIFY_FAILED"):
                await http.get(url)


async def test_a_failed_connect_hands_its_slot_to_the_next_waiter(io_loop: Any,
                                                                  tmp_path: Path) -> None:
    # The server takes the TCP connection but never does the TLS handshake: each connect
    # times out. With one slot, the waiting request must get the slot when the first
    # connect gives up (and time out connecting too), not wait out the pool timeout.
    async def silent(server: Server, reader: asyncio.StreamReader,
                     writer: asyncio.StreamWriter) -> None:
        await reader.read()

    async with serving(silent) as server:
        http = httpx.AsyncClient(
            transport=h1.H1Transport(limits=httpx.Limits(max_connections=1)),
            timeout=httpx.Timeout(5.0, connect=0.3, pool=5.0))
        async with http:
            loop = asyncio.get_running_loop()
            started = loop.time()
            url = f"https://127.0.0.1:{server.port}/"
            results = await asyncio.gather(http.get(url), http.get(url),
                                           return_exceptions=True)
            assert [type(r) for r in results] == [httpx.ConnectTimeout] * 2
            assert loop.time() - started < 3.0


async def test_a_woken_waiter_that_leaves_passes_the_slot_on(io_loop: Any) -> None:
    release = asyncio.Event()

    async def script(server: Server, reader: asyncio.StreamReader,
                     writer: asyncio.StreamWriter) -> None:
        while True:
            await server.read_request(reader)
            writer.write(CHUNKED + b"2\r\nhi\r\n")
            await writer.drain()
            await release.wait()
            writer.write(b"0\r\n\r\n")
            await writer.drain()

    async with serving(script) as server:
        http = httpx.AsyncClient(
            transport=h1.H1Transport(limits=httpx.Limits(max_connections=1)),
            timeout=httpx.Timeout(5.0, pool=3.0))
        url = f"http://127.0.0.1:{server.port}/"
        async with http:
            first = await http.send(http.build_request("GET", url), stream=True)
            leaving = asyncio.create_task(http.get(url))
            staying = asyncio.create_task(http.get(url))
            await asyncio.sleep(0.05)
            release.set()
            await first.aread()
            await first.aclose()  # wakes `leaving`, which is cancelled before it runs
            leaving.cancel()
            response = await asyncio.wait_for(staying, 2.0)
            assert response.content == b"hi"
        assert server.connections == 1


async def test_a_close_delimited_body_cut_by_closing_the_client_is_an_error(
    io_loop: Any,
) -> None:
    async def script(server: Server, reader: asyncio.StreamReader,
                     writer: asyncio.StreamWriter) -> None:
        await server.read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\n\r\npart1-")
        await writer.drain()
        await reader.read()

    async with serving(script) as server:
        http = client()
        async with http.stream("GET", f"http://127.0.0.1:{server.port}/") as response:
            parts = response.aiter_raw()
            assert await anext(parts) == b"part1-"
            await http.aclose()
            with pytest.raises(httpx.ReadError):
                await anext(parts)


@pytest.mark.parametrize("then_close", [False, True])
async def test_an_answer_before_the_body_was_read_is_the_response(
    io_loop: Any, then_close: bool,
) -> None:
    # Issue 13: an upstream that answers 413 to a large body without reading it (and then
    # stops reading, or closes) was a write error, i.e. "unreachable".
    answer_413 = (b"HTTP/1.1 413 Payload Too Large\r\nContent-Type: application/json\r\n"
                  b"Content-Length: 11\r\n\r\n{\"error\":1}")
    release = asyncio.Event()

    async def script(server: Server, reader: asyncio.StreamReader,
                     writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(answer_413)
        await writer.drain()
        if then_close:
            writer.transport.abort()
            return
        await release.wait()

    async with serving(script) as server, client() as http:
        response = await http.post(f"http://127.0.0.1:{server.port}/",
                                   content=b"x" * (32 << 20))
        release.set()
        assert (response.status_code, response.content) == (413, b'{"error":1}')
        second = await http.post(f"http://127.0.0.1:{server.port}/", content=b"x" * (32 << 20))
        assert second.status_code == 413
        assert server.connections == 2  # a request cut short leaves its connection unused


async def test_a_released_body_no_longer_pauses_its_connection(io_loop: Any) -> None:
    # The connection may already serve another request: pause/resume are this body's only.
    response = CHUNKED + chunked(b"a")
    async with serving(answer(response, response)) as server, client() as http:
        url = f"http://127.0.0.1:{server.port}/"
        async with http.stream("GET", url) as first:
            body = first.extensions["sseproxy_body"]
            await pushed(first)
        async with http.stream("GET", url) as second:
            other = second.extensions["sseproxy_body"]
            assert other._conn is body._conn  # the same kept-alive connection
            other.pause()
            body.resume()
            assert other._conn._reading_paused
            other.resume()
            body.pause()
            assert not other._conn._reading_paused
            await pushed(second)


# --- what is sent (issue 18) -----------------------------------------------------------

@pytest.mark.parametrize("name, value", [
    ("X-Key", "sk-1\r\nX-Injected: 1"), ("X-Key", "sk-1\n"), ("X-Key", "a\x00b"),
    ("X-Key\r\nX-Injected", "1"), ("X Key", "1"), ("X:Key", "1"),
])
async def test_a_header_that_could_smuggle_a_line_is_refused_before_anything_is_sent(
    io_loop: Any, name: str, value: str,
) -> None:
    async with serving(answer(OK_HEAD + b"Content-Length: 0\r\n\r\n")) as server, \
            client() as http:
        with pytest.raises(httpx.LocalProtocolError) as refused:
            await http.get(f"http://127.0.0.1:{server.port}/", headers={name: value})
        assert "sk-1" not in str(refused.value)  # a value may be a key: never shown
        assert server.connections == 0 and server.requests == []
