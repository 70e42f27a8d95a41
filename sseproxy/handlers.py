"""Tornado handlers: thin wiring from a request to validation, a session and a wire format.

Handlers get their dependencies through ``initialize()`` (see :mod:`sseproxy.app`).
Streaming handlers send their headers before the first token and flush every
frame as it is written; they never send ``ETag``, ``Content-Length`` or
``Content-Encoding`` (the app-wide gzip transform is removed for them).
"""

from __future__ import annotations

import asyncio
import re
import secrets
import socket
import time
import uuid
from dataclasses import dataclass
from collections.abc import Callable
from typing import Any

import structlog
import tornado.web
from tornado.http1connection import HTTP1Connection
from tornado.iostream import IOStream, StreamClosedError

from . import __version__, errors, validate
from .config import Settings
from .frames import EventSourceFrames, OpenAIFrames, dumps
from .looplag import LoopLagMonitor
from .metrics import Metrics
from .session import ClientGone, Outcome, StallMonitor, StreamSession
from .upstream import UpstreamClient

log = structlog.get_logger("sseproxy.http")

STREAM_HEADERS = {
    "Content-Type": "text/event-stream; charset=utf-8",
    "Cache-Control": "no-cache, no-transform",
    "X-Accel-Buffering": "no",
}
_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")


class StreamSlots:
    """The running streams of this process, counted against ``limits.max_streams``."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.active = 0
        #: Sessions relaying now (a shutdown ends those still running after the grace).
        self.sessions: set[StreamSession] = set()
        #: Set when the process is shutting down: /readyz fails, new streams are refused.
        self.draining = False

    def acquire(self) -> bool:
        if self.active >= self.limit or self.draining:
            return False
        self.active += 1
        return True

    def release(self, session: StreamSession | None = None) -> None:
        self.active -= 1
        if session is not None:
            self.sessions.discard(session)

    def refusal(self) -> errors.SSEProxyError:
        """Why a stream cannot start now."""
        return errors.ServerShutdown() if self.draining else errors.Overloaded(self.limit)


@dataclass
class Deps:
    """What handlers need, built once per process."""

    settings: Settings
    upstream: UpstreamClient
    slots: StreamSlots
    metrics: Metrics
    monitor: StallMonitor
    #: Measures the event loop's lag (one per process, started with the app).
    loop_lag: LoopLagMonitor | None = None


def new_stream_id() -> str:
    return secrets.token_hex(12)


class BaseHandler(tornado.web.RequestHandler):
    deps: Deps
    cfg: Settings
    request_id: str

    def initialize(self, deps: Deps) -> None:
        self.deps = deps
        # One snapshot per request: a SIGHUP reload applies to requests that start after it.
        self.cfg = deps.settings

    def prepare(self) -> None:
        given = self.request.headers.get("X-Request-ID", "")
        self.request_id = given if _REQUEST_ID.match(given) else uuid.uuid4().hex
        self.set_header("X-Request-ID", self.request_id)
        structlog.contextvars.clear_contextvars()
        structlog.contextvars.bind_contextvars(request_id=self.request_id)

    def send_error_object(self, error: errors.SSEProxyError) -> None:
        """An error before any byte of the body: HTTP status + OpenAI-shaped JSON."""
        self.clear()
        self.set_header("X-Request-ID", self.request_id)
        self.set_status(error.http_status())
        for name, value in error.headers().items():
            self.set_header(name, value)
        self.set_header("Content-Type", "application/json; charset=utf-8")
        self.finish(dumps(error.to_body()))

    def write_error(self, status_code: int, **kwargs: Any) -> None:
        exc = kwargs.get("exc_info", (None, None, None))[1]
        if isinstance(exc, errors.SSEProxyError):
            self.send_error_object(exc)
            return
        reason = self._reason or "error"
        code = "not_found" if status_code == 404 else reason.lower().replace(" ", "_")
        etype = "invalid_request_error" if status_code < 500 else "server_error"
        self.set_header("Content-Type", "application/json; charset=utf-8")
        self.finish(dumps({"error": {"type": etype, "code": code, "message": reason}}))


class StreamingHandler(BaseHandler):
    """Shared parts of the handlers that answer with an event stream."""

    session: StreamSession | None = None

    def compute_etag(self) -> str | None:
        return None

    def start_stream(self) -> None:
        """Set the stream headers (before the first flush)."""
        # Streams are never compressed: gzip would hold frames back until its buffer fills.
        # Transforms run at the first flush, so dropping gzip here is in time.
        self._transforms = [
            t for t in self._transforms
            if not isinstance(t, tornado.web.GZipContentEncoding)
        ]
        for name, value in STREAM_HEADERS.items():
            self.set_header(name, value)
        if isinstance(self.request.connection, HTTP1Connection):
            # Tornado turns Nagle off only when a response finishes; a stream's small
            # frames would otherwise wait for the client's delayed ACK (up to 40 ms).
            self.request.connection.stream.set_nodelay(True)
            self._cap_send_buffer(self.request.connection.stream)
        if self.request.version == "HTTP/1.0":
            # No chunked framing in HTTP/1.0: the stream ends when the connection closes.
            # Tornado would answer a keep-alive request with "Keep-Alive" and then keep the
            # connection open after the last frame, so the client would wait forever.
            self.request.headers["Connection"] = "close"
            self.set_header("Connection", "close")
            self._close_when_done = True

    def _cap_send_buffer(self, stream: IOStream) -> None:
        """Cap the kernel's send buffer (``limits.client_sndbuf_bytes``), so a client that
        stops reading is seen as a flush that does not complete within seconds rather than
        after the kernel has autotuned the buffer to megabytes (and holds them)."""
        size = self.cfg.limits.client_sndbuf_bytes
        if size and stream.socket is not None:
            try:
                stream.socket.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, size)
            except OSError:  # the client is already gone: the first flush will tell
                pass

    async def send(self, data: bytes) -> None:
        """:class:`~sseproxy.session.Sink`: write and flush at once.

        A flush that does not complete within ``stall.client_timeout_s`` means the client
        (or a proxy in between) stopped reading: the session's monitor then drops the
        client (:meth:`disconnect`), which frees its buffers and ends the stream.

        Once the headers are out, a frame goes straight to the socket when nothing is
        queued before it; only what the kernel does not take at once goes through
        Tornado's write buffer (which keeps the order: the direct send is tried only when
        that buffer is empty).
        """
        if not self._raw_known and self._headers_written:
            self._raw, self._raw_known = self._raw_stream(), True
        raw = self._raw
        if not data:
            # (an empty chunk would end a chunked body) Wait for what is queued, if any.
            if raw is not None and raw.writing():
                await self._wait_written(lambda: raw.write(b""))
            return
        if raw is not None:
            if self._closed or raw.closed():
                raise ClientGone
            if not raw.writing():
                rest = self._send_direct(raw, data)
                if rest is not None:
                    await self._wait_written(lambda: rest)
                return
        self.write(data)
        await self._wait_written(self.flush)

    def ready(self) -> bool:
        """:class:`~sseproxy.session.DirectSink`: a frame sent now goes straight out."""
        raw = self._raw
        return raw is not None and not self._closed and not raw.closed() and not raw.writing()

    def send_now(self, data: bytes) -> bool:
        """:class:`~sseproxy.session.DirectSink`: send without waiting (after :meth:`ready`);
        the rest, if any, waits in the write buffer and the next :meth:`send` behind it."""
        if not data or self._raw is None:
            return True
        return self._send_direct(self._raw, data) is None

    def _send_direct(self, raw: IOStream, data: bytes) -> asyncio.Future[None] | None:
        """Send a frame on the socket; the write of what the kernel did not take, if any."""
        frame = b"%x\r\n%b\r\n" % (len(data), data) if self._chunked else data
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

    async def _wait_written(self, start: Callable[[], asyncio.Future[None]]) -> None:
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
        if self._closed:  # Tornado may also resolve the flush of a closed connection
            raise ClientGone

    _closed = False
    _gone: asyncio.Future[None] | None = None
    #: The plain TCP stream that frames go to directly once the headers are out (``None``
    #: when there is none, e.g. under TLS: then every frame goes through Tornado).
    _raw: IOStream | None = None
    _raw_known = False
    _chunked = False

    def _raw_stream(self) -> IOStream | None:
        conn = self.request.connection
        if not isinstance(conn, HTTP1Connection) or type(conn.stream) is not IOStream:
            return None
        # HTTP1Connection.write_headers records its framing in the headers it wrote.
        self._chunked = self._headers.get("Transfer-Encoding") == "chunked"
        return conn.stream

    def _mark_gone(self) -> None:
        self._closed = True
        if self._gone is not None and not self._gone.done():
            self._gone.set_result(None)

    def disconnect(self) -> None:
        """Drop a client that stopped reading: close its socket and end the pending flush."""
        self._mark_gone()
        if isinstance(self.request.connection, HTTP1Connection):
            self.request.connection.stream.close()

    def on_connection_close(self) -> None:
        self._mark_gone()
        if self.session is not None:
            self.session.client_closed()

    def new_session(self, req: validate.ChatRequest, stream_id: str) -> StreamSession:
        structlog.contextvars.bind_contextvars(stream_id=stream_id)
        fields: dict[str, Any] = {"persona": req.persona, "model": req.model,
                                  "prompt_chars": req.prompt_chars}
        if self.cfg.logging.log_prompts:
            fields["prompt"] = req.messages[-1].get("content")
        self.session = StreamSession(
            self.deps.upstream,
            req.upstream_body(),
            settings=self.cfg,
            metrics=self.deps.metrics,
            stream_id=stream_id,
            endpoint=self.endpoint,
            request_id=self.request_id,
            log_fields=fields,
        )
        self.session.disconnect = self.disconnect
        self.deps.slots.sessions.add(self.session)
        return self.session

    endpoint = "stream"

    def rejected(self, error: errors.SSEProxyError) -> None:
        """A request refused before any upstream call: counted and logged as a stream
        with outcome ``rejected``, so the counter and the log lines agree."""
        self.deps.metrics.streams.labels(Outcome.REJECTED.value).inc()
        log.info("stream", endpoint=self.endpoint, outcome=Outcome.REJECTED.value,
                 error_code=error.error_code(), reason=error.message)

    _close_when_done = False

    def finish_quietly(self) -> None:
        if not self._finished:
            try:
                sent = self.finish()
            except StreamClosedError:
                return
            if self._close_when_done:
                sent.add_done_callback(lambda _: self._close_connection())

    def _close_connection(self) -> None:
        """End a close-delimited (HTTP/1.0) stream once its last bytes are written."""
        if isinstance(self.request.connection, HTTP1Connection):
            self.request.connection.stream.close()


@tornado.web.stream_request_body
class ChatCompletionsHandler(StreamingHandler):
    """``POST /v1/chat/completions``: the OpenAI-compatible endpoint."""

    endpoint = "chat_completions"

    def prepare(self) -> None:
        super().prepare()
        self._body = bytearray()
        self._too_large = False
        limit = self.cfg.limits.max_body_bytes
        length = self.request.headers.get("Content-Length")
        if length is not None and length.isdigit() and int(length) > limit:
            too_large = errors.BodyTooLarge(
                f"the request body has {length} bytes; at most {limit} are allowed")
            self.rejected(too_large)
            self.send_error_object(too_large)

    def data_received(self, chunk: bytes) -> None:
        if self._too_large:
            return
        self._body += chunk
        if len(self._body) > self.cfg.limits.max_body_bytes:
            self._too_large = True
            self._body = bytearray()

    async def post(self) -> None:
        limit = self.cfg.limits.max_body_bytes
        try:
            if self._too_large:
                raise errors.BodyTooLarge(f"the request body is over {limit} bytes")
            req = validate.chat_completion(bytes(self._body), self.cfg)
        except errors.RequestError as exc:
            self.rejected(exc)
            self.send_error_object(exc)
            return
        if not self.deps.slots.acquire():
            refusal = self.deps.slots.refusal()
            self.rejected(refusal)
            self.send_error_object(refusal)
            return
        try:
            await self._relay(req)
        finally:
            self.deps.slots.release(self.session)

    async def _relay(self, req: validate.ChatRequest) -> None:
        stream_id = new_stream_id()
        session = self.new_session(req, stream_id)
        try:
            await session.accepted()
        except errors.SSEProxyError as exc:
            session.reject(exc)
            self.send_error_object(exc)
            return
        except ClientGone:
            await session.stop()
            session.log_line()
            return
        completion_id = f"chatcmpl-{stream_id}"
        created = int(time.time())
        if not req.stream:
            await self._collect(session, req, completion_id, created)
            return
        self.start_stream()
        self.set_header("X-Stream-ID", stream_id)
        frames = OpenAIFrames(completion_id, created, req.model, req.include_usage,
                              reported=lambda: session.model)
        try:
            await self.flush()
        except StreamClosedError:
            session.client_closed()
        await session.relay(self, frames)
        self.finish_quietly()

    async def _collect(
        self, session: StreamSession, req: validate.ChatRequest, completion_id: str, created: int
    ) -> None:
        try:
            text = await session.collect()
        except errors.SSEProxyError as exc:
            self.send_error_object(exc)
            return
        except ClientGone:
            return
        finally:
            if session.outcome is not Outcome.COMPLETED:
                session.log_line()
        body = dumps({
            "id": completion_id,
            "object": "chat.completion",
            "created": created,
            "model": session.model or req.model,
            "choices": [{
                "index": 0,
                "message": {"role": "assistant", "content": text},
                "finish_reason": session.finish_reason,
            }],
            "usage": dict(session.usage) if session.usage else None,
        }).encode()
        session.record_body(len(body))
        self.set_header("Content-Type", "application/json; charset=utf-8")
        self.finish(body)
        session.log_line()


class ChatStreamHandler(StreamingHandler):
    """``GET /v1/chat/stream?prompt=…&persona=…``: the one-turn EventSource endpoint."""

    endpoint = "chat_stream"

    async def get(self) -> None:
        last_id = self.request.headers.get("Last-Event-ID") or self.get_query_argument(
            "last_event_id", ""
        )
        if last_id:
            # A reconnect never starts a new generation; 204 stops EventSource for good.
            log.info("reconnect_refused", last_event_id=last_id[:200])
            self.set_status(204)
            self.finish()
            return
        args = {k: self.get_query_argument(k) for k in ("prompt", "persona")
                if self.get_query_argument(k, None) is not None}
        try:
            req = validate.stream_query(args, self.cfg)
        except errors.RequestError as exc:
            self.rejected(exc)
            self.send_error_object(exc)
            return
        stream_id = new_stream_id()
        frames = EventSourceFrames(stream_id, self.cfg.server.retry_ms)
        self.start_stream()
        self.set_header("X-Stream-ID", stream_id)
        if not self.deps.slots.acquire():
            # Never a bare 503 on an EventSource URL: the browser would not say why.
            refusal = self.deps.slots.refusal()
            self.rejected(refusal)
            await self._send_quietly(frames.opening() + frames.error(refusal))
            self.finish_quietly()
            return
        try:
            session = self.new_session(req, stream_id)
            session.start()
            try:
                await session.write(self, frames.opening())
            except ClientGone:
                session.client_closed()
            await session.relay(self, frames)
        finally:
            self.deps.slots.release(self.session)
        self.finish_quietly()

    async def _send_quietly(self, data: bytes) -> None:
        try:
            await self.send(data)
        except ClientGone:
            pass


class HealthHandler(BaseHandler):
    async def get(self) -> None:
        self.set_header("Cache-Control", "no-store")
        self.finish({"status": "ok", "version": __version__})


class ReadyHandler(BaseHandler):
    async def get(self) -> None:
        self.set_header("Cache-Control", "no-store")
        slots = self.deps.slots
        if slots.draining:
            self.set_status(503)
        self.finish({"status": "draining" if slots.draining else "ready",
                     "streams": slots.active})


class MetricsHandler(BaseHandler):
    """``GET /metrics`` in the Prometheus text format."""

    async def get(self) -> None:
        body, content_type = self.deps.metrics.exposition()
        self.set_header("Content-Type", content_type)
        self.set_header("Cache-Control", "no-store")
        self.finish(body)


class NotFoundHandler(BaseHandler):
    def prepare(self) -> None:
        super().prepare()
        raise tornado.web.HTTPError(404)
