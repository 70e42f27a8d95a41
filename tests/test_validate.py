"""Request validation: bad input never reaches the upstream (issue 2, point 4)."""

from __future__ import annotations

import json
from typing import Any

import pytest

from sseproxy import config, errors, validate

SETTINGS = config.Settings(
    limits=config.LimitsSettings(max_messages=3, max_prompt_chars=50),
    personas={"pirate": config.Persona("Arr.", model="gpt-pirate"),
              "plain": config.Persona("Be plain.")},
)


def body(**fields: Any) -> bytes:
    fields.setdefault("messages", [{"role": "user", "content": "hi"}])
    return json.dumps(fields).encode()


def test_minimal_request() -> None:
    req = validate.chat_completion(body(), SETTINGS)
    assert req.messages == [{"role": "user", "content": "hi"}]
    assert req.model == SETTINGS.upstream.model
    assert req.stream is False and req.include_usage is False
    assert req.upstream_body() == {"model": req.model, "messages": req.messages}


def test_passthrough_parameters_and_stream_options() -> None:
    req = validate.chat_completion(
        body(model="m", stream=True, stream_options={"include_usage": True}, temperature=0.5,
             max_tokens=10, stop=["\n"], seed=3, n=1),
        SETTINGS,
    )
    assert req.stream and req.include_usage
    assert req.upstream_body() == {
        "model": "m", "messages": req.messages, "temperature": 0.5, "max_tokens": 10,
        "stop": ["\n"], "seed": 3,
    }


def test_persona_adds_its_system_prompt_and_model() -> None:
    req = validate.chat_completion(body(persona="pirate"), SETTINGS)
    assert req.messages[0] == {"role": "system", "content": "Arr."}
    assert req.model == "gpt-pirate"
    assert validate.chat_completion(body(persona="plain"), SETTINGS).model == "gpt-4o-mini"
    # an explicit model wins over the persona's
    assert validate.chat_completion(body(persona="pirate", model="x"), SETTINGS).model == "x"


def test_escaped_surrogate_pairs_and_big_integers_are_fine() -> None:
    req = validate.chat_completion(
        b'{"messages": [{"role": "user", "content": "\\ud83d\\ude00"}], "seed": 1'
        + b"0" * 30 + b"}", SETTINGS)
    assert req.messages[0]["content"] == "\U0001f600"


def test_text_parts_count_towards_the_limit() -> None:
    parts = [{"type": "text", "text": "a" * 30}, {"type": "text", "text": "b" * 30}]
    with pytest.raises(errors.RequestError, match="60 characters; at most 50"):
        validate.chat_completion(body(messages=[{"role": "user", "content": parts}]), SETTINGS)


@pytest.mark.parametrize(
    "raw, needle",
    [
        (b"", "empty"),
        (b"{not json", "not valid JSON"),
        # Python's json reads these, JSON has no such numbers: never forwarded upstream
        (b'{"messages": [{"role": "user", "content": "x"}], "logit_bias": {"1": NaN}}',
         "not valid JSON: NaN"),
        (b'{"messages": [{"role": "user", "content": "x"}], "top_p": -Infinity}',
         "not valid JSON: -Infinity"),
        (b'{"messages": [{"role": "user", "content": "x"}], "logit_bias": {"1": 1e999}}',
         "not valid JSON: the number 1e999 is out of range"),
        (b'{"messages": [{"role": "user", "content": "x\\ud800"}]}', "lone surrogate"),
        (b'{"messages": [{"role": "user", "content": "x"}], "user": "\\uDC00y"}',
         "lone surrogate"),
        (b"\xff\xfe", "not"),
        # issue 13 point 7: a UTF-8-encoded surrogate was read (and then crashed into a 500)
        (b'{"messages": [{"role": "user", "content": "x\xed\xa0\x80"}]}', "not UTF-8"),
        (b'{"messages": [{"role": "user", "content": "\xc3"}]}', "not UTF-8"),
        (b"[1, 2]", "JSON object"),
        (body(messages=[]), "'messages' must be a non-empty list"),
        (body(messages="hi"), "'messages' must be a non-empty list"),
        (body(messages=[{"role": "user", "content": "x"}] * 4), "at most 3"),
        (body(messages=[{"role": "robot", "content": "x"}]), "'messages[0].role'"),
        (body(messages=[{"role": "user"}]), "'messages[0].content'"),
        (body(messages=[{"role": "user", "content": 5}]), "'messages[0].content'"),
        (body(messages=[{"role": "user", "content": "x", "tool_calls": []}]), "tool_calls"),
        (body(messages=[{"role": "user", "content": [{"type": "image_url"}]}]), "text parts"),
        (body(messages=[{"role": "user", "content": "x" * 51}]), "at most 50"),
        (body(stream="yes"), "'stream' must be true or false"),
        (body(n=2), "'n' must be 1"),
        (body(tools=[]), "'tools' is not supported"),
        (body(frobnicate=1), "unknown parameter 'frobnicate'"),
        (body(temperature=3), "'temperature' must be between 0 and 2"),
        (body(temperature="hot"), "'temperature' must be a number"),
        (b'{"messages": [{"role": "user", "content": "x"}], "temperature": 1' + b"0" * 400 + b"}",
         "'temperature' must be between 0 and 2"),
        (body(max_tokens=0), "'max_tokens' must be an integer"),
        (body(max_tokens=True), "'max_tokens' must be an integer"),
        (body(stop=["a"] * 5), "'stop'"),
        (body(user=5), "'user' must be of type str"),
        (body(model=""), "'model'"),
        (body(stream_options={"include_usage": "y"}), "include_usage"),
        (body(stream_options={"other": 1}), "'stream_options'"),
    ],
)
def test_invalid_bodies_are_400_with_a_message_naming_the_problem(raw: bytes, needle: str) -> None:
    with pytest.raises(errors.RequestError) as info:
        validate.chat_completion(raw, SETTINGS)
    assert info.value.http_status() == 400
    assert needle in info.value.message


def test_unknown_persona_names_the_valid_ones() -> None:
    with pytest.raises(errors.UnknownPersona) as info:
        validate.chat_completion(body(persona="ninja"), SETTINGS)
    assert info.value.http_status() == 400
    assert info.value.error_code() == "unknown_persona"
    assert "pirate, plain" in info.value.message


def test_stream_query() -> None:
    req = validate.stream_query({"prompt": "hello", "persona": "pirate"}, SETTINGS)
    assert req.messages == [{"role": "system", "content": "Arr."},
                            {"role": "user", "content": "hello"}]
    assert req.stream and req.include_usage and req.model == "gpt-pirate"


@pytest.mark.parametrize(
    "args, needle",
    [({}, "'prompt' is required"), ({"prompt": "  "}, "'prompt' is required"),
     ({"prompt": "x" * 51}, "at most 50"), ({"prompt": "x", "persona": "ninja"}, "ninja")],
)
def test_invalid_stream_queries(args: dict[str, str], needle: str) -> None:
    with pytest.raises(errors.RequestError, match=needle):
        validate.stream_query(args, SETTINGS)


# Issue 15: the chat page's comparison view asks for one stream without pacing.
def test_stream_start_may_switch_pacing_off_and_nothing_else() -> None:
    assert validate.stream_start(body(), SETTINGS).pacing_off is False
    req = validate.stream_start(body(pacing="off"), SETTINGS)
    assert req.pacing_off is True
    assert "pacing" not in req.upstream_body()
    for bad in ("smooth", "", True, 0):
        with pytest.raises(errors.RequestError, match="'pacing' must be \"off\""):
            validate.stream_start(body(pacing=bad), SETTINGS)
    with pytest.raises(errors.RequestError):  # the OpenAI endpoint has no such parameter
        validate.chat_completion(body(pacing="off"), SETTINGS)
