"""Tornado handlers: thin wiring from a request to validation, a generation and subscribers.

Handlers get their dependencies through ``initialize()`` (see :mod:`sseproxy.app`). A
request that starts a reply is validated, admitted by the registry and becomes a
:class:`~sseproxy.generation.Generation` writing into a log; a request that reads a reply
(the streaming responses, a reconnect) is a :class:`~sseproxy.subscriber.Subscriber` of that
log, writing through its connection's :class:`~sseproxy.sink.ConnectionSink`. Streaming
responses send their headers before the first token; they never carry ``ETag``,
``Content-Length`` or ``Content-Encoding`` (see :class:`~sseproxy.app.StreamSafeGZip`).
"""

from __future__ import annotations

import asyncio
import re
import secrets
import socket
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any, TypeVar

import structlog
import tornado.web
from tornado.http1connection import HTTP1Connection
from tornado.iostream import IOStream, StreamClosedError

from . import __version__, access, errors, models, sse, validate
from .config import Settings
from .frames import EventSourceFrames, Frames, OpenAIFrames, dumps, dumps_in_slices, error_object
from .generation import Generation
from .limiter import Limiter, Permit
from .limits import ANONYMOUS
from .localmodel import ReadinessProbe
from .looplag import LoopLagMonitor
from .metrics import Metrics
from .models import ModelCatalog
from .record import Outcome, StreamRecord
from .registry import StreamRegistry
from .sink import ClientGone, ConnectionSink
from .store import DONE, TEXT, EventLog, FollowerClosed, Store
from .subscriber import Ended, Subscriber
from .upstream import UpstreamClient

log = structlog.get_logger("sseproxy.http")

STREAM_HEADERS = {
    "Content-Type": "text/event-stream; charset=utf-8",
    "Cache-Control": "no-cache, no-transform",
    "X-Accel-Buffering": "no",
}
_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")


@dataclass
class Deps:
    """What handlers need, built once per process."""

    settings: Settings
    upstream: UpstreamClient
    registry: StreamRegistry
    store: Store
    metrics: Metrics
    models: ModelCatalog
    #: Measures the event loop's lag (one per process, started with the app).
    loop_lag: LoopLagMonitor | None = None
    #: Per-key limits (None: none).
    limiter: Limiter | None = None
    #: ``upstream.kind = "local"``: whether the model server answers yet.
    local_model: ReadinessProbe | None = None


def new_stream_id() -> str:
    """128 random bits: knowing a stream's id is what lets a client read or stop it."""
    return secrets.token_hex(16)


#: A validated request (chat or Responses).
Req = TypeVar("Req")

_EVENT_ID = re.compile(r"^([0-9a-f]{32})\.([0-9]{1,12})$")


def parse_event_id(value: str) -> tuple[str, int] | None:
    """``<stream_id>.<n>`` of an EventSource event id, or None when it is not one."""
    match = _EVENT_ID.match(value.strip())
    return (match[1], int(match[2])) if match else None


class BaseHandler(tornado.web.RequestHandler):
    deps: Deps
    cfg: Settings
    request_id: str
    #: Served without a key when ``auth.mode = keys`` (health checks, the login endpoints).
    public = False
    #: How the request was authenticated: ``bearer``, ``cookie``, or ``""``.
    auth_via = ""

    def initialize(self, deps: Deps) -> None:
        self.deps = deps
        # One snapshot per request: a SIGHUP reload applies to requests that start after it.
        self.cfg = deps.settings
        self.set_default_headers()

    def set_default_headers(self) -> None:
        access.default_headers(self, getattr(self, "cfg", None))

    def get_current_user(self) -> str | None:
        """The name of the client key the request carries (Bearer or session cookie); None
        without a valid one, and always None with ``auth.mode = none``."""
        user, self.auth_via = access.identify(self, self.cfg)
        return user

    def prepare(self) -> None:
        given = self.request.headers.get("X-Request-ID", "")
        self.request_id = given if _REQUEST_ID.match(given) else uuid.uuid4().hex
        self.set_header("X-Request-ID", self.request_id)
        structlog.contextvars.clear_contextvars()
        structlog.contextvars.bind_contextvars(request_id=self.request_id)
        if not self.public:
            refused = access.refusal(self, self.cfg, self.current_user, self.auth_via)
            if refused is not None:
                self.send_error_object(refused)

    def options(self, *args: str) -> None:
        """A CORS preflight: ``204`` for an origin in ``server.cors_origins``, else ``403``."""
        refused = access.preflight(self, self.cfg)
        if refused is not None:
            self.send_error_object(refused)

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
    """Shared parts of the handlers that start a generation or answer with an event stream."""

    endpoint = "stream"
    sink: ConnectionSink | None = None
    subscriber: Subscriber | None = None
    generation: Generation | None = None
    #: Stop the generation as soon as the client leaves (the OpenAI endpoint: SDK clients
    #: never resume); otherwise it runs on for ``store.orphan_grace_s``.
    cancel_on_leave = False
    _left = False
    _close_when_done = False
    #: This request's hold on its key's limits, from admission until the generation ends.
    permit: Permit | None = None

    def compute_etag(self) -> str | None:
        return None

    def start_stream(self) -> None:
        """Set the stream headers (before the first flush)."""
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
        self.sink = ConnectionSink(self)

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

    async def new_generation(self, req: validate.ChatRequest, stream_id: str, *,
                             retained: bool) -> Generation:
        """Start the generation of ``req`` in the registry (after admission); raises
        :class:`~sseproxy.errors.StoreUnavailable` (counted as rejected) when its log
        cannot be made."""
        structlog.contextvars.bind_contextvars(stream_id=stream_id)
        fields: dict[str, Any] = {"persona": req.persona, "model": req.model,
                                  "prompt_chars": req.prompt_chars}
        if self.cfg.logging.log_prompts:
            fields["prompt"] = req.messages[-1].get("content")
        record = StreamRecord(self.deps.metrics, stream_id, self.endpoint, fields)
        try:
            log_ = await self.deps.store.create(stream_id, retained=retained)
        except errors.StoreUnavailable as exc:
            self.rejected(exc)
            if self.permit is not None:
                self.permit.release()
            raise
        settings = self.cfg
        if req.pacing_off:
            settings = replace(settings, pacing=replace(settings.pacing, mode="off"))
        generation = Generation(self.deps.upstream, req.upstream_body(), log=log_,
                                record=record, settings=settings,
                                request_id=self.request_id)
        self.generation = generation
        self.deps.registry.add(generation, self.permit)
        return generation

    async def take_permit(self, req: validate.ChatRequest) -> errors.RateLimited | None:
        """Admit ``req`` against its key's limits (see :mod:`sseproxy.limiter`), before
        anything goes upstream, and set the ``x-ratelimit-*`` headers; the refusal (counted
        as rejected) when it is over one. The key is ``current_user`` (its name), or
        :data:`~sseproxy.limits.ANONYMOUS` without authentication."""
        if self.deps.limiter is None:
            return None
        try:
            self.permit = await self.deps.limiter.acquire(
                str(self.current_user or ANONYMOUS), req, self.cfg)
        except errors.RateLimited as exc:
            self.rejected(exc)
            return exc
        if self.permit is not None:
            for name, value in self.permit.headers.items():
                self.set_header(name, value)
        return None

    async def follow(self, log_: EventLog, after: int, frames: Frames,
                     record: StreamRecord) -> Ended:
        """Subscribe this connection to ``log_`` after event ``after`` until it ends."""
        assert self.sink is not None
        stall = self.cfg.stall
        subscriber = self.subscriber = Subscriber(
            log_, after, frames, self.sink, record, heartbeat_s=self.cfg.heartbeat.interval_s,
            stall_threshold_s=stall.threshold_s, client_timeout_s=stall.client_timeout_s)
        registry = self.deps.registry
        registry.attach(subscriber)
        try:
            try:
                await self.sink.open()  # the headers go out now, before the first event
            except ClientGone:
                self._left = True
            if self._left:
                subscriber.client_closed()
            ended = await subscriber.run(frames.opening())
        finally:
            registry.detach(subscriber)
        if ended is not Ended.FINAL:
            record.client_left()
            if self.cancel_on_leave and self.generation is not None:
                outcome = (Outcome.CLIENT_STALLED if ended is Ended.DROPPED
                           else Outcome.CLIENT_CLOSED)
                self.generation.stop(outcome)
        self.finish_quietly()
        return ended

    def on_finish(self) -> None:
        """The response is finished: its sink lets go of this handler (see
        :meth:`ConnectionSink.release`)."""
        super().on_finish()
        if self.sink is not None:
            self.sink.release()

    def on_connection_close(self) -> None:
        super().on_connection_close()  # (fails a body read still pending)
        self._left = True
        if self.sink is not None:
            self.sink.mark_gone()
        if self.subscriber is not None:
            self.subscriber.client_closed()
        elif self.cancel_on_leave and self.generation is not None:
            # Left while the upstream had not answered yet (or during stream: false).
            self.generation.record.client_left()
            self.generation.stop(Outcome.CLIENT_CLOSED)

    def rejected(self, error: errors.SSEProxyError) -> None:
        """A request refused before any upstream call: counted and logged as a stream
        with outcome ``rejected``, so the counter and the log lines agree."""
        self.deps.metrics.streams.labels(Outcome.REJECTED.value).inc()
        self.deps.metrics.endpoint_streams.labels(self.endpoint, Outcome.REJECTED.value).inc()
        log.info("stream", endpoint=self.endpoint, outcome=Outcome.REJECTED.value,
                 error_code=error.error_code(), reason=error.message)

    def accept(self, parse: Callable[[], Req], *, too_large: bool = False,
               resumable: bool | Callable[[Req], bool] = True) -> Req | None:
        """Validate (``400``/``413``) and admit (``429``/``503``) a request that starts a
        stream (``resumable``: whether it needs the store, or how to tell from the
        request); when it is refused, answer and return None."""
        try:
            if too_large:
                limit = self.cfg.limits.max_body_bytes
                raise errors.BodyTooLarge(f"the request body is over {limit} bytes")
            req = parse()
        except errors.RequestError as exc:
            self.rejected(exc)
            self.send_error_object(exc)
            return None
        refusal = self.admit(resumable(req) if callable(resumable) else resumable)
        if refusal is not None:
            self.send_error_object(refusal)
            return None
        return req

    async def over_limit(self, req: validate.ChatRequest) -> bool:
        """Whether ``req`` is refused by its key's limits (then answered ``429``)."""
        refusal = await self.take_permit(req)
        if refusal is not None and not self._left:
            self.send_error_object(refusal)
        return refusal is not None

    async def upstream_accepted(self, generation: Generation) -> bool:
        """Wait for the upstream's answer to ``generation``; when it refused, answer with its
        HTTP status. False when the request ends here (refused, or the client left)."""
        try:
            await generation.accepted()
        except errors.SSEProxyError as exc:
            if not self._left:
                self.send_error_object(exc)
            return False
        return not self._left

    def admit(self, resumable: bool = True) -> errors.SSEProxyError | None:
        """Why a new stream cannot start now (counted as rejected), or None. A resumable
        stream also needs its store (Redis) to be reachable."""
        try:
            self.deps.registry.check_admission()
            if resumable:
                self.deps.store.check()
        except errors.SSEProxyError as exc:
            self.rejected(exc)
            return exc
        return None

    def client_left(self) -> bool:
        """Whether the client's connection closed (read afresh after an ``await``)."""
        return self._left

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

    async def store_unavailable(self, error: errors.StoreUnavailable) -> None:
        """An EventSource read the store cannot serve now: ``200``, then ``event: error``
        (``store_unavailable``) without an id, so the client's ``Last-Event-ID`` stays
        and EventSource tries again after ``retry``."""
        self.start_stream()
        assert self.sink is not None
        retry = self.cfg.server.retry_ms
        try:
            await self.sink.send(sse.encode(retry=retry) + sse.encode(
                dumps(error_object(error)), event="error", retry=retry))
        except ClientGone:
            pass
        self.finish_quietly()

    # -- resumes -----------------------------------------------------------------------

    def last_event_id(self) -> str:
        """``Last-Event-ID`` (a reconnect), or the ``last_event_id`` query of a first connect."""
        return (self.request.headers.get("Last-Event-ID")
                or self.get_query_argument("last_event_id", "") or "")

    async def resume(self, last_id: str, stream_id: str | None = None) -> None:
        """Follow a stream from the position ``last_id`` names: replay what was missed,
        then follow live. Unknown, expired or fully delivered streams get ``204``, which
        stops EventSource for good; a reconnect never starts a new generation."""
        parsed = parse_event_id(last_id)
        if parsed is None or (stream_id is not None and parsed[0] != stream_id):
            error = errors.RequestError(
                "'Last-Event-ID' must be an event id of this stream (<stream_id>.<n>)")
            self.send_error_object(error)
            return
        sid, position = parsed
        try:
            log_ = await self.deps.store.get(sid)
        except errors.StoreUnavailable as exc:
            await self.store_unavailable(exc)
            return
        if log_ is None or (log_.ended and position >= log_.last):
            log.info("resume_refused", stream_id=sid, position=position,
                     reason="unknown or expired" if log_ is None else "already complete")
            self.set_status(204)
            self.finish()
            return
        structlog.contextvars.bind_contextvars(stream_id=sid)
        metrics = self.deps.metrics
        metrics.resumes.inc()
        record = self.deps.registry.record_of(sid)
        if record is None:
            record = StreamRecord(metrics, sid, self.endpoint, late=True)
        record.resumes += 1
        self.generation = self.deps.registry.get(sid)
        self.start_stream()
        self.set_header("X-Stream-ID", sid)
        frames = EventSourceFrames(sid, self.cfg.server.retry_ms)
        replayed = max(0, log_.last - min(position, log_.last))
        metrics.replayed_events.inc(replayed)
        log.info("resume", stream_id=sid, position=position, replay=replayed)
        await self.follow(log_, position, frames, record)


@tornado.web.stream_request_body
class ChatCompletionsHandler(StreamingHandler):
    """``POST /v1/chat/completions``: the OpenAI-compatible endpoint."""

    endpoint = "chat_completions"
    cancel_on_leave = True

    def prepare(self) -> None:
        super().prepare()
        self._body = bytearray()
        self._too_large = self._finished  # refused (401/403): the body is read and dropped
        if self._finished:
            return
        limit = self.cfg.limits.max_body_bytes
        length = self.request.headers.get("Content-Length")
        if length is not None and length.isdigit() and int(length) > limit:
            too_large = errors.BodyTooLarge(
                f"the request body has {length} bytes; at most {limit} are allowed")
            self.rejected(too_large)
            self.send_error_object(too_large)
            return
        self._body_timer = asyncio.get_running_loop().call_later(
            self.cfg.limits.body_timeout_s, self._body_timed_out)

    _body_timer: asyncio.TimerHandle | None = None

    def _body_timed_out(self) -> None:
        """The body did not arrive whole within ``limits.body_timeout_s``: 408 (Tornado
        then closes the connection, as the body was not read to its end)."""
        if not self._finished:
            late = errors.RequestTimeout(
                f"the request body did not arrive within {self.cfg.limits.body_timeout_s:g} s")
            self.rejected(late)
            self.send_error_object(late)

    def _stop_body_timer(self) -> None:
        if self._body_timer is not None:
            self._body_timer.cancel()
            self._body_timer = None

    def on_connection_close(self) -> None:
        self._stop_body_timer()
        super().on_connection_close()

    def data_received(self, chunk: bytes) -> None:
        if self._too_large:
            return
        self._body += chunk
        if len(self._body) > self.cfg.limits.max_body_bytes:
            self._too_large = True
            self._body = bytearray()

    async def post(self) -> None:
        self._stop_body_timer()
        if self._finished:  # answered while the body arrived (408)
            return
        req = self.accept(lambda: validate.chat_completion(bytes(self._body), self.cfg),
                          too_large=self._too_large, resumable=False)
        if req is None or await self.over_limit(req):
            return
        stream_id = new_stream_id()
        generation = await self.new_generation(req, stream_id, retained=False)
        if not await self.upstream_accepted(generation):
            return
        completion_id = f"chatcmpl-{stream_id}"
        created = int(time.time())
        if not req.stream:
            await self._collect(generation, req, completion_id, created)
            return
        self.start_stream()
        self.set_header("X-Stream-ID", stream_id)
        assert self.sink is not None
        frames = OpenAIFrames(completion_id, created, req.model, req.include_usage,
                              reported=lambda: generation.model)
        await self.follow(generation.log, 0, frames, generation.record)

    async def _collect(self, generation: Generation, req: validate.ChatRequest,
                       completion_id: str, created: int) -> None:
        """``stream: false``: read the whole reply from the live log, then answer once."""
        follower = generation.log.follow(0)
        loop = asyncio.get_running_loop()
        record = generation.record
        text: list[str] = []
        final = None
        size, limit = 0, self.cfg.limits.max_reply_bytes
        try:
            while final is None:
                for event in await follower.next(loop.time() + 3600.0):
                    if event.kind == TEXT:
                        record.first_text()
                        size += len(event.data.encode("utf-8", "surrogatepass"))
                        if size > limit:
                            text.clear()
                            too_large = errors.ReplyTooLarge(limit)
                            generation.stop(Outcome.UPSTREAM_ERROR, too_large)
                            if not self._left:
                                self.send_error_object(too_large)
                            return
                        text.append(event.data)
                    else:
                        final = event
        except FollowerClosed:
            return
        finally:
            follower.close()
            self.deps.registry.reader_done(generation)
        if self._left:
            return
        if final.kind != DONE:
            assert record.error is not None
            self.send_error_object(record.error)
            return
        body = await dumps_in_slices({
            "id": completion_id,
            "object": "chat.completion",
            "created": created,
            "model": generation.model or req.model,
            "choices": [{
                "index": 0,
                "message": {"role": "assistant", "content": "".join(text)},
                "finish_reason": record.finish_reason,
            }],
            "usage": dict(record.usage) if record.usage else None,
        })
        if self.client_left():  # it went while the body was being encoded
            return
        record.sent(1, len(body))
        self.set_header("Content-Type", "application/json; charset=utf-8")
        self.finish(body)


class ChatStreamHandler(StreamingHandler):
    """``GET /v1/chat/stream?prompt=…&persona=…``: the one-turn EventSource endpoint.

    It creates a resumable stream and subscribes to it; a reconnect (``Last-Event-ID``)
    resumes that stream and never starts another generation.
    """

    endpoint = "chat_stream"

    async def get(self) -> None:
        last_id = self.last_event_id()
        if last_id:
            await self.resume(last_id)
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
        refusal: errors.SSEProxyError | None = self.admit()
        if refusal is None:
            refusal = await self.take_permit(req)
        generation = None
        if refusal is None:
            try:
                generation = await self.new_generation(req, stream_id, retained=True)
            except errors.StoreUnavailable as exc:
                refusal = exc
        if generation is None:
            # Never a bare 503 on an EventSource URL: the browser would not say why.
            assert self.sink is not None and refusal is not None
            try:
                await self.sink.send(frames.opening() + self.refusal_event(frames, refusal))
            except ClientGone:
                pass
            self.finish_quietly()
            return
        await self.follow(generation.log, 0, frames, generation.record)

    def refusal_event(self, frames: EventSourceFrames, refusal: errors.SSEProxyError) -> bytes:
        """A refusal as an event; over a key's limit: ``rate_limited`` without an id, its
        ``retry:`` the wait, so EventSource asks again (afresh) once it may pass."""
        if not isinstance(refusal, errors.RateLimited):
            return frames.error(refusal)
        retry_ms = max(1, int(refusal.retry_after_s * 1000 + 0.999))
        return sse.encode(dumps(refusal.event_object()), event="error", retry=retry_ms)


class StreamsHandler(StreamingHandler):
    """``POST /v1/streams``: start a resumable generation; ``201 {"id", "events_url"}``."""

    endpoint = "streams"

    async def post(self) -> None:
        body = self.request.body
        req = self.accept(lambda: validate.stream_start(body, self.cfg),
                          too_large=len(body) > self.cfg.limits.max_body_bytes)
        if req is None or await self.over_limit(req):
            return
        stream_id = new_stream_id()
        try:
            await self.new_generation(req, stream_id, retained=True)
        except errors.StoreUnavailable as exc:
            self.send_error_object(exc)
            return
        url = f"/v1/streams/{stream_id}"
        self.set_status(201)
        self.set_header("Location", url)
        self.set_header("Content-Type", "application/json; charset=utf-8")
        self.finish(dumps({"id": stream_id, "object": "stream", "events_url": url}))


class StreamHandler(StreamingHandler):
    """``GET /v1/streams/{id}`` (EventSource, resumable) and ``DELETE`` (stop it)."""

    endpoint = "streams"

    async def get(self, stream_id: str) -> None:
        last_id = self.last_event_id()
        if last_id:
            await self.resume(last_id, stream_id)
            return
        try:
            log_ = await self.deps.store.get(stream_id)
        except errors.StoreUnavailable as exc:
            await self.store_unavailable(exc)
            return
        if log_ is None:
            log.info("stream_unknown", stream_id=stream_id)
            self.set_status(204)
            self.finish()
            return
        structlog.contextvars.bind_contextvars(stream_id=stream_id)
        record = self.deps.registry.record_of(stream_id)
        if record is None:
            record = StreamRecord(self.deps.metrics, stream_id, self.endpoint, late=True)
        self.generation = self.deps.registry.get(stream_id)
        self.start_stream()
        self.set_header("X-Stream-ID", stream_id)
        await self.follow(log_, 0, EventSourceFrames(stream_id, self.cfg.server.retry_ms),
                          record)

    async def delete(self, stream_id: str) -> None:
        generation = self.deps.registry.get(stream_id)
        if generation is not None:
            generation.stop(Outcome.CANCELLED, errors.StreamCancelled())
        else:  # finished, unknown, or running on another instance (a shared store)
            try:
                found = await self.deps.store.cancel(stream_id)
            except errors.StoreUnavailable as exc:
                self.send_error_object(exc)
                return
            if not found:
                self.send_error_object(errors.StreamNotFound())
                return
        self.set_status(204)
        self.finish()


class ModelsHandler(BaseHandler):
    """``GET /v1/models``: the upstream's model list, or sseproxy's own (see models.py)."""

    async def get(self) -> None:
        self.finish(await self.deps.models.models(self.cfg))


class ModelHandler(BaseHandler):
    """``GET /v1/models/{id}``: that entry of the model list, else ``404 model_not_found``."""

    async def get(self, model: str) -> None:
        found = await self.deps.models.model(self.cfg, model)
        if found is None:
            self.send_error_object(errors.ModelNotFound(model))
            return
        self.finish(found)


class PersonasHandler(BaseHandler):
    """``GET /v1/personas``: each persona's name, title and model, never its prompt."""

    async def get(self) -> None:
        self.finish(models.personas(self.cfg))


class HealthHandler(BaseHandler):
    public = True

    async def get(self) -> None:
        self.set_header("Cache-Control", "no-store")
        self.finish({"status": "ok", "version": __version__})


class ReadyHandler(BaseHandler):
    public = True

    async def get(self) -> None:
        self.set_header("Cache-Control", "no-store")
        registry = self.deps.registry
        problem = self.deps.store.problem
        status = "draining" if registry.draining else "store_unavailable" if problem else "ready"
        if status == "ready" and self.deps.local_model and not self.deps.local_model.ready:
            status = "loading_model"
        if status != "ready":
            self.set_status(503)
        body: dict[str, Any] = {"status": status, "streams": registry.active}
        if problem:
            body["reason"] = problem
        self.finish(body)


class MetricsHandler(BaseHandler):
    """``GET /metrics`` in the Prometheus text format; ``HEAD`` gives the same headers
    without the body (Tornado drops it)."""

    async def get(self) -> None:
        body, content_type = self.deps.metrics.exposition()
        self.set_header("Content-Type", content_type)
        self.set_header("Cache-Control", "no-store")
        self.finish(body)

    head = get


class NotFoundHandler(BaseHandler):
    public = True

    def prepare(self) -> None:
        super().prepare()
        raise tornado.web.HTTPError(404)
