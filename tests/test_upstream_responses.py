"""The pure decoding of a Responses upstream (issue 17): request translation, events → deltas."""

from __future__ import annotations

import json
from typing import Any

import pytest

from sseproxy import errors
from sseproxy.delta import Delta
from sseproxy.upstream_responses import PART, RELAYED, ResponsesDecoder, request_body

WHERE = {"item_id": "msg_1", "output_index": 0, "content_index": 0}
USAGE = {"input_tokens": 3, "output_tokens": 2, "total_tokens": 5,
         "input_tokens_details": {"cached_tokens": 1},
         "output_tokens_details": {"reasoning_tokens": 0}}
CHAT_USAGE = {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5,
              "prompt_tokens_details": {"cached_tokens": 1},
              "completion_tokens_details": {"reasoning_tokens": 0}}


def ev(kind: str, **fields: Any) -> str:
    return json.dumps({"type": kind, **fields})


@pytest.mark.parametrize("data, delta", [
    (ev("response.created", response={"model": "m"}), None),
    (ev("response.output_item.added", item={"type": "message", "role": "assistant"}),
     Delta(role="assistant")),
    (ev("response.output_text.delta", delta="Hi", **WHERE), Delta("Hi", role="assistant")),
    (ev("response.future.thing", x=1), None),
    (ev("response.completed", response={"usage": USAGE}),
     Delta(finish_reason="stop", usage=CHAT_USAGE)),
    (ev("response.incomplete", response={"incomplete_details": {"reason": "max_output_tokens"}}),
     Delta(finish_reason="length")),
    (ev("response.incomplete", response={"incomplete_details": {"reason": "content_filter"}}),
     Delta(finish_reason="content_filter")),
])
def test_each_event_becomes_the_delta_a_chat_upstream_would_give(data: str,
                                                                 delta: Delta | None) -> None:
    assert ResponsesDecoder().decode("message", data) == delta


@pytest.mark.parametrize("data, code", [
    (ev("response.failed", response={"error": {"code": "server_error", "message": "x"}}),
     "server_error"),
    (ev("error", code="overloaded", message="busy"), "overloaded"),
])
def test_a_failure_raises_at_once_or_after_it_was_relayed(data: str, code: str) -> None:
    with pytest.raises(errors.UpstreamStreamError) as raised:
        ResponsesDecoder().decode("message", data)
    assert raised.value.error_code() == code
    relaying = ResponsesDecoder(relay=True)
    assert relaying.decode("message", data) == Delta(event=(RELAYED, data))
    assert relaying.done and relaying.failure is not None
    assert relaying.failure.error_code() == code


def test_relayed_text_names_its_part_only_when_the_part_changes() -> None:
    decoder = ResponsesDecoder(relay=True)
    first = decoder.decode("message", ev("response.output_text.delta", delta="a", **WHERE))
    second = decoder.decode("message", ev("response.output_text.delta", delta="b", **WHERE))
    other = dict(WHERE, content_index=1)
    third = decoder.decode("message", ev("response.output_text.delta", delta="c", **other))
    assert first == Delta("a", role="assistant", event=(PART, json.dumps(
        WHERE, separators=(",", ":"))))
    assert second == Delta("b")
    assert third is not None and third.event is not None and third.event[0] == PART


@pytest.mark.parametrize("data", ["{not json", "[1]", json.dumps({"no": "type"}),
                                  ev("response.output_text.delta", delta=5)])
def test_what_is_not_a_responses_event_is_a_malformed_frame(data: str) -> None:
    with pytest.raises(errors.MalformedFrame):
        ResponsesDecoder().decode("message", data)


def test_an_event_named_only_by_its_event_field_gets_that_type() -> None:
    delta = ResponsesDecoder(relay=True).decode("response.x", "{}")
    assert delta == Delta(event=(RELAYED, '{"type":"response.x"}'))


def test_the_chat_request_becomes_a_responses_request() -> None:
    chat = {"model": "m", "messages": [
        {"role": "system", "content": "persona"}, {"role": "developer", "content": "be brief"},
        {"role": "user", "content": [{"type": "text", "text": "hi"}]},
        {"role": "assistant", "content": "hello"}, {"role": "user", "content": "again"}],
        "temperature": 0.5, "top_p": 0.9, "max_tokens": 9, "max_completion_tokens": 7,
        "user": "u", "metadata": {"k": "v"}, "reasoning_effort": "low",
        "response_format": {"type": "json_schema", "json_schema": {"name": "n", "schema": {}}}}
    assert request_body(chat) == {
        "model": "m", "instructions": "persona\n\nbe brief",
        "input": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"},
                  {"role": "user", "content": "again"}],
        "stream": True, "store": False, "temperature": 0.5, "top_p": 0.9, "user": "u",
        "metadata": {"k": "v"}, "max_output_tokens": 7, "reasoning": {"effort": "low"},
        "text": {"format": {"type": "json_schema", "name": "n", "schema": {}}}}


@pytest.mark.parametrize("key", ["stop", "seed", "presence_penalty", "frequency_penalty",
                                 "logit_bias"])
def test_a_chat_parameter_without_a_responses_equivalent_is_refused(key: str) -> None:
    with pytest.raises(errors.RequestError, match=key):
        request_body({"model": "m", "messages": [], key: 1})
