"""Request validation under arbitrary JSON (issue 18, point 6): every body either passes or
is a 400 (413 for size) with an OpenAI-shaped error; nothing else escapes."""

from __future__ import annotations

import json
from typing import Any

from hypothesis import given, settings, strategies as st

from sseproxy import config, errors, validate

SETTINGS = config.Settings(
    limits=config.LimitsSettings(max_messages=4, max_prompt_chars=200),
    personas={"pirate": config.Persona("Arr.", model="gpt-pirate")},
)

scalars = st.one_of(st.none(), st.booleans(), st.integers(), st.floats(allow_nan=False),
                    st.text(max_size=8))
json_values = st.recursive(scalars, lambda inner: st.one_of(
    st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=8), inner, max_size=4)),
    max_leaves=5)
KEYS = ["model", "messages", "stream", "stream_options", "n", "persona", "temperature",
        "top_p", "max_tokens", "stop", "seed", "user", "tools", "input", "background",
        "instructions", "pacing", "logit_bias", "prompt"]
message = st.fixed_dictionaries({"role": st.sampled_from(["user", "system", "assistant",
                                                          "tool", "x"])},
                                optional={"content": st.one_of(json_values, st.text())})
near_valid = st.fixed_dictionaries(
    {"messages": st.one_of(st.lists(message, max_size=5), json_values)},
    optional={k: json_values for k in KEYS if k != "messages"})
bodies = st.one_of(
    near_valid.map(lambda v: json.dumps(v).encode()),
    st.dictionaries(st.sampled_from(KEYS), json_values, max_size=6).map(
        lambda v: json.dumps(v).encode()),
    json_values.map(lambda v: json.dumps(v).encode()),
    st.binary(max_size=64),
)


def check(call: Any, body: bytes) -> None:
    try:
        call(body, SETTINGS)
    except errors.SSEProxyError as exc:
        assert exc.http_status() in (400, 404, 413), exc
        shaped = exc.to_body()["error"]
        assert set(shaped) >= {"type", "code", "message"}
        assert isinstance(shaped["message"], str) and shaped["message"]
        json.dumps(exc.to_body())  # it can be sent


@settings(max_examples=800)
@given(bodies)
def test_any_chat_completion_body_passes_or_is_an_openai_shaped_client_error(
        body: bytes) -> None:
    check(validate.chat_completion, body)


@settings(max_examples=600)
@given(bodies)
def test_any_stream_start_body_passes_or_is_an_openai_shaped_client_error(body: bytes) -> None:
    check(validate.stream_start, body)


@settings(max_examples=600)
@given(bodies)
def test_any_responses_body_passes_or_is_an_openai_shaped_client_error(body: bytes) -> None:
    check(validate.responses_create, body)
