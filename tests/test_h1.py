"""sseproxy's HTTP/1.1 transport for httpx, against scripted servers on loopback."""

from __future__ import annotations

import asyncio
import contextlib
import gzip
import shutil
import ssl
import subprocess
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import httpx
import pytest

from sseproxy import h1

Script = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]
OK_HEAD = b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n"
CHUNKED = OK_HEAD + b"Transfer-Encoding: chunked\r\n\r\n"


def chunked(*parts: bytes) -> bytes:
    return b"".join(b"%x\r\n%s\r\n" % (len(p), p) for p in parts) + b"0\r\n\r\n"


class Server:
    """A loopback server that runs ``script`` for each connection and counts them."""

    def __init__(self, script: Script) -> None:
        self.script = script
        self.connections = 0
        self.requests: list[bytes] = []
        self.closed = asyncio.Event()
        self.port = 0
        self.tasks: set[asyncio.Task[Any]] = set()
        self.writers: list[asyncio.StreamWriter] = []

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        task = asyncio.current_task()
        assert task is not None
        self.tasks.add(task)
        self.writers.append(writer)
        try:
            await self.script(reader, writer)
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()
            self.closed.set()

    async def read_request(self, reader: asyncio.StreamReader) -> bytes:
        head = await reader.readuntil(b"\r\n\r\n")
        length = 0
        for line in head.split(b"\r\n"):
            if line.lower().startswith(b"content-length:"):
                length = int(line.split(b":")[1])
        body = await reader.readexactly(length)
        self.requests.append(head + body)
        return head + body


@contextlib.asynccontextmanager
async def serving(script: Callable[[Server, asyncio.StreamReader, asyncio.StreamWriter],
                                   Awaitable[None]],
                  ssl_context: ssl.SSLContext | None = None) -> AsyncIterator[Server]:
    server = Server(lambda r, w: script(server, r, w))
    listener = await asyncio.start_server(server._handle, "127.0.0.1", 0, ssl=ssl_context)
    server.port = listener.sockets[0].getsockname()[1]
    try:
        yield server
    finally:
        listener.close()
        await listener.wait_closed()
        for writer in server.writers:
            writer.transport.abort()  # every script ends on its next read or write
        if server.tasks:
            await asyncio.wait(server.tasks, timeout=5)


def answer(*responses: bytes) -> Callable[..., Awaitable[None]]:
    """A script answering each request on a connection with the next response."""

    async def script(server: Server, reader: asyncio.StreamReader,
                     writer: asyncio.StreamWriter) -> None:
        for response in responses:
            await server.read_request(reader)
            writer.write(response)
            await writer.drain()
        await reader.read()  # until the client closes
    return script


def client(**limits: Any) -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=h1.H1Transport(limits=httpx.Limits(**limits)),
                             timeout=httpx.Timeout(5.0))


async def pushed(response: httpx.Response) -> tuple[list[bytes], BaseException | None]:
    """Push the body to a callback; return the pieces and how it ended."""
    body = response.extensions["sseproxy_body"]
    pieces: list[bytes] = []
    done: asyncio.Future[BaseException | None] = asyncio.get_running_loop().create_future()
    body.push(pieces.append, lambda error: done.done() or done.set_result(error))
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
    (b"HTTP/1.1 200 OK\nContent-Length: 2\nX-Folded: a\n b\n\nok", b"ok"),
])
async def test_bodies_by_length_none_interim_trailers_and_bare_lf(
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
    (b"1" * (h1.MAX_LINE_BYTES + 1), "too long"),
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


async def test_gzip_is_decoded_when_pushed_and_bad_gzip_is_a_decoding_error(
    io_loop: Any,
) -> None:
    packed = gzip.compress(b"data: zipped\n\n")
    good = OK_HEAD + b"Content-Encoding: gzip\r\nTransfer-Encoding: chunked\r\n\r\n"
    responses = (good + chunked(packed[:10], packed[10:]), good + chunked(b"not gzip"))
    async with serving(answer(*responses)) as server, client() as http:
        url = f"http://127.0.0.1:{server.port}/"
        async with http.stream("GET", url) as response:
            pieces, error = await pushed(response)
        assert (b"".join(pieces), error) == (b"data: zipped\n\n", None)
        async with http.stream("GET", url) as response:
            pieces, error = await pushed(response)
        assert isinstance(error, httpx.DecodingError)


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


async def test_a_stale_keep_alive_connection_is_retried_once_on_a_new_one(io_loop: Any) -> None:
    ok = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"

    async def script(server: Server, reader: asyncio.StreamReader,
                     writer: asyncio.StreamWriter) -> None:
        await server.read_request(reader)
        if server.connections == 1:
            writer.write(ok)
            await writer.drain()
            await server.read_request(reader)  # the next request: dropped unanswered
            return
        writer.write(ok)
        await writer.drain()
        await reader.read()

    async with serving(script) as server, client() as http:
        url = f"http://127.0.0.1:{server.port}/"
        assert (await http.post(url, content=b"1")).content == b"ok"
        assert (await http.post(url, content=b"2")).content == b"ok"
        assert server.connections == 2 and len(server.requests) == 3


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
