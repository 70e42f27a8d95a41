"""Request validation: client input in, a checked :class:`ChatRequest` out, or a 400.

Nothing reaches the upstream before it passes here. Every rejection is a
:class:`~sseproxy.errors.RequestError` whose message names the offending field
(``param``-style, as OpenAI does) and says what is allowed.

sseproxy relays text chat. Parameters it relays unchanged are listed in
:data:`PASSTHROUGH`; features whose replies it cannot relay faithfully (tool
calls, several choices, log-probabilities, audio) are rejected with a clear
message rather than silently dropped, and so are unknown parameters.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping
import dataclasses
from dataclasses import dataclass, field
from typing import Any

from . import errors
from .config import Settings

ROLES = frozenset({"system", "developer", "user", "assistant"})
MESSAGE_KEYS = frozenset({"role", "content", "name"})


def _number(lo: float, hi: float) -> Any:
    def check(name: str, v: Any) -> None:
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            raise errors.RequestError(f"'{name}' must be a number")
        if isinstance(v, float) and not math.isfinite(v):
            raise errors.RequestError(f"'{name}' must be a number")
        if not lo <= v <= hi:
            raise errors.RequestError(f"'{name}' must be between {lo:g} and {hi:g}")
    return check


def _integer(lo: int) -> Any:
    def check(name: str, v: Any) -> None:
        if isinstance(v, bool) or not isinstance(v, int) or v < lo:
            raise errors.RequestError(f"'{name}' must be an integer of at least {lo}")
    return check


def _typed(*types: type) -> Any:
    def check(name: str, v: Any) -> None:
        if isinstance(v, bool) and bool not in types or not isinstance(v, types):
            kinds = " or ".join(t.__name__ for t in types)
            raise errors.RequestError(f"'{name}' must be of type {kinds}")
    return check


def _stop(name: str, v: Any) -> None:
    if isinstance(v, str):
        return
    if isinstance(v, list) and len(v) <= 4 and all(isinstance(s, str) for s in v):
        return
    raise errors.RequestError(f"'{name}' must be a string or a list of up to 4 strings")


#: Parameters relayed to the upstream as they are, with their checks.
PASSTHROUGH: dict[str, Any] = {
    "temperature": _number(0, 2),
    "top_p": _number(0, 1),
    "presence_penalty": _number(-2, 2),
    "frequency_penalty": _number(-2, 2),
    "max_tokens": _integer(1),
    "max_completion_tokens": _integer(1),
    "seed": _integer(-(2**63)),
    "stop": _stop,
    "user": _typed(str),
    "logit_bias": _typed(dict),
    "response_format": _typed(dict),
    "reasoning_effort": _typed(str),
    "metadata": _typed(dict),
}
#: Parameters whose replies sseproxy cannot relay faithfully.
UNSUPPORTED = frozenset({
    "tools", "tool_choice", "functions", "function_call", "parallel_tool_calls",
    "logprobs", "top_logprobs", "audio", "modalities", "prediction",
})
OWN = frozenset({"model", "messages", "stream", "stream_options", "n", "persona"})


@dataclass(frozen=True)
class ChatRequest:
    """A validated chat request, ready for the upstream."""

    messages: list[dict[str, Any]]
    model: str
    persona: str | None = None
    stream: bool = True
    include_usage: bool = False
    params: dict[str, Any] = field(default_factory=dict)
    prompt_chars: int = 0
    #: ``"pacing": "off"`` in a ``POST /v1/streams`` body: this stream is relayed unpaced.
    pacing_off: bool = False

    def upstream_body(self) -> dict[str, Any]:
        return {"model": self.model, "messages": self.messages, **self.params}


def _text_of(content: Any, where: str) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        texts = []
        for i, part in enumerate(content):
            if not isinstance(part, dict) or part.get("type") != "text":
                raise errors.RequestError(
                    f"'{where}.content[{i}]': only text parts are supported"
                )
            text = part.get("text")
            if not isinstance(text, str):
                raise errors.RequestError(f"'{where}.content[{i}].text' must be a string")
            texts.append(text)
        return "".join(texts)
    raise errors.RequestError(f"'{where}.content' must be a string or a list of text parts")


def _messages(raw: Any, settings: Settings) -> tuple[list[dict[str, Any]], int]:
    limits = settings.limits
    if not isinstance(raw, list) or not raw:
        raise errors.RequestError("'messages' must be a non-empty list")
    if len(raw) > limits.max_messages:
        raise errors.RequestError(
            f"'messages' has {len(raw)} entries; at most {limits.max_messages} are allowed"
        )
    chars = 0
    out = []
    for i, msg in enumerate(raw):
        where = f"messages[{i}]"
        if not isinstance(msg, dict):
            raise errors.RequestError(f"'{where}' must be an object")
        extra = set(msg) - MESSAGE_KEYS
        if extra:
            raise errors.RequestError(f"'{where}' has unsupported keys: {', '.join(sorted(extra))}")
        role = msg.get("role")
        if role not in ROLES:
            raise errors.RequestError(
                f"'{where}.role' must be one of {', '.join(sorted(ROLES))}"
            )
        if "name" in msg and not isinstance(msg["name"], str):
            raise errors.RequestError(f"'{where}.name' must be a string")
        chars += len(_text_of(msg.get("content"), where))
        out.append(dict(msg))
    if chars > limits.max_prompt_chars:
        raise errors.RequestError(
            f"the messages hold {chars} characters; at most {limits.max_prompt_chars} are allowed"
        )
    return out, chars


def _persona(name: Any, settings: Settings) -> str | None:
    """The persona's name (None when no persona is asked for)."""
    if name is None or name == "":
        return None
    if not isinstance(name, str) or name not in settings.personas:
        valid = ", ".join(sorted(settings.personas)) or "none are configured"
        raise errors.UnknownPersona(f"unknown persona {name!r}; valid personas: {valid}")
    return name


def _with_persona(
    messages: list[dict[str, Any]], persona: str | None, settings: Settings
) -> list[dict[str, Any]]:
    if persona is None:
        return messages
    return [{"role": "system", "content": settings.personas[persona].system}, *messages]


def _model(requested: Any, persona: str | None, settings: Settings) -> str:
    if requested is not None:
        if not isinstance(requested, str) or not requested.strip() or len(requested) > 256:
            raise errors.RequestError("'model' must be a non-empty string")
        return requested
    if persona is not None:
        return settings.personas[persona].model or settings.upstream.model
    return settings.upstream.model


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON number")


def _finite(text: str) -> float:
    number = float(text)
    if not math.isfinite(number):
        raise ValueError(f"the number {text[:40]} is out of range")
    return number


#: A JSON escape of a UTF-16 surrogate (\ud800-\udfff): fine in a pair, refused alone.
_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89abcdefABCDEF]")


def parse_json(body: bytes) -> dict[str, Any]:
    if not body:
        raise errors.RequestError("the request body is empty; expected a JSON object")
    try:
        # Strict UTF-8 (RFC 8259), BOM allowed: json.loads(bytes) would guess UTF-16/32 and
        # let UTF-8-encoded surrogates (ED A0 80) through, which cannot be sent on.
        text = body.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise errors.RequestError(
            f"the request body is not UTF-8 (invalid byte at offset {exc.start})") from None
    try:
        obj = json.loads(text, parse_constant=_no_constant, parse_float=_finite)
    except ValueError as exc:
        raise errors.RequestError(f"the request body is not valid JSON: {exc}") from None
    if _SURROGATE_ESCAPE.search(body):
        # Python reads a lone surrogate escape into a string that cannot be sent on as UTF-8.
        try:
            json.dumps(obj, ensure_ascii=False).encode()
        except UnicodeEncodeError:
            raise errors.RequestError(
                "the request body is not valid JSON: a string holds a lone surrogate "
                "(\\ud800-\\udfff without its pair)") from None
    if not isinstance(obj, dict):
        raise errors.RequestError("the request body must be a JSON object")
    return obj


def chat_completion(body: bytes, settings: Settings) -> ChatRequest:
    """Validate a ``POST /v1/chat/completions`` body."""
    obj = parse_json(body)
    for key in obj:
        if key in UNSUPPORTED:
            raise errors.RequestError(f"'{key}' is not supported by sseproxy (text chat only)")
        if key not in PASSTHROUGH and key not in OWN:
            raise errors.RequestError(f"unknown parameter '{key}'")
    stream = obj.get("stream", False)
    if not isinstance(stream, bool):
        raise errors.RequestError("'stream' must be true or false")
    n = obj.get("n", 1)
    if n != 1 or isinstance(n, bool):
        raise errors.RequestError("'n' must be 1: sseproxy relays one choice")
    include_usage = False
    options = obj.get("stream_options")
    if options is not None:
        if not isinstance(options, dict) or set(options) - {"include_usage"}:
            raise errors.RequestError("'stream_options' supports only 'include_usage'")
        include_usage = options.get("include_usage", False)
        if not isinstance(include_usage, bool):
            raise errors.RequestError("'stream_options.include_usage' must be true or false")
    params = {}
    for key, check in PASSTHROUGH.items():
        if key in obj and obj[key] is not None:
            check(key, obj[key])
            params[key] = obj[key]
    persona = _persona(obj.get("persona"), settings)
    messages, chars = _messages(obj.get("messages"), settings)
    return ChatRequest(
        messages=_with_persona(messages, persona, settings),
        model=_model(obj.get("model"), persona, settings),
        persona=persona,
        stream=stream,
        include_usage=include_usage,
        params=params,
        prompt_chars=chars,
    )


def stream_query(args: Mapping[str, str], settings: Settings) -> ChatRequest:
    """Validate the query of ``GET /v1/chat/stream`` (``prompt``, optional ``persona``)."""
    prompt = args.get("prompt", "")
    if not prompt.strip():
        raise errors.RequestError("'prompt' is required and must not be empty")
    if len(prompt) > settings.limits.max_prompt_chars:
        raise errors.RequestError(
            f"'prompt' has {len(prompt)} characters; "
            f"at most {settings.limits.max_prompt_chars} are allowed"
        )
    persona = _persona(args.get("persona") or None, settings)
    messages = [{"role": "user", "content": prompt}]
    return ChatRequest(
        messages=_with_persona(messages, persona, settings),
        model=_model(None, persona, settings),
        persona=persona,
        stream=True,
        include_usage=True,
        prompt_chars=len(prompt),
    )


def stream_start(body: bytes, settings: Settings) -> ChatRequest:
    """Validate a ``POST /v1/streams`` body: ``messages``, optional ``persona`` and ``model``,
    and the parameters the chat endpoint relays (the reply is always streamed).

    ``"pacing": "off"`` relays this one stream unpaced (the chat page's comparison view);
    a client may only switch pacing off, never on or retuned."""
    obj = parse_json(body)
    pacing = obj.pop("pacing", None)
    if pacing is not None and pacing != "off":
        raise errors.RequestError(
            "'pacing' must be \"off\" (leave it out for the server's pacing)")
    if obj.get("stream") is False:
        raise errors.RequestError("'stream' must be true here (a stream is always streamed)")
    obj.pop("stream", None)
    obj.pop("stream_options", None)
    req = chat_completion(json.dumps(obj).encode(), settings)
    return dataclasses.replace(req, stream=True, include_usage=True, pacing_off=pacing == "off")


# --- POST /v1/responses -------------------------------------------------------------------

#: Responses parameters relayed to a chat-completions upstream (renamed where needed).
RESPONSES_PASSTHROUGH: dict[str, tuple[str, Any]] = {
    "temperature": ("temperature", _number(0, 2)),
    "top_p": ("top_p", _number(0, 1)),
    "max_output_tokens": ("max_completion_tokens", _integer(1)),
    "user": ("user", _typed(str)),
    "metadata": ("metadata", _typed(dict)),
}
#: Responses parameters whose replies sseproxy cannot relay faithfully.
RESPONSES_UNSUPPORTED = frozenset({
    "tools", "tool_choice", "parallel_tool_calls", "max_tool_calls", "include",
    "previous_response_id", "conversation", "prompt", "reasoning", "text", "truncation",
    "top_logprobs", "service_tier", "prompt_cache_key", "safety_identifier",
})
RESPONSES_OWN = frozenset({"model", "input", "instructions", "stream", "stream_options",
                           "store", "background", "persona"})
_INPUT_PARTS = frozenset({"input_text", "output_text"})


@dataclass(frozen=True)
class ResponsesRequest:
    """A validated ``POST /v1/responses`` body: the chat request it becomes upstream, and
    what the response object echoes."""

    chat: ChatRequest
    stream: bool = False
    background: bool = False
    store: bool = True
    include_obfuscation: bool = True
    instructions: str | None = None
    params: dict[str, Any] = field(default_factory=dict)


def _input_text(item: dict[str, Any], where: str) -> str:
    content = item.get("content")
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise errors.RequestError(f"'{where}.content' must be a string or a list of text parts")
    texts = []
    for i, part in enumerate(content):
        kind = part.get("type") if isinstance(part, dict) else None
        if kind not in _INPUT_PARTS:
            raise errors.RequestError(
                f"'{where}.content[{i}]': {kind or 'this part'} is not supported by sseproxy "
                "(text only: input_text, output_text)")
        text = part.get("text")
        if not isinstance(text, str):
            raise errors.RequestError(f"'{where}.content[{i}].text' must be a string")
        texts.append(text)
    return "".join(texts)


def _input_messages(raw: Any) -> list[dict[str, Any]]:
    if isinstance(raw, str):
        return [{"role": "user", "content": raw}]
    if not isinstance(raw, list) or not raw:
        raise errors.RequestError("'input' must be a string or a non-empty list of messages")
    out = []
    for i, item in enumerate(raw):
        where = f"input[{i}]"
        if not isinstance(item, dict):
            raise errors.RequestError(f"'{where}' must be an object")
        kind = item.get("type", "message")
        if kind != "message":
            raise errors.RequestError(
                f"'{where}.type': {kind!r} items are not supported by sseproxy (messages only)")
        extra = set(item) - {"type", "role", "content", "id", "status"}
        if extra:
            raise errors.RequestError(f"'{where}' has unsupported keys: {', '.join(sorted(extra))}")
        role = item.get("role")
        if role not in ROLES:
            raise errors.RequestError(f"'{where}.role' must be one of {', '.join(sorted(ROLES))}")
        out.append({"role": role, "content": _input_text(item, where)})
    return out


def _flag(obj: Mapping[str, Any], key: str, default: bool, name: str | None = None) -> bool:
    value = obj.get(key)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise errors.RequestError(f"'{name or key}' must be true or false")
    return value


def responses_create(body: bytes, settings: Settings) -> ResponsesRequest:
    """Validate a ``POST /v1/responses`` body (text only; see README, "Responses API")."""
    obj = parse_json(body)
    for key in obj:
        if key in RESPONSES_UNSUPPORTED:
            raise errors.RequestError(f"'{key}' is not supported by sseproxy (text only)")
        if key not in RESPONSES_PASSTHROUGH and key not in RESPONSES_OWN:
            raise errors.RequestError(f"unknown parameter '{key}'")
    options = obj.get("stream_options")
    if options is not None and (not isinstance(options, dict)
                                or set(options) - {"include_obfuscation"}):
        raise errors.RequestError("'stream_options' supports only 'include_obfuscation'")
    obfuscation = _flag(options or {}, "include_obfuscation", True,
                        "stream_options.include_obfuscation")
    instructions = obj.get("instructions")
    if instructions is not None and not isinstance(instructions, str):
        raise errors.RequestError("'instructions' must be a string")
    upstream, echoed = {}, {}
    for key, (name, check) in RESPONSES_PASSTHROUGH.items():
        if key in obj and obj[key] is not None:
            check(key, obj[key])
            upstream[name] = echoed[key] = obj[key]
    persona = _persona(obj.get("persona"), settings)
    messages = _input_messages(obj.get("input"))
    if instructions:
        messages.insert(0, {"role": "system", "content": instructions})
    messages, chars = _messages(messages, settings)
    chat = ChatRequest(
        messages=_with_persona(messages, persona, settings),
        model=_model(obj.get("model"), persona, settings),
        persona=persona, stream=True, include_usage=True, params=upstream, prompt_chars=chars)
    background, store = _flag(obj, "background", False), _flag(obj, "store", True)
    if background and not store:
        raise errors.RequestError("'background' needs 'store': a background response is kept")
    return ResponsesRequest(
        chat=chat,
        stream=_flag(obj, "stream", False),
        background=background,
        store=store,
        include_obfuscation=obfuscation,
        instructions=instructions,
        params=echoed,
    )
