"""Wire formats: how a stream's log events become bytes for one endpoint.

A subscriber reads :class:`~sseproxy.store.Event` items from a stream's log and hands them
to its connection's format, which turns them into the bytes of one write. Two formats share
one interface (:class:`Frames`):

* :class:`EventSourceFrames` — the EventSource endpoints: ``retry:`` first,
  ``id: <stream_id>.<n>`` on every event with ``n`` counting 1, 2, 3, … without
  gaps, unnamed delta events ``{"content": …}``, ``event: done`` and
  ``event: error``.
* :class:`OpenAIFrames` — ``POST /v1/chat/completions``: OpenAI
  ``chat.completion.chunk`` frames, ending ``data: [DONE]``; an error after the
  headers is a ``data: {"error": …}`` frame (as OpenAI sends it), with no
  ``[DONE]`` after it.

A format only builds bytes; it never writes or waits.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable, Mapping
from typing import Any, Protocol

from . import sse
from .errors import ServerShutdown, SSEProxyError
from .store import DONE, TEXT, Event
from .upstream import Delta

HEARTBEAT = sse.encode(comment="ping")


#: A JSON string literal of a str, keeping non-ASCII text as it is (the C encoder).
_json_string: Callable[[str], str] = json.encoder.encode_basestring


def dumps(obj: Any) -> str:
    """Compact JSON that keeps non-ASCII text as it is (smaller frames for CJK and emoji)."""
    return json.dumps(obj, ensure_ascii=False, separators=(",", ":"))


#: Characters of one long string that :func:`dumps_in_slices` encodes per step.
JSON_SLICE = 65536


async def dumps_in_slices(obj: Any) -> bytes:
    """``dumps(obj).encode()`` for a body that may hold megabytes of text (a collected
    ``stream: false`` reply): a string longer than :data:`JSON_SLICE` characters is encoded
    one slice at a time, with the event loop let run between two slices, so no step holds
    the loop for more than a slice's work whatever the reply's size."""
    out: list[bytes] = []
    await _encode_into(obj, out)
    return b"".join(out)


async def _encode_into(obj: Any, out: list[bytes]) -> None:
    if isinstance(obj, str) and len(obj) > JSON_SLICE:
        out.append(b'"')
        for start in range(0, len(obj), JSON_SLICE):
            out.append(_json_string(obj[start:start + JSON_SLICE])[1:-1].encode())
            await asyncio.sleep(0)
        out.append(b'"')
    elif isinstance(obj, dict):
        out.append(b"{")
        for n, (key, value) in enumerate(obj.items()):
            out.append(b"%s%s:" % (b"," if n else b"", dumps(key).encode()))
            await _encode_into(value, out)
        out.append(b"}")
    elif isinstance(obj, (list, tuple)):
        out.append(b"[")
        for n, value in enumerate(obj):
            if n:
                out.append(b",")
            await _encode_into(value, out)
        out.append(b"]")
    else:
        out.append(dumps(obj).encode())


class Frames(Protocol):
    heartbeat: bytes

    def opening(self) -> bytes:
        """What a new connection sends first (``b""`` for none)."""

    def role(self, role: str) -> bytes:
        """The frame announcing the speaker's role (``b""`` when this format has none)."""

    def events(self, events: list[Event]) -> bytes:
        """The frames of log events, for one write."""

    def delta(self, delta: Delta) -> bytes:
        """The frame for one delta (``b""`` when it carries nothing this format shows)."""

    def text(self, content: str) -> bytes:
        """The frame for a piece of text (non-empty): ``delta(Delta(content))``, faster."""

    def end(self, finish_reason: str, usage: Mapping[str, Any] | None) -> bytes: ...

    def error(self, error: SSEProxyError) -> bytes: ...


def error_object(error: SSEProxyError) -> dict[str, Any]:
    """The ``{"error": …}`` object of an error event, with a hint whether retrying may help."""
    body = error.to_body()
    body["error"]["retryable"] = bool(error.retryable)
    return body


class EventSourceFrames:
    heartbeat = HEARTBEAT

    def __init__(self, stream_id: str, retry_ms: int) -> None:
        self.stream_id = stream_id
        self.retry_ms = retry_ms
        self.last_n = 0
        self._prefix = stream_id + "."

    def opening(self) -> bytes:
        return sse.encode(retry=self.retry_ms)

    def role(self, role: str) -> bytes:
        return b""

    def events(self, events: list[Event]) -> bytes:
        prefix = self._prefix
        out = []
        for n, kind, data in events:
            if kind == TEXT:
                out.append(sse.encode_message('{"content":' + _json_string(data) + "}",
                                              f"{prefix}{n}"))
            elif kind == DONE:
                out.append(sse.encode(data, event="done", id=f"{prefix}{n}"))
            else:
                # On shutdown, ``retry:`` tells EventSource when to reconnect (elsewhere).
                retry = self.retry_ms if '"server_shutdown"' in data else None
                out.append(sse.encode(data, event="error", id=f"{prefix}{n}", retry=retry))
            self.last_n = n
        return b"".join(out)

    def _next_id(self) -> str:
        self.last_n += 1
        return f"{self._prefix}{self.last_n}"

    def delta(self, delta: Delta) -> bytes:
        if not delta.content:
            return b""
        return self.text(delta.content)

    def text(self, content: str) -> bytes:
        self.last_n += 1
        return sse.encode_message('{"content":' + _json_string(content) + "}",
                                  f"{self._prefix}{self.last_n}")

    def end(self, finish_reason: str, usage: Mapping[str, Any] | None) -> bytes:
        data = dumps({"finish_reason": finish_reason, "usage": usage})
        return sse.encode(data, event="done", id=self._next_id())

    def error(self, error: SSEProxyError) -> bytes:
        # On shutdown, ``retry:`` tells EventSource when to reconnect (to another instance).
        retry = self.retry_ms if isinstance(error, ServerShutdown) else None
        return sse.encode(dumps(error_object(error)), event="error", id=self._next_id(),
                          retry=retry)


class OpenAIFrames:
    heartbeat = HEARTBEAT

    def __init__(
        self,
        completion_id: str,
        created: int,
        model: str,
        include_usage: bool,
        reported: Callable[[], str | None] | None = None,
    ) -> None:
        """``model`` is the one asked for; ``reported`` returns the one the upstream says it
        used, once known (it is set once and then never changes), which then wins."""
        self.completion_id = completion_id
        self.created = created
        self._model = model
        self._reported = reported
        self.include_usage = include_usage
        #: (model, head, tail) of a text chunk; final once the upstream reported its model.
        self._template: tuple[str, bytes, bytes] | None = None
        self._final = reported is None

    def _reported_model(self) -> str | None:
        return self._reported() if self._reported is not None else None

    def model(self) -> str:
        return self._reported_model() or self._model

    def _chunk(self, choices: list[dict[str, Any]], usage: Any = None) -> bytes:
        chunk: dict[str, Any] = {
            "id": self.completion_id,
            "object": "chat.completion.chunk",
            "created": self.created,
            "model": self.model(),
            "choices": choices,
        }
        if self.include_usage:
            chunk["usage"] = usage
        return b"data: " + dumps(chunk).encode() + b"\n\n"

    def _content_frame(self, content: str) -> bytes:
        """A text chunk: everything but the text is encoded once per stream (and again when
        the upstream first reports its model)."""
        template = self._template
        if template is None or not self._final:
            template = self._content_template()
        return template[1] + _json_string(content).encode() + template[2]

    def _content_template(self) -> tuple[str, bytes, bytes]:
        reported = self._reported_model()
        model = reported or self._model
        template = self._template
        if template is None or template[0] != model:
            head, _, tail = self._chunk([{"index": 0, "delta": {"content": "\x00"},
                                          "finish_reason": None}]).partition(b'"\\u0000"')
            template = self._template = (model, head, tail)
        self._final = reported is not None or self._reported is None
        return template

    def text(self, content: str) -> bytes:
        return self._content_frame(content)

    def opening(self) -> bytes:
        return b""

    def role(self, role: str) -> bytes:
        return self._chunk([{"index": 0, "delta": {"role": role, "content": ""},
                             "finish_reason": None}])

    def events(self, events: list[Event]) -> bytes:
        out = []
        for _, kind, data in events:
            if kind == TEXT:
                out.append(self._content_frame(data))
            elif kind == DONE:
                end = json.loads(data)
                out.append(self.end(end["finish_reason"], end["usage"]))
            else:
                body = json.loads(data)
                body["error"].pop("retryable", None)
                out.append(b"data: " + dumps(body).encode() + b"\n\n")
        return b"".join(out)

    def delta(self, delta: Delta) -> bytes:
        if delta.role is None:
            return self._content_frame(delta.content)
        body: dict[str, Any] = {"role": delta.role, "content": delta.content}
        return self._chunk([{"index": 0, "delta": body, "finish_reason": None}])

    def end(self, finish_reason: str, usage: Mapping[str, Any] | None) -> bytes:
        out = self._chunk([{"index": 0, "delta": {}, "finish_reason": finish_reason}])
        if self.include_usage:
            out += self._chunk([], usage=dict(usage) if usage else None)
        return out + b"data: [DONE]\n\n"

    def error(self, error: SSEProxyError) -> bytes:
        return b"data: " + dumps(error.to_body()).encode() + b"\n\n"
