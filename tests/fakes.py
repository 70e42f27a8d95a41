"""Fakes for unit tests: an upstream served by httpx's MockTransport (no network)."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Callable, Sequence
from typing import Any

import httpx

from sseproxy import config
from sseproxy.upstream import UpstreamClient

URL = "http://upstream.test/v1"
SSE = {"Content-Type": "text/event-stream"}


def chunk(content: str | None = None, *, role: str | None = None,
          finish: str | None = None, usage: dict[str, int] | None = None,
          choices: bool = True) -> bytes:
    delta: dict[str, Any] = {}
    if role:
        delta["role"] = role
    if content is not None:
        delta["content"] = content
    obj: dict[str, Any] = {"id": "c", "object": "chat.completion.chunk", "model": "up-model",
                           "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]
                           if choices else []}
    if usage is not None:
        obj["usage"] = usage
    return b"data: " + json.dumps(obj).encode() + b"\n\n"


GOOD = [chunk("", role="assistant"), chunk("Hel"), chunk("lo"), chunk(finish="stop"),
        chunk(usage={"prompt_tokens": 1, "completion_tokens": 2, "total_tokens": 3},
              choices=False),
        b"data: [DONE]\n\n"]


class Body(httpx.AsyncByteStream):
    """A response body that yields parts, sleeping where a part is a float, and notes closing."""

    def __init__(self, parts: Sequence[bytes | float | Exception]) -> None:
        self.parts = parts
        self.closed = False

    async def __aiter__(self) -> AsyncIterator[bytes]:
        for part in self.parts:
            if isinstance(part, float):
                await asyncio.sleep(part)
            elif isinstance(part, Exception):
                raise part
            else:
                yield part

    async def aclose(self) -> None:
        self.closed = True


def client(handler: Callable[[httpx.Request], Any], api_key: str | None = None,
           **upstream: Any) -> UpstreamClient:
    settings = config.Settings(upstream=config.UpstreamSettings(kind="openai", base_url=URL,
                                                                **upstream))
    # the real client, a fake network
    return UpstreamClient(settings, httpx.MockTransport(handler), api_key=api_key)


def responder(status: int = 200, parts: Sequence[bytes | float | Exception] | None = None,
              headers: dict[str, str] | None = None) -> tuple[Callable[..., Any], Body]:
    body = Body(GOOD if parts is None else parts)
    all_headers = {"Content-Type": "text/event-stream", **(headers or {})}

    async def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(status, headers=all_headers, stream=body)
    return handler, body
