"""A lean HTTP/1.1 client transport for httpx, made for long streamed responses.

``httpx.AsyncClient(transport=H1Transport(...))`` behaves as with httpx's default transport
for what sseproxy asks of it (a request with a body, a status, headers, a body read as a
stream, pooled keep-alive connections, TLS, httpx's exceptions), but reads on an
:class:`asyncio.Protocol` of its own instead of httpcore and h11.

Why: a streamed reply is thousands of small HTTP chunks, and under httpcore every one
went through h11's state machine, several async generators and a read timeout scope,
about half of the relay's CPU per token in a profile. Here a chunk is framed by a few
``bytes.find`` calls in ``data_received``, and a body can be *pushed*:
:meth:`Body.push` hands each piece of the body to a callback from the protocol itself, so
no task wakes up per chunk. Pulling (``async for`` over the body, what httpx does) works
too, for error bodies and for any other caller.

Deliberately left out: HTTP/2, proxies, ``Expect: 100-continue`` (1xx answers are read
past), request bodies that are not in memory, and transfer codings other than ``chunked``
(refused, as h11 refuses them). A request is sent again (once, on a new connection) only
when a reused keep-alive connection turned out closed before any of it was written, or
when it is replayable (an idempotent method, or an ``Idempotency-Key`` header), as Go's
client does: a POST the server may have read is never sent twice, which for a model could
mean a second, billed generation.

Compressed bodies are not pushed: :meth:`Body.push` refuses a ``Content-Encoding`` other
than ``identity`` (sseproxy asks for ``identity``). Inflating a streamed body is an
amplifier a hostile or broken server controls: a 1 MB gzip body inflates to 1 GB, and
even inflated in bounded steps it costs CPU and parsing in proportion to the inflated
size, not to the bytes that crossed the network; and a compressed event stream arrives in
bursts anyway (the compressor holds text back). Refusing keeps every pushed byte one byte
of the wire, so the socket's own flow control bounds what a stream holds and costs.

A server may answer before it has read the whole request (a ``413`` for a large body):
the answer is taken as soon as its head has come, even when the rest of the request is
still being written or could not be written, and the connection is then not reused.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import select
import socket
import ssl
from collections import deque
from collections.abc import AsyncIterator, Callable
from typing import cast

import httptools
import httpx

#: A response head larger than this is refused.
MAX_HEAD_BYTES = 64 * 1024
#: A chunk-size line (with extensions) or trailer line longer than this is refused.
MAX_LINE_BYTES = 8 * 1024
#: A pulled body pauses reading once this much is queued and unread.
PULL_HIGH_WATER = 256 * 1024
#: How long a released connection may finish reading a body before it is dropped.
DRAIN_TIMEOUT_S = 1.0

#: The receive buffer of every connection (see :class:`_Connection`).
_RECEIVE_VIEW = memoryview(bytearray(64 * 1024))

#: CR, LF and NUL: never in a request header's name or value (header injection).
_UNSAFE = re.compile(rb"[\r\n\0]")
_TOKEN = re.compile(rb"[-!#$%&'*+.^_`|~0-9A-Za-z]+")
_DEFAULT_PORTS = {"http": 80, "https": 443}
_IDEMPOTENT = frozenset({b"GET", b"HEAD", b"PUT", b"DELETE", b"OPTIONS", b"TRACE"})


class NoResponse(httpx.RemoteProtocolError):
    """The connection ended before any response: the server is gone, not malformed."""


class _NotSent(NoResponse):
    """The connection was closed before anything of the request was written."""


class _HeadOnly(Exception):
    """Stops llhttp after the head of an answer to HEAD (see on_headers_complete)."""


Origin = tuple[str, str, int]
OnData = Callable[[bytes], None]
OnEnd = Callable[[BaseException | None], None]


class _Head:
    __slots__ = ("status", "reason", "version", "headers", "framing", "keep_alive")

    def __init__(self, status: int, reason: bytes, version: bytes,
                 headers: list[tuple[bytes, bytes]], framing: str, keep_alive: bool) -> None:
        self.status = status
        self.reason = reason
        self.version = version
        self.headers = headers
        self.framing = framing  # "none", "length", "chunked" or "close"
        self.keep_alive = keep_alive and framing != "close"


def _framing(method: bytes, status: int, headers: list[tuple[bytes, bytes]]) -> str:
    """How the body of a final answer ends; refuses what llhttp reads but h11 does not."""
    codings: list[bytes] = []
    length: bytes | None = None
    for name, value in headers:
        key = name.lower()
        if key == b"transfer-encoding":
            codings += (c.strip(b" \t").lower() for c in value.split(b","))
        elif key == b"content-length":
            length = value  # llhttp has checked it: digits, given once, without chunked
    if codings and codings != [b"chunked"]:
        # gzip, chunked; identity; chunked twice: llhttp reads some of them until the
        # connection closes, h11 refuses them, and so does this.
        raise httpx.RemoteProtocolError(
            f"unsupported Transfer-Encoding {b', '.join(codings)[:80]!r}")
    if method == b"HEAD" or status in (204, 304):
        return "none"
    if codings:
        return "chunked"
    if length is not None:
        return "length" if length.strip(b" \t") != b"0" else "none"
    return "close"


def _request_head(method: bytes, target: bytes, headers: list[tuple[bytes, bytes]]) -> bytes:
    """The request line and headers; refuses what could smuggle a line into them (the
    value is not echoed: it may be a key)."""
    if _TOKEN.fullmatch(method) is None or _UNSAFE.search(target) is not None:
        raise httpx.LocalProtocolError(f"refused to send a malformed request line "
                                       f"({method[:20]!r})")
    lines = [method + b" " + target + b" HTTP/1.1"]
    for name, value in headers:
        if _TOKEN.fullmatch(name) is None or _UNSAFE.search(value) is not None:
            raise httpx.LocalProtocolError(
                f"refused to send the request header {name[:40]!r}: its name is not a token "
                "or its value holds CR, LF or NUL")
        lines.append(name + b": " + value)
    return b"\r\n".join(lines) + b"\r\n\r\n"


def content_encoding(headers: list[tuple[bytes, bytes]]) -> bytes:
    """The ``Content-Encoding`` of a response (every header of that name, lowercased)."""
    codings = [v.strip().lower() for k, v in headers if k.lower() == b"content-encoding"]
    return b", ".join(c for c in codings if c) or b"identity"


class Body(httpx.AsyncByteStream):
    """A response body: pull it (``async for``) or push it to a callback (:meth:`push`).

    Pulled bytes are as the server sent them (httpx decodes ``Content-Encoding`` itself);
    a body with a ``Content-Encoding`` other than ``identity`` is not pushed (see the
    module docstring).
    """

    def __init__(self, conn: _Connection, head: _Head) -> None:
        self._conn = conn
        self._head = head
        self.complete = head.framing == "none"
        self.error: BaseException | None = None
        #: Pieces not yet taken (pulled, or arrived before :meth:`push`); made when needed:
        #: a pushed body, the common case, never queues (an empty deque is 760 bytes).
        self._queue: deque[bytes] | None = None
        self._queued = 0
        self._waiter: asyncio.Future[None] | None = None
        self._on_data: OnData | None = None
        self._on_end: OnEnd | None = None
        self._closed = False
        self._paused = False

    # --- fed by the connection ---------------------------------------------------------

    def _deliver(self, data: bytes) -> None:
        if self._closed:
            return  # released early: the connection only reads the rest to be reused
        on_data = self._on_data
        if on_data is None:
            if self._queue is None:
                self._queue = deque()
            self._queue.append(data)
            self._queued += len(data)
            if self._queued >= PULL_HIGH_WATER:
                self._conn.pause_reading()
            self._wake()
            return
        try:
            on_data(data)
        except BaseException as exc:  # the consumer refused the data: end the body with it
            self._refuse(exc)

    def _refuse(self, error: BaseException) -> None:
        """End the body with ``error`` from this side (even if the server had finished)."""
        self.error = error
        on_end, self._on_end = self._on_end, None
        self._on_data = None
        self._wake()
        self._conn.close()
        if on_end is not None:
            on_end(error)

    def _end(self, error: BaseException | None) -> None:
        if self.complete or self.error is not None:
            return
        if error is None:
            self.complete = True
        else:
            self.error = error
        self._wake()
        on_end, self._on_end = self._on_end, None
        self._on_data = None
        if on_end is not None:
            on_end(error)

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    # --- the consumer's side -------------------------------------------------------------

    def push(self, on_data: OnData, on_end: OnEnd) -> None:
        """Call ``on_data`` with each piece of the body as it arrives, then ``on_end`` once
        with None (complete) or the error. An exception raised by ``on_data`` ends the body
        with that exception. Bytes already queued go first. A compressed body is refused
        with :class:`httpx.DecodingError` (see the module docstring)."""
        encoding = content_encoding(self._head.headers)
        if encoding not in (b"identity", b""):
            self._on_end = on_end
            self._refuse(httpx.DecodingError(
                f"a compressed body ({encoding[:40]!r}) is not pushed"))
            return
        self._on_data, self._on_end = on_data, on_end
        queued, self._queue = self._queue or (), None
        self._queued = 0
        for data in queued:
            self._deliver(data)
            if self.error is not None:  # the consumer refused a piece: that ended the body
                break
        if self.complete or self.error is not None:
            ended, self._on_end = self._on_end, None  # None when the end was told already
            self._on_data = None
            if ended is not None:
                ended(self.error)
        elif not self._paused:
            self._conn.resume_reading()

    def pause(self) -> None:
        """Stop reading from the socket (the server's window fills up) until :meth:`resume`.
        Once the body is released, its connection is no longer this body's to pause."""
        if not self._closed:
            self._paused = True
            self._conn.pause_reading()

    def resume(self) -> None:
        if not self._closed:
            self._paused = False
            self._conn.resume_reading()

    async def __aiter__(self) -> AsyncIterator[bytes]:
        loop = asyncio.get_running_loop()
        while True:
            queue = self._queue
            while queue:
                data = queue.popleft()
                self._queued -= len(data)
                if self._queued < PULL_HIGH_WATER // 2 and not self._paused:
                    self._conn.resume_reading()
                yield data
            if self.error is not None:
                raise self.error
            if self.complete:
                return
            self._waiter = loop.create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None

    def drain(self) -> None:
        """The consumer has all it wants (the stream said it is done): read the rest of the
        body, usually only the final zero chunk, for up to ``DRAIN_TIMEOUT_S``, then give
        the connection back to the pool."""
        if not self._closed:
            self._closed = True
            self._on_data = self._on_end = None
            self._conn.release(self, drain=True)

    async def aclose(self) -> None:
        """Release the connection: back to the pool when the body was read to its end,
        closed otherwise (a reply not read to its end must stop being generated)."""
        if not self._closed:
            self._closed = True
            self._on_data = self._on_end = None
            self._conn.release(self, drain=False)


class _Connection(asyncio.BufferedProtocol):
    """One HTTP/1.1 connection: writes a request, parses the response head and frames the
    body (``Content-Length``, chunked, or until close) into its :class:`Body`.

    It reads into one receive buffer shared by every connection of the process (the loop
    runs one read at a time and the bytes are copied out at once): asyncio's plain
    ``Protocol`` would allocate a 256 KiB buffer for every read, which costs more than the
    rest of the read path together.
    """

    def __init__(self, transport_: H1Transport, origin: Origin) -> None:
        self.owner = transport_
        self.origin = origin
        self.transport: asyncio.Transport | None = None
        self.lost = False
        self.idle_since = 0.0
        self.used = False
        self._method = b"GET"
        #: The head and its body, together: the body outlives a connection lost right after
        #: the head (the connection lets go of it then, see connection_lost).
        self._head_waiter: asyncio.Future[tuple[_Head, Body]] | None = None
        self._head: _Head | None = None
        self.body: Body | None = None
        self._drain_waiter: asyncio.Future[None] | None = None
        self._write_paused = False
        self._reading_paused = False
        # the response being parsed (a new parser for every request)
        self._parser: httptools.HttpResponseParser | None = None
        self._status_line = False  # the status line has been read (for error messages)
        self._reason = b""
        self._headers: list[tuple[bytes, bytes]] = []
        self._fed = 0  # bytes given to the parser before the final head was complete
        self._quiet = 0  # bytes of framing alone since the last piece of body
        self._pieces: list[bytes] = []  # body parsed from the current read
        self._done = False  # the final answer has ended
        self._stop: BaseException | None = None  # raised by a callback to stop the parse
        self._drain_timer: asyncio.TimerHandle | None = None
        self._any_byte = False
        self._aborted = False

    # --- asyncio.Protocol ----------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports do not subclass asyncio.Transport, but behave as one
        self.transport = cast(asyncio.Transport, transport)

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True
        self.owner._forget(self)
        error: BaseException
        if self._head_waiter is not None and not self._head_waiter.done():
            error = NoResponse(
                "the server closed the connection without sending a response")
            error.__cause__ = exc
            self._head_waiter.set_exception(error)
        body = self.body
        if body is not None and not body.complete and body.error is None:
            if (self._head is not None and self._head.framing == "close" and exc is None
                    and not self._aborted):
                body._end(None)
            else:
                error = httpx.ReadError(
                    "the server closed the connection before the body ended"
                    if exc is None else f"the connection broke ({exc})")
                error.__cause__ = exc
                body._end(error)
        waiter = self._drain_waiter
        if waiter is not None and not waiter.done():
            waiter.set_exception(httpx.WriteError("the connection closed while writing"))
        if self._drain_timer is not None:
            self._drain_timer.cancel()
        # A lost connection parses nothing more. The parser holds bound methods of this
        # connection, and the body holds it too: let go of both, so the connection is freed
        # when its last user lets go of it, not by the cyclic garbage collector (issue 13).
        self._parser = None
        self.body = None

    def get_buffer(self, sizehint: int) -> memoryview:
        return _RECEIVE_VIEW

    def buffer_updated(self, nbytes: int) -> None:
        self.data_received(_RECEIVE_VIEW[:nbytes].tobytes())

    def eof_received(self) -> bool | None:
        return False  # close our side too; connection_lost sorts out what it means

    def pause_writing(self) -> None:
        self._write_paused = True

    def resume_writing(self) -> None:
        self._write_paused = False
        waiter = self._drain_waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def data_received(self, data: bytes) -> None:
        self._any_byte = True
        parser = self._parser
        if parser is None or self._done:
            if data.strip():
                self.abort(httpx.RemoteProtocolError("the server sent bytes after a response"))
            return
        if self._head is None:
            self._receive_head(data, parser)
            return
        try:
            parser.feed_data(data)
        except httptools.HttpParserError as exc:
            self._parse_failed(exc)
            return
        pieces = self._pieces
        if pieces:
            self._pieces = []
            self._quiet = 0
            body = self.body
            if body is not None:
                body._deliver(pieces[0] if len(pieces) == 1 else b"".join(pieces))
        elif not self._done:
            # Only framing came (chunk-size lines, extensions, trailers): llhttp keeps no
            # limit on them, and httptools gathers a trailer in memory until it ends.
            self._quiet += len(data)
            if self._quiet > MAX_LINE_BYTES:
                self.abort(httpx.RemoteProtocolError("a chunk line is too long"))

    # --- the response: parsed by llhttp, which calls these back from feed_data ------------

    def _receive_head(self, data: bytes, parser: httptools.HttpResponseParser) -> None:
        room = MAX_HEAD_BYTES - self._fed
        part = data if len(data) <= room else data[:room]
        self._fed += len(part)
        try:
            parser.feed_data(part)
        except httptools.HttpParserError as exc:
            self._parse_failed(exc)
            return
        if self.lost:
            return
        if self._head is None:
            if part is not data:
                self.abort(httpx.RemoteProtocolError("the response head is too large"))
            return
        pieces = self._pieces
        if pieces:
            self._pieces = []
            assert self.body is not None
            self.body._deliver(pieces[0] if len(pieces) == 1 else b"".join(pieces))
        if part is not data:
            self.data_received(data[len(part):])

    def _parse_failed(self, exc: httptools.HttpParserError) -> None:
        """The parse stopped: llhttp's error, one a callback raised, or a HEAD answer."""
        stop, self._stop = self._stop, None
        self._pieces = []  # what the read held before the error is not delivered
        if isinstance(stop, _HeadOnly):
            return
        self.abort(stop if stop is not None else self._parse_error(exc))

    def _parse_error(self, exc: httptools.HttpParserError) -> httpx.RemoteProtocolError:
        """llhttp's error, told in the words of the part of the response it hit."""
        reason = str(exc) or type(exc).__name__
        if self._head is None:
            in_status = not self._status_line or "response line" in reason
            what = "malformed status line" if in_status else "malformed header line"
        elif "chunk size" in reason.lower():
            what = "malformed chunk size"
        elif "after chunk data" in reason:
            what = "a chunk did not end with CRLF"
        else:
            what = "malformed body framing"
        return httpx.RemoteProtocolError(f"{what} ({reason})")

    def _refuse_head(self, message: str) -> None:
        self._stop = httpx.RemoteProtocolError(message)
        raise self._stop

    def on_message_begin(self) -> None:
        if self._head is not None:
            self._refuse_head("the server sent bytes after a response")

    def on_status(self, reason: bytes) -> None:
        self._status_line = True
        self._reason += reason

    def on_header(self, name: bytes, value: bytes) -> None:
        self._status_line = True
        if self._head is None:  # after the head: a trailer, read past
            self._headers.append((name, value.rstrip(b" \t")))

    def on_headers_complete(self) -> None:
        parser = self._parser
        assert parser is not None
        self._status_line = True
        status = parser.get_status_code()
        version = parser.get_http_version()
        if version not in ("1.1", "1.0") or status < 100:
            self._refuse_head(f"malformed status line (HTTP/{version} {status})")
        headers, self._headers = self._headers, []
        reason, self._reason = self._reason, b""
        self._status_line = False
        if status == 101:
            self._refuse_head("the server switched protocols, which was not asked")
        if status < 200:
            return  # an interim answer (100 Continue, 103 Early Hints): read past it
        try:
            framing = _framing(self._method, status, headers)
        except httpx.RemoteProtocolError as exc:
            self._stop = exc
            raise
        head = _Head(status, reason, b"HTTP/" + version.encode(), headers, framing,
                     parser.should_keep_alive())
        self._head = head
        self.body = body = Body(self, head)
        waiter = self._head_waiter
        if waiter is not None and not waiter.done():
            waiter.set_result((head, body))
        if self._method == b"HEAD":
            # llhttp cannot be told that a HEAD answer has no body (httptools has no way
            # to say so): the parse stops here, and the connection is not reused.
            head.keep_alive = False
            self._done = True
            self._body_done(body)
            self._stop = _HeadOnly()
            raise self._stop

    def on_body(self, data: bytes) -> None:
        self._pieces.append(data)

    def on_message_complete(self) -> None:
        body = self.body
        if self._head is None or body is None:
            return  # an interim answer ended
        self._done = True
        pieces = self._pieces
        if pieces:
            self._pieces = []
            body._deliver(pieces[0] if len(pieces) == 1 else b"".join(pieces))
        self._body_done(body)

    def _body_done(self, body: Body) -> None:
        body._end(None)
        if body._closed:  # released while still draining: back to the pool now
            self._finish_release()

    # --- used by the transport and the body ----------------------------------------------

    async def request(self, method: bytes, head: bytes, content: bytes,
                      write_timeout: float | None) -> None:
        assert self.transport is not None
        if self.lost or self.transport.is_closing():
            raise _NotSent("the connection closed before the request")
        self.used = True
        self._method = method
        self._head = None
        self.body = None
        self._any_byte = False
        self._parser = httptools.HttpResponseParser(self)
        self._status_line = False
        self._reason = b""
        self._headers = []
        self._fed = self._quiet = 0
        self._pieces = []
        self._done = False
        self._stop = None
        loop = asyncio.get_running_loop()
        self._head_waiter = head_waiter = loop.create_future()
        self.transport.write(head + content if len(content) < 64 * 1024 else head)
        if len(content) >= 64 * 1024:
            self.transport.write(content)
        if self._write_paused and not self.lost:
            self._drain_waiter = drain = loop.create_future()
            try:
                # The server may answer (413) before it has read the body, and stop reading.
                await asyncio.wait([drain, head_waiter], timeout=write_timeout,
                                   return_when=asyncio.FIRST_COMPLETED)
            finally:
                self._drain_waiter = None
            if head_waiter.done() and not head_waiter.cancelled() \
                    and head_waiter.exception() is None:
                # The answer counts, not the rest of the write; the request was cut short,
                # so the connection is not reused.
                if drain.done():
                    drain.exception()  # retrieved: a write that broke is not the error
                else:
                    drain.cancel()
                head_waiter.result()[0].keep_alive = False
                return
            if not drain.done():
                drain.cancel()
                raise httpx.WriteTimeout("timed out sending the request")
            drain.result()  # the connection broke while writing: WriteError

    async def response_head(self, read_timeout: float | None) -> tuple[_Head, Body]:
        waiter = self._head_waiter
        assert waiter is not None
        try:
            async with asyncio.timeout(read_timeout):
                got = await waiter
        except TimeoutError as exc:
            raise httpx.ReadTimeout("timed out waiting for the response") from exc
        self._head_waiter = None  # (it holds the body, which holds this connection)
        return got

    def pause_reading(self) -> None:
        if not self._reading_paused and self.transport is not None and not self.lost:
            self._reading_paused = True
            self.transport.pause_reading()

    def resume_reading(self) -> None:
        if self._reading_paused and self.transport is not None and not self.lost:
            self._reading_paused = False
            self.transport.resume_reading()

    def abort(self, error: BaseException) -> None:
        """End the body (or the wait for the head) with ``error`` and drop the connection."""
        waiter = self._head_waiter
        if waiter is not None and not waiter.done():
            waiter.set_exception(error)
        if self.body is not None:
            self.body._end(error)
        self.close()

    def close(self) -> None:
        if self.transport is not None and not self.lost:
            self._aborted = True  # a close-delimited body cut here did not end
            self.transport.abort()  # no lingering FIN handshake with a broken server
        self.lost = True
        self.owner._forget(self)

    def release(self, body: Body, drain: bool) -> None:
        """The consumer is done with ``body``: reuse the connection if it can be."""
        head = self._head
        if self.lost or head is None or not head.keep_alive or body.error is not None:
            self.close()
        elif body.complete:
            self._finish_release()
        elif not drain:
            self.close()
        else:
            # Often only the final zero chunk is still on its way: let it come, quietly.
            body._on_data = None
            self.resume_reading()
            self._drain_timer = asyncio.get_running_loop().call_later(
                DRAIN_TIMEOUT_S, self.close)

    def _finish_release(self) -> None:
        if self._drain_timer is not None:
            self._drain_timer.cancel()
            self._drain_timer = None
        self.resume_reading()
        self.owner._give_back(self)

    def can_reuse(self) -> bool:
        """Still open, and nothing to read: an idle connection that is readable was closed
        by the server (or it sent bytes nobody asked for). The close may have arrived
        without the loop having run since, so the socket itself is asked (as httpcore
        does): a POST written into a closing connection could not be sent again."""
        if self.lost or self.transport is None or self.transport.is_closing():
            return False
        sock = self.transport.get_extra_info("socket")
        if sock is None:
            return True
        poller = select.poll()
        poller.register(sock.fileno(), select.POLLIN)
        return not poller.poll(0)


class H1Transport(httpx.AsyncBaseTransport):
    """A pool of :class:`_Connection` per origin, within httpx's ``Limits``."""

    def __init__(self, *, limits: httpx.Limits, ssl_context: ssl.SSLContext | None = None
                 ) -> None:
        self._max = limits.max_connections
        self._max_idle = limits.max_keepalive_connections
        self._expiry = limits.keepalive_expiry
        self._ssl = ssl_context
        self._idle: dict[Origin, list[_Connection]] = {}
        self._open: set[_Connection] = set()
        self._connecting = 0
        self._slot_waiters: deque[asyncio.Future[None]] = deque()
        self._closed = False

    # --- the pool --------------------------------------------------------------------------

    def _forget(self, conn: _Connection) -> None:
        if conn in self._open:
            self._open.discard(conn)
            idle = self._idle.get(conn.origin)
            if idle is not None and conn in idle:
                idle.remove(conn)
            self._wake_one()

    def _give_back(self, conn: _Connection) -> None:
        if self._closed or not conn.can_reuse():
            conn.close()
            return
        idle = self._idle.setdefault(conn.origin, [])
        if self._max_idle is not None and sum(map(len, self._idle.values())) >= self._max_idle:
            conn.close()
            return
        conn.idle_since = asyncio.get_running_loop().time()
        conn.body = None
        idle.append(conn)
        self._wake_one()

    def _wake_one(self) -> None:
        while self._slot_waiters:
            waiter = self._slot_waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)
                return

    def _take_idle(self, origin: Origin) -> _Connection | None:
        idle = self._idle.get(origin)
        if not idle:
            return None
        if self._expiry is not None:
            oldest = asyncio.get_running_loop().time() - self._expiry
            for conn in [c for c in idle if c.idle_since <= oldest]:
                conn.close()  # expired (the list is short: at most the keep-alive limit)
        while idle:
            conn = idle.pop()  # the most recently used: the least likely to be closed
            if conn.can_reuse():
                return conn
            conn.close()
        return None

    def _has_room(self) -> bool:
        return self._max is None or len(self._open) + self._connecting < self._max

    def _drop_an_idle(self) -> bool:
        for idle in self._idle.values():
            if idle:
                idle.pop(0).close()
                return True
        return False

    async def _acquire(self, origin: Origin, timeouts: dict[str, float | None],
                       fresh: bool = False) -> _Connection:
        loop = asyncio.get_running_loop()
        pool_timeout = timeouts.get("pool")
        deadline = None if pool_timeout is None else loop.time() + pool_timeout
        while True:
            conn = None if fresh else self._take_idle(origin)
            if conn is not None:
                return conn
            if self._has_room() or self._drop_an_idle():
                break
            waiter = loop.create_future()
            self._slot_waiters.append(waiter)
            try:
                async with asyncio.timeout_at(deadline):
                    await waiter
            except BaseException as exc:
                if waiter.done() and not waiter.cancelled():
                    self._wake_one()  # woken, but leaving: the slot goes to the next one
                else:
                    waiter.cancel()
                    with contextlib.suppress(ValueError):
                        self._slot_waiters.remove(waiter)
                if isinstance(exc, TimeoutError):
                    raise httpx.PoolTimeout("no upstream connection became free in time"
                                            ) from exc
                raise
            if self._closed:
                raise RuntimeError("the transport is closed")
        self._connecting += 1
        try:
            conn = await self._connect(origin, timeouts.get("connect"))
        except BaseException:
            self._wake_one()  # the slot this connect held is free again
            raise
        finally:
            self._connecting -= 1
        return conn

    async def _connect(self, origin: Origin, timeout: float | None) -> _Connection:
        scheme, host, port = origin
        loop = asyncio.get_running_loop()
        conn = _Connection(self, origin)
        try:
            async with asyncio.timeout(timeout):
                if scheme == "https":
                    context = self._ssl or ssl.create_default_context()
                    await loop.create_connection(lambda: conn, host, port, ssl=context,
                                                 server_hostname=host)
                else:
                    await loop.create_connection(lambda: conn, host, port)
        except TimeoutError as exc:
            raise httpx.ConnectTimeout(f"timed out connecting to {host}:{port}") from exc
        except (OSError, ssl.SSLError) as exc:
            raise httpx.ConnectError(f"cannot connect to {host}:{port}: {exc}") from exc
        assert conn.transport is not None
        sock = conn.transport.get_extra_info("socket")
        if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self._open.add(conn)
        return conn

    # --- httpx ---------------------------------------------------------------------------

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        if self._closed:
            raise RuntimeError("the transport is closed")
        url = request.url
        scheme = url.scheme
        if scheme not in _DEFAULT_PORTS:
            raise httpx.UnsupportedProtocol(f"unsupported URL scheme {scheme!r}")
        origin = (scheme, url.host, url.port or _DEFAULT_PORTS[scheme])
        timeouts: dict[str, float | None] = request.extensions.get("timeout", {})
        content = await request.aread()
        method = request.method.encode("ascii")
        target = url.raw_path or b"/"
        head = _request_head(method, target, request.headers.raw)
        replayable = method in _IDEMPOTENT or "idempotency-key" in request.headers
        fresh = False
        while True:
            conn = await self._acquire(origin, timeouts, fresh)
            reused = conn.used
            try:
                await conn.request(method, head, content, timeouts.get("write"))
                response_head, body = await conn.response_head(timeouts.get("read"))
            except httpx.RemoteProtocolError as exc:
                conn.close()
                stale = reused and not conn._any_byte and not fresh
                if stale and (isinstance(exc, _NotSent) or replayable):
                    fresh = True  # a stale keep-alive connection: once more, on a new one
                    continue
                raise
            except BaseException:
                conn.close()
                raise
            break
        return httpx.Response(
            response_head.status,
            headers=response_head.headers,
            stream=body,
            extensions={"http_version": response_head.version,
                        "reason_phrase": response_head.reason,
                        "sseproxy_body": body},
        )

    async def aclose(self) -> None:
        self._closed = True
        for conn in list(self._open):
            conn.close()
        self._idle.clear()
        while self._slot_waiters:
            waiter = self._slot_waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)  # it sees the transport closed
