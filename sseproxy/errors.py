"""The one error tree of sseproxy.

Every failure a client can see is one of these classes. httpx and decoder
exceptions are translated into it once, at the boundary where they happen
(``raise ... from exc``), so handlers only ever deal with this tree::

    SSEProxyError                      code            HTTP (before headers)
    ├── ConfigError                    (start-up / reload only, never sent to a client)
    ├── RequestError                   invalid_request        400
    │   ├── UnknownPersona             unknown_persona        400
    │   ├── BodyTooLarge               body_too_large         413
    │   ├── RequestTimeout             request_timeout        408 (body not in within
    │   │                                                      limits.body_timeout_s)
    │   ├── UriTooLong                 uri_too_long           414 (request line over
    │   │                                                      limits.max_url_bytes)
    │   └── HeadersTooLarge            headers_too_large      431 (header fields over
    │                                                          limits.max_header_bytes)
    ├── Unauthenticated                invalid_api_key        401 (auth.mode = keys: no key,
    │                                                          an unknown key, or no session)
    ├── Forbidden                      cross_site_request     403 (a cookie-authenticated
    │                                  cors_origin_not_allowed     request from another site;
    │                                                          a preflight from an origin not
    │                                                          in server.cors_origins)
    ├── Overloaded                     overloaded             429 (an ``event: error`` on
    │                                                          EventSource URLs, never a 503)
    ├── RateLimited                    rate_limit_exceeded    429 + Retry-After, x-ratelimit-*
    │                                                          (``event: error`` rate_limited)
    ├── ServerShutdown                 server_shutdown        503 (mid-stream: an error event,
    │                                                          with ``retry:`` on EventSource)
    ├── StreamEnded                    (how a resumable stream was stopped; always an event)
    │   ├── Abandoned                  abandoned              nobody followed it for
    │   │                                                      store.orphan_grace_s
    │   └── StreamCancelled            cancelled              DELETE /v1/streams/{id}
    ├── LogFull                        log_full               store.max_events / max_bytes
    ├── StreamNotFound                 stream_not_found       404 (DELETE of an unknown id)
    ├── ModelNotFound                  model_not_found        404 (GET /v1/models/{id})
    ├── SSEDecodeError                 (the codec's own; wrapped into MalformedFrame upstream)
    │   └── EventTooLarge
    └── UpstreamError                                         502 unless said otherwise
        ├── UpstreamUnreachable        upstream_unreachable   502  connect failure, DNS, refused
        ├── UpstreamStatusError        the upstream's code    400/404/413/422 kept, 429 kept
        │                                                      (with Retry-After, normalized),
        │                                                      401/403 and 5xx → 502
        │                                                      (401/403 as upstream_auth_failed,
        │                                                      type server_error)
        ├── ReplyTooLarge              upstream_reply_too_large 502  a ``stream: false`` reply
        │                                                      over limits.max_reply_bytes
        ├── UpstreamTimeout            upstream_timeout       504
        │   ├── FirstTokenTimeout      first token did not arrive in upstream.first_token_timeout_s
        │   ├── IdleTimeout            no event for upstream.idle_timeout_s between events
        │   └── DurationExceeded       the reply ran past upstream.max_duration_s
        └── UpstreamProtocolError      upstream_protocol_error 502
            ├── (itself)               a malformed response head, a compressed event stream,
            │                          a body that is not an event stream
            ├── MalformedFrame         a frame that is not an OpenAI chunk (or too large)
            ├── UpstreamStreamError    an ``{"error": …}`` object inside the stream; its code kept
            └── IncompleteStream       ended without ``[DONE]`` or a ``finish_reason``

Before response headers are sent an error is an HTTP status with the
OpenAI-shaped body from :meth:`SSEProxyError.to_body`; after, it is an error
event (``event: error`` on the EventSource endpoints, ``data: {"error": …}`` on
the OpenAI-compatible one) followed by a clean end of the stream.

Messages are written for the person calling sseproxy: they say what was wrong
and never carry upstream headers, API keys or the upstream's URL.
"""

from __future__ import annotations

from typing import Any, ClassVar


class SSEProxyError(Exception):
    """Base of every sseproxy error."""

    status: ClassVar[int] = 500
    code: ClassVar[str] = "internal_error"
    type: ClassVar[str] = "server_error"
    #: Whether a client may usefully try again later (EventSource gets a retry hint).
    retryable: ClassVar[bool] = False

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message

    def error_code(self) -> str:
        return self.code

    def http_status(self) -> int:
        return self.status

    def headers(self) -> dict[str, str]:
        """Extra response headers for the HTTP form of this error."""
        return {}

    def to_body(self) -> dict[str, Any]:
        """The OpenAI-shaped error object: ``{"error": {"type", "code", "message"}}``."""
        return {"error": {"type": self.type, "code": self.error_code(), "message": self.message}}


class ConfigError(SSEProxyError):
    """An invalid configuration file, environment variable or flag."""

    code = "config_error"


# --- the client's request ---------------------------------------------------


class RequestError(SSEProxyError):
    """The request is invalid; nothing was sent upstream."""

    status = 400
    code = "invalid_request"
    type = "invalid_request_error"


class UnknownPersona(RequestError):
    code = "unknown_persona"


class BodyTooLarge(RequestError):
    status = 413
    code = "body_too_large"


class RequestTimeout(RequestError):
    status = 408
    code = "request_timeout"


class UriTooLong(RequestError):
    status = 414
    code = "uri_too_long"


class HeadersTooLarge(RequestError):
    status = 431
    code = "headers_too_large"


class Unauthenticated(SSEProxyError):
    """``auth.mode = keys`` and the request carries no valid key or session."""

    status = 401
    code = "invalid_api_key"
    type = "invalid_request_error"

    def __init__(self, message: str = "a valid API key is required: send "
                 "'Authorization: Bearer <key>' (or log in on the chat page)") -> None:
        super().__init__(message)

    def headers(self) -> dict[str, str]:
        return {"WWW-Authenticate": 'Bearer realm="sseproxy"'}


class Forbidden(SSEProxyError):
    """A browser request from a page this server does not trust."""

    status = 403
    type = "invalid_request_error"

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self._code = code

    def error_code(self) -> str:
        return self._code


class Overloaded(SSEProxyError):
    """This process already serves ``limits.max_streams`` streams."""

    status = 429
    code = "overloaded"
    type = "rate_limit_error"
    retryable = True

    def __init__(self, limit: int) -> None:
        super().__init__(f"sseproxy is serving its limit of {limit} streams; try again shortly")

    def headers(self) -> dict[str, str]:
        return {"Retry-After": "1"}


class RateLimited(SSEProxyError):
    """A key is over one of its limits (see :mod:`sseproxy.limits`); nothing went upstream.

    The body is OpenAI's: ``type`` names the limit (``requests``, ``tokens``, ``streams``),
    ``code`` is ``rate_limit_exceeded``; on an EventSource URL the code is ``rate_limited``
    (see :meth:`event_object`)."""

    status = 429
    code = "rate_limit_exceeded"
    type = "rate_limit_error"
    retryable = True

    def __init__(self, limit: str, retry_after_s: float, headers: dict[str, str]) -> None:
        per = {"streams": "concurrent streams", "requests": "requests per minute",
               "tokens": "tokens per minute"}.get(limit, limit)
        super().__init__(f"Rate limit reached on {per}: try again in {retry_after_s:.3g} s")
        self.limit = limit
        self.retry_after_s = retry_after_s
        self._headers = headers

    def headers(self) -> dict[str, str]:
        return dict(self._headers)

    def to_body(self) -> dict[str, Any]:
        body = super().to_body()
        body["error"]["type"] = self.limit
        return body

    def event_object(self) -> dict[str, Any]:
        """The data of the EventSource ``event: error``."""
        return {"error": {"type": self.limit, "code": "rate_limited", "message": self.message,
                          "retryable": True, "retry_after_s": round(self.retry_after_s, 3)}}


class ServerShutdown(SSEProxyError):
    """The process is shutting down and its grace period for running streams is over."""

    status = 503
    code = "server_shutdown"
    retryable = True

    def __init__(self) -> None:
        super().__init__("sseproxy is restarting; reconnect to continue")


# --- resumable streams -----------------------------------------------------


class StreamEnded(SSEProxyError):
    """A resumable stream's generation was stopped on purpose (never an HTTP status)."""

    status = 409


class Abandoned(StreamEnded):
    """Nobody followed the stream for ``store.orphan_grace_s``: its upstream was cancelled."""

    code = "abandoned"

    def __init__(self, grace_s: float) -> None:
        super().__init__(f"nobody followed this stream for {grace_s:g} s "
                         "(store.orphan_grace_s); its generation was stopped")


class StreamCancelled(StreamEnded):
    """``DELETE /v1/streams/{id}`` stopped the generation."""

    code = "cancelled"

    def __init__(self) -> None:
        super().__init__("the stream was cancelled")


class LogFull(SSEProxyError):
    """A stream's log, or the store of every log, reached its bound."""

    status = 503
    code = "log_full"


class StoreUnavailable(SSEProxyError):
    """The shared event store (Redis) did not answer within ``store.redis_timeout_s``."""

    status = 503
    code = "store_unavailable"
    retryable = True

    def __init__(self, reason: str = "") -> None:
        super().__init__("the event store is unavailable" + (f": {reason}" if reason else "")
                         + "; try again shortly")


class StreamNotFound(SSEProxyError):
    """No running or replayable stream has this id."""

    status = 404
    code = "stream_not_found"
    type = "invalid_request_error"

    def __init__(self, message: str | None = None) -> None:
        super().__init__(
            message or "no stream with this id (unknown, or expired after store.ttl_s)")


class ModelNotFound(SSEProxyError):
    """``GET /v1/models/{id}`` of a model that ``GET /v1/models`` does not list."""

    status = 404
    code = "model_not_found"
    type = "invalid_request_error"

    def __init__(self, model: str) -> None:
        super().__init__(f"the model {model!r} does not exist; GET /v1/models lists them")


# --- the SSE codec ----------------------------------------------------------


class SSEDecodeError(SSEProxyError):
    """The SSE decoder could not accept its input."""

    code = "sse_decode_error"


class EventTooLarge(SSEDecodeError):
    """One event grew past the decoder's size limit."""

    code = "event_too_large"


# --- the upstream -----------------------------------------------------------


class UpstreamError(SSEProxyError):
    """The upstream model API failed."""

    status = 502
    code = "upstream_error"
    type = "upstream_error"


class UpstreamUnreachable(UpstreamError):
    code = "upstream_unreachable"
    retryable = True


class UpstreamStatusError(UpstreamError):
    """The upstream answered with an HTTP error status.

    The upstream's own OpenAI error ``code`` and ``message`` are kept (so a
    client sees ``context_length_exceeded`` or ``model_not_found``); its headers
    are not, except a ``Retry-After`` on 429.
    """

    #: Upstream statuses that describe the client's request and are passed on as they are.
    PASSED_ON: ClassVar[frozenset[int]] = frozenset({400, 404, 409, 413, 422, 429})

    def __init__(
        self,
        upstream_status: int,
        message: str,
        *,
        upstream_code: str | None = None,
        upstream_type: str | None = None,
        retry_after: str | None = None,
    ) -> None:
        super().__init__(message)
        self.upstream_status = upstream_status
        self.upstream_code = upstream_code
        self.upstream_type = upstream_type
        self.retry_after = retry_after

    @property
    def retryable(self) -> bool:  # type: ignore[override]  # depends on the status
        return self.upstream_status == 429 or self.upstream_status >= 500

    def error_code(self) -> str:
        if self.upstream_status in (401, 403):
            # sseproxy's own key was refused: "invalid_api_key" would mislead the client.
            return "upstream_auth_failed"
        if self.upstream_code:
            return self.upstream_code
        if self.upstream_status == 429:
            return "rate_limited"
        return f"upstream_http_{self.upstream_status}"

    def http_status(self) -> int:
        if self.upstream_status in self.PASSED_ON:
            return self.upstream_status
        return 502

    def headers(self) -> dict[str, str]:
        if self.upstream_status == 429:
            # A 429 always says when to come back; 1 s when the upstream did not say.
            return {"Retry-After": self.retry_after or "1"}
        return {}

    def to_body(self) -> dict[str, Any]:
        body = super().to_body()
        if self.upstream_status in (401, 403):
            # sseproxy's own key was refused: a fault on the server's side, whatever type
            # the upstream gave (OpenAI says invalid_request_error about its own caller).
            body["error"]["type"] = "server_error"
        else:
            body["error"]["type"] = self.upstream_type or self.type
        return body


class ReplyTooLarge(UpstreamError):
    """A collected (``stream: false``) reply grew past ``limits.max_reply_bytes``."""

    code = "upstream_reply_too_large"

    def __init__(self, limit: int) -> None:
        super().__init__(f"the upstream's reply exceeded {limit} bytes "
                         "(limits.max_reply_bytes); ask for stream: true for longer replies")


class UpstreamTimeout(UpstreamError):
    status = 504
    code = "upstream_timeout"
    retryable = True


class FirstTokenTimeout(UpstreamTimeout):
    pass


class IdleTimeout(UpstreamTimeout):
    pass


class DurationExceeded(UpstreamTimeout):
    pass


class UpstreamProtocolError(UpstreamError):
    code = "upstream_protocol_error"


class MalformedFrame(UpstreamProtocolError):
    pass


class UpstreamStreamError(UpstreamProtocolError):
    """The upstream sent an ``{"error": {...}}`` object inside its stream."""

    def __init__(self, message: str, *, upstream_code: str | None = None) -> None:
        super().__init__(message)
        self.upstream_code = upstream_code

    def error_code(self) -> str:
        return self.upstream_code or "upstream_stream_error"


class IncompleteStream(UpstreamProtocolError):
    code = "upstream_incomplete"
    retryable = True
