"""An OpenAI-compatible chat-completions simulator, with knobs for how real upstreams misbehave.

It stands in for the paid API in tests, in benchmarks and in ``make run`` (no key needed).

Endpoints
---------
``POST /v1/chat/completions``
    An OpenAI request body (``model``, ``messages``, ``stream``,
    ``stream_options.include_usage``, ``max_tokens`` / ``max_completion_tokens``;
    everything else is accepted and ignored). A reply longer than ``max_tokens`` (or
    ``max_completion_tokens``; the smaller when both are given) stops after that many
    tokens with ``finish_reason: "length"``, as a real model does.
    With ``stream: true`` the answer is ``200 text/event-stream``: a chunk whose
    delta is ``{"role": "assistant", "content": ""}``, one chunk per token
    ``{"content": tok}``, a chunk with an empty delta and ``finish_reason: "stop"``
    (or ``"length"``),
    then (with ``include_usage``) a chunk with ``choices: []`` and the usage, and
    ``data: [DONE]``. With ``include_usage`` every other chunk carries
    ``"usage": null``, as OpenAI's do. Without ``stream`` it is one
    ``chat.completion`` body, sent when the whole generation would have finished.
    A body that is not JSON, or lacks ``model`` or ``messages``, is ``400`` with
    OpenAI's error shape ``{"error": {"message", "type", "code", "param"}}``.
``POST /v1/responses``
    The same knobs, answered as OpenAI's Responses API (``model``, ``input``,
    ``instructions``, ``max_output_tokens``, ``stream``; other parameters are echoed or
    ignored): with ``stream: true`` ``response.created``, ``response.in_progress``,
    ``response.output_item.added``, ``response.content_part.added``, one
    ``response.output_text.delta`` per token (``sequence_number``, ``obfuscation``), then
    ``response.output_text.done``, ``response.content_part.done``,
    ``response.output_item.done`` and ``response.completed`` (``response.incomplete`` past
    ``max_output_tokens``) with the usage; ``error_at`` sends ``response.failed``;
    without ``stream``, the response object. It counts in the same stats.
``GET /v1/models``
    The one model, ``mock``.
``GET /mock/stats``, ``POST /mock/reset``
    ``{"requests", "open", "completed", "cancelled", "errors"}`` for
    ``/v1/chat/completions``: every request counts in ``requests`` when it
    arrives and in ``open`` until it ends; it then ends in exactly one of
    ``completed`` (a full answer), ``cancelled`` (the client went away first;
    noticed within milliseconds, also while a stall or delay is sleeping) or
    ``errors`` (a 400, or a scripted ``error_status``, ``error_at`` or ``drop_at``),
    so ``requests == open + completed + cancelled + errors`` (unless a reset came
    while requests were open: reset zeroes every counter but ``open``). Relay
    tests poll this to prove upstream requests get cancelled. A cancelled request
    is logged in the access log with status ``499`` (as nginx does), also when its
    ``200`` headers had gone out.

Knobs (:class:`Scenario`)
-------------------------
``tokens`` (40) tokens in the reply; ``rate`` (20.0) tokens per second, 0 for no
delay at all -- token *i* is due at ``start + i / rate`` (plus stalls), so
pacing never drifts, and all tokens that are due go out in one write;
``text`` (``lorem``) what the tokens are: ``lorem`` English sentences, one word
with its trailing space per token; ``cjk`` Chinese and Japanese, one character
per token (including one outside the BMP); ``emoji`` one grapheme cluster per
token, with ZWJ sequences, flags, skin tones, keycaps and combining marks;
``mixed`` runs of all three; ``echo`` the last user message, split into words
(CJK: characters), repeated or cut to ``tokens``; ``seed`` (0) makes the text
deterministic (a shorter reply is a prefix of a longer one with the same seed);
``stamp`` (false) replaces each token's text with the moment it is written,
``"<time.monotonic_ns()> "`` (digits and one space), taken just before the write
that carries it (tokens that go out in one write share one stamp): a receiver on
the same machine subtracts it from its own ``time.monotonic_ns()`` to measure
one-way latency (CLOCK_MONOTONIC is shared by the processes of one machine), as
``bench/loadgen.py`` does; the reply keeps its number of tokens, but its text is
the stamps, and :func:`make_tokens` refuses such a scenario;
``burst`` (0) hold frames until at least this many bytes of content are held,
then send them in one write (the rest goes out at the end);
``first_delay_s`` (0) pause between the 200 headers and the first chunk;
``header_delay_s`` (0) pause before answering at all;
``error_status`` (0) answer this HTTP status (400-599) with an OpenAI error body,
``error_code`` / ``error_message`` overriding what the status implies, and
``Retry-After: <retry_after>`` (1) on a 429.
Events after K tokens have been sent (``-1`` = off; K may be 0; several at the
same K happen in this order): ``malformed_at`` a frame ``data: {not json``, then
the stream goes on; ``stall_at`` a pause of ``stall_s`` seconds; ``error_at`` an
in-stream ``data: {"error": ...}`` frame, then a clean end of the body;
``drop_at`` the connection is closed without finishing the chunked body.
``no_done`` (false) ends the body cleanly after the tokens, without the
``finish_reason`` chunk, usage or ``[DONE]``. Without ``stream``, the reply is
sent after the time the stream would have taken; ``error_at`` then answers 500
and ``drop_at`` closes the connection without an answer.

Process defaults come from the command line (``sseproxy mock-upstream --rate 50``,
``python -m sseproxy.mockupstream``); each request may override any knob in its
``model`` string, with query-string syntax after a ``?``::

    mock?tokens=20&rate=50&stall_at=3&stall_s=2
    mock?text=emoji&error_message=try%20again&no_done     (a bare boolean means true)

A model without ``?`` (``gpt-4o-mini``) uses the defaults; the model is echoed in
chunks exactly as sent. An unknown knob or a bad value is a 400 naming the knob
and what it allows. :meth:`Scenario.to_model` builds such a string and
:func:`make_tokens` returns the exact tokens a scenario will send (unless it stamps them).

Deliberate divergences from OpenAI: no ``system_fingerprint``, ``logprobs`` or
``refusal`` fields; ``n``, tools and every other parameter are ignored; usage
counts words and CJK characters rather than BPE tokens.
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import itertools
import json
import math
import random
import re
import signal
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, fields, replace
from typing import Any, Final, Literal
from urllib.parse import quote, unquote_plus

import tornado.httpserver
import tornado.netutil
import tornado.web
from tornado.http1connection import HTTP1Connection
from tornado.iostream import StreamClosedError

__all__ = [
    "TEXT_KINDS",
    "Scenario",
    "Stats",
    "add_arguments",
    "make_app",
    "make_tokens",
    "run",
    "start",
]

TEXT_KINDS: Final = ("lorem", "cjk", "emoji", "mixed", "echo")
MAX_TOKENS: Final = 1_000_000

# ---------------------------------------------------------------------------
# Knobs


def _parse_bool(raw: str) -> bool:
    lowered = raw.strip().lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off"):
        return False
    raise ValueError(raw)


@dataclass(frozen=True)
class _Knob:
    """How one :class:`Scenario` field is parsed, checked and explained."""

    kind: type
    allowed: str
    help: str
    ok: Callable[[Any], bool] = lambda value: True

    def check(self, name: str, value: object) -> object:
        """Return ``value`` (an int widened to float where a float is wanted) or raise."""
        if self.kind is float and type(value) is int:
            value = float(value)
        if type(value) is not self.kind or not self.ok(value):
            raise ValueError(f"bad value {value!r} for knob {name!r}; allowed: {self.allowed}")
        return value

    def parse(self, name: str, raw: str) -> object:
        """Parse the text form used in model strings and on the command line."""
        convert: Callable[[str], object] = _parse_bool if self.kind is bool else self.kind
        try:
            value = convert(raw)
        except ValueError:
            raise ValueError(
                f"bad value {raw!r} for knob {name!r}; allowed: {self.allowed}"
            ) from None
        return self.check(name, value)


def _seconds(value: float) -> bool:
    return math.isfinite(value) and value >= 0


def _event_at(value: int) -> bool:
    return value >= -1


_AT = "an integer >= 0 (tokens sent before it happens), or -1 for never"
_KNOBS: Final[dict[str, _Knob]] = {
    "tokens": _Knob(
        int, f"an integer from 0 to {MAX_TOKENS}", "tokens in the reply",
        lambda v: 0 <= v <= MAX_TOKENS),
    "rate": _Knob(
        float, "a number >= 0 (tokens per second; 0 = no delay)",
        "tokens per second, 0 for no delay at all", _seconds),
    "text": _Knob(
        str, "one of " + ", ".join(TEXT_KINDS), "what the tokens are",
        lambda v: v in TEXT_KINDS),
    "burst": _Knob(
        int, "an integer >= 0 (bytes of content per write; 0 = off)",
        "hold frames until this many bytes of content are held, then send them at once",
        lambda v: v >= 0),
    "stall_at": _Knob(int, _AT, "pause after this many tokens", _event_at),
    "stall_s": _Knob(float, "a number of seconds >= 0", "length of that pause", _seconds),
    "first_delay_s": _Knob(
        float, "a number of seconds >= 0",
        "pause between the 200 headers and the first chunk", _seconds),
    "header_delay_s": _Knob(
        float, "a number of seconds >= 0", "pause before answering at all", _seconds),
    "error_status": _Knob(
        int, "0 (off) or an HTTP status from 400 to 599",
        "answer this HTTP status with an OpenAI error body",
        lambda v: v == 0 or 400 <= v <= 599),
    "error_code": _Knob(
        str, "any text", "error code for error_status / error_at (default: from the status)"),
    "error_message": _Knob(
        str, "any text", "error message for error_status / error_at (default: from the status)"),
    "retry_after": _Knob(
        int, "an integer >= 0 (seconds)", "Retry-After of a 429", lambda v: v >= 0),
    "error_at": _Knob(int, _AT, "send an in-stream error frame after this many tokens", _event_at),
    "drop_at": _Knob(int, _AT, "close the connection abruptly after this many tokens", _event_at),
    "no_done": _Knob(
        bool, "true or false (also 1/0, yes/no, on/off; a bare 'no_done' means true)",
        "end the body after the tokens without finish_reason chunk and [DONE]"),
    "malformed_at": _Knob(
        int, _AT, "send a frame that is not JSON after this many tokens", _event_at),
    "seed": _Knob(int, "an integer", "seed of the generated text"),
    "stamp": _Knob(
        bool, "true or false (also 1/0, yes/no, on/off; a bare 'stamp' means true)",
        "each token's text is the time it is written: '<time.monotonic_ns()> '"),
}


@dataclass(frozen=True)
class Scenario:
    """What the simulator does for one request; see the module docstring for each knob."""

    tokens: int = 40
    rate: float = 20.0
    text: str = "lorem"
    burst: int = 0
    stall_at: int = -1
    stall_s: float = 0.0
    first_delay_s: float = 0.0
    header_delay_s: float = 0.0
    error_status: int = 0
    error_code: str = ""
    error_message: str = ""
    retry_after: int = 1
    error_at: int = -1
    drop_at: int = -1
    no_done: bool = False
    malformed_at: int = -1
    seed: int = 0
    stamp: bool = False

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            checked = _KNOBS[f.name].check(f.name, value)
            if checked is not value:
                object.__setattr__(self, f.name, checked)

    @classmethod
    def parse(cls, model: str, defaults: Scenario | None = None) -> Scenario:
        """The scenario that ``model`` asks for: ``defaults`` with the knobs after ``?`` changed.

        Raises ValueError naming the knob and what it allows.
        """
        base = defaults if defaults is not None else cls()
        _name, question, query = model.partition("?")
        if not question:
            return base
        changes: dict[str, object] = {}
        for part in query.split("&"):
            if not part:
                continue
            raw_key, equals, raw_value = part.partition("=")
            key = unquote_plus(raw_key)
            knob = _KNOBS.get(key)
            if knob is None:
                raise ValueError(
                    f"unknown knob {key!r} in model {model!r}; known knobs: " + ", ".join(_KNOBS)
                )
            if key in changes:
                raise ValueError(f"knob {key!r} is given twice in model {model!r}")
            if not equals and knob.kind is not bool:
                raise ValueError(f"knob {key!r} needs a value; allowed: {knob.allowed}")
            changes[key] = knob.parse(key, unquote_plus(raw_value) if equals else "true")
        if not changes:
            return base
        return replace(base, **changes)  # type: ignore[arg-type]  # values checked above

    def to_model(self) -> str:
        """A model string (``mock?...``) naming only the knobs that differ from the defaults."""
        parts = []
        for f in fields(self):
            value = getattr(self, f.name)
            if value != f.default:
                parts.append(f"{f.name}={quote(_format_value(value), safe='')}")
        return "mock?" + "&".join(parts) if parts else "mock"


def _format_value(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        text = repr(value)
        return text[:-2] if text.endswith(".0") else text
    return str(value)


# ---------------------------------------------------------------------------
# Text

_SUBJECTS: Final = (
    "the relay", "a patient reader", "every stream", "the small model", "our server",
    "the browser tab", "each request", "the quiet proxy", "a careful engineer",
    "the event loop", "the café downstairs", "a naïve client", "the night shift",
    "my old laptop", "the load balancer", "a curious student",
)
_VERBS: Final = (
    "sends", "reads", "holds", "flushes", "watches", "answers", "carries", "paces",
    "measures", "remembers", "greets", "forgets", "counts", "follows", "explains", "keeps",
)
_OBJECTS: Final = (
    "the next token", "a short reply", "every byte", "the open connection", "a steady rhythm",
    "the first word", "its own buffer", "a friendly greeting", "the whole answer",
    "three small chunks", "the last event", "a warm cup of tea", "the user's question",
    "twenty-one lines", "the morning news", "a long story",
)
_ADVERBIALS: Final = (
    "without delay", "in order", "at a steady pace", "before the deadline",
    "after a short pause", "over the network", "for the reader", "one word at a time",
    "with great care", "behind the proxy", "late at night", "every few seconds",
)
_JOINERS: Final = (", and", ", while", ", because", ", so", "; meanwhile,")

_CJK_SENTENCES: Final = (
    "今天天气很好，我们去公园散步吧。",
    "流式传输让用户更快看到第一个字。",
    "服务器正在逐字发送回复。",
    "请稍等，答案马上就来。",
    "東京の空は青く、風が気持ちいいです。",
    "𠮷野家で牛丼を食べました。",
    "ストリーミングは最初の文字をすぐに届けます。",
    "日本語と中文が混ざっても大丈夫です。",
)

_EMOJI: Final = (
    "😀", "🚀", "✨", "🎉", "🔥", "🌍",
    "❤️",                          # heart + variation selector
    "👍🏽", "👋🏿", "🫶🏼",             # skin tones
    "👩‍💻", "🧑🏾‍🚀", "👨‍👩‍👧‍👦", "❤️‍🔥", "🏳️‍🌈", "🏴‍☠️",  # ZWJ sequences
    "🇯🇵", "🇫🇷", "🇺🇦", "🇧🇷",       # flags (regional indicator pairs)
    "🏴󠁧󠁢󠁳󠁣󠁴󠁿",                          # Scotland (tag sequence)
    "1️⃣", "#️⃣",                     # keycaps
    "e\u0301", "n\u0303", "o\u0308\u0304", "a\u0328",  # combining marks
)


def _sentence(rng: random.Random) -> str:
    def clause() -> str:
        return f"{rng.choice(_SUBJECTS)} {rng.choice(_VERBS)} {rng.choice(_OBJECTS)}"

    shape = rng.randrange(4)
    if shape == 0:
        text = clause()
    elif shape == 1:
        text = f"{clause()} {rng.choice(_ADVERBIALS)}"
    elif shape == 2:
        text = f"{clause()}{rng.choice(_JOINERS)} {clause()}"
    else:
        text = f"{rng.choice(_ADVERBIALS)}, {clause()}"
    return text[0].upper() + text[1:] + rng.choice(".....!")


def _lorem(rng: random.Random) -> Iterator[str]:
    while True:
        for word in _sentence(rng).split(" "):
            yield word + " "


def _cjk(rng: random.Random) -> Iterator[str]:
    while True:
        yield from rng.choice(_CJK_SENTENCES)


def _emoji(rng: random.Random) -> Iterator[str]:
    while True:
        yield rng.choice(_EMOJI)


def _mixed(rng: random.Random) -> Iterator[str]:
    streams = {
        "lorem": _lorem(random.Random(rng.getrandbits(64))),
        "cjk": _cjk(random.Random(rng.getrandbits(64))),
        "emoji": _emoji(random.Random(rng.getrandbits(64))),
    }
    while True:
        stream = streams[rng.choice(("lorem", "lorem", "cjk", "emoji"))]
        for _ in range(rng.randint(2, 6)):
            yield next(stream)


_GENERATORS: Final[dict[str, Callable[[random.Random], Iterator[str]]]] = {
    "lorem": _lorem,
    "cjk": _cjk,
    "emoji": _emoji,
    "mixed": _mixed,
}

# Echo and usage split text into words with their trailing whitespace, except
# that CJK ideographs and kana (with any combining marks) are one token each.
_CJK_CHARS: Final = (
    "\u2e80-\u2fff\u3000-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\uff00-\uffef"
    "\U00020000-\U0003ffff"
)
_WORD: Final = re.compile(
    rf"\s+|[{_CJK_CHARS}][\u0300-\u036f\u3099\u309a\ufe00-\ufe0f]*\s*|[^\s{_CJK_CHARS}]+\s*"
)


def _words(text: str) -> list[str]:
    return _WORD.findall(text)


def _echo(prompt: str, count: int) -> list[str]:
    base = _words(prompt)
    if not base or count <= len(base):
        return base[:count]
    last = len(base) - 1
    out = []
    for i in range(count):
        token = base[i % len(base)]
        if i % len(base) == last and i != count - 1 and not token[-1].isspace():
            token += " "  # keep the repetitions apart
        out.append(token)
    return out


@dataclass(frozen=True)
class _Tokens:
    texts: tuple[str, ...]
    json: tuple[bytes, ...]  # each text as a JSON string
    sizes: tuple[int, ...]  # UTF-8 bytes of each text

    @property
    def content(self) -> str:
        return "".join(self.texts)

    def cut(self, count: int) -> _Tokens:
        """The first ``count`` tokens."""
        return _Tokens(self.texts[:count], self.json[:count], self.sizes[:count])


_CACHED_TOKENS: Final = 10_000


@functools.lru_cache(maxsize=256)
def _tokens(kind: str, count: int, seed: int, prompt: str) -> _Tokens:
    if kind == "echo":
        texts = _echo(prompt, count)
    else:
        texts = list(itertools.islice(_GENERATORS[kind](random.Random(seed)), count))
    return _Tokens(
        texts=tuple(texts),
        json=tuple(_dumps(t).encode() for t in texts),
        sizes=tuple(len(t.encode()) for t in texts),
    )


def _tokens_for(scenario: Scenario, prompt: str) -> _Tokens:
    echoed = prompt if scenario.text == "echo" else ""
    args = (scenario.text, scenario.tokens, scenario.seed, echoed)
    if scenario.tokens > _CACHED_TOKENS:  # rare, and too big to keep 256 of them
        return _tokens.__wrapped__(*args)
    return _tokens(*args)


def make_tokens(scenario: Scenario, prompt: str = "") -> list[str]:
    """The exact token texts the simulator sends for ``scenario``.

    ``prompt`` is the last user message's text; only ``text=echo`` uses it (an
    empty prompt echoes as no tokens at all). With ``stamp`` the texts are the
    moments the tokens are written, unknown in advance: that is a ValueError (the
    count is ``len(make_tokens(replace(scenario, stamp=False), prompt))``).
    """
    if scenario.stamp:
        raise ValueError("with stamp, the token texts are the times they are written")
    return list(_tokens_for(scenario, prompt).texts)


# ---------------------------------------------------------------------------
# Wire format

_dumps: Final = functools.partial(json.dumps, ensure_ascii=False, separators=(",", ":"))
_DONE: Final = b"data: [DONE]\n\n"
_MALFORMED: Final = b"data: {not json\n\n"
# Where a stamped token's JSON string goes until its write: a NUL byte, which JSON text
# never holds raw (json.dumps escapes it), so a write replaces every one of them at once.
_STAMP_SLOT: Final = b"\x00"


def _stamp() -> bytes:
    """A stamped token's content as a JSON string: the time now, then one space."""
    return b'"%d "' % time.monotonic_ns()


# status: (type, code, message), as OpenAI sends them; OpenAI's 5xx bodies have no code.
_STATUS_ERRORS: Final[dict[int, tuple[str, str | None, str]]] = {
    401: ("invalid_request_error", "invalid_api_key", "Incorrect API key provided (simulated)."),
    403: ("request_forbidden", "unsupported_country_region_territory",
          "Country, region, or territory not supported (simulated)."),
    404: ("invalid_request_error", "model_not_found",
          "The model does not exist or you do not have access to it (simulated)."),
    429: ("requests", "rate_limit_exceeded",
          "Rate limit reached for requests (simulated). Please try again in {retry_after}s."),
    500: ("server_error", None,
          "The server had an error while processing your request (simulated)."),
    503: ("server_error", None,
          "The engine is currently overloaded, please try again later (simulated)."),
}


def _error_body(message: str, type_: str, code: str | None) -> bytes:
    error = {"message": message, "type": type_, "code": code, "param": None}
    return _dumps({"error": error}).encode()


def _status_error(scenario: Scenario, status: int) -> tuple[str, str | None, str]:
    """(type, code, message) of an error answered with HTTP ``status``."""
    type_, code, message = _STATUS_ERRORS.get(status) or (
        "invalid_request_error" if status < 500 else "server_error",
        None,
        f"HTTP {status} (simulated).",
    )
    message = message.format(retry_after=scenario.retry_after)
    return type_, scenario.error_code or code, scenario.error_message or message


def _stream_error(scenario: Scenario) -> dict[str, str]:
    return {
        "message": scenario.error_message or _STATUS_ERRORS[500][2],
        "type": "server_error",
        "code": scenario.error_code or "server_error",
    }


class _Frames:
    """The fixed parts of one response's chunks, encoded once."""

    __slots__ = ("head", "end", "role", "token_prefix", "token_suffix", "finish")

    def __init__(
        self, chunk_id: str, created: int, model: str, include_usage: bool,
        finish_reason: str = "stop",
    ) -> None:
        self.head = (
            f'data: {{"id":{_dumps(chunk_id)},"object":"chat.completion.chunk",'
            f'"created":{created},"model":{_dumps(model)},"choices":'
        )
        self.end = ',"usage":null}\n\n' if include_usage else "}\n\n"
        choice = '[{"index":0,"delta":%s,"finish_reason":%s}]'
        self.role = self._frame(choice % ('{"role":"assistant","content":""}', "null"))
        self.token_prefix = (self.head + '[{"index":0,"delta":{"content":').encode()
        self.token_suffix = ('},"finish_reason":null}]' + self.end).encode()
        self.finish = self._frame(choice % ("{}", _dumps(finish_reason)))

    def _frame(self, choices: str) -> bytes:
        return (self.head + choices + self.end).encode()

    def usage(self, usage: dict[str, int]) -> bytes:
        return (self.head + '[],"usage":' + _dumps(usage) + "}\n\n").encode()

    def token(self, i: int, text: bytes) -> tuple[bytes, ...]:
        """Token ``i``'s frame, in pieces (``text``: its JSON string, or the stamp slot)."""
        return (self.token_prefix, text, self.token_suffix)

    def error(self, error: dict[str, str], sent: int) -> bytes:
        return b"data: " + _dumps({"error": error}).encode() + b"\n\n"

    def ending(self, request: _ChatRequest, count: int) -> list[bytes]:
        out = [self.finish]
        if request.include_usage:
            out.append(self.usage(_usage(request.prompt_tokens, count)))
        out.append(_DONE)
        return out


class _ResponseFrames:
    """The events of one ``/v1/responses`` stream, as OpenAI sends them for a text reply."""

    def __init__(self, request: _ChatRequest, response_id: str, tokens: _Tokens,
                 finish: str) -> None:
        self.request = request
        self.item_id = "msg_" + response_id.removeprefix("resp_")
        self.tokens = tokens
        self.finish = finish
        self.response = _response_object(request, response_id, "in_progress")
        where = f'"item_id":{_dumps(self.item_id)},"output_index":0,"content_index":0'
        self.token_prefix = ('event: response.output_text.delta\ndata: {"type":'
                             '"response.output_text.delta",' + where + ',"delta":').encode()
        self.role = b"".join(self._events(0, [
            ("response.created", {"response": self.response}),
            ("response.in_progress", {"response": self.response}),
            ("response.output_item.added", {"output_index": 0, "item": self._item("")}),
            ("response.content_part.added", {"item_id": self.item_id, "output_index": 0,
                                             "content_index": 0, "part": _part("")}),
        ]))

    def _item(self, text: str | None, status: str = "in_progress") -> dict[str, Any]:
        return {"id": self.item_id, "type": "message", "status": status, "role": "assistant",
                "content": [] if not text else [_part(text)]}

    def _events(self, first: int, events: list[tuple[str, dict[str, Any]]]) -> list[bytes]:
        return [f"event: {kind}\ndata: ".encode()
                + _dumps({"type": kind, "sequence_number": first + i, **body}).encode()
                + b"\n\n" for i, (kind, body) in enumerate(events)]

    def token(self, i: int, text: bytes) -> tuple[bytes, ...]:
        pad = "x" * (16 - len(text) % 16)
        return (self.token_prefix, text,
                b',"logprobs":[],"obfuscation":"%s","sequence_number":%d}\n\n'
                % (pad.encode(), 4 + i))

    def error(self, error: dict[str, str], sent: int) -> bytes:
        failed = dict(self.response, status="failed",
                      error={"code": error["code"], "message": error["message"]})
        return self._events(4 + sent, [("response.failed", {"response": failed})])[0]

    def ending(self, request: _ChatRequest, count: int) -> list[bytes]:
        text = self.tokens.content
        done = "completed" if self.finish == "stop" else "incomplete"
        final = _response_object(request, self.response["id"], done, text,
                                 _usage(request.prompt_tokens, count))
        final["created_at"] = self.response["created_at"]
        where = {"item_id": self.item_id, "output_index": 0, "content_index": 0}
        return self._events(4 + count, [
            ("response.output_text.done", {**where, "text": text, "logprobs": []}),
            ("response.content_part.done", {**where, "part": _part(text)}),
            ("response.output_item.done", {"output_index": 0, "item": final["output"][0]}),
            (f"response.{done}", {"response": final}),
        ])


def _part(text: str) -> dict[str, Any]:
    return {"type": "output_text", "text": text, "annotations": [], "logprobs": []}


def _response_object(request: _ChatRequest, response_id: str, status: str,
                     text: str | None = None,
                     usage: dict[str, int] | None = None) -> dict[str, Any]:
    """A response object as OpenAI sends it (``usage`` in chat shape, converted here)."""
    item_id = "msg_" + response_id.removeprefix("resp_")
    output = []
    if text is not None:
        output = [{"id": item_id, "type": "message", "role": "assistant",
                   "status": "completed" if status == "completed" else "incomplete",
                   "content": [_part(text)]}]
    params = request.params
    return {
        "id": response_id, "object": "response", "created_at": int(time.time()),
        "status": status, "background": False, "error": None,
        "incomplete_details": {"reason": "max_output_tokens"} if status == "incomplete"
        else None,
        "instructions": params.get("instructions"),
        "max_output_tokens": params.get("max_output_tokens"), "model": request.model,
        "output": output, "parallel_tool_calls": True,
        "temperature": params.get("temperature", 1.0), "text": {"format": {"type": "text"}},
        "tool_choice": "auto", "tools": [], "top_p": params.get("top_p", 1.0),
        "truncation": "disabled", "metadata": params.get("metadata") or {},
        "store": params.get("store", True), "user": params.get("user"),
        "usage": None if usage is None else {
            "input_tokens": usage["prompt_tokens"],
            "input_tokens_details": {"cached_tokens": 0},
            "output_tokens": usage["completion_tokens"],
            "output_tokens_details": {"reasoning_tokens": 0},
            "total_tokens": usage["total_tokens"]},
    }


def _usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


# ---------------------------------------------------------------------------
# Requests


class _BadRequest(Exception):
    def __init__(self, message: str, code: str) -> None:
        super().__init__(message)
        self.message = message
        self.code = code


@dataclass(frozen=True)
class _ChatRequest:
    model: str
    stream: bool
    include_usage: bool
    prompt: str  # the last user message's text
    prompt_tokens: int
    max_tokens: int | None = None  # the smaller of max_tokens and max_completion_tokens
    #: A Responses request's parameters echoed in the response object.
    params: dict[str, Any] = field(default_factory=dict)


def _message_text(message: dict[str, Any]) -> str:
    content = message.get("content")
    if isinstance(content, str):
        return content
    if isinstance(content, list):  # content parts
        return " ".join(
            part["text"] for part in content
            if isinstance(part, dict) and isinstance(part.get("text"), str)
        )
    return ""


def _parse_chat_request(body: bytes) -> _ChatRequest:
    try:
        request = json.loads(body)
    except ValueError as exc:
        raise _BadRequest(
            f"We could not parse the JSON body of your request ({exc}).", "invalid_json"
        ) from None
    if not isinstance(request, dict):
        raise _BadRequest("The request body must be a JSON object.", "invalid_type")
    model = request.get("model")
    if model is None:
        raise _BadRequest("Missing required parameter: 'model'.", "missing_required_parameter")
    if not isinstance(model, str):
        raise _BadRequest("Invalid type for 'model': expected a string.", "invalid_type")
    messages = request.get("messages")
    if messages is None:
        raise _BadRequest(
            "Missing required parameter: 'messages'.", "missing_required_parameter"
        )
    if not isinstance(messages, list) or not all(
        isinstance(m, dict) and isinstance(m.get("role"), str) for m in messages
    ):
        raise _BadRequest(
            "Invalid type for 'messages': expected an array of objects with a 'role'.",
            "invalid_type",
        )
    if not messages:
        raise _BadRequest(
            "Invalid 'messages': empty array. Expected an array with minimum length 1.",
            "empty_array",
        )
    stream = request.get("stream")
    if not isinstance(stream, bool | None):
        raise _BadRequest("Invalid type for 'stream': expected a boolean.", "invalid_type")
    options = request.get("stream_options")
    if not isinstance(options, dict | None):
        raise _BadRequest(
            "Invalid type for 'stream_options': expected an object.", "invalid_type"
        )
    include_usage = (options or {}).get("include_usage")
    if not isinstance(include_usage, bool | None):
        raise _BadRequest(
            "Invalid type for 'stream_options.include_usage': expected a boolean.",
            "invalid_type",
        )
    limits = []
    for key in ("max_tokens", "max_completion_tokens"):
        limit = request.get(key)
        if limit is None:
            continue
        if isinstance(limit, bool) or not isinstance(limit, int):
            raise _BadRequest(f"Invalid type for '{key}': expected an integer.", "invalid_type")
        if limit < 1:
            raise _BadRequest(
                f"Invalid '{key}': integer below minimum value. Expected a value >= 1, but "
                f"got {limit} instead.", "integer_below_min_value")
        limits.append(limit)
    texts = [_message_text(m) for m in messages]
    users = [text for m, text in zip(messages, texts) if m["role"] == "user"]
    return _ChatRequest(
        model=model,
        stream=bool(stream),
        include_usage=bool(include_usage),
        prompt=users[-1] if users else "",
        prompt_tokens=sum(len(_words(t)) for t in texts),
        max_tokens=min(limits, default=None),
    )


#: Responses parameters the simulator echoes in its response objects.
_ECHOED: Final = ("instructions", "max_output_tokens", "temperature", "top_p", "metadata",
                  "store", "user")


def _parse_responses_request(body: bytes) -> _ChatRequest:
    """A ``POST /v1/responses`` body, as the chat request it would be."""
    try:
        request = json.loads(body)
    except ValueError as exc:
        raise _BadRequest(
            f"We could not parse the JSON body of your request ({exc}).", "invalid_json"
        ) from None
    if not isinstance(request, dict):
        raise _BadRequest("The request body must be a JSON object.", "invalid_type")
    model = request.get("model")
    if not isinstance(model, str):
        raise _BadRequest("Missing required parameter: 'model'.", "missing_required_parameter")
    given = request.get("input")
    if isinstance(given, str):
        items: list[Any] = [{"role": "user", "content": given}]
    elif isinstance(given, list) and given:
        items = given
    else:
        raise _BadRequest("Missing required parameter: 'input'.", "missing_required_parameter")
    if not all(isinstance(m, dict) and isinstance(m.get("role"), str) for m in items):
        raise _BadRequest("Invalid 'input': expected message items with a 'role'.",
                          "invalid_type")
    limit = request.get("max_output_tokens")
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int)
                              or limit < 1):
        raise _BadRequest("Invalid 'max_output_tokens': expected an integer >= 1.",
                          "invalid_type")
    texts = [_message_text(m) for m in items]
    instructions = request.get("instructions")
    if isinstance(instructions, str):
        texts.append(instructions)
    users = [text for m, text in zip(items, texts) if m["role"] == "user"]
    return _ChatRequest(
        model=model,
        stream=request.get("stream") is True,
        include_usage=True,
        prompt=users[-1] if users else "",
        prompt_tokens=sum(len(_words(t)) for t in texts),
        max_tokens=limit,
        params={k: request[k] for k in _ECHOED if request.get(k) is not None},
    )


# ---------------------------------------------------------------------------
# Handlers

Outcome = Literal["completed", "cancelled", "errors"]


@dataclass
class Stats:
    """Counters of ``/v1/chat/completions``, served at ``/mock/stats``."""

    requests: int = 0
    open: int = 0
    completed: int = 0
    cancelled: int = 0
    errors: int = 0

    def snapshot(self) -> dict[str, int]:
        return {
            "requests": self.requests,
            "open": self.open,
            "completed": self.completed,
            "cancelled": self.cancelled,
            "errors": self.errors,
        }

    def reset(self) -> None:
        """Zero every counter except ``open`` (those requests are still running)."""
        self.requests = self.completed = self.cancelled = self.errors = 0

    def count(self, outcome: Outcome) -> None:
        setattr(self, outcome, getattr(self, outcome) + 1)


class _OpenAIHandler(tornado.web.RequestHandler):
    """Errors as OpenAI's JSON body instead of Tornado's HTML page."""

    def send_json(self, status: int, body: bytes) -> None:
        self.set_status(status)
        self.set_header("Content-Type", "application/json")
        self.finish(body)

    def write_error(self, status_code: int, **kwargs: Any) -> None:
        type_ = "invalid_request_error" if status_code < 500 else "server_error"
        self.send_json(status_code, _error_body(self._reason, type_, None))


class _NotFoundHandler(_OpenAIHandler):
    def prepare(self) -> None:
        message = f"Invalid URL ({self.request.method} {self.request.path})"
        self.send_json(404, _error_body(message, "invalid_request_error", "unknown_url"))


class _ModelsHandler(_OpenAIHandler):
    def get(self) -> None:
        model = {"id": "mock", "object": "model", "created": 1700000000, "owned_by": "sseproxy"}
        self.send_json(200, _dumps({"object": "list", "data": [model]}).encode())


class _StatsHandler(_OpenAIHandler):
    def initialize(self, stats: Stats) -> None:
        self.stats = stats

    def get(self) -> None:
        self.set_header("Cache-Control", "no-store")
        self.send_json(200, _dumps(self.stats.snapshot()).encode())


class _ResetHandler(_OpenAIHandler):
    def initialize(self, stats: Stats) -> None:
        self.stats = stats

    def post(self) -> None:
        self.stats.reset()
        self.send_json(200, _dumps(self.stats.snapshot()).encode())


def _wake(waiter: asyncio.Future[None]) -> None:
    if not waiter.done():
        waiter.set_result(None)


class _ChatCompletionsHandler(_OpenAIHandler):
    def initialize(self, defaults: Scenario, stats: Stats, ids: Iterator[int]) -> None:
        self.defaults = defaults
        self.stats = stats
        self.ids = ids
        self.gone = False  # the client closed the connection
        self.stamping = False  # token contents are _STAMP_SLOT until written
        self.waiter: asyncio.Future[None] | None = None

    def on_connection_close(self) -> None:
        self.gone = True
        if self.waiter is not None:
            _wake(self.waiter)

    async def post(self) -> None:
        self.stats.requests += 1
        self.stats.open += 1
        outcome: Outcome = "errors"  # unless we get to say otherwise
        try:
            outcome = await self._respond()
        except StreamClosedError:
            outcome = "cancelled"
        finally:
            if outcome == "cancelled":
                # In the access log only (the client has gone), as nginx logs it: a
                # cancelled stream is not a plain 200, also when its headers went out.
                self.set_status(499, "Client Closed Request")
            self.stats.open -= 1
            self.stats.count(outcome)

    parse = staticmethod(_parse_chat_request)
    id_prefix = "chatcmpl-mock-"

    async def _respond(self) -> Outcome:
        try:
            request = self.parse(self.request.body)
        except _BadRequest as exc:
            self.send_json(400, _error_body(exc.message, "invalid_request_error", exc.code))
            return "errors"
        try:
            scenario = Scenario.parse(request.model, self.defaults)
        except ValueError as exc:
            self.send_json(400, _error_body(str(exc), "invalid_request_error", "invalid_scenario"))
            return "errors"
        if scenario.header_delay_s and not await self._sleep(scenario.header_delay_s):
            return "cancelled"
        if scenario.error_status:
            type_, code, message = _status_error(scenario, scenario.error_status)
            if scenario.error_status == 429:
                self.set_header("Retry-After", str(scenario.retry_after))
            self.send_json(scenario.error_status, _error_body(message, type_, code))
            return "errors"
        tokens = _tokens_for(scenario, request.prompt)
        finish = "stop"
        if request.max_tokens is not None and len(tokens.texts) > request.max_tokens:
            tokens, finish = tokens.cut(request.max_tokens), "length"
        chunk_id = f"{self.id_prefix}{next(self.ids)}"
        if request.stream:
            return await self._stream(scenario, request, tokens, chunk_id, finish)
        return await self._complete(scenario, request, tokens, chunk_id, finish)

    async def _sleep(self, seconds: float) -> bool:
        return await self._sleep_until(asyncio.get_running_loop().time() + seconds)

    async def _sleep_until(self, deadline: float) -> bool:
        """Sleep until ``deadline`` (loop time) or until the client leaves; False if it left."""
        if self.gone:
            return False
        loop = asyncio.get_running_loop()
        waiter = self.waiter = loop.create_future()
        timer = loop.call_at(deadline, _wake, waiter)
        try:
            await waiter
        finally:
            timer.cancel()
            self.waiter = None
        return not self.gone

    async def _send(self, pending: list[bytes]) -> None:
        """Write what is pending in one chunk and flush it (raises StreamClosedError)."""
        if pending:
            data = b"".join(pending)
            if self.stamping:
                data = data.replace(_STAMP_SLOT, _stamp())  # the moment of the write
            self.write(data)
            pending.clear()
        flushed = self.flush()
        if not flushed.done() and not self.gone:
            # Tornado forgets a pending flush when the connection closes (and resolves one
            # whose connection closed while it was written): the close notification tells.
            closed = self.waiter = asyncio.get_running_loop().create_future()
            try:
                await asyncio.wait((flushed, closed), return_when=asyncio.FIRST_COMPLETED)
            finally:
                self.waiter = None
        if self.gone or not flushed.done():
            raise StreamClosedError()
        flushed.result()

    def _drop(self) -> None:
        """Close the connection without ending the response."""
        self.detach().close()

    async def _stream(
        self, scenario: Scenario, request: _ChatRequest, tokens: _Tokens, chunk_id: str,
        finish: str,
    ) -> Outcome:
        self.set_header("Content-Type", "text/event-stream")
        self.set_header("Cache-Control", "no-cache")
        connection = self.request.connection
        if isinstance(connection, HTTP1Connection):
            connection.stream.set_nodelay(True)  # frames are small and must leave now
        if scenario.first_delay_s:
            await self.flush()
            if not await self._sleep(scenario.first_delay_s):
                return "cancelled"

        frames = self._frames(request, chunk_id, tokens, finish)
        pending = [frames.role]
        self.stamping = scenario.stamp
        texts = (_STAMP_SLOT,) * len(tokens.json) if scenario.stamp else tokens.json
        burst = scenario.burst
        held = 0  # bytes of content held back while bursting
        count = len(tokens.texts)
        period = 1.0 / scenario.rate if scenario.rate else 0.0
        loop = asyncio.get_running_loop()
        start = loop.time()  # token i is due at start + i * period
        sent = 0

        async def send_until(stop: int) -> bool:
            """Send tokens up to index ``stop`` as they fall due; False if the client left."""
            nonlocal sent, held
            while sent < stop:
                upto = stop
                if period:
                    due = int((loop.time() - start) / period + 1e-9) + 1
                    if due <= sent:
                        if not burst:
                            await self._send(pending)
                        if not await self._sleep_until(start + sent * period):
                            return False
                        continue
                    upto = min(stop, due)
                for i in range(sent, upto):
                    pending.extend(frames.token(i, texts[i]))
                    if burst:
                        held += tokens.sizes[i]
                        if held >= burst:
                            await self._send(pending)
                            held = 0
                sent = upto
            return True

        events = (scenario.malformed_at, scenario.stall_at, scenario.error_at, scenario.drop_at)
        for mark in sorted({k for k in events if 0 <= k <= count}):
            if not await send_until(mark):
                return "cancelled"
            if mark == scenario.malformed_at:
                pending.append(_MALFORMED)
            if mark == scenario.stall_at and scenario.stall_s:
                resume = max(loop.time(), start + sent * period) + scenario.stall_s
                if not burst:
                    await self._send(pending)
                if not await self._sleep_until(resume):
                    return "cancelled"
                start = resume - sent * period
            if mark == scenario.error_at:
                pending.append(frames.error(_stream_error(scenario), sent))
            if mark == scenario.drop_at:
                await self._send(pending)
                self._drop()
                return "errors"
            if mark == scenario.error_at:
                await self._send(pending)
                self.finish()
                return "errors"
        if not await send_until(count):
            return "cancelled"

        if not scenario.no_done:
            pending.extend(frames.ending(request, count))
        await self._send(pending)
        self.finish()
        return "completed"

    async def _complete(
        self, scenario: Scenario, request: _ChatRequest, tokens: _Tokens, chunk_id: str,
        finish: str,
    ) -> Outcome:
        """Answer ``stream: false`` after the time the stream would have taken."""
        count = len(tokens.texts)
        ends = [k for k in (scenario.error_at, scenario.drop_at) if 0 <= k <= count]
        end = min(ends, default=count)
        period = 1.0 / scenario.rate if scenario.rate else 0.0
        duration = scenario.first_delay_s + max(end - 1, 0) * period
        if 0 <= scenario.stall_at <= end:
            duration += scenario.stall_s
        if duration and not await self._sleep(duration):
            return "cancelled"
        if end == scenario.drop_at:
            self._drop()
            return "errors"
        if end == scenario.error_at:
            type_, code, message = _status_error(scenario, 500)
            self.send_json(500, _error_body(message, type_, code))
            return "errors"
        content = f"{time.monotonic_ns()} " * count if scenario.stamp else tokens.content
        body = self._body(request, chunk_id, content, finish, count)
        self.send_json(200, _dumps(body).encode())
        return "completed"

    def _frames(self, request: _ChatRequest, chunk_id: str, tokens: _Tokens,
                finish: str) -> _Frames | _ResponseFrames:
        return _Frames(chunk_id, int(time.time()), request.model, request.include_usage,
                       finish)

    def _body(self, request: _ChatRequest, chunk_id: str, content: str, finish: str,
              count: int) -> dict[str, Any]:
        return {
            "id": chunk_id,
            "object": "chat.completion",
            "created": int(time.time()),
            "model": request.model,
            "choices": [{
                "index": 0,
                "message": {"role": "assistant", "content": content},
                "finish_reason": finish,
            }],
            "usage": _usage(request.prompt_tokens, count),
        }


class _ResponsesHandler(_ChatCompletionsHandler):
    """``POST /v1/responses``: the same knobs, OpenAI's Responses events."""

    parse = staticmethod(_parse_responses_request)
    id_prefix = "resp_mock"

    def _frames(self, request: _ChatRequest, chunk_id: str, tokens: _Tokens,
                finish: str) -> _Frames | _ResponseFrames:
        return _ResponseFrames(request, chunk_id, tokens, finish)

    def _body(self, request: _ChatRequest, chunk_id: str, content: str, finish: str,
              count: int) -> dict[str, Any]:
        status = "completed" if finish == "stop" else "incomplete"
        return _response_object(request, chunk_id, status, content,
                                _usage(request.prompt_tokens, count))


# ---------------------------------------------------------------------------
# Application, server, command line


def make_app(
    defaults: Scenario = Scenario(), stats: Stats | None = None, **app_settings: Any
) -> tornado.web.Application:
    """The simulator as a Tornado application; ``stats`` is created when not given.

    ``app_settings`` go to :class:`tornado.web.Application` (for example ``log_function``).
    """
    stats = stats if stats is not None else Stats()
    chat = {"defaults": defaults, "stats": stats, "ids": itertools.count(1)}
    return tornado.web.Application(
        [
            (r"/v1/chat/completions", _ChatCompletionsHandler, chat),
            (r"/v1/responses", _ResponsesHandler, chat),
            (r"/v1/models", _ModelsHandler),
            (r"/mock/stats", _StatsHandler, {"stats": stats}),
            (r"/mock/reset", _ResetHandler, {"stats": stats}),
        ],
        default_handler_class=_NotFoundHandler,
        **app_settings,
    )


async def start(
    defaults: Scenario = Scenario(),
    host: str = "127.0.0.1",
    port: int = 0,
    *,
    stats: Stats | None = None,
    **app_settings: Any,
) -> tuple[tornado.httpserver.HTTPServer, int]:
    """Serve the simulator on ``host:port`` (0 = any free port); return the server and its port.

    Call inside a running event loop; stop with ``server.stop()`` and
    ``await server.close_all_connections()``.
    """
    # A long backlog, so that benchmarks opening thousands of connections at once
    # do not wait for SYN retries.
    sockets = tornado.netutil.bind_sockets(port, host, backlog=4096)
    server = tornado.httpserver.HTTPServer(make_app(defaults, stats, **app_settings))
    server.add_sockets(sockets)
    return server, int(sockets[0].getsockname()[1])


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add ``--host``, ``--port`` and one flag per knob (``--stall-at`` for ``stall_at``)."""
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on")
    parser.add_argument("--port", type=int, default=8081, help="port to listen on (0: any)")
    for f in fields(Scenario):
        knob = _KNOBS[f.name]
        flag = "--" + f.name.replace("_", "-")
        if knob.kind is bool:
            parser.add_argument(flag, action="store_true", default=f.default, help=knob.help)
        else:
            parser.add_argument(
                flag,
                type=_argument_type(f.name, knob),
                default=f.default,
                choices=TEXT_KINDS if f.name == "text" else None,
                help=f"{knob.help} (default: %(default)r)",
            )


def _argument_type(name: str, knob: _Knob) -> Callable[[str], object]:
    def convert(raw: str) -> object:
        try:
            return knob.parse(name, raw)
        except ValueError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None

    return convert


def run(args: argparse.Namespace) -> int:
    """Serve until SIGINT or SIGTERM with the knobs from ``args``; return the exit status."""
    try:
        defaults = Scenario(**{f.name: getattr(args, f.name) for f in fields(Scenario)})
    except ValueError as exc:
        print(f"mock-upstream: {exc}", file=sys.stderr)
        return 2
    return asyncio.run(_serve_until_signal(defaults, args.host, args.port))


async def _serve_until_signal(defaults: Scenario, host: str, port: int) -> int:
    server, port = await start(defaults, host, port)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)
    shown = f"[{host}]" if ":" in host else host
    print(
        f"mock upstream listening on http://{shown}:{port}/v1 (defaults: {defaults.to_model()})",
        flush=True,
    )
    try:
        await stop.wait()
    finally:
        for signum in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(signum)
        server.stop()
        await asyncio.wait_for(server.close_all_connections(), timeout=5)
    return 0


def main(argv: list[str] | None = None) -> int:
    """``python -m sseproxy.mockupstream [flags]``."""
    parser = argparse.ArgumentParser(
        prog="python -m sseproxy.mockupstream",
        description="An OpenAI-compatible chat-completions simulator.",
    )
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
