"""The Responses API (issue 17): ``/v1/responses`` through real servers, with the official
OpenAI SDK, on both upstream kinds (the simulator): translated from a chat-completions
upstream, and relayed from an upstream that speaks the Responses API itself.

Every stream's ``sequence_number`` must run 0, 1, 2, … without a gap, paced or not.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator, Sequence
from typing import Any

import httpx
import openai
import pytest
from openai.types.responses import EasyInputMessageParam, ResponseStreamEvent
import servers
from servers import eventually

from sseproxy.mockupstream import Scenario, make_tokens

FAST = Scenario(rate=0, tokens=12)


UPSTREAM_API = ["chat_completions"]


@pytest.fixture(params=["chat_completions", "responses"], autouse=True)
def api(request: pytest.FixtureRequest) -> Iterator[str]:
    """Every test runs against both upstream kinds (``upstream.api``)."""
    UPSTREAM_API[0] = request.param
    yield str(request.param)
    UPSTREAM_API[0] = "chat_completions"


def running(scenario: Scenario | None = None, **overrides: Any) -> Any:
    """sseproxy in front of the simulator, speaking this test's upstream API."""
    return servers.running(scenario, upstream__api=UPSTREAM_API[0], **overrides)


def sdk(r: Any) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=r.url + "/v1", api_key="unused", max_retries=0)


def text_of(events: Sequence[Any]) -> str:
    return "".join(e.delta for e in events if e.type == "response.output_text.delta")


def assert_consecutive(events: Sequence[Any], first: int = 0) -> None:
    assert [e.sequence_number for e in events] == list(range(first, first + len(events)))


async def collect(stream: Any) -> list[ResponseStreamEvent]:
    return [event async for event in stream]


# --- streaming, the stream helper, stream: false ---------------------------------------


async def test_a_streamed_response_has_the_exact_text_and_ends_completed_with_usage(
        io_loop: Any) -> None:
    scenario = Scenario(rate=200, tokens=40, text="mixed")
    async with running() as r:
        client = sdk(r)
        events = await collect(await client.responses.create(
            model=scenario.to_model(), input="hi", stream=True))
        await client.close()
    assert [e.type for e in events[:4]] == [
        "response.created", "response.in_progress", "response.output_item.added",
        "response.content_part.added"]
    assert [e.type for e in events[-4:]] == [
        "response.output_text.done", "response.content_part.done",
        "response.output_item.done", "response.completed"]
    assert_consecutive(events)
    expected = "".join(make_tokens(scenario))
    assert text_of(events) == expected
    done = events[-1]
    assert done.type == "response.completed"
    assert done.response.status == "completed"
    assert done.response.output_text == expected
    assert done.response.usage is not None
    assert done.response.usage.output_tokens == 40
    assert done.response.usage.total_tokens == done.response.usage.input_tokens + 40
    assert done.response.id.startswith("resp_")


async def test_the_stream_helper_gets_the_final_response(io_loop: Any) -> None:
    scenario = Scenario(rate=0, tokens=20, text="emoji")
    async with running() as r:
        client = sdk(r)
        async with client.responses.stream(model=scenario.to_model(), input="hi",
                                           instructions="Be brief.") as stream:
            final = await stream.get_final_response()
        await client.close()
    assert final.output_text == "".join(make_tokens(scenario))
    assert final.status == "completed"
    assert final.instructions == "Be brief."


async def test_a_response_without_streaming_has_the_same_text(io_loop: Any) -> None:
    scenario = Scenario(rate=0, tokens=10, text="cjk")
    message: EasyInputMessageParam = {
        "role": "user", "content": [{"type": "input_text", "text": "hi"}]}
    async with running() as r:
        client = sdk(r)
        reply = await client.responses.create(
            model=scenario.to_model(), input=[message],
            metadata={"k": "v"}, temperature=0.5)
        await client.close()
    assert reply.output_text == "".join(make_tokens(scenario))
    assert reply.status == "completed"
    assert reply.usage is not None and reply.usage.output_tokens == 10
    assert reply.metadata == {"k": "v"} and reply.temperature == 0.5


def test_the_sync_client_streams_a_response(io_loop: Any) -> None:
    async def run() -> tuple[list[ResponseStreamEvent], str]:
        async with running() as r:
            def call() -> list[ResponseStreamEvent]:
                with openai.OpenAI(base_url=r.url + "/v1", api_key="unused",
                                   max_retries=0) as client:
                    return list(client.responses.create(
                        model=FAST.to_model(), input="hi", stream=True))
            return await asyncio.to_thread(call), "".join(make_tokens(FAST))
    events, expected = io_loop.asyncio_loop.run_until_complete(run())
    assert text_of(events) == expected
    assert_consecutive(events)


@pytest.mark.parametrize("obfuscation", [True, False])
async def test_sequence_numbers_stay_consecutive_when_pacing_splits_an_8kb_burst(
        io_loop: Any, obfuscation: bool) -> None:
    scenario = Scenario(rate=0, tokens=1500, burst=8192)
    async with running(pacing__mode="smooth") as r:
        client = sdk(r)
        events = await collect(await client.responses.create(
            model=scenario.to_model(), input="hi", stream=True,
            stream_options={"include_obfuscation": obfuscation}))
        await client.close()
    assert_consecutive(events)
    deltas = [e for e in events if e.type == "response.output_text.delta"]
    assert text_of(events) == "".join(make_tokens(scenario))
    assert 1 < len(deltas) < 1500  # pieces, neither one lump nor one per token
    assert all((getattr(e, "obfuscation", None) is not None) == obfuscation for e in deltas)


# --- refusals --------------------------------------------------------------------------


@pytest.mark.parametrize("field, value", [
    ("tools", [{"type": "web_search"}]),
    ("previous_response_id", "resp_x"),
    ("frobnicate", 1),
])
async def test_what_cannot_be_relayed_is_a_400_naming_it(io_loop: Any, field: str,
                                                         value: Any) -> None:
    async with running(FAST) as r:
        client = sdk(r)
        with pytest.raises(openai.BadRequestError, match=field):
            await client.responses.create(model=FAST.to_model(), input="hi",
                                          extra_body={field: value})
        image: Any = [{"role": "user", "content": [{"type": "input_image", "image_url": "x"}]}]
        with pytest.raises(openai.BadRequestError, match="input_image"):
            await client.responses.create(model=FAST.to_model(), input=image)
        stats = await r.mock_stats()
        await client.close()
    assert stats["requests"] == 0


# --- failures --------------------------------------------------------------------------


@pytest.mark.parametrize("status, error", [
    (500, openai.InternalServerError),
    (429, openai.RateLimitError),
])
async def test_an_upstream_error_status_before_the_first_token_is_an_http_error(
        io_loop: Any, status: int, error: type[Exception]) -> None:
    scenario = Scenario(error_status=status)
    async with running() as r:
        client = sdk(r)
        with pytest.raises(error):
            await client.responses.create(model=scenario.to_model(), input="hi", stream=True)
        with pytest.raises(error):
            await client.responses.create(model=scenario.to_model(), input="hi")
        await client.close()


async def test_an_upstream_that_does_not_answer_in_time_is_a_504(io_loop: Any) -> None:
    scenario = Scenario(header_delay_s=30)
    async with running(upstream__first_token_timeout_s=2.0) as r:
        client = sdk(r)
        with pytest.raises(openai.APIStatusError) as raised:
            await client.responses.create(model=scenario.to_model(), input="hi", stream=True)
        await client.close()
    assert raised.value.status_code == 504


async def test_a_first_token_that_never_comes_ends_the_response_failed(io_loop: Any) -> None:
    scenario = Scenario(first_delay_s=30)
    async with running(upstream__first_token_timeout_s=2.0) as r:
        client = sdk(r)
        events = await collect(await client.responses.create(
            model=scenario.to_model(), input="hi", stream=True))
        await client.close()
    assert_consecutive(events)
    failed = events[-1]
    assert failed.type == "response.failed"
    assert failed.response.status == "failed"
    assert failed.response.error is not None
    assert failed.response.error.code == "upstream_timeout"  # type: ignore[comparison-overlap]


async def test_a_connection_broken_mid_reply_ends_the_response_failed(io_loop: Any) -> None:
    scenario = Scenario(rate=0, tokens=10, drop_at=4)
    async with running() as r:
        client = sdk(r)
        async with client.responses.stream(model=scenario.to_model(), input="hi") as stream:
            events = [event async for event in stream]
            with pytest.raises(RuntimeError, match="response.completed"):
                await stream.get_final_response()
        await client.close()
    assert_consecutive(events)
    assert text_of(events) == "".join(make_tokens(scenario)[:4])
    failed = events[-1]
    assert failed.type == "response.failed"
    assert failed.response.error is not None
    assert failed.response.error.code == "upstream_incomplete"  # type: ignore[comparison-overlap]


async def test_max_output_tokens_reached_ends_the_response_incomplete(io_loop: Any) -> None:
    scenario = Scenario(rate=0, tokens=12)
    async with running(pacing__mode="smooth") as r:
        client = sdk(r)
        events = await collect(await client.responses.create(
            model=scenario.to_model(), input="hi", stream=True, max_output_tokens=4))
        whole = await client.responses.create(model=scenario.to_model(), input="hi",
                                              max_output_tokens=4)
        await client.close()
    assert_consecutive(events)
    assert text_of(events) == "".join(make_tokens(scenario)[:4]) == whole.output_text
    last = events[-1]
    assert last.type == "response.incomplete"
    for response in (last.response, whole):
        assert response.status == "incomplete"
        assert response.incomplete_details is not None
        assert response.incomplete_details.reason == "max_output_tokens"


# --- who stops what -------------------------------------------------------------------


async def test_a_foreground_response_stops_its_upstream_when_the_client_leaves(
        io_loop: Any) -> None:
    scenario = Scenario(rate=20, tokens=200)
    async with running() as r:
        client = sdk(r)
        stream = await client.responses.create(model=scenario.to_model(), input="hi",
                                               stream=True)
        async for event in stream:
            if event.type == "response.output_text.delta":
                break
        await stream.close()
        took = await r.wait_mock("cancelled", 1, within=10.0)
        await client.close()
    assert took < 5.0  # within 1 s as designed; generous for a busy machine


async def test_a_background_response_resumes_exactly_after_starting_after(
        io_loop: Any) -> None:
    scenario = Scenario(rate=50, tokens=40)
    # Nobody follows it for longer than the orphan grace: a background response runs on.
    async with running(store__orphan_grace_s=0.1) as r:
        client = sdk(r)
        first: list[ResponseStreamEvent] = []
        stream = await client.responses.create(model=scenario.to_model(), input="hi",
                                               stream=True, background=True)
        async for event in stream:
            first.append(event)
            if event.type == "response.output_text.delta" and event.sequence_number >= 8:
                break
        await stream.close()  # the connection is cut; the response runs on
        await r.wait_mock("open", 0, within=10.0)
        assert first[0].type == "response.created"
        assert first[0].response.status == "queued"
        response_id = first[0].response.id
        cut = first[-1].sequence_number
        rest = await collect(await client.responses.retrieve(
            response_id, stream=True, starting_after=cut))
        stored = await client.responses.retrieve(response_id)
        stats = await r.mock_stats()
        await client.close()
    assert_consecutive(first)
    assert_consecutive(rest, cut + 1)
    assert rest[-1].type == "response.completed"
    expected = "".join(make_tokens(scenario))
    assert text_of(first) + text_of(rest) == expected
    assert stored.status == "completed" and stored.output_text == expected
    assert stats["cancelled"] == 0 and stats["completed"] == 1


async def test_a_background_response_is_retrievable_while_it_runs_and_after(
        io_loop: Any) -> None:
    scenario = Scenario(rate=50, tokens=30)
    async with running() as r:
        client = sdk(r)
        queued = await client.responses.create(model=scenario.to_model(), input="hi",
                                               background=True)
        assert queued.status == "queued" and queued.background
        running_now = await client.responses.retrieve(queued.id)
        assert running_now.status in ("queued", "in_progress")
        whole = await collect(await client.responses.retrieve(queued.id, stream=True))
        final = await client.responses.retrieve(queued.id)
        await client.close()
    assert_consecutive(whole)
    assert final.status == "completed"
    assert final.output_text == text_of(whole) == "".join(make_tokens(scenario))
    assert final.usage is not None and final.usage.output_tokens == 30


async def test_cancel_stops_a_background_response_and_its_upstream(io_loop: Any) -> None:
    scenario = Scenario(rate=10, tokens=200)
    async with running() as r:
        client = sdk(r)
        started = await client.responses.create(model=scenario.to_model(), input="hi",
                                                background=True)
        await r.wait_mock("open", 1, within=10.0)
        cancelled = await client.responses.cancel(started.id)
        again = await client.responses.cancel(started.id)  # idempotent
        await r.wait_mock("cancelled", 1, within=10.0)
        events = await collect(await client.responses.retrieve(started.id, stream=True))
        await client.close()
    assert cancelled.status == again.status == "cancelled"
    assert_consecutive(events)
    assert events[-1].type == "response.failed"
    assert events[-1].response.status == "cancelled"


async def test_unknown_responses_are_404(io_loop: Any) -> None:
    async with running(FAST) as r:
        client = sdk(r)
        with pytest.raises(openai.NotFoundError):
            await client.responses.retrieve("resp_" + "0" * 32)
        with pytest.raises(openai.NotFoundError):
            await client.responses.cancel("resp_" + "0" * 32)
        foreground = await client.responses.create(model=FAST.to_model(), input="hi")
        with pytest.raises(openai.NotFoundError):  # only background responses are kept
            await client.responses.retrieve(foreground.id)
        await client.close()


async def test_a_resume_after_the_last_event_is_an_empty_stream(io_loop: Any) -> None:
    async with running(FAST) as r:
        client = sdk(r)
        done = await client.responses.create(model=FAST.to_model(), input="hi",
                                             background=True)
        await eventually(lambda: r.deps.registry.get(done.id) is None, what="the end")
        whole = await collect(await client.responses.retrieve(done.id, stream=True))
        last = whole[-1].sequence_number
        async with httpx.AsyncClient() as http:
            tail = await http.get(f"{r.url}/v1/responses/{done.id}",
                                  params={"stream": "true", "starting_after": str(last)})
        await client.close()
    assert tail.status_code == 200 and tail.content == b""
    assert whole[-1].type == "response.completed"


async def test_metrics_count_responses_apart_from_chat_completions(io_loop: Any) -> None:
    async with running(FAST) as r:
        client = sdk(r)
        await client.responses.create(model=FAST.to_model(), input="hi")
        await client.chat.completions.create(
            model=FAST.to_model(), messages=[{"role": "user", "content": "hi"}])
        counter = r.deps.metrics.endpoint_streams

        def counted(endpoint: str) -> float:
            return counter.labels(endpoint, "completed")._value.get()  # type: ignore[no-any-return]
        await eventually(lambda: counted("responses") == counted("chat_completions") == 1,
                         what="one completed stream per endpoint")
        body, _ = r.deps.metrics.exposition()
        await client.close()
    assert b'sseproxy_endpoint_streams_total{endpoint="responses",outcome="completed"} 1.0' \
        in body
    assert b'sseproxy_endpoint_streams_total{endpoint="chat_stream",outcome="completed"} 0.0' \
        in body
