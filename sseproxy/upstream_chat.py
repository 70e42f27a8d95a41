"""Decoding an OpenAI chat-completions stream: ``chat.completion.chunk`` events → deltas.

Pure: one server-sent event's data in, one :class:`~sseproxy.delta.Delta` (or None) out;
``data: [DONE]`` ends the reply; an ``{"error": …}`` object mid-stream raises
:class:`~sseproxy.errors.UpstreamStreamError`; anything not shaped like a chunk raises
:class:`~sseproxy.errors.MalformedFrame`.
"""

from __future__ import annotations

import json
import re
from typing import Any

import orjson

from . import errors
from .delta import Delta


def loads(data: str) -> Any:
    """``json.loads``, with orjson first: a quarter of the cost per upstream chunk. What
    orjson refuses but ``json`` reads (NaN, integers past 64 bits, lone surrogates) is
    read by ``json``, so the result never depends on which one parsed it."""
    try:
        return orjson.loads(data)
    except orjson.JSONDecodeError:
        return json.loads(data)


#: An upstream's error ``code`` or ``type`` is passed on only when it looks like one.
_TOKEN = re.compile(r"^[A-Za-z0-9_.:-]{1,64}$")
_BEARER = re.compile(r"(?i)bearer\s+\S+")
#: Characters of an upstream's error message passed on to a client.
_MAX_MESSAGE_CHARS = 1000

Said = tuple[str | None, str | None, str | None]


def redact(text: str, secret: str | None) -> str:
    """``text`` without sseproxy's upstream key (upstreams echo the request's
    ``Authorization``, whole or in part)."""
    if secret:
        text = text.replace(secret, "[redacted]")
    return _BEARER.sub("Bearer [redacted]", text)


def passed_on(err: dict[str, Any], secret: str | None) -> Said:
    """``(message, code, type)`` of an upstream's OpenAI error object, as a client may see
    them: the message redacted (see :func:`redact`) and bounded; a code or type only when
    it is a short token."""
    message, code, etype = err.get("message"), err.get("code"), err.get("type")
    if isinstance(message, str) and message:
        message = redact(message, secret)[:_MAX_MESSAGE_CHARS]
    else:
        message = None
    code = code if isinstance(code, str) and _TOKEN.match(code) else None
    etype = etype if isinstance(etype, str) and _TOKEN.match(etype) else None
    return message, code, etype


def json_object(data: str, what: str) -> dict[str, Any]:
    """One event's data as a JSON object; ``what`` names it in the error (``frame``)."""
    try:
        obj = loads(data)
    except ValueError as exc:
        raise errors.MalformedFrame(f"the upstream sent {what} that is not JSON") from exc
    if not isinstance(obj, dict):
        raise errors.MalformedFrame(f"the upstream sent {what} that is not a JSON object")
    return obj


def stream_error(err: Any, default: str, secret: str | None) -> errors.UpstreamStreamError:
    """The error an upstream reported in its stream (an OpenAI error object, or not)."""
    message, code = default, None
    if isinstance(err, dict):
        said, code, _ = passed_on(err, secret)
        message = said or default
    return errors.UpstreamStreamError(message, upstream_code=code)


class ChatDecoder:
    """Chat-completion chunks → deltas (see :class:`~sseproxy.delta.Decoder`)."""

    __slots__ = ("model", "done", "failure", "_secret")

    def __init__(self, *, secret: str | None = None) -> None:
        self._secret = secret
        self.model: str | None = None
        self.done = False
        self.failure: errors.SSEProxyError | None = None

    def decode(self, name: str, data: str) -> Delta | None:
        if data == "[DONE]":
            self.done = True
            return None
        obj = json_object(data, "a frame")
        err = obj.get("error")
        if err is not None:
            raise stream_error(err, "the upstream reported an error mid-reply", self._secret)
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
