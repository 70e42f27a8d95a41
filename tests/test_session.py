"""StreamSession: one writer, heartbeats, outcomes, cancellation, canonical log (issue 2)."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from fakes import GOOD, Body, chunk, client, responder
from structlog.testing import capture_logs

from sseproxy import config, errors, sse
from sseproxy.frames import EventSourceFrames
from sseproxy.metrics import Metrics
from sseproxy.session import ITEM_OVERHEAD_BYTES, Channel, ClientGone, End, Outcome, StreamSession
from sseproxy.upstream import Delta


class RecordingSink:
    """A client: records every write; can fail from the n-th write on."""

    def __init__(self, fail_at: int | None = None) -> None:
        self.writes: list[bytes] = []
        self.fail_at = fail_at

    async def send(self, data: bytes) -> None:
        if self.fail_at is not None and len(self.writes) + 1 >= self.fail_at:
            raise ClientGone
        self.writes.append(data)

    def events(self) -> list[sse.Event]:
        return sse.Decoder().feed(b"".join(self.writes))


def session_for(parts: list[Any], heartbeat_s: float = 10.0, **upstream: Any) -> tuple[
        StreamSession, Body]:
    handler, stream = responder(parts=parts)
    up = client(handler, **upstream)
    s = StreamSession(up, {"model": "m", "messages": []}, stream_id="sid",
                      settings=settings(heartbeat_s), metrics=Metrics(), endpoint="test")
    return s, stream


def settings(heartbeat_s: float = 10.0, **sections: Any) -> config.Settings:
    return config.Settings(heartbeat=config.HeartbeatSettings(heartbeat_s), **sections)


async def test_relay_writes_every_delta_then_done(io_loop: Any) -> None:
    s, stream = session_for(list(GOOD))
    sink = RecordingSink()
    with capture_logs() as logs:
        outcome = await s.relay(sink, EventSourceFrames("sid", 1000))
    assert outcome is Outcome.COMPLETED
    events = sink.events()
    assert [(e.event, e.id) for e in events] == [
        ("message", "sid.1"), ("message", "sid.2"), ("done", "sid.3")]
    assert [e.data for e in events[:2]] == ['{"content":"Hel"}', '{"content":"lo"}']
    assert '"usage":{"prompt_tokens":1' in events[2].data
    assert stream.closed
    line = [entry for entry in logs if entry["event"] == "stream"]
    assert len(line) == 1
    assert line[0]["outcome"] == "completed" and line[0]["events"] == 3
    assert line[0]["bytes"] == sum(map(len, sink.writes))
    assert line[0]["ttft_s"] is not None and line[0]["completion_tokens"] == 2


class DirectRecordingSink(RecordingSink):
    """A sink that can take a frame at once when ``ready``; notes which way each came."""

    def __init__(self, ready: bool = True, fail_now: bool = False) -> None:
        super().__init__()
        self.is_ready = ready
        self.fail_now = fail_now
        self.ways: list[str] = []

    async def send(self, data: bytes) -> None:
        await super().send(data)
        self.ways.append("send")

    def ready(self) -> bool:
        return self.is_ready

    def send_now(self, data: bytes) -> bool:
        if self.fail_now:
            raise ClientGone
        self.writes.append(data)
        self.ways.append("now")
        return True


PAUSED = [chunk("", role="assistant"), chunk("a"), 0.05, chunk("b"), 0.05, chunk("c"), 0.05,
          chunk(finish="stop"), b"data: [DONE]\n\n"]


def paced_session(parts: list[Any], mode: str, heartbeat_s: float = 10.0) -> StreamSession:
    handler, _ = responder(parts=parts)
    return StreamSession(client(handler), {"model": "m", "messages": []}, stream_id="sid",
                         settings=settings(heartbeat_s, pacing=config.PacingSettings(mode=mode)),
                         metrics=Metrics(), endpoint="test")


async def test_with_pacing_off_text_is_written_from_the_upstream_callback(io_loop: Any) -> None:
    # The writer idles between tokens: each text frame goes out from the upstream callback,
    # and the stream reads exactly as when every frame goes through the writer task.
    direct, queued = DirectRecordingSink(), DirectRecordingSink(ready=False)
    with capture_logs() as logs:
        assert await paced_session(PAUSED, "off").relay(
            direct, EventSourceFrames("sid", 1000)) is Outcome.COMPLETED
        assert await paced_session(PAUSED, "off").relay(
            queued, EventSourceFrames("sid", 1000)) is Outcome.COMPLETED
    assert direct.ways.count("now") >= 2 and direct.ways[-1] == "send"  # the end: the writer
    assert set(queued.ways) == {"send"}
    assert b"".join(direct.writes) == b"".join(queued.writes)
    assert [e.data for e in direct.events()][:3] == [
        '{"content":"a"}', '{"content":"b"}', '{"content":"c"}']
    lines = [e for e in logs if e["event"] == "stream"]
    for line, sink in zip(lines, (direct, queued)):
        assert line["events"] == 4 and line["bytes"] == sum(map(len, sink.writes))
        assert line["ttft_s"] is not None and line["pacing_lag_p99_s"] == 0.0


async def test_tokens_of_one_upstream_read_go_out_in_one_write(io_loop: Any) -> None:
    burst = [chunk("", role="assistant"), 0.05, chunk("a") + chunk("b") + chunk("c"), 0.05,
             chunk(finish="stop"), b"data: [DONE]\n\n"]
    sink = DirectRecordingSink()
    with capture_logs() as logs:
        await paced_session(burst, "off").relay(sink, EventSourceFrames("sid", 1000))
    assert sink.ways == ["now", "send"]  # abc (a role writes nothing here), then the end
    assert [e.data for e in sse.Decoder().feed(sink.writes[0])] == [
        '{"content":"a"}', '{"content":"b"}', '{"content":"c"}']
    line = next(e for e in logs if e["event"] == "stream")
    assert line["events"] == 4 and line["bytes"] == sum(map(len, sink.writes))


async def test_a_callback_write_that_did_not_go_out_whole_is_waited_for(io_loop: Any) -> None:
    # The model pauses right after a frame the socket took only in part: the writer waits
    # for the rest (as for any write of its own), so a client that stopped reading is
    # watched for a stall now, not at the next token or heartbeat.
    class Partial(DirectRecordingSink):
        def __init__(self) -> None:
            super().__init__()
            self.drained = asyncio.Event()
            self.watched: list[bool] = []

        def send_now(self, data: bytes) -> bool:
            super().send_now(data)
            self.is_ready = False  # the rest waits in the write buffer
            return False

        async def send(self, data: bytes) -> None:
            if not data:
                self.watched.append(s.client_watch.since is not None)
                await self.drained.wait()
                self.is_ready = True
            await super().send(data)

    sink = Partial()
    s = paced_session([chunk("", role="assistant"), 0.05, chunk("a"), 30.0], "off")
    task = asyncio.create_task(s.relay(sink, EventSourceFrames("sid", 1000)))
    try:
        for _ in range(100):
            if sink.watched:
                break
            await asyncio.sleep(0.01)
        assert sink.ways == ["now"] and sink.watched == [True]
        sink.drained.set()
        await asyncio.sleep(0.05)
        assert s.client_watch.since is None
    finally:
        s.client_closed()
        assert await asyncio.wait_for(task, 5) is Outcome.CLIENT_CLOSED


async def test_with_pacing_on_nothing_bypasses_the_pacer(io_loop: Any) -> None:
    sink = DirectRecordingSink()
    await paced_session(PAUSED, "smooth").relay(sink, EventSourceFrames("sid", 1000))
    assert set(sink.ways) == {"send"}


async def test_no_heartbeat_while_text_goes_out_from_the_callback(io_loop: Any) -> None:
    # Heartbeats are owed from the last write, whoever made it.
    parts = [chunk("", role="assistant")]
    for i in range(12):
        parts += [chunk(str(i)), 0.05]
    parts += [chunk(finish="stop"), b"data: [DONE]\n\n"]
    sink = DirectRecordingSink()
    await paced_session(parts, "off", heartbeat_s=0.2).relay(sink, EventSourceFrames("s", 1))
    assert sink.ways.count("now") >= 6
    assert not any(w.startswith(b":") for w in sink.writes)


async def test_a_client_gone_during_a_callback_write_ends_the_stream(io_loop: Any) -> None:
    sink = DirectRecordingSink(fail_now=True)
    s = paced_session([chunk("", role="assistant"), chunk("a"), 0.05, chunk("b"), 30.0], "off")
    task = asyncio.create_task(s.relay(sink, EventSourceFrames("sid", 1000)))
    await asyncio.sleep(0.2)
    s.client_closed()  # what the handler's on_connection_close does
    assert await asyncio.wait_for(task, 5) is Outcome.CLIENT_CLOSED
    assert "now" not in sink.ways


async def test_heartbeat_during_a_pause_never_splits_a_frame(io_loop: Any) -> None:
    s, _ = session_for([chunk("a"), 0.35, chunk("b"), chunk(finish="stop"), b"data: [DONE]\n\n"],
                       heartbeat_s=0.05)
    sink = RecordingSink()
    assert await s.relay(sink, EventSourceFrames("sid", 1000)) is Outcome.COMPLETED
    kinds = [w[:2] for w in sink.writes]
    assert kinds.count(b": ") >= 2, sink.writes
    # every write is whole frames, and the pings sit between the two deltas
    assert all(w.endswith(b"\n\n") for w in sink.writes)
    first_ping = kinds.index(b": ")
    assert b'"a"' in b"".join(sink.writes[:first_ping])
    assert b'"b"' in b"".join(sink.writes[first_ping:])
    assert s.heartbeats == kinds.count(b": ")


async def test_upstream_error_mid_stream_ends_with_an_error_event(io_loop: Any) -> None:
    s, stream = session_for([chunk("a"), b'data: {"error": {"code": "boom", "message": "x"}}\n\n'])
    sink = RecordingSink()
    assert await s.relay(sink, EventSourceFrames("sid", 1000)) is Outcome.UPSTREAM_ERROR
    events = sink.events()
    assert [e.event for e in events] == ["message", "error"]
    assert '"code":"boom"' in events[-1].data
    assert stream.closed


async def test_upstream_timeout_outcome(io_loop: Any) -> None:
    s, _ = session_for([chunk("a"), 1.0, chunk("b")], idle_timeout_s=0.05)
    sink = RecordingSink()
    assert await s.relay(sink, EventSourceFrames("sid", 1000)) is Outcome.UPSTREAM_TIMEOUT
    assert sink.events()[-1].event == "error"


async def test_client_gone_on_write_cancels_the_upstream(io_loop: Any) -> None:
    s, stream = session_for([chunk("a"), 0.05, chunk("b"), 30.0, chunk("c")])
    sink = RecordingSink(fail_at=2)
    with capture_logs() as logs:
        assert await s.relay(sink, EventSourceFrames("sid", 1000)) is Outcome.CLIENT_CLOSED
    assert stream.closed
    assert [e["outcome"] for e in logs if e["event"] == "stream"] == ["client_closed"]


async def test_client_closed_while_the_model_thinks_cancels_the_upstream(io_loop: Any) -> None:
    s, stream = session_for([30.0, chunk("a")], first_token_timeout_s=60)
    sink = RecordingSink()
    relay = asyncio.create_task(s.relay(sink, EventSourceFrames("sid", 1000)))
    await asyncio.sleep(0.05)
    s.client_closed()
    assert await asyncio.wait_for(relay, 2) is Outcome.CLIENT_CLOSED
    assert stream.closed
    assert sink.writes == []


async def test_accepted_raises_the_status_error(io_loop: Any) -> None:
    handler, _ = responder(429, [b'{"error": {"message": "slow"}}'], {"Retry-After": "2"})
    s = StreamSession(client(handler), {}, stream_id="x", settings=settings(),
                      metrics=Metrics(), endpoint="t")
    with pytest.raises(errors.UpstreamStatusError) as info:
        await s.accepted()
    assert info.value.http_status() == 429


async def test_collect_returns_the_whole_text(io_loop: Any) -> None:
    s, _ = session_for(list(GOOD))
    assert await s.collect() == "Hello"
    assert s.finish_reason == "stop" and s.outcome is Outcome.COMPLETED


async def test_channel_batches_and_tells_when_it_has_space_again(io_loop: Any) -> None:
    spaces: list[int] = []
    # the mark is in bytes: each delta costs its text plus a fixed overhead
    ch = Channel(high_water=2 * (1 + ITEM_OVERHEAD_BYTES), on_space=lambda: spaces.append(len(ch)))
    loop = asyncio.get_running_loop()
    ch.put_nowait(Delta("a"))
    assert not ch.full
    ch.put_nowait(Delta("b"))
    assert ch.full  # the producer pauses its upstream here
    assert await ch.get_batch(loop.time() + 1) == [Delta("a"), Delta("b")]
    assert spaces == [0]
    ch.put_nowait(Delta("c"))
    assert await ch.get_batch(loop.time() + 1) == [Delta("c")]
    assert spaces == [0]  # not full before: nobody to tell
    assert await ch.get_batch(loop.time() + 0.01) is None  # deadline: nothing queued
    ch.put_nowait(End("stop", None))
    ch.close()
    with pytest.raises(ClientGone):
        await ch.get_batch(loop.time() + 1)


async def test_channel_deadline_moves_earlier_and_later(io_loop: Any) -> None:
    ch = Channel()
    loop = asyncio.get_running_loop()
    started = loop.time()
    assert await ch.get_batch(started + 0.3) is None
    first = loop.time()
    assert first - started >= 0.29
    # A later deadline reuses the timer lazily; an earlier one must not wait for it.
    assert await ch.get_batch(first + 0.05) is None
    assert loop.time() - first < 0.25
    waiter = asyncio.create_task(ch.get_batch(loop.time() + 5))
    await asyncio.sleep(0.02)
    ch.put_nowait(Delta("x"))
    assert await asyncio.wait_for(waiter, 1) == [Delta("x")]
    ch.close()


async def test_a_client_that_does_not_read_pauses_the_upstream_read(io_loop: Any) -> None:
    # A flood into a client that never reads: the channel stops at its high-water mark
    # and the upstream socket is paused, so memory stays bounded (issue 2, backpressure).
    from servers import running, silent_client

    from sseproxy.mockupstream import Scenario
    from sseproxy.session import CHANNEL_HIGH_WATER_BYTES

    flood = Scenario(rate=5000, tokens=100_000)
    async with running(flood, sndbuf=8192) as r:
        async with silent_client(r):
            await r.wait_mock("open", 1, within=5)
            session = None
            for _ in range(100):
                sessions = list(r.deps.slots.sessions)
                if sessions and sessions[0].channel.full:
                    session = sessions[0]
                    break
                await asyncio.sleep(0.05)
            assert session is not None, "the channel never filled up"
            chat = session._chat
            assert chat is not None and chat._paused
            queued = session.channel.queued_bytes
            await asyncio.sleep(0.5)
            # past the mark by at most the rest of the read that crossed it (64 KiB of
            # chunks, each over 64 bytes), and no longer growing
            most = CHANNEL_HIGH_WATER_BYTES + 65536 + 65536 // 64 * ITEM_OVERHEAD_BYTES
            assert session.channel.queued_bytes == queued <= most
            assert session.upstream_watch.since is None  # paused is not an upstream stall
