"""The upstream client: one ``httpx.AsyncClient`` per process, OpenAI streaming in, deltas out.

``UpstreamClient.open(body)`` posts ``{base_url}/chat/completions`` with
``stream: true`` and returns a :class:`ChatStream`. Entering it waits for the
upstream's status (an error status raises before anything is sent to the
client); iterating :meth:`ChatStream.deltas` yields :class:`Delta` objects.
Every failure is translated here, once, into :mod:`sseproxy.errors`; the
response is always closed, on success, on error and on cancellation.

Timeouts: httpx's own timeouts cover connecting and acquiring a pooled
connection. Reads have no httpx timeout, because one read timeout cannot tell
"the model has not started" from "the model stopped mid-reply": the first
token gets ``upstream.first_token_timeout_s`` (counted from the request), and
each later frame ``upstream.idle_timeout_s``, enforced with ``asyncio.timeout``.
"""

from __future__ import annotations

import asyncio
import json
import math
from collections.abc import AsyncGenerator, Mapping
from dataclasses import dataclass
from types import TracebackType
from typing import Any, Protocol, cast

import httpcore
import httpx

from . import errors
from .config import Settings
from .netbackend import AsyncioBackend
from .sse import Decoder

#: Upstream error bodies are read up to this size to find the OpenAI error object.
_MAX_ERROR_BODY = 64 * 1024


class Waits(Protocol):
    """Told when sseproxy starts and stops waiting for upstream bytes (stall detection)."""

    def begin(self) -> None: ...

    def end(self) -> None: ...


@dataclass(frozen=True, slots=True)
class Delta:
    """One step of the reply: text, the role, the finish reason or the token usage."""

    content: str = ""
    role: str | None = None
    finish_reason: str | None = None
    usage: Mapping[str, Any] | None = None


def make_http_client(settings: Settings) -> httpx.AsyncClient:
    """The process's upstream client, with explicit timeouts and pool limits."""
    up = settings.upstream
    timeout = httpx.Timeout(
        connect=up.connect_timeout_s,
        read=None,  # first-token and idle deadlines are enforced per frame, see module doc
        write=up.connect_timeout_s,
        pool=up.connect_timeout_s,
    )
    limits = httpx.Limits(
        max_connections=up.max_connections,
        max_keepalive_connections=up.max_keepalive_connections,
        keepalive_expiry=up.keepalive_expiry_s,
    )
    transport = httpx.AsyncHTTPTransport(limits=limits, trust_env=False)
    # httpx builds its pool with httpcore's default (anyio) network backend; the same pool
    # on plain asyncio streams costs a fraction per read (see sseproxy/netbackend.py).
    # httpx offers no public way to pass a backend, so the pool is replaced as a whole.
    transport._pool = httpcore.AsyncConnectionPool(
        ssl_context=httpx.create_ssl_context(trust_env=False),
        max_connections=limits.max_connections,
        max_keepalive_connections=limits.max_keepalive_connections,
        keepalive_expiry=limits.keepalive_expiry,
        network_backend=AsyncioBackend(),
    )
    return httpx.AsyncClient(timeout=timeout, transport=transport, trust_env=False)


def _retry_after(headers: httpx.Headers) -> str | None:
    """``Retry-After`` in seconds, also from OpenAI's ``retry-after-ms``."""
    if headers.get("Retry-After"):
        return headers["Retry-After"]
    ms = headers.get("retry-after-ms", "")
    try:
        return str(max(1, math.ceil(float(ms) / 1000))) if ms else None
    except ValueError:
        return None


class UpstreamClient:
    """Opens chat-completion streams against one OpenAI-compatible base URL."""

    def __init__(
        self,
        settings: Settings,
        http: httpx.AsyncClient,
        *,
        base_url: str | None = None,
        api_key: str | None = None,
    ) -> None:
        self.settings = settings
        self.http = http
        self.url = (base_url or settings.upstream_url).rstrip("/") + "/chat/completions"
        self._headers = {"Accept": "text/event-stream"}
        if api_key:
            self._headers["Authorization"] = f"Bearer {api_key}"

    def open(self, body: Mapping[str, Any], *, request_id: str | None = None) -> ChatStream:
        payload = dict(body)
        payload["stream"] = True
        payload["stream_options"] = {"include_usage": True}
        headers = dict(self._headers)
        if request_id:
            headers["X-Request-ID"] = request_id
        request = self.http.build_request("POST", self.url, json=payload, headers=headers)
        return ChatStream(self, request)

    async def aclose(self) -> None:
        await self.http.aclose()


class ChatStream:
    """One upstream streaming response. Use as ``async with client.open(body) as s``."""

    def __init__(self, client: UpstreamClient, request: httpx.Request) -> None:
        self._client = client
        self._request = request
        self._response: httpx.Response | None = None
        self._loop = asyncio.get_running_loop()
        self._started = 0.0
        up = client.settings.upstream
        self._first_token_timeout = up.first_token_timeout_s
        self._idle_timeout = up.idle_timeout_s
        self._max_event_bytes = client.settings.limits.max_event_bytes
        #: The HTTP status the upstream answered with (None until it answered).
        self.status: int | None = None
        #: The model the upstream says it used (from its chunks).
        self.model: str | None = None
        #: Told about every wait for upstream bytes, when set.
        self.waits: Waits | None = None

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
            async with asyncio.timeout(self._first_token_timeout):
                response = await self._client.http.send(self._request, stream=True)
        except TimeoutError as exc:
            raise errors.FirstTokenTimeout(
                f"the upstream did not answer within {self._first_token_timeout:g} s"
            ) from exc
        except httpx.TimeoutException as exc:
            raise errors.UpstreamUnreachable(
                f"the upstream could not be reached in time ({type(exc).__name__})"
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
                f"the upstream answered {content_type or 'no Content-Type'} "
                "instead of an event stream"
            )

    async def _status_error(self, response: httpx.Response) -> errors.UpstreamStatusError:
        body = b""
        try:
            async with asyncio.timeout(self._idle_timeout):
                async for chunk in response.aiter_bytes():
                    body += chunk
                    if len(body) >= _MAX_ERROR_BODY:
                        break
        except (TimeoutError, httpx.HTTPError):
            pass  # the status alone is enough; the body only refines the message
        code = etype = None
        message = f"the upstream answered HTTP {response.status_code}"
        try:
            obj = json.loads(body)
            err = obj.get("error") if isinstance(obj, dict) else None
            if isinstance(err, dict):
                if isinstance(err.get("message"), str) and err["message"]:
                    message = err["message"]
                if isinstance(err.get("code"), str) and err["code"]:
                    code = err["code"]
                if isinstance(err.get("type"), str) and err["type"]:
                    etype = err["type"]
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
            retry_after=_retry_after(response.headers),
        )

    async def deltas(self) -> AsyncGenerator[Delta, None]:
        """Yield the reply's deltas until ``[DONE]`` (or a finish reason and the end of body)."""
        if self._response is None:
            await self.connect()
        assert self._response is not None
        decoder = Decoder(max_event_bytes=self._max_event_bytes)
        chunks = cast(AsyncGenerator[bytes, None], self._response.aiter_bytes())
        finished = False
        first = True
        try:
            while True:
                budget = self._first_token_timeout if first else self._idle_timeout
                deadline = (self._started + budget) if first else (self._loop.time() + budget)
                if self.waits is not None:
                    self.waits.begin()
                try:
                    async with asyncio.timeout_at(deadline):
                        chunk = await anext(chunks)
                except StopAsyncIteration:
                    break
                except TimeoutError as exc:
                    if first:
                        raise errors.FirstTokenTimeout(
                            f"the upstream sent no token within {budget:g} s"
                        ) from exc
                    raise errors.IdleTimeout(
                        f"the upstream sent nothing for {budget:g} s mid-reply"
                    ) from exc
                except httpx.DecodingError as exc:
                    raise errors.MalformedFrame(
                        "the upstream sent a body that cannot be decoded"
                    ) from exc
                except httpx.HTTPError as exc:
                    raise errors.IncompleteStream(
                        f"the upstream connection broke mid-reply ({type(exc).__name__})"
                    ) from exc
                finally:
                    if self.waits is not None:
                        self.waits.end()
                try:
                    events = decoder.feed(chunk)
                except errors.EventTooLarge as exc:
                    raise errors.MalformedFrame(
                        "the upstream sent an event over the size limit "
                        f"(limits.max_event_bytes = {self._max_event_bytes})"
                    ) from exc
                for event in events:
                    if event.data == "[DONE]":
                        return
                    delta = self._parse(event.data)
                    if delta is None:
                        continue
                    if delta.content or delta.finish_reason is not None:
                        # A role-only chunk often comes at once; the first token has not.
                        first = False
                    if delta.finish_reason is not None:
                        finished = True
                    yield delta
        finally:
            # Close the byte iterator here, in this task: left to the garbage collector,
            # its finaliser would run as a stray task, maybe after the loop is gone.
            await chunks.aclose()
            await self.aclose()
        if not finished:
            raise errors.IncompleteStream(
                "the upstream ended the reply without [DONE] or a finish_reason"
            )

    def _parse(self, data: str) -> Delta | None:
        try:
            obj = json.loads(data)
        except ValueError as exc:
            raise errors.MalformedFrame("the upstream sent a frame that is not JSON") from exc
        if not isinstance(obj, dict):
            raise errors.MalformedFrame("the upstream sent a frame that is not a JSON object")
        err = obj.get("error")
        if err is not None:
            message, code = "the upstream reported an error mid-reply", None
            if isinstance(err, dict):
                if isinstance(err.get("message"), str) and err["message"]:
                    message = err["message"]
                if isinstance(err.get("code"), str) and err["code"]:
                    code = err["code"]
            raise errors.UpstreamStreamError(message, upstream_code=code)
        if self.model is None and isinstance(obj.get("model"), str):
            self.model = obj["model"]
        usage = obj.get("usage")
        usage = usage if isinstance(usage, dict) else None
        choices = obj.get("choices")
        if not isinstance(choices, list):
            raise errors.MalformedFrame("the upstream sent a chunk without a choices list")
        if not choices:
            return Delta(usage=usage) if usage else None
        choice = choices[0]
        if not isinstance(choice, dict):
            raise errors.MalformedFrame("the upstream sent a malformed choice")
        delta = choice.get("delta") or {}
        if not isinstance(delta, dict):
            raise errors.MalformedFrame("the upstream sent a malformed delta")
        content = delta.get("content") or ""
        role = delta.get("role")
        finish = choice.get("finish_reason")
        if not isinstance(content, str) or not isinstance(role, (str, type(None))):
            raise errors.MalformedFrame("the upstream sent a delta of the wrong shape")
        if not isinstance(finish, (str, type(None))):
            raise errors.MalformedFrame("the upstream sent a finish_reason of the wrong shape")
        if not content and role is None and finish is None and usage is None:
            return None
        return Delta(content=content, role=role, finish_reason=finish, usage=usage)

    async def aclose(self) -> None:
        """Close the response (idempotent); also runs when the stream is cancelled."""
        response, self._response = self._response, None
        if response is not None:
            await response.aclose()
