"""The OpenAI-compatible simulator: wire shape, every knob, the stats endpoint, the command line.

End-to-end tests run a real server on 127.0.0.1 and check order and overlap, never speed.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import re
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

import httpx
import openai
import pytest
import regex  # type: ignore[import-untyped]  # regex ships no type hints
from hypothesis import given
from hypothesis import strategies as st
from servers import simulator

from sseproxy import mockupstream
from sseproxy.mockupstream import TEXT_KINDS, Scenario, make_tokens

USER = [{"role": "user", "content": "Say something."}]


@asynccontextmanager
async def serving(
    defaults: Scenario = Scenario(rate=0), **app_settings: Any
) -> AsyncIterator[httpx.AsyncClient]:
    """A running simulator (in its own thread) and a client whose base URL points at it."""
    async with simulator(defaults, **app_settings) as url:
        async with httpx.AsyncClient(base_url=url, timeout=5) as c:
            yield c


def chat(model: str, stream: bool = True, usage: bool = False, messages: Any = None) -> Any:
    body: dict[str, Any] = {"model": model, "messages": messages or USER}
    if stream:
        body["stream"] = True
    if usage:
        body["stream_options"] = {"include_usage": True}
    return body


def payloads(body: bytes) -> list[str]:
    """The data of each ``data: ...\\n\\n`` frame (the simulator sends nothing else)."""
    text = body.decode("utf-8")
    *frames, rest = text.split("\n\n")
    assert rest == "", f"body does not end with a blank line: {text[-80:]!r}"
    for frame in frames:
        assert frame.startswith("data: ") and "\n" not in frame, frame
    return [frame.removeprefix("data: ") for frame in frames]


def contents(body: bytes) -> list[str]:
    """The content of every token chunk (not the role chunk) in a stream body."""
    out = []
    for data in payloads(body):
        if data == "[DONE]" or data.startswith("{not json"):
            continue
        chunk = json.loads(data)
        for choice in chunk.get("choices", []):
            delta = choice["delta"]
            if "content" in delta and "role" not in delta:
                out.append(delta["content"])
    return out


async def timed_chunks(response: httpx.Response) -> list[tuple[float, bytes]]:
    return [(time.monotonic(), chunk) async for chunk in response.aiter_raw()]


async def stats_until(
    client: httpx.AsyncClient, done: Callable[[dict[str, int]], bool], timeout: float = 2.0
) -> dict[str, int]:
    deadline = time.monotonic() + timeout
    while True:
        stats: dict[str, int] = (await client.get("/mock/stats")).json()
        if done(stats) or time.monotonic() > deadline:
            return stats
        await asyncio.sleep(0.01)


def stats(requests: int = 1, open: int = 0, completed: int = 0, cancelled: int = 0,
          errors: int = 0) -> dict[str, int]:
    return {"requests": requests, "open": open, "completed": completed,
            "cancelled": cancelled, "errors": errors}


# --- Scenario and model strings ---------------------------------------------------------------


def test_model_string_overrides_the_defaults() -> None:
    defaults = Scenario(tokens=7, rate=5.0, text="cjk")
    parsed = Scenario.parse("mock?tokens=20&rate=50&stall_at=3&stall_s=2&no_done", defaults)
    assert parsed == Scenario(tokens=20, rate=50.0, text="cjk", stall_at=3, stall_s=2.0,
                              no_done=True)
    assert Scenario.parse("mock?error_message=try+again%21&no_done=off", defaults) == Scenario(
        tokens=7, rate=5.0, text="cjk", error_message="try again!")


@pytest.mark.parametrize("model", ["gpt-4o-mini", "mock", "mock?", "anything?&&"])
def test_model_without_knobs_uses_the_defaults(model: str) -> None:
    defaults = Scenario(tokens=3)
    assert Scenario.parse(model, defaults) is defaults


@pytest.mark.parametrize(
    ("model", "named", "allowed"),
    [
        ("mock?speed=3", "'speed'", "known knobs: tokens, rate"),
        ("mock?tokens=many", "'tokens'", "an integer from 0"),
        ("mock?tokens=1.5", "'tokens'", "an integer from 0"),
        ("mock?tokens=-1", "'tokens'", "an integer from 0"),
        ("mock?rate=-2", "'rate'", "a number >= 0"),
        ("mock?rate=nan", "'rate'", "a number >= 0"),
        ("mock?stall_s=inf", "'stall_s'", "seconds >= 0"),
        ("mock?text=klingon", "'text'", "one of lorem, cjk, emoji, mixed, echo"),
        ("mock?error_status=200", "'error_status'", "from 400 to 599"),
        ("mock?drop_at=-3", "'drop_at'", "or -1 for never"),
        ("mock?no_done=maybe", "'no_done'", "true or false"),
        ("mock?tokens", "'tokens'", "needs a value"),
        ("mock?tokens=1&tokens=2", "'tokens'", "given twice"),
    ],
)
def test_bad_knobs_are_errors_naming_the_knob(model: str, named: str, allowed: str) -> None:
    with pytest.raises(ValueError) as info:
        Scenario.parse(model, Scenario())
    assert named in str(info.value) and allowed in str(info.value)


def test_scenario_checks_its_fields() -> None:
    assert Scenario(rate=5).rate == 5.0 and isinstance(Scenario(rate=5).rate, float)
    bad_fields: list[dict[str, Any]] = [
        {"tokens": -1}, {"text": "x"}, {"burst": -1}, {"tokens": True}, {"seed": 1.5}]
    for bad in bad_fields:
        with pytest.raises(ValueError):
            Scenario(**bad)


def test_to_model_names_only_what_differs_from_the_dataclass_defaults() -> None:
    assert Scenario().to_model() == "mock"
    assert Scenario(tokens=20, rate=50, no_done=True).to_model() == (
        "mock?tokens=20&rate=50&no_done=true")
    assert Scenario(error_message="a&b=c +d").to_model() == "mock?error_message=a%26b%3Dc%20%2Bd"


scenarios = st.builds(
    Scenario,
    tokens=st.integers(0, mockupstream.MAX_TOKENS),
    rate=st.floats(0, 1e9),
    text=st.sampled_from(TEXT_KINDS),
    burst=st.integers(0, 1 << 20),
    stall_at=st.integers(-1, 100),
    stall_s=st.floats(0, 1e6),
    first_delay_s=st.floats(0, 1e6),
    header_delay_s=st.floats(0, 1e6),
    error_status=st.sampled_from([0, 400, 429, 500, 503, 599]),
    error_code=st.text(),
    error_message=st.text(),
    retry_after=st.integers(0, 1000),
    error_at=st.integers(-1, 100),
    drop_at=st.integers(-1, 100),
    no_done=st.booleans(),
    malformed_at=st.integers(-1, 100),
    seed=st.integers(-(1 << 70), 1 << 70),
    stamp=st.booleans(),
)


@given(scenarios)
def test_to_model_and_parse_round_trip(scenario: Scenario) -> None:
    assert Scenario.parse(scenario.to_model(), Scenario()) == scenario


# --- Text ------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["lorem", "cjk", "emoji", "mixed"])
def test_text_is_deterministic_per_seed_and_shorter_is_a_prefix(kind: str) -> None:
    long = make_tokens(Scenario(text=kind, tokens=300, seed=7))
    assert len(long) == 300
    assert make_tokens(Scenario(text=kind, tokens=300, seed=7)) == long
    assert make_tokens(Scenario(text=kind, tokens=50, seed=7)) == long[:50]
    assert make_tokens(Scenario(text=kind, tokens=300, seed=8)) != long
    assert all(tok for tok in long)


def test_lorem_tokens_are_words_with_their_trailing_space() -> None:
    tokens = make_tokens(Scenario(tokens=200))
    assert all(re.fullmatch(r"\S+ ", tok) for tok in tokens)
    text = "".join(tokens)
    assert text[0].isupper() and re.search(r"[a-z]+[.!] [A-Z]", text)


def test_cjk_tokens_are_single_characters_including_one_outside_the_bmp() -> None:
    tokens = make_tokens(Scenario(text="cjk", tokens=2000))
    assert all(len(tok) == 1 for tok in tokens)
    assert "𠮷" in tokens and "。" in tokens
    assert any("\u4e00" <= tok <= "\u9fff" for tok in tokens)
    assert any("\u3040" <= tok <= "\u30ff" for tok in tokens)


def test_emoji_tokens_are_whole_grapheme_clusters_of_every_kind() -> None:
    tokens = make_tokens(Scenario(text="emoji", tokens=1000))
    assert regex.findall(r"\X", "".join(tokens)) == tokens
    assert all(len(regex.findall(r"\X", tok)) == 1 for tok in tokens)
    assert any("\u200d" in tok for tok in tokens)  # ZWJ sequence
    assert any(len(tok) == 2 and all("\U0001f1e6" <= c <= "\U0001f1ff" for c in tok)
               for tok in tokens)  # flag
    assert any(any("\U0001f3fb" <= c <= "\U0001f3ff" for c in tok) for tok in tokens)  # skin
    assert any("\u0300" <= tok[-1] <= "\u036f" for tok in tokens)  # combining mark


def test_mixed_tokens_mix_words_cjk_and_emoji() -> None:
    text = "".join(make_tokens(Scenario(text="mixed", tokens=300)))
    assert re.search(r"[a-z]+ ", text)
    assert re.search(r"[\u4e00-\u9fff]", text)
    assert "\u200d" in text or re.search(r"[\U0001f300-\U0001faff]", text)


@pytest.mark.parametrize(
    ("prompt", "tokens", "expected"),
    [
        ("Hello wide world", 2, ["Hello ", "wide "]),
        ("Hello wide world", 7, ["Hello ", "wide ", "world ", "Hello ", "wide ", "world ",
                                 "Hello "]),
        ("Hello wide world", 3, ["Hello ", "wide ", "world"]),
        ("  spaced\tout\n", 3, ["  ", "spaced\t", "out\n"]),
        ("日本語 ok", 5, ["日", "本", "語 ", "ok ", "日"]),
        ("", 5, []),
    ],
)
def test_echo_repeats_or_cuts_the_prompt(prompt: str, tokens: int, expected: list[str]) -> None:
    assert make_tokens(Scenario(text="echo", tokens=tokens), prompt) == expected


# --- The stream ------------------------------------------------------------------------------


async def test_stream_has_exactly_openai_chunk_shape_with_usage(io_loop: Any) -> None:
    scenario = Scenario(tokens=5, rate=0, seed=3)
    async with serving() as client:
        started = time.time()
        response = await client.post("/v1/chat/completions",
                                     json=chat(scenario.to_model(), usage=True))
    assert response.status_code == 200
    assert response.headers["content-type"] == "text/event-stream"
    assert response.headers["cache-control"] == "no-cache"
    assert "content-length" not in response.headers
    datas = payloads(response.content)
    assert datas[-1] == "[DONE]"
    chunks = [json.loads(d) for d in datas[:-1]]
    first = chunks[0]
    assert re.fullmatch(r"chatcmpl-mock-\d+", first["id"])
    assert abs(first["created"] - started) < 5

    def chunk(delta: dict[str, str], finish: str | None = None) -> dict[str, Any]:
        return {"id": first["id"], "object": "chat.completion.chunk",
                "created": first["created"], "model": "mock?tokens=5&rate=0&seed=3",
                "choices": [{"index": 0, "delta": delta, "finish_reason": finish}],
                "usage": None}

    tokens = make_tokens(scenario)
    assert chunks == [
        chunk({"role": "assistant", "content": ""}),
        *[chunk({"content": tok}) for tok in tokens],
        chunk({}, "stop"),
        {"id": first["id"], "object": "chat.completion.chunk", "created": first["created"],
         "model": "mock?tokens=5&rate=0&seed=3", "choices": [],
         "usage": {"prompt_tokens": 2, "completion_tokens": 5, "total_tokens": 7}},
    ]


async def test_stream_without_include_usage_has_no_usage_anywhere(io_loop: Any) -> None:
    async with serving(Scenario(tokens=4, rate=0, text="cjk")) as client:
        response = await client.post("/v1/chat/completions", json=chat("gpt-4o-mini"))
    datas = payloads(response.content)
    assert datas[-1] == "[DONE]"
    chunks = [json.loads(d) for d in datas[:-1]]
    assert len(chunks) == 1 + 4 + 1
    assert all("usage" not in c and c["model"] == "gpt-4o-mini" for c in chunks)
    assert chunks[-1]["choices"] == [{"index": 0, "delta": {}, "finish_reason": "stop"}]
    assert contents(response.content) == make_tokens(Scenario(tokens=4, text="cjk"))


async def test_stream_false_is_one_completion_body(io_loop: Any) -> None:
    async with serving() as client:
        response = await client.post(
            "/v1/chat/completions", json=chat("mock?tokens=6&text=emoji", stream=False))
    assert response.status_code == 200
    assert response.headers["content-type"] == "application/json"
    body = response.json()
    assert re.fullmatch(r"chatcmpl-mock-\d+", body.pop("id"))
    assert isinstance(body.pop("created"), int)
    assert body == {
        "object": "chat.completion", "model": "mock?tokens=6&text=emoji",
        "choices": [{"index": 0, "finish_reason": "stop", "message": {
            "role": "assistant",
            "content": "".join(make_tokens(Scenario(tokens=6, text="emoji")))}}],
        "usage": {"prompt_tokens": 2, "completion_tokens": 6, "total_tokens": 8},
    }


async def test_echo_and_seed_over_the_wire(io_loop: Any) -> None:
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "first question"},
        {"role": "assistant", "content": "first answer"},
        {"role": "user", "content": [{"type": "text", "text": "Hello wide world"}]},
    ]
    async with serving() as client:
        echo = await client.post("/v1/chat/completions",
                                 json=chat("mock?text=echo&tokens=5", messages=messages))
        emoji = [await client.post("/v1/chat/completions",
                                   json=chat(f"mock?text=emoji&tokens=30&seed={seed}"))
                 for seed in (1, 1, 2)]
    assert "".join(contents(echo.content)) == "Hello wide world Hello wide "
    texts = ["".join(contents(r.content)) for r in emoji]
    assert texts[0] == texts[1] != texts[2]
    assert texts[0] == "".join(make_tokens(Scenario(text="emoji", tokens=30, seed=1)))


@pytest.mark.parametrize(
    ("body", "code", "message"),
    [
        (b"{not json", "invalid_json", "could not parse the JSON body"),
        (b"[1, 2]", "invalid_type", "must be a JSON object"),
        (b'{"model": "mock"}', "missing_required_parameter", "'messages'"),
        (b'{"messages": [{"role": "user", "content": "x"}]}', "missing_required_parameter",
         "'model'"),
        (b'{"model": "mock", "messages": []}', "empty_array", "'messages'"),
        (b'{"model": "mock", "messages": ["hi"]}', "invalid_type", "'messages'"),
        (b'{"model": "mock", "messages": [{"role": "user"}], "stream": "yes"}',
         "invalid_type", "'stream'"),
        (b'{"model": "mock?rate=fast", "messages": [{"role": "user"}]}', "invalid_scenario",
         "bad value 'fast' for knob 'rate'; allowed: a number >= 0"),
        (b'{"model": "mock?colour=red", "messages": [{"role": "user"}]}', "invalid_scenario",
         "unknown knob 'colour'"),
        (b'{"model": "mock", "messages": [{"role": "user"}], "max_tokens": 0}',
         "integer_below_min_value", "'max_tokens'"),
        (b'{"model": "mock", "messages": [{"role": "user"}], "max_completion_tokens": "9"}',
         "invalid_type", "'max_completion_tokens'"),
    ],
)
async def test_invalid_requests_are_400_with_an_openai_error_body(
    io_loop: Any, body: bytes, code: str, message: str
) -> None:
    async with serving() as client:
        response = await client.post("/v1/chat/completions", content=body,
                                     headers={"Content-Type": "application/json"})
        after = (await client.get("/mock/stats")).json()
    assert response.status_code == 400
    error = response.json()["error"]
    assert error["type"] == "invalid_request_error" and error["param"] is None
    assert error["code"] == code and message in error["message"]
    assert after == stats(errors=1)


async def test_models_and_unknown_urls_answer_openai_json(io_loop: Any) -> None:
    async with serving() as client:
        models = await client.get("/v1/models")
        missing = await client.post("/v1/embeddings", json={})
        wrong_method = await client.get("/v1/chat/completions")
    assert models.json() == {"object": "list", "data": [
        {"id": "mock", "object": "model", "created": 1700000000, "owned_by": "sseproxy"}]}
    assert missing.status_code == 404
    assert missing.json()["error"]["message"] == "Invalid URL (POST /v1/embeddings)"
    assert wrong_method.status_code == 405 and "error" in wrong_method.json()


# --- Knobs -----------------------------------------------------------------------------------


async def test_rate_spreads_tokens_over_time_while_the_stream_is_open(io_loop: Any) -> None:
    async with serving() as client:
        async with client.stream("POST", "/v1/chat/completions",
                                 json=chat("mock?tokens=10&rate=40")) as response:
            chunks = response.aiter_raw()
            first = await anext(chunks)
            assert contents(first)  # the first token came with the role chunk ...
            during = (await client.get("/mock/stats")).json()
            rest = [(time.monotonic(), chunk) async for chunk in chunks]
        after = await stats_until(client, lambda s: s["completed"] == 1)
    assert during["open"] == 1  # ... before the last token was sent
    assert after == stats(completed=1)
    body = first + b"".join(chunk for _, chunk in rest)
    assert contents(body) == make_tokens(Scenario(tokens=10))
    arrivals = [t for t, chunk in rest if contents(chunk)]
    assert len(arrivals) >= 5
    assert arrivals[-1] - arrivals[0] >= 0.5 * 8 / 40


async def test_high_rate_sends_all_due_tokens_in_one_write(io_loop: Any) -> None:
    async with serving() as client:
        async with client.stream("POST", "/v1/chat/completions",
                                 json=chat("mock?tokens=300&rate=3000")) as response:
            chunks = [chunk async for chunk in response.aiter_raw()]
    assert contents(b"".join(chunks)) == make_tokens(Scenario(tokens=300))
    assert len(chunks) < 200  # not one write per token


async def test_burst_holds_frames_until_enough_content(io_loop: Any) -> None:
    burst = 100
    async with serving() as client:
        async with client.stream("POST", "/v1/chat/completions",
                                 json=chat(f"mock?tokens=60&rate=600&burst={burst}")) as response:
            chunks = [chunk async for chunk in response.aiter_raw()]
    tokens = make_tokens(Scenario(tokens=60))
    assert contents(b"".join(chunks)) == tokens
    total = sum(len(tok.encode()) for tok in tokens)
    assert 2 <= len(chunks) <= math.ceil(total / burst) + 1
    held = [sum(len(c.encode()) for c in contents(chunk)) for chunk in chunks]
    assert all(size >= burst for size in held[:-1])
    assert payloads(chunks[-1])[-1] == "[DONE]"


async def test_stall_pauses_after_k_tokens(io_loop: Any) -> None:
    async with serving() as client:
        async with client.stream("POST", "/v1/chat/completions",
                                 json=chat("mock?tokens=6&stall_at=3&stall_s=0.3")) as response:
            chunks = await timed_chunks(response)
    before = [c for t, chunk in chunks for c in contents(chunk) if t < chunks[0][0] + 0.2]
    assert before == make_tokens(Scenario(tokens=3))
    token_times = [t for t, chunk in chunks for _ in contents(chunk)]
    assert token_times[3] - token_times[2] >= 0.25
    assert contents(b"".join(c for _, c in chunks)) == make_tokens(Scenario(tokens=6))


async def test_stall_at_zero_and_at_the_end(io_loop: Any) -> None:
    async with serving() as client:
        for at in (0, 2):
            model = f"mock?tokens=2&stall_at={at}&stall_s=0.2"
            async with client.stream("POST", "/v1/chat/completions", json=chat(model)) as response:
                chunks = await timed_chunks(response)
            assert len(chunks) == 2 and chunks[1][0] - chunks[0][0] >= 0.15
            assert payloads(chunks[-1][1])[-1] == "[DONE]"


@pytest.mark.parametrize(
    ("status", "type_", "code", "retry_after"),
    [
        (429, "requests", "rate_limit_exceeded", "3"),
        (401, "invalid_request_error", "invalid_api_key", None),
        (500, "server_error", None, None),  # OpenAI's 5xx bodies have no code
        (503, "server_error", None, None),
        (418, "invalid_request_error", None, None),
    ],
)
async def test_error_status_answers_an_openai_error(
    io_loop: Any, status: int, type_: str, code: str | None, retry_after: str | None
) -> None:
    async with serving() as client:
        response = await client.post(
            "/v1/chat/completions", json=chat(f"mock?error_status={status}&retry_after=3"))
        after = (await client.get("/mock/stats")).json()
    assert response.status_code == status
    assert response.headers.get("retry-after") == retry_after
    error = response.json()["error"]
    assert (error["type"], error["code"], error["param"]) == (type_, code, None)
    assert "simulated" in error["message"]
    assert after == stats(errors=1)


async def test_error_status_with_own_code_and_message(io_loop: Any) -> None:
    async with serving() as client:
        response = await client.post("/v1/chat/completions", json=chat(
            "mock?error_status=429&error_code=insufficient_quota&error_message=No+money"
            "&retry_after=0"
        ))
    assert response.headers["retry-after"] == "0"
    assert response.json() == {"error": {"message": "No money", "type": "requests",
                                         "code": "insufficient_quota", "param": None}}


async def test_error_at_sends_an_error_frame_and_ends_cleanly(io_loop: Any) -> None:
    async with serving() as client:
        plain = await client.post("/v1/chat/completions", json=chat("mock?tokens=5&error_at=2"))
        custom = await client.post("/v1/chat/completions",
                                   json=chat("mock?tokens=5&error_at=0&error_code=overloaded"))
        after = (await client.get("/mock/stats")).json()
    assert plain.status_code == 200
    assert contents(plain.content) == make_tokens(Scenario(tokens=2))
    last = json.loads(payloads(plain.content)[-1])
    assert last == {"error": {"message": last["error"]["message"], "type": "server_error",
                              "code": "server_error"}}
    assert "[DONE]" not in payloads(plain.content)
    assert contents(custom.content) == []
    assert json.loads(payloads(custom.content)[-1])["error"]["code"] == "overloaded"
    assert after == stats(requests=2, errors=2)


async def test_drop_at_breaks_the_body_after_k_tokens(io_loop: Any) -> None:
    received = b""
    async with serving() as client:
        with pytest.raises(httpx.RemoteProtocolError):
            async with client.stream("POST", "/v1/chat/completions",
                                     json=chat("mock?tokens=5&drop_at=3")) as response:
                async for chunk in response.aiter_raw():
                    received += chunk
        with pytest.raises(httpx.RemoteProtocolError):
            await client.post("/v1/chat/completions",
                              json=chat("mock?tokens=5&drop_at=3", stream=False))
        after = await stats_until(client, lambda s: s["open"] == 0)
    assert contents(received) == make_tokens(Scenario(tokens=3))
    assert after == stats(requests=2, errors=2)


async def test_no_done_ends_after_the_tokens(io_loop: Any) -> None:
    async with serving() as client:
        response = await client.post("/v1/chat/completions",
                                     json=chat("mock?tokens=3&no_done", usage=True))
        after = await stats_until(client, lambda s: s["open"] == 0)
    datas = payloads(response.content)
    assert len(datas) == 1 + 3
    assert contents(response.content) == make_tokens(Scenario(tokens=3))
    assert all(json.loads(d)["choices"][0]["finish_reason"] is None for d in datas)
    assert after == stats(completed=1)


async def test_malformed_at_sends_a_broken_frame_and_goes_on(io_loop: Any) -> None:
    async with serving() as client:
        response = await client.post("/v1/chat/completions",
                                     json=chat("mock?tokens=4&malformed_at=2"))
    datas = payloads(response.content)
    assert datas[3] == "{not json"
    assert datas[-1] == "[DONE]"
    assert contents(response.content) == make_tokens(Scenario(tokens=4))


async def test_header_delay_and_first_delay(io_loop: Any) -> None:
    async with serving() as client:
        sent = time.monotonic()
        async with client.stream("POST", "/v1/chat/completions",
                                 json=chat("mock?tokens=2&header_delay_s=0.2")) as response:
            headers_at = time.monotonic()
            await response.aread()
        assert headers_at - sent >= 0.18

        async with client.stream("POST", "/v1/chat/completions",
                                 json=chat("mock?tokens=2&first_delay_s=0.3")) as response:
            headers_at = time.monotonic()
            chunks = await timed_chunks(response)
        assert chunks[0][0] - headers_at >= 0.25  # the headers came first
        assert json.loads(payloads(chunks[0][1])[0])["choices"][0]["delta"]["role"] == "assistant"


async def test_stream_false_waits_for_the_generation_and_scripted_errors(io_loop: Any) -> None:
    async with serving() as client:
        sent = time.monotonic()
        slow = await client.post("/v1/chat/completions",
                                 json=chat("mock?tokens=5&rate=20&stall_at=1&stall_s=0.1",
                                           stream=False))
        waited = time.monotonic() - sent
        failed = await client.post("/v1/chat/completions",
                                   json=chat("mock?error_at=2", stream=False))
    assert slow.status_code == 200 and waited >= 0.9 * (4 / 20 + 0.1)
    assert failed.status_code == 500
    assert failed.json()["error"]["type"] == "server_error"
    assert failed.json()["error"]["code"] is None


async def test_stamp_sends_the_moment_each_token_is_written(io_loop: Any) -> None:
    # issue 6: the benchmark measures one-way latency from these stamps.
    model = "mock?tokens=4&rate=20&stamp"  # serving() defaults to rate=0
    scenario = Scenario(tokens=4, rate=20, stamp=True)
    assert Scenario.parse(model) == scenario
    with pytest.raises(ValueError, match="stamp"):
        make_tokens(scenario)
    async with serving() as client:
        before = time.monotonic_ns()
        async with client.stream("POST", "/v1/chat/completions",
                                 json=chat(model, usage=True)) as response:
            received = [(time.monotonic_ns(), contents(chunk))
                        async for chunk in response.aiter_raw()]
        whole = await client.post("/v1/chat/completions", json=chat(model, stream=False))
    stamps = [(at, int(tok)) for at, toks in received for tok in toks]
    assert all(re.fullmatch(r"\d+ ", tok) for _, toks in received for tok in toks)
    assert len(stamps) == 4  # the number of tokens is kept
    assert all(before <= stamp <= at for at, stamp in stamps)  # written, then received
    # Taken at each write, not when the request came: token i is due at i / rate.
    assert all(b[1] - a[1] >= 0.8 * 1e9 / 20 for a, b in zip(stamps, stamps[1:]))
    text = whole.json()["choices"][0]["message"]["content"]
    assert re.fullmatch(r"(\d+ ){4}", text)
    assert whole.json()["usage"]["completion_tokens"] == 4


# --- Stats and cancellation ------------------------------------------------------------------


async def test_stats_count_open_completed_and_reset(io_loop: Any) -> None:
    async with serving() as client:
        async with client.stream("POST", "/v1/chat/completions",
                                 json=chat("mock?tokens=3&first_delay_s=0.2")) as response:
            during = (await client.get("/mock/stats")).json()
            await response.aread()
        after = await stats_until(client, lambda s: s["completed"] == 1)
        reset = (await client.post("/mock/reset")).json()
        after_reset = (await client.get("/mock/stats")).json()
    assert during == stats(open=1)
    assert after == stats(completed=1)
    assert reset == after_reset == stats(requests=0)


async def test_client_leaving_during_a_stall_is_counted_cancelled_at_once(io_loop: Any) -> None:
    async with serving() as client:
        async with client.stream("POST", "/v1/chat/completions",
                                 json=chat("mock?tokens=5&stall_at=2&stall_s=30")) as response:
            received = b""
            async for chunk in response.aiter_raw():
                received += chunk
                if len(contents(received)) == 2:
                    break
            during = (await client.get("/mock/stats")).json()
        left = time.monotonic()
        after = await stats_until(client, lambda s: s["open"] == 0)
        noticed = time.monotonic() - left
    assert during == stats(open=1)
    assert after == stats(cancelled=1)
    assert noticed < 1.0  # in practice a few ms; the stall was 30 s


@pytest.mark.parametrize("model", [
    "mock?tokens=100&rate=1",  # waiting for the next token
    "mock?header_delay_s=30",  # before any answer
    "mock?first_delay_s=30",  # after the headers
])
async def test_client_leaving_anywhere_is_counted_cancelled(io_loop: Any, model: str) -> None:
    async with serving() as client:
        with pytest.raises(httpx.ReadTimeout):
            async with client.stream("POST", "/v1/chat/completions", json=chat(model),
                                     timeout=httpx.Timeout(5, read=0.3)) as response:
                async for _ in response.aiter_raw():
                    pass
        after = await stats_until(client, lambda s: s["open"] == 0)
    assert after == stats(cancelled=1)


@pytest.mark.parametrize("model", [
    "mock?tokens=100&rate=1",  # waiting for the next token
    "mock?tokens=5&stall_at=2&stall_s=30",  # during a stall
    "mock?header_delay_s=30",  # before any answer
    "mock?first_delay_s=30",  # after the headers
    "mock?tokens=100&rate=1&stream=false",  # (stream: false, below) before the body
])
async def test_the_access_log_records_a_request_the_client_left_as_499(
    io_loop: Any, model: str
) -> None:
    # issue 12 point 5: a stream cancelled after its headers was logged as a plain 200
    logged: list[tuple[str, int]] = []
    stream = not model.endswith("&stream=false")
    model = model.removesuffix("&stream=false")

    def access_log(handler: Any) -> None:
        logged.append((handler.request.path, handler.get_status()))

    async with serving(log_function=access_log) as c:
        with pytest.raises(httpx.ReadTimeout):
            async with c.stream("POST", "/v1/chat/completions", json=chat(model, stream),
                                timeout=httpx.Timeout(5, read=0.3)) as response:
                async for _ in response.aiter_raw():
                    pass
        after = await stats_until(c, lambda s: s["open"] == 0)
    assert after == stats(cancelled=1)
    assert [status for path, status in logged if path == "/v1/chat/completions"] == [499]


async def test_many_concurrent_streams(io_loop: Any) -> None:
    expected = make_tokens(Scenario(tokens=20, text="mixed"))
    async with serving(Scenario(tokens=20, rate=200, text="mixed")) as client:
        responses = await asyncio.gather(*[
            client.post("/v1/chat/completions", json=chat("mock")) for _ in range(50)])
        after = await stats_until(client, lambda s: s["completed"] == 50)
    assert all(contents(r.content) == expected for r in responses)
    assert len({json.loads(payloads(r.content)[0])["id"] for r in responses}) == 50
    assert after == stats(requests=50, completed=50)


# --- Clients and the command line ------------------------------------------------------------


async def test_the_openai_sdk_understands_the_simulator(io_loop: Any) -> None:
    async with simulator(Scenario(rate=0)) as url, openai.AsyncOpenAI(
            base_url=url + "/v1", api_key="sk-none", max_retries=0) as sdk:
        stream = await sdk.chat.completions.create(
            model="mock?tokens=8&text=mixed", messages=[{"role": "user", "content": "hi"}],
            stream=True, stream_options={"include_usage": True})
        parts, usage = [], None
        async for chunk in stream:
            if chunk.choices:
                parts.append(chunk.choices[0].delta.content or "")
            if chunk.usage is not None:
                usage = chunk.usage
        whole = await sdk.chat.completions.create(
            model="mock?tokens=8&text=mixed", messages=[{"role": "user", "content": "hi"}])
        with pytest.raises(openai.RateLimitError):
            await sdk.chat.completions.create(
                model="mock?error_status=429", messages=[{"role": "user", "content": "hi"}])
    expected = "".join(make_tokens(Scenario(tokens=8, text="mixed")))
    assert "".join(parts) == expected == whole.choices[0].message.content
    assert usage is not None and usage.completion_tokens == 8


@pytest.mark.parametrize("max_tokens, max_completion_tokens, cut", [
    (5, None, 5),
    (None, 3, 3),
    (6, 4, 4),
    (8, None, None),  # the reply is no longer than that: a natural stop
    (100, None, None),
])
async def test_max_tokens_stops_the_reply_there_with_finish_reason_length(
    io_loop: Any, max_tokens: int | None, max_completion_tokens: int | None, cut: int | None
) -> None:
    # issue 12: the simulator ignored max_tokens
    server, port = await mockupstream.start(Scenario(rate=0, tokens=8))
    sdk = openai.AsyncOpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="sk-none",
                             max_retries=0)
    try:
        stream = await sdk.chat.completions.create(
            model="mock", messages=[{"role": "user", "content": "hi"}], stream=True,
            stream_options={"include_usage": True}, max_tokens=max_tokens,
            max_completion_tokens=max_completion_tokens)
        parts, finish, usage = [], None, None
        async for chunk in stream:
            if chunk.choices:
                parts.append(chunk.choices[0].delta.content or "")
                finish = chunk.choices[0].finish_reason or finish
            usage = chunk.usage or usage
        whole = await sdk.chat.completions.create(
            model="mock", messages=[{"role": "user", "content": "hi"}], max_tokens=max_tokens,
            max_completion_tokens=max_completion_tokens)
    finally:
        await sdk.close()
        server.stop()
        await server.close_all_connections()
    tokens = make_tokens(Scenario(tokens=8))
    expected = "".join(tokens[:cut])
    assert "".join(parts) == expected == whole.choices[0].message.content
    assert finish == whole.choices[0].finish_reason == ("length" if cut else "stop")
    assert usage is not None and usage.completion_tokens == (cut or 8)


def test_flags_become_the_default_scenario() -> None:
    parser = argparse.ArgumentParser()
    mockupstream.add_arguments(parser)
    args = parser.parse_args(["--port", "9000", "--tokens", "5", "--rate", "0", "--text", "cjk",
                              "--stall-at", "2", "--stall-s", "1.5", "--no-done",
                              "--error-message", "oops"])
    assert (args.host, args.port) == ("127.0.0.1", 9000)
    fields = {name: getattr(args, name) for name in Scenario.__dataclass_fields__}
    assert Scenario(**fields) == Scenario(tokens=5, rate=0, text="cjk", stall_at=2, stall_s=1.5,
                                          no_done=True, error_message="oops")
    assert parser.parse_args([]).port == 8081
    assert Scenario(**{n: getattr(parser.parse_args([]), n)
                       for n in Scenario.__dataclass_fields__}) == Scenario()


@pytest.mark.parametrize("flags", [["--rate", "-1"], ["--text", "klingon"], ["--tokens", "x"]])
def test_bad_flags_are_usage_errors(flags: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    parser = argparse.ArgumentParser()
    mockupstream.add_arguments(parser)
    with pytest.raises(SystemExit) as info:
        parser.parse_args(flags)
    assert info.value.code == 2
    assert flags[0] in capsys.readouterr().err


@pytest.mark.slow
def test_python_dash_m_serves_until_sigint() -> None:
    command = [sys.executable, "-m", "sseproxy.mockupstream", "--port", "0", "--tokens", "3"]
    with subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          text=True) as proc:
        try:
            line = proc.stdout.readline() if proc.stdout else ""
            match = re.search(r"listening on (http://127\.0\.0\.1:\d+/v1)", line)
            assert match, line
            assert "defaults: mock?tokens=3" in line
            reply = httpx.post(match[1] + "/chat/completions", json=chat("mock?rate=0"))
            assert contents(reply.content) == make_tokens(Scenario(tokens=3))
            proc.send_signal(signal.SIGINT)
            assert proc.wait(timeout=10) == 0
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
