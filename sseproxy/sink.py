"""The one path from a stream to a client's socket: write, then wait until it went out.

A :class:`ConnectionSink` belongs to one streaming response. Its :meth:`~ConnectionSink.send`
is called only by that connection's subscriber loop (so a heartbeat never lands inside a
frame) and returns once the bytes are out of sseproxy's hands: that wait is the
backpressure, and a closed connection shows up there as :class:`ClientGone`.

The first write goes through Tornado's public API (``RequestHandler.write`` + ``flush``),
which sends the headers. After that, a frame goes straight to the socket when nothing is
queued in front of it, with the HTTP/1.1 chunk framing added here; only what the kernel does
not take at once goes through the stream's write buffer (``IOStream.write``), and the next
frame waits behind it, so the order holds. :meth:`ConnectionSink.send_now` is the same write
for a caller that cannot wait (the subscriber's listener, called from the appending code):
it says whether all went out, and the subscriber's loop waits for the rest. This fast path
is the one place where sseproxy looks under Tornado's request handler (only public
``HTTP1Connection.stream`` and ``IOStream`` calls): it saves two futures and two system
calls per frame, about a tenth of the CPU per token (docs/benchmarks.md). It is pinned to
the Tornado versions in ``pyproject.toml`` by tests/test_sink.py, which also checks that
frames really take it, and it is off where it cannot apply (TLS, or a connection that is not
plain HTTP/1.1): those frames all go through Tornado.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import tornado.web
from tornado.http1connection import HTTP1Connection
from tornado.iostream import IOStream, SSLIOStream, StreamClosedError


class ClientGone(Exception):
    """The client closed the connection, or was dropped."""


class ConnectionSink:
    """Writes one streaming response; see the module docstring."""

    __slots__ = (
        "_handler",
        "closed",
        "_gone",
        "_raw",
        "_headers_out",
        "_chunked",
        "_stream",
    )

    def __init__(self, handler: tornado.web.RequestHandler) -> None:
        self._handler: tornado.web.RequestHandler | None = handler
        self.closed = False
        self._gone: asyncio.Future[None] | None = None
        #: The plain TCP stream frames go to once the headers are out (None: none).
        self._raw: IOStream | None = None
        self._headers_out = False
        request = handler.request
        conn = request.connection
        self._chunked = request.version == "HTTP/1.1"
        if (isinstance(conn, HTTP1Connection) and isinstance(conn.stream, IOStream)
                and not isinstance(conn.stream, SSLIOStream)):
            self._stream: IOStream | None = conn.stream
        else:
            self._stream = None

    async def open(self) -> None:
        """Send the response headers now (before the first event)."""
        if not self._headers_out:
            handler = self._handler
            if handler is None:
                raise ClientGone
            await self._wait(handler.flush)
            self._headers_out = True
            self._raw = self._stream

    async def send(self, data: bytes) -> None:
        """Write ``data`` and wait until it is out (``b""``: wait for what is queued)."""
        if self.closed:
            raise ClientGone
        raw = self._raw
        if not data:
            # (an empty chunk would end a chunked body) Wait for what is queued, if any.
            if raw is not None and raw.writing():
                await self._wait(lambda: raw.write(b""))
            return
        if raw is not None:
            if raw.closed():
                raise ClientGone
            if not raw.writing():
                rest = self._send_direct(raw, data)
                if rest is not None:
                    await self._wait(lambda: rest)
                return
            await self._wait(lambda: raw.write(self._frame(data)))
            return
        handler = self._handler
        if handler is None:
            raise ClientGone
        handler.write(data)
        await self._wait(handler.flush)
        if not self._headers_out:
            self._headers_out = True
            self._raw = self._stream

    def ready(self) -> bool:
        """Whether a frame would go straight to the socket now: the headers are out, the
        connection is open and nothing is queued in front of it."""
        raw = self._raw
        return raw is not None and not self.closed and not raw.writing() and not raw.closed()

    def send_now(self, data: bytes) -> bool:
        """Write ``data`` (non-empty) at once, from a callback, when :meth:`ready`: True
        when all of it went out, False when the rest is queued (``send(b"")`` waits for
        it). Raises :class:`ClientGone` when the connection is closed."""
        raw = self._raw
        if raw is None or self.closed:
            raise ClientGone
        return self._send_direct(raw, data) is None

    def _frame(self, data: bytes) -> bytes:
        return b"%x\r\n%b\r\n" % (len(data), data) if self._chunked else data

    def _send_direct(self, raw: IOStream, data: bytes) -> asyncio.Future[None] | None:
        """Send a frame on the socket; the write of what the kernel did not take, if any."""
        frame = self._frame(data)
        try:
            sent = raw.socket.send(frame)
        except BlockingIOError:
            sent = 0
        except OSError as exc:
            raw.close(exc_info=exc)  # tells the handler (on_connection_close)
            raise ClientGone from None
        if sent < len(frame):
            return raw.write(memoryview(frame)[sent:])
        return None

    async def _wait(self, start: Callable[[], asyncio.Future[None]]) -> None:
        try:
            flushed = start()
            if not flushed.done():
                # Tornado forgets a pending flush when the connection closes, so wait for
                # the close notification too.
                gone = self._gone = asyncio.get_running_loop().create_future()
                try:
                    await asyncio.wait((flushed, gone), return_when=asyncio.FIRST_COMPLETED)
                finally:
                    self._gone = None
                if not flushed.done():
                    raise ClientGone
            flushed.result()
        except StreamClosedError:
            raise ClientGone from None
        if self.closed:  # Tornado may also resolve the flush of a closed connection
            raise ClientGone

    def mark_gone(self) -> None:
        """The connection closed (``on_connection_close``): a pending send raises."""
        self.closed = True
        if self._gone is not None and not self._gone.done():
            self._gone.set_result(None)

    def drop(self) -> None:
        """Drop a client that stopped reading: close its socket (its buffers go with it)."""
        self.mark_gone()
        if self._stream is not None:
            self._stream.close()
        elif self._handler is not None:
            conn = self._handler.request.connection
            if isinstance(conn, HTTP1Connection):
                conn.stream.close()

    def release(self) -> None:
        """The response is finished: let go of the handler and the connection (a send
        raises :class:`ClientGone` from now on). The handler holds its sink, and the sink
        held the handler: without this, every finished stream would leave that cycle, and
        all it reaches, to the cyclic garbage collector (issue 13)."""
        self.closed = True
        self._handler = None
        self._stream = self._raw = None
