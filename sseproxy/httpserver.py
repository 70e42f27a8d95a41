"""The HTTP server: Tornado's, answering request heads over the limits instead of dropping them.

Tornado reads a request head up to ``max_header_size`` bytes and, past that, closes the
connection without a word: a browser reports a network error and a script a reset. sseproxy
answers as nginx does:

* a request line over ``limits.max_url_bytes`` is ``414`` ``uri_too_long`` (an EventSource
  ``prompt`` travels in the URL; the message says to send long prompts in a POST);
* header fields over ``limits.max_header_bytes`` are ``431`` ``headers_too_large``;

each with an OpenAI-shaped JSON body and ``Connection: close``. The answer is written on the
socket, then sseproxy stops sending (``SHUT_WR``) and reads and discards what the client
still sends, for up to :data:`LINGER_S`, before it closes (nginx's *lingering close*): a
client still writing a 10 MB header then reads the answer instead of a reset.

How: every plain TCP connection's stream is a :class:`_HeadGuard`. Tornado reads each
request head with ``read_until_regex`` (and nothing else with it); the guard judges the
head when it is complete, and when Tornado's own limit (both limits together) trips first,
it takes the socket over in ``close_fd``, the one moment a closing stream still holds it
open. To tell a long request line from long headers there, it reads the start of the
stream's buffer (``IOStream._read_buffer``, the one private attribute used, also to tell
an idle connection while draining; the tests of this module pin it). TLS connections (not
used by sseproxy) keep Tornado's behaviour.

On a graceful shutdown, :meth:`HTTPServer.drain` stops keeping connections alive, as nginx
does: a request read from then on is answered with ``Connection: close`` and its connection
closes after the response; a connection idle between two requests (waiting for a request
head, no byte of one received) is closed at once, and one that becomes idle during the
drain (its last response, begun before the drain, finished) is closed then rather than
waiting for another request. Connections busy with a request (a running stream) are left
alone. A client, or a proxy's pool of upstream connections, that sends a request on an idle
connection at the instant it is closed sees the connection close without an answer: the
race every HTTP server has when it closes an idle keep-alive connection; a proxy retries
an idempotent request (nginx does not retry a ``POST``).
"""

from __future__ import annotations

import asyncio
import functools
import http
import socket
import typing
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import structlog
import tornado.httpserver
from tornado.iostream import IOStream, StreamClosedError, UnsatisfiableReadError

from . import errors
from .frames import dumps

log = structlog.get_logger("sseproxy.http")

#: How long a refused connection may keep sending before it is closed (nginx:
#: ``lingering_time``); the answer was written first.
LINGER_S = 10.0
_READ_SIZE = 65_536


@dataclass(frozen=True)
class HeadLimits:
    """``limits.max_url_bytes`` and ``limits.max_header_bytes``."""

    max_url_bytes: int
    max_header_bytes: int

    @property
    def total(self) -> int:
        """The most Tornado reads of one head: both limits and their line ends."""
        return self.max_url_bytes + self.max_header_bytes + 4

    def judge(self, head: bytes, complete: bool) -> errors.RequestError | None:
        """The refusal ``head`` deserves, if any. ``complete``: a whole head, up to its
        blank line; else the start of one that did not end within :attr:`total` bytes."""
        head = head.lstrip(b"\r\n")  # (empty lines before a request are allowed)
        end = head.find(b"\n")
        line = len(head) if end < 0 else end - (end > 0 and head[end - 1] == ord("\r"))
        if line > self.max_url_bytes:
            return errors.UriTooLong(
                f"the request line is longer than {self.max_url_bytes} bytes, the most "
                "sseproxy accepts: send a long prompt in the body of POST "
                "/v1/chat/completions, not in the URL")
        fields = len(head) - end - 1
        if complete:
            fields -= 2 if head.endswith(b"\r\n") else 1  # the blank line that ends the head
        if not complete or fields > self.max_header_bytes:
            return errors.HeadersTooLarge(
                f"the request header fields are larger than {self.max_header_bytes} bytes, "
                "the most sseproxy accepts")
        return None


def http_response(error: errors.SSEProxyError) -> bytes:
    """A whole ``Connection: close`` response carrying ``error`` as OpenAI-shaped JSON."""
    body = dumps(error.to_body()).encode()
    status = error.http_status()
    return (f"HTTP/1.1 {status} {http.HTTPStatus(status).phrase}\r\n"
            "Content-Type: application/json; charset=utf-8\r\n"
            f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n").encode() + body


async def answer_and_close(sock: socket.socket, response: bytes, linger_s: float = LINGER_S
                           ) -> None:
    """Send ``response``, then read and discard what the client sends until it closes or
    ``linger_s`` has passed, then close (so the client reads the answer, not a reset)."""
    loop = asyncio.get_running_loop()
    try:
        async with asyncio.timeout(linger_s):
            await loop.sock_sendall(sock, response)
            sock.shutdown(socket.SHUT_WR)
            while await loop.sock_recv(sock, _READ_SIZE):
                pass
    except (OSError, TimeoutError):
        pass  # the client left, or was still sending after linger_s: it ends here
    finally:
        sock.close()


#: Takes over the socket of a refused connection: answers ``error`` and closes it.
Refuse = Callable[[socket.socket, errors.RequestError], None]


class _HeadGuard(IOStream):
    """A connection's stream that judges every request head Tornado reads from it, and
    closes when it waits for one while the server drains."""

    def __init__(self, sock: socket.socket, limits: HeadLimits, refuse: Refuse,
                 on_close: Callable[[_HeadGuard], None], **kwargs: Any) -> None:
        super().__init__(sock, **kwargs)
        self._limits = limits
        self._refuse = refuse
        self._on_close = on_close
        self._reading_head = False
        self._draining = False
        self._refusal: errors.RequestError | None = None

    def read_until_regex(self, regex: bytes, max_bytes: int | None = None
                         ) -> asyncio.Future[bytes]:
        self._reading_head = True
        # IOStream's reads return Futures (typed as Awaitable).
        read = typing.cast("asyncio.Future[bytes]", super().read_until_regex(regex, max_bytes))
        checked: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()
        read.add_done_callback(functools.partial(self._head_read, checked))
        if self._draining and not read.done():  # (done: a whole head had arrived)
            self._close_if_idle()  # (the read above took in what had arrived)
        return checked

    def drain(self) -> None:
        """From now on, close when waiting for a request head of which nothing arrived."""
        self._draining = True
        self._close_if_idle()

    def _close_if_idle(self) -> None:
        if not self._reading_head or self.closed() or self._read_buffer:
            return  # busy with a request, or part of the next head is here
        try:
            if self.socket.recv(1, socket.MSG_PEEK):
                return  # it arrived but the loop has not read it yet: answer it
        except BlockingIOError:
            pass  # nothing sent: idle
        except OSError:
            pass  # the client is gone: close it too
        self.close()  # the pending head read fails: Tornado ends the connection quietly

    def _head_read(self, checked: asyncio.Future[bytes], read: asyncio.Future[bytes]) -> None:
        if checked.done():
            return
        if read.cancelled():
            checked.cancel()
            return
        error = read.exception()
        if error is not None:
            checked.set_exception(error)
            return
        head = read.result()
        self._refusal = self._limits.judge(head, complete=True)
        if self._refusal is None:
            self._reading_head = False
            checked.set_result(head)
            return
        self.close()  # close_fd hands the socket to the refusal
        checked.set_exception(StreamClosedError())

    def close_fd(self) -> None:
        self._on_close(self)
        refusal = self._refusal
        if (refusal is None and self._reading_head
                and isinstance(self.error, UnsatisfiableReadError)):
            # Tornado's limit tripped: the start of the head is still in the buffer.
            start = bytes(self._read_buffer[:self._limits.max_url_bytes + 4])
            refusal = self._limits.judge(start, complete=False)
        if refusal is None:
            super().close_fd()
            return
        sock, self.socket = self.socket, None  # type: ignore[assignment]  # as IOStream does
        self._refuse(sock, refusal)


class HTTPServer(tornado.httpserver.HTTPServer):
    """Tornado's HTTP server with :class:`HeadLimits` answered by ``414``/``431``, and a
    :meth:`drain` that stops keeping connections alive."""

    # Configurable: HTTPServer(app, head_limits=..., **tornado's keywords) calls this.
    def initialize(  # type: ignore[override]  # one keyword of its own, then Tornado's
        self, request_callback: Any, *, head_limits: HeadLimits, **kwargs: Any
    ) -> None:
        super().initialize(request_callback, max_header_size=head_limits.total, **kwargs)
        self.head_limits = head_limits
        self._refusals: set[asyncio.Task[None]] = set()
        self._guards: set[_HeadGuard] = set()
        self._draining = False

    def handle_stream(self, stream: IOStream, address: tuple[Any, ...]) -> None:
        if type(stream) is IOStream:
            # Nothing has been read yet: the same socket goes into a guarded stream.
            guard = stream = _HeadGuard(stream.socket, self.head_limits,
                                        functools.partial(self._refuse, address),
                                        self._guards.discard,
                                        max_buffer_size=stream.max_buffer_size,
                                        read_chunk_size=stream.read_chunk_size)
            self._guards.add(guard)
            if self._draining:
                guard.drain()
        super().handle_stream(stream, address)

    def drain(self) -> None:
        """Stop keeping connections alive (call it after :meth:`stop`): requests read from
        now on are answered with ``Connection: close``, idle connections close at once, and
        busy ones when their response has finished, unless the next request has begun to
        arrive (it is answered, then the connection closes)."""
        self._draining = True
        self.conn_params.no_keep_alive = True  # consulted as each request head is read
        for guard in list(self._guards):
            guard.drain()

    def _refuse(self, address: tuple[Any, ...], sock: socket.socket,
                error: errors.RequestError) -> None:
        log.warning("request_refused", status=error.http_status(), error_code=error.error_code(),
                    reason=error.message, remote_ip=address[0] if address else None)
        task = asyncio.get_running_loop().create_task(
            answer_and_close(sock, http_response(error)))
        self._refusals.add(task)
        task.add_done_callback(self._refusals.discard)

    async def close_all_connections(self) -> None:
        for task in list(self._refusals):
            task.cancel()
        await super().close_all_connections()
