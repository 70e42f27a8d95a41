"""An upstream that speaks the Responses API: the request it is sent, and its events → deltas.

:func:`request_body` turns the chat-shaped request sseproxy builds for every endpoint into
a ``POST {base_url}/responses`` body: leading ``system``/``developer`` messages become
``instructions``, the other messages ``input`` items; ``max_tokens`` /
``max_completion_tokens`` become ``max_output_tokens``, ``reasoning_effort`` becomes
``reasoning.effort``, ``response_format`` becomes ``text.format``; ``stream`` is true and
``store`` false (sseproxy keeps the response itself). Chat parameters the Responses API has
no equivalent for (``stop``, ``seed``, penalties, ``logit_bias``) are a ``400`` naming them:
sending the request without them would change the reply silently.

:class:`ResponsesDecoder` reads the upstream's events. Every endpoint gets the same deltas as
from a chat upstream: text from ``response.output_text.delta``, the role, and at the end
(``response.completed`` / ``response.incomplete``) the finish reason (``stop``; ``length``
for ``max_output_tokens``, ``content_filter``) and the usage in chat-completions shape
(``prompt_tokens``, ``completion_tokens``, ``total_tokens``); ``response.failed`` and
``error`` raise :class:`~sseproxy.errors.UpstreamStreamError`. With ``relay=True`` (a
``/v1/responses`` client) each delta also carries the log event that relays the upstream's
own event (kind :data:`RELAYED`, its data as sent), and the text deltas of a new content
part are preceded by a :data:`PART` event naming it (``item_id``, ``output_index``,
``content_index``); a failure is then raised only after its event was passed on
(:attr:`ResponsesDecoder.failure`). Unknown event types are relayed as they are.

Pure: no I/O, no clock.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from . import errors
from .delta import Delta
from .upstream_chat import json_object, passed_on, redact, stream_error

#: Log kind of an upstream Responses event relayed as it came (data: its JSON).
RELAYED = "relayed"
#: Log kind naming the content part the following text belongs to (sent to nobody).
PART = "part"

_TEXT_DELTA = "response.output_text.delta"
_ENDS = ("response.completed", "response.incomplete")
_FAILS = ("response.failed", "error")
#: Chat parameters with the same name and meaning in the Responses API.
_SAME = ("temperature", "top_p", "user", "metadata")
#: Chat parameters the Responses API has no equivalent for.
_REFUSED = ("presence_penalty", "frequency_penalty", "seed", "stop", "logit_bias")
#: ``incomplete_details.reason`` → chat finish reason.
_FINISH = {"max_output_tokens": "length", "content_filter": "content_filter"}


def dumps(obj: Any) -> str:
    """Compact JSON keeping non-ASCII text as it is (as :func:`sseproxy.frames.dumps`)."""
    return json.dumps(obj, ensure_ascii=False, separators=(",", ":"))


def _text(content: Any) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(p.get("text", "") for p in content if isinstance(p, dict))
    return ""


def request_body(chat: Mapping[str, Any]) -> dict[str, Any]:
    """The ``/responses`` request for a chat-shaped request (see the module docstring);
    raises :class:`~sseproxy.errors.RequestError` for a parameter it cannot carry."""
    for key in _REFUSED:
        if key in chat:
            raise errors.RequestError(
                f"'{key}' cannot be sent to an upstream that speaks the Responses API "
                "(upstream.api = \"responses\")")
    messages = list(chat.get("messages") or ())
    lead: list[str] = []
    while messages and messages[0].get("role") in ("system", "developer"):
        lead.append(_text(messages.pop(0).get("content")))
    body: dict[str, Any] = {
        "model": chat.get("model"),
        "input": [{"role": m.get("role"), "content": _text(m.get("content"))}
                  for m in messages],
        "stream": True,
        "store": False,
    }
    if lead:
        body["instructions"] = "\n\n".join(lead)
    for key in _SAME:
        if key in chat:
            body[key] = chat[key]
    limits = [chat[k] for k in ("max_tokens", "max_completion_tokens") if k in chat]
    if limits:
        body["max_output_tokens"] = min(limits)
    if "reasoning_effort" in chat:
        body["reasoning"] = {"effort": chat["reasoning_effort"]}
    fmt = chat.get("response_format")
    if isinstance(fmt, dict):
        if fmt.get("type") == "json_schema" and isinstance(fmt.get("json_schema"), dict):
            body["text"] = {"format": {"type": "json_schema", **fmt["json_schema"]}}
        else:
            body["text"] = {"format": fmt}
    return body


def chat_usage(usage: Any) -> dict[str, Any] | None:
    """A response's usage in chat-completions shape (what records and chat clients read)."""
    if not isinstance(usage, dict):
        return None
    prompt = usage.get("input_tokens")
    completion = usage.get("output_tokens")
    if not isinstance(prompt, int) or not isinstance(completion, int):
        return None
    total = usage.get("total_tokens")
    out: dict[str, Any] = {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": total if isinstance(total, int) else prompt + completion,
    }
    cached = (usage.get("input_tokens_details") or {}).get("cached_tokens")
    if isinstance(cached, int):
        out["prompt_tokens_details"] = {"cached_tokens": cached}
    reasoning = (usage.get("output_tokens_details") or {}).get("reasoning_tokens")
    if isinstance(reasoning, int):
        out["completion_tokens_details"] = {"reasoning_tokens": reasoning}
    return out


class ResponsesDecoder:
    """Responses events → deltas (see :class:`~sseproxy.delta.Decoder`)."""

    __slots__ = ("relay", "model", "done", "failure", "_part", "_role", "_secret")

    def __init__(self, *, relay: bool = False, secret: str | None = None) -> None:
        self.relay = relay
        #: sseproxy's upstream key: never relayed, even when an upstream echoes it.
        self._secret = secret
        self.model: str | None = None
        self.done = False
        self.failure: errors.SSEProxyError | None = None
        self._part: tuple[Any, Any, Any] | None = None
        self._role = False

    def decode(self, name: str, data: str) -> Delta | None:
        obj = json_object(data, "an event")
        kind = obj.get("type")
        if not isinstance(kind, str):
            if name == "message":
                raise errors.MalformedFrame("the upstream sent a Responses event without a type")
            kind = obj["type"] = name
            data = dumps(obj)
        if kind == _TEXT_DELTA:
            return self._text(obj)
        relayed = (RELAYED, self._relayable(obj, kind, data)) if self.relay else None
        response = obj.get("response")
        response = response if isinstance(response, dict) else {}
        if self.model is None and isinstance(response.get("model"), str):
            self.model = response["model"]
        if kind in _ENDS:
            self.done = True
            details = response.get("incomplete_details")
            reason = details.get("reason") if isinstance(details, dict) else None
            finish = "stop" if kind == "response.completed" else \
                _FINISH.get(reason, "length") if isinstance(reason, str) else "length"
            return Delta(finish_reason=finish, usage=chat_usage(response.get("usage")),
                         event=relayed)
        if kind in _FAILS:
            self.done = True
            err = response.get("error") if kind == "response.failed" else obj
            failure = stream_error(err, "the upstream reported that the response failed",
                                   self._secret)
            if relayed is None:
                raise failure
            self.failure = failure
            return Delta(event=relayed)
        role = None
        item = obj.get("item")
        if kind == "response.output_item.added" and isinstance(item, dict) \
                and item.get("type") == "message" and isinstance(item.get("role"), str):
            role = self._announce(item["role"])
        if relayed is None and role is None:
            return None
        return Delta(role=role, event=relayed)

    def _relayable(self, obj: dict[str, Any], kind: str, data: str) -> str:
        """The event as a client may see it: an error's message as the chat endpoint would
        pass it on (redacted, bounded, tokens only), and never sseproxy's key."""
        if kind in _FAILS:
            holder = obj.get("response") if kind == "response.failed" else None
            err = holder.get("error") if isinstance(holder, dict) else obj
            if isinstance(err, dict):
                message, code, _ = passed_on(err, self._secret)
                message = message or "the upstream reported that the response failed"
                if (message, code) != (err.get("message"), err.get("code")):
                    err["message"], err["code"] = message, code
                    data = dumps(obj)
        return redact(data, self._secret) if self._secret and self._secret in data else data

    def _announce(self, role: str) -> str | None:
        if self._role:
            return None
        self._role = True
        return role

    def _text(self, obj: dict[str, Any]) -> Delta | None:
        text = obj.get("delta")
        if not isinstance(text, str):
            raise errors.MalformedFrame("the upstream sent a text delta of the wrong shape")
        part = (obj.get("item_id"), obj.get("output_index"), obj.get("content_index"))
        event = None
        if self.relay and part != self._part:
            self._part = part
            event = (PART, dumps({"item_id": part[0], "output_index": part[1],
                                  "content_index": part[2]}))
        role = self._announce("assistant")
        if not text and event is None and role is None:
            return None
        return Delta(content=text, role=role, event=event)
