"""The local model's server process: llama.cpp's OpenAI-compatible server, adapted.

``python -m sseproxy.localserver ARGS`` runs ``python -m llama_cpp.server ARGS`` with
``--chat_format`` :data:`CHAT_FORMAT`, with its own log cut to warnings and errors, and
adapted to what sseproxy sends to and expects of any OpenAI-compatible API:

* **A chat as a transcript.** The bundled model is Gemma 3 270M *base*, not its
  instruction-tuned variant: given Gemma's turn template it echoes the prompt and loops.
  A base model continues a plain transcript well, so the messages become ``User: …`` /
  ``Assistant: …`` lines (a system message first, as a paragraph) ending in
  ``Assistant:``, and the reply ends where the model starts the next turn
  (:data:`STOPS`: ``finish_reason`` ``stop``).
* **Usage in streams.** A streamed reply ends with a usage chunk (``"choices": []`` and
  ``usage``, the shape of OpenAI's ``stream_options.include_usage``, which sseproxy always
  asks for); llama-cpp-python's server reports usage only without streaming. Prompt tokens
  are counted as llama.cpp counts them (the transcript, tokenized the same way);
  completion tokens are the pieces of text streamed, one per token except text llama.cpp
  holds back while it may still be a stop sequence.
* ``max_completion_tokens`` (OpenAI's current name, and what sseproxy sends for the
  Responses API's ``max_output_tokens``) is read as ``max_tokens``, the one name
  llama-cpp-python's server knows (it drops the other unread).

This module runs only in the model server's process (started by
:mod:`sseproxy.localmodel`); it is the one place that imports ``llama_cpp``.
"""

from __future__ import annotations

import importlib
import json
from collections.abc import Awaitable, Callable, Iterator
from typing import Any

CHAT_FORMAT = "sseproxy-transcript"
#: Where a reply ends: the model writing the next turn.
STOPS = ("\nUser:", "\nAssistant:")


def _text(content: Any) -> str:
    """A message's content: a string, or the text of its parts."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(str(p.get("text", "")) for p in content if isinstance(p, dict))
    return ""


def transcript(messages: list[dict[str, Any]]) -> str:
    """The prompt for a chat: system text first, then one line per turn, then
    ``Assistant:`` for the model to continue."""
    lines: list[str] = []
    for message in messages:
        role, text = message.get("role"), _text(message.get("content")).strip()
        if role in ("system", "developer"):
            lines.append(text + "\n")
        else:
            lines.append(f"{'Assistant' if role == 'assistant' else 'User'}: {text}")
    return "\n".join(lines) + "\nAssistant:"


def with_usage(chunks: Iterator[dict[str, Any]], prompt_tokens: int) -> Iterator[dict[str, Any]]:
    """The chunks as they come, then one with the usage (after the finish reason)."""
    completion = 0
    last: dict[str, Any] | None = None
    for chunk in chunks:
        last = chunk
        completion += sum(1 for c in chunk.get("choices") or ()
                          if (c.get("delta") or {}).get("content"))
        yield chunk
    if last is not None:
        yield {"id": last.get("id"), "object": "chat.completion.chunk",
               "created": last.get("created"), "model": last.get("model"), "choices": [],
               "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion,
                         "total_tokens": prompt_tokens + completion}}


def _handler(fmt: Any) -> Any:
    """llama.cpp's chat handler for :func:`transcript`, with usage in streams."""

    def formatter(*, messages: list[dict[str, Any]], **kwargs: Any) -> Any:
        return fmt.ChatFormatterResponse(prompt=transcript(messages), stop=list(STOPS))

    base = fmt.chat_formatter_to_chat_completion_handler(formatter)

    def handler(*, llama: Any, messages: Any, stream: bool = False, **kwargs: Any) -> Any:
        result = base(llama=llama, messages=messages, stream=stream, **kwargs)
        if not stream:
            return result
        # the prompt as the handler tokenized it (a transcript adds no special tokens)
        tokens = llama.tokenize(transcript(messages).encode("utf-8"), add_bos=True,
                                special=True)
        return with_usage(result, len(tokens))
    return handler


Message = dict[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Message, Receive, Send], Awaitable[None]]


def max_tokens(body: bytes) -> bytes:
    """A chat request with ``max_completion_tokens`` and no ``max_tokens``, renamed."""
    try:
        obj = json.loads(body)
    except ValueError:
        return body
    if not isinstance(obj, dict) or "max_completion_tokens" not in obj:
        return body
    limit = obj.pop("max_completion_tokens")
    if obj.get("max_tokens") is None:
        obj["max_tokens"] = limit
    return json.dumps(obj).encode()


class MaxCompletionTokens:
    """ASGI middleware: :func:`max_tokens` on the body of ``POST /v1/chat/completions``;
    what the client sends after the body (its disconnect) passes through unchanged."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Message, receive: Receive, send: Send) -> None:
        if scope.get("type") != "http" or scope.get("path") != "/v1/chat/completions":
            await self.app(scope, receive, send)
            return
        body = b""
        while True:
            message = await receive()
            if message.get("type") != "http.request":
                await self.app(scope, _replay(message, receive), send)
                return
            body += message.get("body", b"")
            if not message.get("more_body"):
                break
        request = {"type": "http.request", "body": max_tokens(body), "more_body": False}
        await self.app(scope, _replay(request, receive), send)


def _replay(first: Message, receive: Receive) -> Receive:
    pending = [first]

    async def replay() -> Message:
        return pending.pop() if pending else await receive()
    return replay


def main() -> None:
    fmt: Any = importlib.import_module("llama_cpp.llama_chat_format")
    fmt.register_chat_completion_handler(CHAT_FORMAT)(_handler(fmt))
    server: Any = importlib.import_module("llama_cpp.server.__main__")
    create_app = server.create_app
    server.create_app = lambda **kwargs: MaxCompletionTokens(create_app(**kwargs))
    # warnings and errors only: sseproxy logs the requests, and asks every second whether
    # the server answers
    uvicorn: Any = importlib.import_module("uvicorn")
    run = uvicorn.run
    uvicorn.run = lambda app, **kwargs: run(app, access_log=False, log_level="warning",
                                            **kwargs)
    server.main()


if __name__ == "__main__":
    main()
