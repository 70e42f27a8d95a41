"""sseproxy's upstream transport against h11 on generated responses (issue 18, point 6).

Each generated response (valid and broken chunked framing, Content-Length, both of them,
huge and non-hex chunk sizes, long and many headers, obsolete line folding, bare LF, 1xx
answers first, a body cut short) is fed to a :class:`sseproxy.h1._Connection` through a
fake transport (its protocol methods called directly, no sockets), in pieces split at
generated offsets, and to h11 as the oracle. They must agree on the status, the headers
and the body, or both refuse; nothing else may escape, and the connection's own buffers
stay within their bounds after every read.

Where they legitimately differ, sseproxy is the stricter (llhttp's strict mode). h11
accepts, and sseproxy refuses: bare LF line ends, obsolete line folding, any ``HTTP/d.d``
version, DEL in a header value, whitespace after a chunk size, ``Transfer-Encoding``
together with ``Content-Length`` (h11: chunked wins), a ``Content-Length`` repeated with
one value, and a head over the size limit that arrives whole in one read (h11 holds a head
to its limit only while it is incomplete). Such inputs carry ``lenient=True``: there h11
may accept what sseproxy refuses, never the other way round.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Any

import h11
import httpx
import pytest
from hypothesis import given, settings, strategies as st
from scripted import answer, serving

from sseproxy import h1


class FakeTransport:
    """What the connection calls on its asyncio transport; records nothing but state."""

    def __init__(self) -> None:
        self.closing = False
        self.paused = False
        self.written = b""

    def write(self, data: bytes) -> None:
        self.written += data

    def is_closing(self) -> bool:
        return self.closing

    def abort(self) -> None:
        self.closing = True

    close = abort

    def pause_reading(self) -> None:
        self.paused = True

    def resume_reading(self) -> None:
        self.paused = False

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return default


@dataclass
class Outcome:
    status: int = 0
    headers: list[tuple[bytes, bytes]] | None = None
    body: bytes = b""
    refused: bool = False


def fast(raw: bytes, cuts: list[int]) -> Outcome:
    """sseproxy's transport fed ``raw`` in pieces ending at ``cuts``, then the close."""
    loop = asyncio.new_event_loop()
    try:
        pool = h1.H1Transport(limits=httpx.Limits())
        conn = h1._Connection(pool, ("http", "upstream.test", 80))
        fake = FakeTransport()
        conn.connection_made(fake)  # type: ignore[arg-type]  # a stand-in transport
        loop.run_until_complete(conn.request(b"POST", b"POST / HTTP/1.1\r\n\r\n", b"", None))
        waiter = conn._head_waiter
        assert waiter is not None
        pieces: list[bytes] = []
        ended: list[BaseException | None] = []
        pushed = False
        start = 0
        for end in [*cuts, len(raw)]:
            if start < end and not conn.lost:
                read = raw[start:end]
                conn.data_received(read)
                # the bounds hold after every read
                assert conn._pieces == []
                assert conn._fed <= h1.MAX_HEAD_BYTES
                assert conn._quiet <= h1.MAX_LINE_BYTES
                assert conn.body is None or conn.body._queued <= h1.PULL_HIGH_WATER + len(read)
            start = max(start, end)
            if waiter.done() and not pushed and waiter.exception() is None:
                assert conn.body is not None
                conn.body.push(pieces.append, ended.append)
                pushed = True
        if not conn.lost:
            conn.connection_lost(None)
        if waiter.exception() is not None:
            assert isinstance(waiter.exception(), httpx.RemoteProtocolError)
            return Outcome(refused=True)
        assert pushed and len(ended) == 1, ended
        if ended[0] is not None:
            assert isinstance(ended[0], (httpx.RemoteProtocolError, httpx.ReadError)), ended
            return Outcome(refused=True)
        head, _ = waiter.result()
        return Outcome(head.status, [(k.lower(), v) for k, v in head.headers], b"".join(pieces))
    finally:
        loop.close()


def oracle(raw: bytes, cuts: list[int]) -> Outcome:
    """h11, as a client that sent a POST, fed the same pieces, then the close."""
    conn = h11.Connection(h11.CLIENT, max_incomplete_event_size=h1.MAX_HEAD_BYTES)
    conn.send(h11.Request(method="POST", target="/",
                          headers=[("Host", "upstream.test"), ("Content-Length", "0")]))
    conn.send(h11.EndOfMessage())
    got = Outcome()
    body: list[bytes] = []
    start = 0
    try:
        for end in [*cuts, len(raw), None]:
            if end is None:
                conn.receive_data(b"")
            elif start < end:
                conn.receive_data(raw[start:end])
                start = end
            else:
                continue
            while True:
                event = conn.next_event()
                if event is h11.NEED_DATA or event is h11.PAUSED:
                    break
                if isinstance(event, h11.Response):
                    got.status = event.status_code
                    got.headers = list(event.headers)
                elif isinstance(event, h11.Data):
                    body.append(bytes(event.data))
                elif isinstance(event, h11.EndOfMessage):
                    got.body = b"".join(body)
                    return got
                elif isinstance(event, h11.ConnectionClosed):
                    return Outcome(refused=True)
                # an InformationalResponse (1xx) is read past
    except h11.RemoteProtocolError:
        return Outcome(refused=True)
    return Outcome(refused=True)


def agree(raw: bytes, lenient: bool, cuts: list[int]) -> None:
    ours, theirs = fast(raw, cuts), oracle(raw, cuts)
    if ours.refused and not theirs.refused:
        assert lenient, f"sseproxy refused what h11 accepted: {raw[:300]!r}"
        return
    assert ours == theirs, raw[:300]


# --- generated responses -------------------------------------------------------------------

TEXT = st.binary(max_size=40)
NAMES = st.sampled_from([b"Content-Type", b"X-Request-Id", b"Set-Cookie", b"Server",
                         b"x-a", b"X_Under", b"Cache-Control"])
SAFE_VALUE = st.text(st.characters(min_codepoint=0x21, max_codepoint=0x7E), max_size=30)
ODD_VALUE = st.sampled_from([b"a\x00b", b"a\x7fb", b"\x80\xff", b"a\tb", b"a\rb", b"  padded  ",
                             b"", b"x" * 5000, b"y" * (h1.MAX_HEAD_BYTES + 4096)])


@st.composite
def responses(draw: Any) -> tuple[bytes, bool]:
    lenient = False
    eol = b"\r\n"
    if draw(st.integers(0, 19)) == 0:
        eol, lenient = b"\n", True
    out = b""
    for _ in range(draw(st.integers(0, 2))):  # 1xx answers first
        out += b"HTTP/1.1 %d Interim" % draw(st.sampled_from([100, 102, 103])) + eol
        if draw(st.booleans()):
            out += b"Link: </a>; rel=preload" + eol
        out += eol
    version = draw(st.sampled_from([b"HTTP/1.1"] * 6 + [b"HTTP/1.0", b"HTTP/2.0", b"HTTP/1.x"]))
    status = draw(st.sampled_from([b"200", b"200", b"201", b"204", b"304", b"404", b"500",
                                   b"599", b"000", b"099", b"2000", b"2x0"]))
    reason = draw(st.sampled_from([b" OK", b" ", b"", b" Very Fine Indeed", b" \x80\xff"]))
    lenient = lenient or version == b"HTTP/2.0"  # h11 reads any HTTP/d.d
    out += version + b" " + status + reason + eol
    headers: list[tuple[bytes, bytes]] = []
    for _ in range(draw(st.integers(0, 6))):
        value = draw(st.one_of(SAFE_VALUE.map(str.encode), ODD_VALUE))
        lenient = lenient or b"\x7f" in value  # DEL: llhttp refuses it, h11 does not
        headers.append((draw(NAMES), value))
    if draw(st.integers(0, 9)) == 0:  # many headers
        headers += [(b"X-Many-%d" % i, b"v") for i in range(draw(st.integers(50, 300)))]
    body = draw(st.binary(max_size=300))
    framing = draw(st.sampled_from(["chunked"] * 4 + ["length"] * 3 + [
        "close", "both", "dup-length", "te-gzip", "te-identity", "length-short",
        "length-long", "length-bad"]))
    if framing in ("chunked", "both", "te-gzip", "te-identity"):
        te = {"chunked": b"chunked", "both": b"chunked", "te-gzip": b"gzip, chunked",
              "te-identity": b"identity"}[framing]
        headers.append((b"Transfer-Encoding", te))
        if framing == "both":
            headers.append((b"Content-Length", b"%d" % len(body)))
            lenient = True
        payload = draw(chunked(body, eol))
        lenient = lenient or payload[1]
        payload_bytes = payload[0]
    else:
        payload_bytes = body
        if framing in ("length", "dup-length"):
            headers.append((b"Content-Length", b"%d" % len(body)))
            if framing == "dup-length":
                headers.append((b"Content-Length", b"%d" % len(body)))
                lenient = True
        elif framing == "length-short":
            headers.append((b"Content-Length", b"%d" % (len(body) + 5)))
        elif framing == "length-long":
            headers.append((b"Content-Length", b"%d" % max(0, len(body) - 1)))
        elif framing == "length-bad":
            headers.append((b"Content-Length", draw(st.sampled_from(
                [b"-1", b"+3", b"0x10", b"1 2", b"", b"99999999999999999999999"]))))
    headers = draw(st.permutations(headers))
    for name, value in headers:
        out += name + b": " + value + eol
        if draw(st.integers(0, 29)) == 0:  # obsolete line folding
            out += b" folded" + eol
            lenient = True
    out += eol
    # h11 holds a head to its size limit only while it is incomplete: one that arrives
    # whole in a read passes whatever its size. sseproxy counts every read, 1xx heads too.
    lenient = lenient or len(out) > h1.MAX_HEAD_BYTES - 1024
    out += payload_bytes
    if draw(st.integers(0, 9)) == 0:
        out = out[:draw(st.integers(0, len(out)))]  # cut short
    return out, lenient


@st.composite
def chunked(draw: Any, body: bytes, eol: bytes) -> tuple[bytes, bool]:
    """``body`` in chunked framing, sometimes broken; True when h11 is laxer about it."""
    out = b""
    lenient = False
    pos = 0
    while pos < len(body):
        size = draw(st.integers(1, max(1, len(body) - pos)))
        piece = body[pos:pos + size]
        pos += size
        style = draw(st.integers(0, 39))
        if style == 0:
            head = b"zz"  # not hex
        elif style == 1:
            head = b"%X" % len(piece)
        elif style == 2:
            head = b"000%x" % len(piece)
        elif style == 3:
            head = b"%x;name=value;flag" % len(piece)
        elif style == 4:
            head = b"%x" % (len(piece) + 3)  # wrong size
        elif style == 5:
            head = b"f" * draw(st.integers(9, 24))  # huge, or past 64 bits
        elif style == 6:
            head = b"%x " % len(piece)  # whitespace after the size: h11 reads past it
            lenient = True
        else:
            head = b"%x" % len(piece)
        out += head + eol + piece + (b"X" if style == 7 else eol)
    out += b"0" + eol
    if draw(st.integers(0, 5)) == 0:
        out += b"X-Trailer: t" + eol
    out += eol
    if eol != b"\r\n":
        lenient = True
    return out, lenient


def cuts_for(draw_sizes: list[int], n: int) -> list[int]:
    cuts, at = [], 0
    for size in draw_sizes:
        at += size
        if at >= n:
            break
        cuts.append(at)
    return cuts


@settings(max_examples=4000)
@given(responses(), st.lists(st.integers(1, 97), max_size=8))
def test_the_transport_and_h11_agree_on_generated_responses(
    response: tuple[bytes, bool], sizes: list[int],
) -> None:
    raw, lenient = response
    agree(raw, lenient, cuts_for(sizes, len(raw)))


@settings(max_examples=400)
@given(responses().filter(lambda r: len(r[0]) <= 400))
def test_a_response_split_at_every_offset_reads_as_whole(
    response: tuple[bytes, bool],
) -> None:
    raw, lenient = response
    whole = fast(raw, [])
    agree(raw, lenient, [])
    for i in range(1, len(raw)):
        assert fast(raw, [i]) == whole, i


# --- a handful on real sockets ------------------------------------------------------------

@pytest.mark.parametrize("raw", [
    b"HTTP/1.1 103 Early\r\nLink: </a>\r\n\r\nHTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\nabc",
    b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
    b"3;x=y\r\nabc\r\n000A\r\n0123456789\r\n0\r\nT: 1\r\n\r\n",
    b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\nabc\r\n0\r\n\r\n",
    b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n" + b"f" * 20 + b"\r\nabc",
    b"HTTP/1.1 200 OK\r\n" + b"".join(b"X-%d: v\r\n" % i for i in range(300))
    + b"Content-Length: 2\r\n\r\nok",
])
async def test_the_transport_and_h11_agree_on_a_real_socket(io_loop: Any, raw: bytes) -> None:
    expected = oracle(raw, [])
    async with serving(answer(raw)) as server:
        transport = h1.H1Transport(limits=httpx.Limits())
        async with httpx.AsyncClient(transport=transport, timeout=5) as http:
            try:
                response = await http.post(f"http://127.0.0.1:{server.port}/", content=b"q")
            except httpx.HTTPError:
                got = Outcome(refused=True)
            else:
                got = Outcome(response.status_code,
                              [(k.lower(), v) for k, v in response.headers.raw],
                              response.content)
    assert got == expected


def test_a_connection_lost_right_after_its_whole_response_still_gives_the_response() -> None:
    # The server answers (an early 413, say) and closes; the close can be handled before
    # the request's task resumes. The connection then lets go of its body (so that it is
    # not left in a reference cycle), and the response must still carry it.
    loop = asyncio.new_event_loop()
    try:
        pool = h1.H1Transport(limits=httpx.Limits())
        conn = h1._Connection(pool, ("http", "upstream.test", 80))
        conn.connection_made(FakeTransport())  # type: ignore[arg-type]  # a stand-in
        loop.run_until_complete(conn.request(b"POST", b"POST / HTTP/1.1\r\n\r\n", b"", None))
        conn.data_received(b"HTTP/1.1 413 Payload Too Large\r\nContent-Length: 11\r\n\r\n"
                           b'{"error":1}')
        conn.connection_lost(None)
        assert conn.body is None  # let go of
        head, body = loop.run_until_complete(conn.response_head(1.0))
        assert head.status == 413

        async def read() -> bytes:
            return b"".join([part async for part in body])

        assert loop.run_until_complete(read()) == b'{"error":1}'
    finally:
        loop.close()
