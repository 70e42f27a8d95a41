"""The Responses wire format (issue 17): log events in, Responses events out, numbered so
that ``starting_after=N`` names an exact place in the log."""

from __future__ import annotations

import json
from typing import Any

import pytest

from sseproxy import sse
from sseproxy.frames import dumps
from sseproxy.responses import META, ResponsesFrames, last_sequence
from sseproxy.store import DONE, ERROR, TEXT, Event

META_OBJ = {"id": "resp_" + "a" * 32, "object": "response", "status": "in_progress",
            "model": "m", "output": []}
DONE_DATA = dumps({"finish_reason": "stop",
                   "usage": {"prompt_tokens": 3, "completion_tokens": 4, "total_tokens": 7}})
ERROR_DATA = dumps({"error": {"code": "upstream_timeout", "message": "late"}})


def log_of(texts: list[str], final: tuple[str, str]) -> list[Event]:
    events = [Event(1, META, dumps(META_OBJ))]
    events += [Event(i + 2, TEXT, t) for i, t in enumerate(texts)]
    events.append(Event(len(events) + 1, *final))
    return events


def decode(data: bytes) -> list[dict[str, Any]]:
    out = []
    for event in sse.Decoder().feed(data):
        body = json.loads(event.data)
        assert body["type"] == event.event
        out.append(body)
    return out


@pytest.mark.parametrize("final", [(DONE, DONE_DATA), (ERROR, ERROR_DATA)])
def test_a_resume_after_any_sequence_number_gives_exactly_the_events_after_it(
        final: tuple[str, str]) -> None:
    log = log_of(["Hel", "lo", " wor", "ld"], final)
    whole = decode(ResponsesFrames(obfuscate=False).events(log))
    assert [e["sequence_number"] for e in whole] == list(range(len(whole)))
    assert whole[-1]["sequence_number"] == last_sequence(log[-1].n, final[0])
    for after in range(-1, len(whole)):
        # a resume reads the log from its start, in batches of any size
        frames = ResponsesFrames(after, obfuscate=False)
        got = b"".join(frames.events(log[i:i + 2]) for i in range(0, len(log), 2))
        assert decode(got) == whole[after + 1:]


def test_the_final_response_has_the_whole_text_and_the_usage() -> None:
    events = decode(ResponsesFrames().events(log_of(["Hel", "lo"], (DONE, DONE_DATA))))
    done = events[-1]
    assert done["type"] == "response.completed"
    assert done["response"]["output"][0]["content"][0]["text"] == "Hello"
    assert done["response"]["usage"]["input_tokens"] == 3
    assert done["response"]["usage"]["output_tokens"] == 4
    assert done["response"]["usage"]["total_tokens"] == 7
    deltas = [e for e in events if e["type"] == "response.output_text.delta"]
    # obfuscation pads every delta to a multiple of 16 bytes
    assert all((len(e["delta"]) + len(e["obfuscation"])) % 16 == 0 for e in deltas)


def test_a_reply_cut_by_length_is_incomplete() -> None:
    cut = dumps({"finish_reason": "length", "usage": None})
    events = decode(ResponsesFrames().events(log_of(["a"], (DONE, cut))))
    assert events[-1]["type"] == "response.incomplete"
    assert events[-1]["response"]["incomplete_details"] == {"reason": "max_output_tokens"}
    assert events[-1]["response"]["output"][0]["status"] == "incomplete"
