"""Wire formats of both endpoints, byte for byte (issue 2, point 4)."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import pytest

from sseproxy import errors, frames
from sseproxy.frames import EventSourceFrames, OpenAIFrames
from sseproxy.upstream import Delta


def test_eventsource_frames_number_every_event_without_gaps() -> None:
    f = EventSourceFrames("abc", retry_ms=2500)
    assert f.opening() == b"retry: 2500\n\n"
    assert f.delta(Delta(role="assistant")) == b""  # nothing to show, no id used
    assert f.delta(Delta("Hi")) == b'id: abc.1\ndata: {"content":"Hi"}\n\n'
    assert f.delta(Delta("línea\nnueva 你好")) == (
        'id: abc.2\ndata: {"content":"línea\\nnueva 你好"}\n\n'.encode())
    assert f.end("stop", {"total_tokens": 3}) == (
        b'id: abc.3\nevent: done\ndata: {"finish_reason":"stop","usage":{"total_tokens":3}}\n\n')
    assert f.last_n == 3
    assert f.heartbeat == b": ping\n\n"


def test_eventsource_error_event_carries_code_message_and_retry_hint() -> None:
    f = EventSourceFrames("s", retry_ms=1)
    frame = f.error(errors.IdleTimeout("the upstream sent nothing for 5 s mid-reply"))
    head, data = frame.decode().split("data: ")
    assert head == "id: s.1\nevent: error\n"
    assert json.loads(data) == {"error": {
        "type": "upstream_error", "code": "upstream_timeout",
        "message": "the upstream sent nothing for 5 s mid-reply", "retryable": True}}


def test_openai_chunks() -> None:
    reported: str | None = None
    f = OpenAIFrames("chatcmpl-x", 1700000000, "m-1", include_usage=False,
                     reported=lambda: reported)
    assert json.loads(f.delta(Delta("a"))[6:])["model"] == "m-1"  # asked for, until reported
    first = f.delta(Delta("", role="assistant"))
    assert first.startswith(b"data: ") and first.endswith(b"\n\n")
    assert json.loads(first[6:]) == {
        "id": "chatcmpl-x", "object": "chat.completion.chunk", "created": 1700000000,
        "model": "m-1", "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""},
                                     "finish_reason": None}]}
    reported = "m-2"  # the model the upstream reported, once known
    assert json.loads(f.delta(Delta("a"))[6:])["model"] == "m-2"
    assert json.loads(f.text("b")[6:])["model"] == "m-2"
    end = f.end("stop", {"total_tokens": 1}).split(b"\n\n")
    assert json.loads(end[0][6:])["choices"] == [{"index": 0, "delta": {}, "finish_reason": "stop"}]
    assert end[1:] == [b"data: [DONE]", b""]


def test_openai_usage_chunk_when_asked() -> None:
    f = OpenAIFrames("c", 1, "m", include_usage=True)
    assert json.loads(f.delta(Delta("a"))[6:])["usage"] is None
    frames = f.end("length", {"prompt_tokens": 2}).split(b"\n\n")
    usage = json.loads(frames[1][6:])
    assert usage["choices"] == [] and usage["usage"] == {"prompt_tokens": 2}
    assert frames[2] == b"data: [DONE]"


def test_openai_error_frame_is_the_openai_error_object() -> None:
    f = OpenAIFrames("c", 1, "m", include_usage=False)
    frame = f.error(errors.UpstreamStreamError("busy", upstream_code="overloaded"))
    assert json.loads(frame[6:]) == {"error": {"type": "upstream_error", "code": "overloaded",
                                               "message": "busy"}}
    assert b"[DONE]" not in frame


# --- long bodies (issue 13: no step holds the event loop long, whatever the reply's size) ---


@pytest.mark.parametrize("obj, slices", [
    ({"id": "c", "n": 1, "x": None, "ok": True, "f": 1.5, "list": [1, "a", {"b": []}]}, 0),
    # two strings of 200,000 and 210,000 characters: 4 slices of 65,536 each
    ({"content": "x" * 200_000, "more": ["\u4f60\u597d\"\\\n\x00" * 30_000, "short"]}, 8),
])
async def test_dumps_in_slices_is_dumps_and_lets_the_loop_run_between_slices(
    obj: dict[str, Any], slices: int,
) -> None:
    ran = 0

    async def neighbour() -> None:
        nonlocal ran
        while True:
            ran += 1
            await asyncio.sleep(0)

    other = asyncio.create_task(neighbour())
    await asyncio.sleep(0)
    before = ran
    try:
        body = await frames.dumps_in_slices(obj)
    finally:
        other.cancel()
    assert body == frames.dumps(obj).encode()
    assert ran - before >= slices - 1  # the neighbour ran between every two slices
