"""The Responses wire format: a stream's log events as OpenAI Responses API events.

A Responses stream's log starts with one ``meta`` event holding the response object as
created (id, model, instructions, parameters); then come the text events and one final
``done`` or ``error`` event, as for every stream. :class:`ResponsesFrames` turns them into
the events OpenAI sends for a text reply, each ``event: <type>`` + ``data: <json>``:

======================  ====================================================================
log event at ``n``      Responses events (``sequence_number``)
======================  ====================================================================
``meta`` (n = 1)        ``response.created`` (0), ``response.in_progress`` (1),
                        ``response.output_item.added`` (2), ``response.content_part.added`` (3)
text                    ``response.output_text.delta`` (n + 2)
``done``                ``response.output_text.done`` (n + 2), ``response.content_part.done``
                        (n + 3), ``response.output_item.done`` (n + 4), then
                        ``response.completed`` (n + 5), or ``response.incomplete`` when the
                        reply was cut (finish reason ``length``: ``max_output_tokens``)
``error``               ``response.failed`` (n + 2); status ``cancelled`` when it was cancelled
======================  ====================================================================

So a sequence number is a function of a log position, and ``starting_after=N`` names an
exact place in the log: a resume replays exactly the events after ``N``, and the numbers
stay consecutive (0, 1, 2, …) however the pacer split or merged the text.

Deliberate divergences from OpenAI: the output item and content part are announced with
the response (before the first token), not when the first token comes; a failure after the
headers is ``response.failed`` (never a bare ``error`` event: the response exists by then);
a cancelled response ends with ``response.failed`` whose response has status
``cancelled`` (OpenAI's SDK knows no ``response.cancelled`` event); ``obfuscation`` pads
each delta to a multiple of 16 bytes with random letters.

Relaying an upstream that speaks the Responses API (``upstream.api = "responses"``), the
log starts with a ``relay_meta`` event (the response object as created) instead, then holds
the upstream's own events (``relayed``, see :mod:`sseproxy.upstream_responses`), the paced
text, ``part`` events naming the content part the text after them belongs to, and the final
event. Each ``relayed`` event is sent as it came, in order, with its ``sequence_number``
renumbered, its ``response`` carrying sseproxy's response id (and ``background``, ``store``,
``instructions``, ``metadata``, ``user`` as the client asked, and on ``response.created``
its ``status``, ``queued`` when in the background: the upstream request is a plain stream
and never carries a persona's prompt), and ``obfuscation`` dropped when the
client asked for none; each text event becomes one ``response.output_text.delta`` of the
current part, with ``obfuscation`` computed for that piece. Sequence numbers then count the
events actually sent (0, 1, 2, …), still a function of the log alone. The final event
becomes nothing when the upstream's own terminal event (``response.completed``,
``response.incomplete``, ``response.failed``, ``error``) was relayed, else
``response.failed`` (a connection broken mid-reply, a timeout, a cancel).

Pure: a format builds bytes and never writes or waits (randomness comes in as ``rng``).
"""

from __future__ import annotations

import json
import random
import string
from collections.abc import Callable, Mapping
from typing import Any

from . import sse
from .frames import HEARTBEAT, dumps
from .errors import SSEProxyError
from .frames import error_object
from .store import DONE, ERROR, TEXT, Event
from .upstream import Delta
from .upstream_responses import PART, RELAYED

#: The kind of a Responses stream's first log event: the response object as created.
META = "meta"
#: The same, for a stream that relays an upstream's own Responses events.
RELAY_META = "relay_meta"
#: Upstream events after which the response is over (the final log event adds nothing).
_TERMINAL = frozenset({"response.completed", "response.incomplete", "response.failed",
                       "error"})
#: Fields of a relayed response object that are sseproxy's, not the upstream's.
_OWN_FIELDS = ("id", "background", "store", "instructions", "metadata", "user")
#: A text event at log position ``n`` has sequence number ``n + SEQ_OFFSET``.
SEQ_OFFSET = 2
#: Sequence numbers of the events the ``meta`` event becomes.
PREAMBLE = 4
#: Events a ``done`` event becomes.
ENDING = 4

_ALPHABET = string.ascii_letters + string.digits


def last_sequence(log_last: int, final_kind: str | None) -> int:
    """The sequence number of the last event of a log whose last position is ``log_last``
    (-1 when it has none yet); ``final_kind`` is the kind of that event when it is final."""
    if log_last == 0:
        return -1
    if log_last == 1:
        return PREAMBLE - 1
    if final_kind == DONE:
        return log_last + SEQ_OFFSET + ENDING - 1
    return log_last + SEQ_OFFSET


def usage_of(usage: Mapping[str, Any] | None) -> dict[str, Any] | None:
    """A chat completion's usage as a response's usage."""
    if not usage:
        return None
    prompt = int(usage.get("prompt_tokens") or 0)
    completion = int(usage.get("completion_tokens") or 0)
    cached = (usage.get("prompt_tokens_details") or {}).get("cached_tokens") or 0
    reasoning = (usage.get("completion_tokens_details") or {}).get("reasoning_tokens") or 0
    return {
        "input_tokens": prompt,
        "input_tokens_details": {"cached_tokens": cached},
        "output_tokens": completion,
        "output_tokens_details": {"reasoning_tokens": reasoning},
        "total_tokens": int(usage.get("total_tokens") or prompt + completion),
    }


def item_id_of(response_id: str) -> str:
    """The id of a response's one output message."""
    return "msg_" + response_id.removeprefix("resp_")


def _part(text: str) -> dict[str, Any]:
    return {"type": "output_text", "text": text, "annotations": [], "logprobs": []}


def _item(response_id: str, status: str, text: str | None) -> dict[str, Any]:
    return {"id": item_id_of(response_id), "type": "message", "status": status,
            "role": "assistant", "content": [] if text is None else [_part(text)]}


def response_object(meta: Mapping[str, Any], text: str, final: Event | None,
                    ) -> dict[str, Any]:
    """The response object: as created (``meta``), with the text so far and, once the log
    ended, the final event's status, usage and error."""
    obj = dict(meta)
    rid = obj["id"]
    if final is None:
        obj["status"] = "in_progress" if text or meta.get("status") != "queued" \
            else meta["status"]
        obj["output"] = [_item(rid, "in_progress", text)]
        return obj
    end = json.loads(final.data)
    if final.kind == DONE:
        reason = end.get("finish_reason")
        if reason in ("length", "content_filter"):
            obj["status"] = "incomplete"
            obj["incomplete_details"] = {
                "reason": "max_output_tokens" if reason == "length" else "content_filter"}
        else:
            obj["status"] = "completed"
        obj["output"] = [_item(rid, "completed" if obj["status"] == "completed"
                               else "incomplete", text)]
        obj["usage"] = usage_of(end.get("usage"))
        return obj
    error = end.get("error") or {}
    code = error.get("code") or "server_error"
    obj["status"] = "cancelled" if code == "cancelled" else "failed"
    obj["error"] = {"code": code, "message": error.get("message") or "the response failed"}
    obj["output"] = [_item(rid, "incomplete", text)] if text else []
    return obj


def _event(kind: str, body: dict[str, Any]) -> bytes:
    return sse.encode(dumps(body), event=kind)


class ResponsesFrames:
    """Log events → Responses events, from ``after`` (a ``starting_after``) on.

    Every event of the log goes through :meth:`events` (a resume reads the log from its
    start), so the object knows the response and its text; only events whose sequence
    number is above ``after`` become bytes.
    """

    heartbeat = HEARTBEAT

    def __init__(self, after: int = -1, *, obfuscate: bool = True,
                 rng: Callable[[int], str] | None = None) -> None:
        self.after = after
        self.obfuscate = obfuscate
        self._rng = rng or _random_letters
        self.meta: dict[str, Any] | None = None
        self._texts: list[str] = []
        self._item_id = ""
        #: Relaying an upstream's Responses events (the log began with ``relay_meta``).
        self.relay = False
        self._where: dict[str, Any] = {"item_id": "", "output_index": 0, "content_index": 0}
        #: The latest response object the upstream sent (with sseproxy's own fields).
        self.upstream_response: dict[str, Any] | None = None
        #: The upstream's terminal event was relayed (the final log event adds nothing).
        self.terminal_relayed = False
        #: The sequence number of the last event built (or skipped).
        self.last_sequence = -1

    @property
    def full_text(self) -> str:
        return "".join(self._texts)

    def opening(self) -> bytes:
        return b""

    def role(self, role: str) -> bytes:
        return b""

    def events(self, events: list[Event]) -> bytes:
        out: list[bytes] = []
        for event in events:
            if event.kind == TEXT:
                self._texts.append(event.data)
                seq = self.last_sequence + 1 if self.relay else event.n + SEQ_OFFSET
                if seq > self.after:
                    out.append(self._delta(event.data, seq))
                self.last_sequence = seq
            elif event.kind == RELAYED:
                self._relayed(out, event.data)
            elif event.kind == PART:
                self._where = json.loads(event.data)
                self._item_id = self._where.get("item_id") or ""
            elif event.kind == RELAY_META:
                self.meta = json.loads(event.data)
                self.relay = True
            elif self.relay and event.kind in (DONE, ERROR):
                if not self.terminal_relayed:
                    obj = self.snapshot(event)
                    kind = "response.completed" if event.kind == DONE else "response.failed"
                    self._emit(out, self.last_sequence + 1, [(kind, {"response": obj})])
            elif event.kind == META:
                self.meta = json.loads(event.data)
                self._item_id = item_id_of(self.meta["id"])
                self._emit(out, 0, self._preamble())
            elif event.kind in (DONE, ERROR):
                self._emit(out, event.n + SEQ_OFFSET, self._ending(event))
        return b"".join(out)

    def _relayed(self, out: list[bytes], data: str) -> None:
        """An upstream event, renumbered, with sseproxy's response id."""
        obj = json.loads(data)
        seq = self.last_sequence + 1
        self.last_sequence = seq
        if obj.get("type") in _TERMINAL:
            self.terminal_relayed = True
        response = obj.get("response")
        if isinstance(response, dict) and self.meta is not None:
            obj["response"] = self.upstream_response = dict(
                response, **{k: self.meta.get(k) for k in _OWN_FIELDS})
            if obj.get("type") == "response.created":  # ``queued`` for a background one
                obj["response"] = dict(obj["response"], status=self.meta.get("status"))
        if seq <= self.after:
            return
        obj["sequence_number"] = seq
        if not self.obfuscate:
            obj.pop("obfuscation", None)
        out.append(_event(str(obj.get("type")), obj))

    def snapshot(self, final: Event | None) -> dict[str, Any]:
        """The response object of a relayed stream after the events read so far (``final``:
        its final event, once read): the upstream's own once it ended, else the latest one
        it sent with the text so far."""
        upstream = self.upstream_response
        if upstream is not None and self.terminal_relayed \
                and upstream.get("status") != "in_progress":
            return upstream
        base = upstream or self.meta or {"id": "resp_unknown", "object": "response"}
        obj = response_object(base, self.full_text, final)
        for item in obj.get("output") or ():
            item["id"] = self._where.get("item_id") or item["id"]
        return obj

    def _emit(self, out: list[bytes], first: int,
              items: list[tuple[str, dict[str, Any]]]) -> None:
        for i, (kind, body) in enumerate(items):
            seq = first + i
            if seq > self.after:
                out.append(_event(kind, {"type": kind, "sequence_number": seq, **body}))
            self.last_sequence = seq

    def _preamble(self) -> list[tuple[str, dict[str, Any]]]:
        assert self.meta is not None
        rid = self.meta["id"]
        created = dict(self.meta, output=[])
        running = dict(created, status="in_progress")
        where = {"item_id": self._item_id, "output_index": 0, "content_index": 0}
        return [
            ("response.created", {"response": created}),
            ("response.in_progress", {"response": running}),
            ("response.output_item.added",
             {"output_index": 0, "item": _item(rid, "in_progress", None)}),
            ("response.content_part.added", {**where, "part": _part("")}),
        ]

    def _ending(self, final: Event) -> list[tuple[str, dict[str, Any]]]:
        meta = self.meta or {"id": "resp_unknown", "object": "response"}
        obj = response_object(meta, self.full_text, final)
        if final.kind == ERROR:
            return [("response.failed", {"response": obj})]
        text = self.full_text
        where = {"item_id": self._item_id, "output_index": 0, "content_index": 0}
        kind = "response.completed" if obj["status"] == "completed" else "response.incomplete"
        return [
            ("response.output_text.done", {**where, "text": text, "logprobs": []}),
            ("response.content_part.done", {**where, "part": _part(text)}),
            ("response.output_item.done", {"output_index": 0, "item": obj["output"][0]}),
            (kind, {"response": obj}),
        ]

    # The per-item interface of :class:`~sseproxy.frames.Frames`, for a stream built without
    # a log: each call is the next log position.

    def _next(self, kind: str, data: str) -> bytes:
        n = max(self.last_sequence - SEQ_OFFSET, 1) + 1
        return self.events([Event(n, kind, data)])

    def delta(self, delta: Delta) -> bytes:
        return self.text(delta.content) if delta.content else b""

    def text(self, content: str) -> bytes:
        return self._next(TEXT, content)

    def end(self, finish_reason: str, usage: Mapping[str, Any] | None) -> bytes:
        return self._next(DONE, dumps({"finish_reason": finish_reason, "usage": usage}))

    def error(self, error: SSEProxyError) -> bytes:
        return self._next(ERROR, dumps(error_object(error)))

    def _delta(self, text: str, seq: int) -> bytes:
        body: dict[str, Any] = {
            "type": "response.output_text.delta", "sequence_number": seq,
            "item_id": self._item_id, "output_index": 0, "content_index": 0,
            "delta": text, "logprobs": [],
        }
        if self.relay:
            body["output_index"] = self._where.get("output_index", 0)
            body["content_index"] = self._where.get("content_index", 0)
        if self.obfuscate:
            body["obfuscation"] = self._rng(16 - len(text.encode("utf-8", "replace")) % 16)
        return _event("response.output_text.delta", body)


def _random_letters(count: int) -> str:
    """``count`` random letters and digits (the padding of an ``obfuscation`` field)."""
    return "".join(random.choices(_ALPHABET, k=count))
