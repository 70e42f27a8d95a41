"""The upstream client: one pooled transport per process, OpenAI streaming in, deltas out.

``UpstreamClient.open(body)`` posts ``{base_url}/chat/completions`` with
``stream: true`` (with ``upstream.api = "responses"``: ``{base_url}/responses``, the
body translated by :mod:`sseproxy.upstream_responses`) and returns a :class:`ChatStream`.
What the events mean is the job of that API's decoder (:mod:`sseproxy.upstream_chat`,
:mod:`sseproxy.upstream_responses`); this module moves bytes and keeps time. Entering
the stream waits for the upstream's status (an error status raises before anything is sent to the
client); :meth:`ChatStream.run` passes each :class:`Delta` to a callback as it arrives.
Every failure is translated here, once, into :mod:`sseproxy.errors`; the
response is always closed, on success, on error and on cancellation.

Requests go straight to an httpx transport (sseproxy's own :mod:`sseproxy.h1`, or any
``httpx.AsyncBaseTransport``, e.g. ``httpx.MockTransport`` in tests), not through an
``httpx.AsyncClient``: a relay must not keep cookies from one user's request for the next
(a client's cookie jar would), follows no redirects (a redirect means a wrong ``base_url``,
and following it would resend the API key), and so needs none of the client's per-request
work (a third of the cost of opening a stream).

Timeouts: httpx's own timeouts cover connecting and acquiring a pooled
connection. Reads have no httpx timeout, because one read timeout cannot tell
"the model has not started" from "the model stopped mid-reply": the first
token gets ``upstream.first_token_timeout_s`` (counted from the request), and
each later event ``upstream.idle_timeout_s``. Only a complete event counts: bytes of a
line that never ends, or comments, do not move the idle deadline, so an upstream cannot
hold a stream open by trickling. The whole generation gets ``upstream.max_duration_s``.
On sseproxy's own transport one timer per stream enforces them, moved on lazily (events
only note the time); on any other transport each read is wrapped in ``asyncio.timeout``.

What an upstream sends is bounded before it reaches the rest of sseproxy: an event stream
must come uncompressed (``Accept-Encoding: identity`` is asked; a ``Content-Encoding`` is
refused as a protocol error, see :mod:`sseproxy.h1` for why), an event is bounded by
``limits.max_event_bytes``, an error body is read up to 64 KiB (inflated up to 64 KiB when
compressed) and ``Retry-After`` is normalized to whole seconds in 1..3600.
"""

from __future__ import annotations

import asyncio
import email.utils
import json
import math
import time
import zlib
from collections.abc import AsyncGenerator, Callable, Mapping
from types import TracebackType
from typing import Any, Protocol, cast

import httpx

from . import __version__, errors, h1, upstream_responses
from .config import Settings
from .delta import Decoder as EventDecoder
from .delta import Delta
from .envproxy import EnvProxyTransport
from .sse import Decoder
from .upstream_chat import ChatDecoder, passed_on

__all__ = ["ChatStream", "Delta", "UpstreamClient", "Waits", "make_transport", "retry_after"]

#: Upstream error bodies are read up to this size to find the OpenAI error object.
_MAX_ERROR_BODY = 64 * 1024
#: ``Retry-After`` passed on to a client is clamped to this range (seconds).
RETRY_AFTER_MIN_S, RETRY_AFTER_MAX_S = 1, 3600


class Waits(Protocol):
    """Told when sseproxy starts and stops waiting for upstream bytes (stall detection)."""

    def begin(self) -> None: ...

    def end(self) -> None: ...


def make_transport(settings: Settings) -> httpx.AsyncBaseTransport:
    """The process's upstream connection pool, with explicit limits."""
    up = settings.upstream
    limits = httpx.Limits(
        max_connections=up.max_connections,
        max_keepalive_connections=up.max_keepalive_connections,
        keepalive_expiry=up.keepalive_expiry_s,
    )
    if up.transport == "httpx":
        # httpx's own (httpcore, h11): bodies are pulled, a proxy may come from the
        # environment; slower per token, but nothing of sseproxy's own below the request.
        return EnvProxyTransport(limits=limits)
    # sseproxy's own HTTP/1.1 transport: streamed bodies are parsed as they arrive,
    # without a task switch, h11's state machine or a timeout scope per chunk (see h1.py).
    return h1.H1Transport(limits=limits, ssl_context=httpx.create_ssl_context(trust_env=False))


def retry_after(headers: httpx.Headers, now: float | None = None) -> str | None:
    """The upstream's ``Retry-After`` as whole seconds in 1..3600, or None when it has none
    that can be read (the 429 then says 1). Delay-seconds and HTTP-dates (counted from
    ``now``, Unix time) are read, else OpenAI's ``retry-after-ms``; anything else (control
    characters, non-ASCII bytes, 60,000 digits) is dropped: it is never passed on as sent.
    """
    seconds: float | None = None
    value = _header(headers, b"retry-after")
    if value and len(value) <= 64:
        if value.isdigit():
            seconds = int(value)
        else:
            try:
                when = email.utils.parsedate_to_datetime(value.decode("ascii"))
                seconds = when.timestamp() - (time.time() if now is None else now)
            except (ValueError, TypeError, UnicodeDecodeError):
                seconds = None
    elif value and value.isdigit():
        seconds = RETRY_AFTER_MAX_S  # more digits than fit in 64 characters: a long time
    if seconds is None:
        ms = _header(headers, b"retry-after-ms")
        try:
            seconds = float(ms) / 1000 if ms and len(ms) <= 32 else None
        except ValueError:
            seconds = None
        if seconds is not None and not math.isfinite(seconds):
            seconds = None
    if seconds is None:
        return None
    return str(min(max(math.ceil(seconds), RETRY_AFTER_MIN_S), RETRY_AFTER_MAX_S))


def _header(headers: httpx.Headers, name: bytes) -> bytes:
    """A header's raw value (the first one), stripped; b"" when absent."""
    for key, value in headers.raw:
        if key.lower() == name:
            return value.strip()
    return b""


class UpstreamClient:
    """Opens chat-completion streams against one OpenAI-compatible base URL."""

    def __init__(
        self,
        settings: Settings,
        transport: httpx.AsyncBaseTransport,
        *,
        base_url: str | None = None,
        api_key: str | None = None,
    ) -> None:
        self.settings = settings
        self.transport = transport
        # parsed once: httpx would parse a str URL again for every request
        self.base_url = (base_url or settings.upstream_url).rstrip("/")
        self.responses_api = settings.upstream.api == "responses"
        self.url = httpx.URL(self.base_url + (
            "/responses" if self.responses_api else "/chat/completions"))
        # identity: a compressed event stream arrives in bursts, whatever the server does
        self._headers = {"Accept": "text/event-stream", "Accept-Encoding": "identity",
                         "Content-Type": "application/json",
                         "User-Agent": f"sseproxy/{__version__}"}
        self.api_key = api_key
        if api_key:
            self._headers["Authorization"] = f"Bearer {api_key}"
        up = settings.upstream
        # The transport's own timeouts: connecting and waiting for a pooled connection.
        # Reads have none: first-token and idle deadlines are enforced per frame.
        self._extensions = {"timeout": httpx.Timeout(
            connect=up.connect_timeout_s, read=None, write=up.connect_timeout_s,
            pool=up.connect_timeout_s).as_dict()}

    def open(self, body: Mapping[str, Any], *, request_id: str | None = None,
             relay: bool = False) -> ChatStream:
        """The stream of a chat-shaped request ``body``. ``relay``: a Responses upstream's
        own events are passed on too (see :mod:`sseproxy.upstream_responses`); raises
        :class:`~sseproxy.errors.RequestError` when the body cannot be sent to this API."""
        decoder: EventDecoder
        if self.responses_api:
            payload = upstream_responses.request_body(body)
            decoder = upstream_responses.ResponsesDecoder(relay=relay, secret=self.api_key)
        else:
            payload = dict(body)
            payload["stream"] = True
            payload["stream_options"] = {"include_usage": True}
            decoder = ChatDecoder(secret=self.api_key)
        headers = dict(self._headers)
        if request_id:
            headers["X-Request-ID"] = request_id
        # What httpx's json= would send; NaN and Infinity never get here (see validate).
        content = json.dumps(payload, ensure_ascii=False, separators=(",", ":"),
                             allow_nan=False).encode()
        request = httpx.Request("POST", self.url, headers=headers, content=content,
                                extensions=self._extensions)
        return ChatStream(self, request, decoder)

    def get(self, path: str, timeout_s: float) -> httpx.Request:
        """A ``GET {base_url}/{path}`` (e.g. ``models``) with sseproxy's headers and key,
        for :attr:`transport`; ``timeout_s`` bounds connecting and each read."""
        headers = dict(self._headers, Accept="application/json")
        del headers["Content-Type"]
        return httpx.Request("GET", f"{self.base_url}/{path}", headers=headers,
                             extensions={"timeout": httpx.Timeout(timeout_s).as_dict()})

    async def aclose(self) -> None:
        await self.transport.aclose()


class ChatStream:
    """One upstream streaming response. Use as ``async with client.open(body) as s``."""

    def __init__(self, client: UpstreamClient, request: httpx.Request,
                 decoder: EventDecoder | None = None) -> None:
        self._client = client
        self._events_decoder: EventDecoder = decoder or ChatDecoder()
        self._request = request
        self._response: httpx.Response | None = None
        self._loop = asyncio.get_running_loop()
        self._started = 0.0
        up = client.settings.upstream
        self._first_token_timeout = up.first_token_timeout_s
        self._idle_timeout = up.idle_timeout_s
        self._max_duration = up.max_duration_s
        self._max_event_bytes = client.settings.limits.max_event_bytes
        #: The HTTP status the upstream answered with (None until it answered).
        self.status: int | None = None
        #: Told about every wait for upstream bytes, when set.
        self.waits: Waits | None = None
        self._decoder: Decoder | None = None
        self._on_delta: Callable[[Delta], None] | None = None
        self._on_read: Callable[[], None] | None = None
        self._first = True
        self._events = 0
        self._finished = False
        self._done = False
        self._paused = False
        self._last = 0.0
        self._body: h1.Body | None = None
        self._end: asyncio.Future[None] | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._resumed: asyncio.Future[None] | None = None
        self._ended = False

    @property
    def model(self) -> str | None:
        """The model the upstream says it used (from its events)."""
        return self._events_decoder.model

    async def __aenter__(self) -> ChatStream:
        if self.status is None:
            await self.connect()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    async def connect(self) -> None:
        """Send the request and wait for the status; raise the mapped error on failure."""
        self._started = self._loop.time()
        if self.waits is not None:
            self.waits.begin()
        try:
            async with asyncio.timeout_at(self._deadline()):
                response = await self._client.transport.handle_async_request(self._request)
        except TimeoutError as exc:
            if self._max_duration < self._first_token_timeout:
                raise self._timeout_error() from exc
            raise errors.FirstTokenTimeout(
                f"the upstream did not answer within {self._first_token_timeout:g} s"
            ) from exc
        except httpx.TimeoutException as exc:
            raise errors.UpstreamUnreachable(
                f"the upstream could not be reached in time ({type(exc).__name__})"
            ) from exc
        except h1.NoResponse as exc:
            raise errors.UpstreamUnreachable(
                f"the upstream closed the connection without answering ({type(exc).__name__})"
            ) from exc
        except httpx.RemoteProtocolError as exc:
            # The upstream answered, but not in HTTP/1.1 (a malformed head, status 000,
            # Transfer-Encoding: gzip, chunked): not a network failure.
            raise errors.UpstreamProtocolError(
                "the upstream answered with a malformed HTTP response"
            ) from exc
        except httpx.HTTPError as exc:
            raise errors.UpstreamUnreachable(
                f"the upstream could not be reached ({type(exc).__name__})"
            ) from exc
        finally:
            if self.waits is not None:
                self.waits.end()
        self._response = response
        self.status = response.status_code
        if not 200 <= response.status_code < 300:
            # 3xx too: a redirect means a wrong base_url, and following it would resend
            # the API key to wherever it points.
            try:
                raise await self._status_error(response)
            finally:
                await self.aclose()
        content_type = response.headers.get("Content-Type", "")
        if not content_type.startswith("text/event-stream"):
            await self.aclose()
            raise errors.UpstreamProtocolError(
                f"the upstream answered {content_type[:80] or 'no Content-Type'} "
                "instead of an event stream"
            )
        if h1.content_encoding(response.headers.raw) != b"identity":
            # On every transport (issue 18): a pulled body would be inflated unbounded.
            await self.aclose()
            raise errors.UpstreamProtocolError(
                "the upstream compressed its event stream, though sseproxy asked for "
                "Accept-Encoding: identity"
            )

    async def _status_error(self, response: httpx.Response) -> errors.UpstreamStatusError:
        body = b""
        try:
            async with asyncio.timeout(self._idle_timeout):
                # raw: httpx would inflate each read in one unbounded call
                async for chunk in response.aiter_raw():
                    body += chunk
                    if len(body) >= _MAX_ERROR_BODY:
                        break
        except (TimeoutError, httpx.HTTPError):
            pass  # the status alone is enough; the body only refines the message
        encoding = h1.content_encoding(response.headers.raw)
        if encoding in (b"gzip", b"x-gzip", b"deflate"):
            try:  # gzip or zlib, detected from the header; at most _MAX_ERROR_BODY out
                body = zlib.decompressobj(zlib.MAX_WBITS | 32).decompress(body, _MAX_ERROR_BODY)
            except zlib.error:
                body = b""
        elif encoding != b"identity":
            body = b""
        code = etype = None
        message = f"the upstream answered HTTP {response.status_code}"
        try:
            obj = json.loads(body)
            err = obj.get("error") if isinstance(obj, dict) else None
            if isinstance(err, dict):
                said, code, etype = passed_on(err, self._client.api_key)
                message = said or message
        except ValueError:
            pass
        if response.status_code in (401, 403):
            # The key is sseproxy's, not the client's: say so without echoing details.
            message = "the upstream rejected sseproxy's credentials"
        return errors.UpstreamStatusError(
            response.status_code,
            message,
            upstream_code=code,
            upstream_type=etype,
            retry_after=retry_after(response.headers),
        )

    def pause(self) -> None:
        """Stop reading the upstream (its TCP window fills up) until :meth:`resume`:
        backpressure from a slow client. A paused stream is not waiting on the upstream,
        so neither its idle deadline nor its stall watch runs. Both do nothing once the
        reply has ended (its connection may already serve another stream)."""
        if self._ended:
            return
        if not self._paused:
            self._paused = True
            if self._body is not None:
                self._body.pause()
            if self.waits is not None:
                self.waits.end()

    def resume(self) -> None:
        if self._ended:
            return
        if self._paused:
            self._paused = False
            self._last = self._loop.time()
            if self.waits is not None:
                self.waits.begin()
            if self._body is not None:
                self._body.resume()
            if self._end is not None and not self._end.done():
                self._reschedule()
            resumed, self._resumed = self._resumed, None
            if resumed is not None and not resumed.done():
                resumed.set_result(None)

    async def run(self, on_delta: Callable[[Delta], None],
                  on_read: Callable[[], None] | None = None) -> None:
        """Pass each delta of the reply to ``on_delta`` until ``[DONE]`` (or a finish reason
        and the end of the body); raise the mapped error when the reply fails.

        ``on_delta`` runs synchronously as bytes arrive; it may call :meth:`pause`.
        ``on_read``, when given, is called after the deltas of each read (a burst of
        tokens arrives in one read), also when the read ended the reply or broke it.
        """
        if self._response is None:
            await self.connect()
        response = self._response
        assert response is not None
        self._decoder = Decoder(max_event_bytes=self._max_event_bytes)
        self._on_delta = on_delta
        self._on_read = on_read
        try:
            body = response.extensions.get("sseproxy_body")
            if isinstance(body, h1.Body):
                await self._pushed(body)
            else:
                await self._pulled(response)
        except (errors.SSEProxyError, asyncio.CancelledError):
            raise
        except httpx.DecodingError as exc:
            raise errors.MalformedFrame("the upstream sent a body that cannot be decoded") from exc
        except httpx.HTTPError as exc:
            raise errors.IncompleteStream(
                f"the upstream connection broke mid-reply ({type(exc).__name__})"
            ) from exc
        finally:
            self._ended = True
            self._body = None
            try:
                await self.aclose()
            finally:
                # The callbacks are bound methods of the caller, which holds this stream:
                # let go of them, so that cycle does not wait for the garbage collector.
                self._on_delta = self._on_read = None
        if not (self._done or self._finished):
            raise errors.IncompleteStream(
                "the upstream ended the reply without [DONE] or a finish_reason"
            )

    def _feed(self, data: bytes) -> bool:
        """Decode ``data`` and pass its deltas on; True once ``[DONE]`` came."""
        try:
            return self._deliver(data)
        finally:
            if self._on_read is not None:
                self._on_read()

    def _deliver(self, data: bytes) -> bool:
        assert self._decoder is not None and self._on_delta is not None
        try:
            events = self._decoder.feed(data)
        except errors.EventTooLarge as exc:
            raise errors.MalformedFrame(
                "the upstream sent an event over the size limit "
                f"(limits.max_event_bytes = {self._max_event_bytes})"
            ) from exc
        if events:
            # Only a complete event moves the idle deadline (not a byte, not a comment).
            self._events += len(events)
            self._last = self._loop.time()
        decode = self._events_decoder.decode
        for event in events:
            delta = decode(event.event, event.data)
            if delta is not None:
                if delta.content or delta.finish_reason is not None:
                    # A role-only chunk often comes at once; the first token has not.
                    self._first = False
                if delta.finish_reason is not None:
                    self._finished = True
                self._on_delta(delta)
                if delta.event is not None and self._events_decoder.failure is not None:
                    raise self._events_decoder.failure  # relayed first, then it ends the reply
            if self._events_decoder.done:
                self._done = True
                return True
        return False

    def _timeout_error(self) -> errors.UpstreamTimeout:
        if self._loop.time() >= self._started + self._max_duration:
            return errors.DurationExceeded(
                f"the reply took longer than {self._max_duration:g} s "
                "(upstream.max_duration_s)")
        if self._first:
            return errors.FirstTokenTimeout(
                f"the upstream sent no token within {self._first_token_timeout:g} s")
        return errors.IdleTimeout(
            f"the upstream sent no event for {self._idle_timeout:g} s mid-reply")

    def _deadline(self) -> float:
        """The next deadline while reading (loop time): first token or idle, and the total."""
        if self._first:
            deadline = self._started + self._first_token_timeout
        else:
            deadline = self._last + self._idle_timeout
        return min(deadline, self._started + self._max_duration)

    def _reschedule(self) -> None:
        """Bring the timer forward when the deadline moved earlier (it is only ever moved
        on lazily, by the timer itself)."""
        deadline = self._deadline()
        timer = self._timer
        if timer is None or timer.when() > deadline:
            if timer is not None:
                timer.cancel()
            self._timer = self._loop.call_at(deadline, self._on_deadline)

    def _on_deadline(self) -> None:
        # One timer per stream, moved on lazily: events only note the time they came.
        self._timer = None
        end = self._end
        if end is None or end.done():
            return
        now = self._loop.time()
        total = self._started + self._max_duration
        if self._paused:
            # A paused stream waits for its client, not the upstream: only the total counts.
            if now < total:
                self._timer = self._loop.call_at(total, self._on_deadline)
                return
            deadline = total
        else:
            deadline = self._deadline()
        if now < deadline:
            self._timer = self._loop.call_at(deadline, self._on_deadline)
        else:
            end.set_exception(self._timeout_error())

    async def _pushed(self, body: h1.Body) -> None:
        """Bytes pushed by sseproxy's own transport, parsed as they arrive (no task per read)."""
        loop = self._loop
        self._end = end = loop.create_future()
        self._body = body
        self._last = loop.time()
        waits = self.waits

        def on_data(data: bytes) -> None:
            if end.done():
                return
            first, events = self._first, self._events
            if self._feed(data) and not end.done():
                end.set_result(None)
                return
            if events != self._events and waits is not None and not self._paused:
                waits.end()  # an event came: the wait for the next one begins now
                waits.begin()
            if first and not self._first and not end.done():
                # The first token came: the idle deadline may be earlier than the timer.
                self._reschedule()

        def on_end(error: BaseException | None) -> None:
            if not end.done():
                if error is None:
                    end.set_result(None)
                else:
                    end.set_exception(error)

        self._reschedule()
        if waits is not None and not self._paused:
            waits.begin()
        try:
            body.push(on_data, on_end)
            if self._paused:
                body.pause()
            await end
            if self._done:
                body.drain()  # the rest is the final zero chunk: keep the connection
        finally:
            if self._timer is not None:
                self._timer.cancel()
                self._timer = None
            if waits is not None:
                waits.end()

    async def _pulled(self, response: httpx.Response) -> None:
        """Any other httpx transport: read the body chunk by chunk, each read timed."""
        chunks = cast(AsyncGenerator[bytes, None], response.aiter_bytes())
        self._last = self._loop.time()
        try:
            while True:
                deadline = self._deadline()
                if self.waits is not None:
                    self.waits.begin()
                try:
                    async with asyncio.timeout_at(deadline):
                        chunk = await anext(chunks)
                except StopAsyncIteration:
                    return
                except TimeoutError as exc:
                    raise self._timeout_error() from exc
                finally:
                    if self.waits is not None:
                        self.waits.end()
                if self._feed(chunk):
                    return
                while self._paused:
                    self._resumed = self._loop.create_future()
                    await self._resumed
        finally:
            # Close the byte iterator here, in this task: left to the garbage collector,
            # its finaliser would run as a stray task, maybe after the loop is gone.
            await chunks.aclose()

    async def aclose(self) -> None:
        """Close the response (idempotent); also runs when the stream is cancelled."""
        response, self._response = self._response, None
        if response is not None:
            await response.aclose()
