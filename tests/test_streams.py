"""The stream machinery: generation → EventLog → subscribers, on a fake upstream (issue 14).

Each test wires the real parts (Generation, MemoryStore, Subscriber, StreamRegistry) to
httpx's MockTransport instead of a network, on virtual time (tests/virtualtime.py): the
fake upstream's pauses, the orphan grace and the stall sweep take no wall time, and waits
are on events and conditions.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable, MutableMapping
from typing import Any

import pytest
from fakes import GOOD, chunk, client, responder
from virtualtime import run_virtual, virtual_time
from hypothesis import HealthCheck, given, settings as hsettings, strategies as st
from structlog.testing import capture_logs

from sseproxy import config, errors, sse
from sseproxy.frames import EventSourceFrames
from sseproxy.generation import Generation
from sseproxy.metrics import Metrics
from sseproxy.pacing import PacingSettings
from sseproxy.record import Outcome, StreamRecord
from sseproxy.registry import StreamRegistry
from sseproxy.sink import ClientGone
from sseproxy.store import DONE, TEXT, FollowerClosed
from sseproxy.store.memory import MemoryFollower, MemoryStore
from sseproxy.subscriber import Ended, Subscriber

SID = "0" * 32


class RecordingSink:
    """A client: records every write; can leave from the n-th write on."""

    def __init__(self, leave_at: int | None = None) -> None:
        self.writes: list[bytes] = []
        self.leave_at = leave_at
        self.dropped = False

    async def send(self, data: bytes) -> None:
        if self.leave_at is not None and len(self.writes) + 1 >= self.leave_at:
            raise ClientGone
        self.writes.append(data)

    def drop(self) -> None:
        self.dropped = True

    def events(self) -> list[sse.Event]:
        return sse.Decoder().feed(b"".join(self.writes))


class Stuck(RecordingSink):
    """A client that stops reading: its second write completes only when it is dropped."""

    def __init__(self) -> None:
        super().__init__()
        self.closed = asyncio.Event()

    async def send(self, data: bytes) -> None:
        if self.writes:
            await self.closed.wait()
            raise ClientGone
        self.writes.append(data)

    def drop(self) -> None:
        super().drop()
        self.closed.set()


def cfg(**sections: Any) -> config.Settings:
    """Settings for these tests: one event per upstream delta (pacing off) unless given."""
    sections.setdefault("pacing", PacingSettings(mode="off"))
    return config.Settings(**sections)


class Kit:
    """One process's stream machinery around a fake upstream."""

    def __init__(self, parts: list[Any], settings: config.Settings | None = None,
                 **upstream: Any) -> None:
        self.settings = settings or cfg()
        handler, self.body = responder(parts=parts)
        self.upstream = client(handler, **upstream)
        self.metrics = Metrics()
        st_ = self.settings.store
        self.store = MemoryStore(max_events=st_.max_events, max_bytes=st_.max_bytes,
                                 ttl_s=st_.ttl_s)
        self.registry = StreamRegistry(10, lambda: self.settings)
        self.registry.start()

    def start(self, retained: bool = True, sid: str = SID) -> Generation:
        record = StreamRecord(self.metrics, sid, "test")
        gen = Generation(self.upstream, {"model": "m", "messages": []},
                         log=self.store.new_log(sid, retained=retained), record=record,
                         settings=self.settings)
        self.registry.add(gen)
        return gen

    def subscriber(self, gen: Generation, sink: RecordingSink, after: int = 0) -> Subscriber:
        stall = self.settings.stall
        sub = Subscriber(gen.log, after, EventSourceFrames(gen.stream_id, 1000), sink,
                         gen.record, heartbeat_s=self.settings.heartbeat.interval_s,
                         stall_threshold_s=stall.threshold_s,
                         client_timeout_s=stall.client_timeout_s)
        self.registry.attach(sub)
        return sub

    async def follow(self, gen: Generation, sink: RecordingSink, after: int = 0) -> Ended:
        sub = self.subscriber(gen, sink, after)
        try:
            return await sub.run()
        finally:
            self.registry.detach(sub)

    def close(self) -> None:
        self.registry.stop()
        self.store.stop()


def stream_lines(logs: list[MutableMapping[str, Any]]) -> list[MutableMapping[str, Any]]:
    return [entry for entry in logs if entry["event"] == "stream"]


@virtual_time
async def test_a_subscriber_gets_every_delta_then_done_with_consecutive_ids() -> None:
    kit = Kit(list(GOOD))
    sink = RecordingSink()
    with capture_logs() as logs:
        gen = kit.start()
        assert await kit.follow(gen, sink) is Ended.FINAL
        await gen.wait_closed()
    events = sink.events()
    assert [(e.event, e.id) for e in events] == [
        ("message", f"{SID}.1"), ("message", f"{SID}.2"), ("done", f"{SID}.3")]
    assert [e.data for e in events[:2]] == ['{"content":"Hel"}', '{"content":"lo"}']
    assert json.loads(events[2].data)["usage"]["completion_tokens"] == 2
    assert kit.body.closed
    line = stream_lines(logs)
    assert len(line) == 1 and line[0]["outcome"] == "completed"
    assert line[0]["events"] == 3 and line[0]["bytes"] == sum(map(len, sink.writes))
    assert line[0]["subscribers"] == 1 and line[0]["resumes"] == 0
    kit.close()


@virtual_time
async def test_two_subscribers_of_one_stream_each_get_it_whole() -> None:
    parts = [chunk("", role="assistant")] + [chunk(f"t{i} ") for i in range(50)] + [
        chunk(finish="stop"), b"data: [DONE]\n\n"]
    kit = Kit(parts)
    gen = kit.start()
    a, b = RecordingSink(), RecordingSink()
    assert list(await asyncio.gather(kit.follow(gen, a), kit.follow(gen, b))) == [Ended.FINAL] * 2
    assert b"".join(a.writes) == b"".join(b.writes)
    assert [e.id for e in a.events()] == [f"{SID}.{n}" for n in range(1, 52)]
    kit.close()


@virtual_time
async def test_a_reconnect_replays_what_followed_its_position_then_follows_live() -> None:
    parts: list[Any] = [chunk(f"w{i} ") for i in range(10)] + [0.2] + [
        chunk(f"v{i} ") for i in range(10)] + [chunk(finish="stop"), b"data: [DONE]\n\n"]
    kit = Kit(parts)
    gen = kit.start()
    first = RecordingSink(leave_at=2)  # leaves after its first write
    assert await kit.follow(gen, first) is Ended.GONE
    last = int(first.events()[-1].id.rsplit(".", 1)[1])
    second = RecordingSink()
    assert await kit.follow(gen, second, after=last) is Ended.FINAL
    ids = [int(e.id.rsplit(".", 1)[1]) for e in first.events() + second.events()]
    assert ids == list(range(1, 22))
    text = "".join(json.loads(e.data)["content"] for e in first.events() + second.events()
                   if e.event == "message")
    assert text == "".join(f"w{i} " for i in range(10)) + "".join(f"v{i} " for i in range(10))
    kit.close()


@hsettings(max_examples=40, deadline=None,
           suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(cuts=st.lists(st.integers(min_value=1, max_value=30), min_size=1, max_size=4),
       delays=st.lists(st.sampled_from([0.0, 0.001, 0.01]), min_size=4, max_size=4))
def test_any_cut_points_and_reconnect_delays_deliver_the_uninterrupted_sequence(
        cuts: list[int], delays: list[float]) -> None:
    parts: list[Any] = []
    for i in range(30):
        parts += [chunk(f"<{i}>"), 0.001] if i % 7 == 0 else [chunk(f"<{i}>")]
    parts += [chunk(finish="stop"), b"data: [DONE]\n\n"]

    async def scenario() -> tuple[list[sse.Event], list[sse.Event]]:
        kit = Kit(parts, cfg(store=config.StoreSettings(orphan_grace_s=5)))
        gen = kit.start()
        whole = RecordingSink()
        whole_task = asyncio.create_task(kit.follow(gen, whole))
        got: list[sse.Event] = []
        position = 0
        for cut, delay in zip(cuts, delays):
            sink = RecordingSink(leave_at=cut)
            ended = await kit.follow(gen, sink, after=position)
            got += sink.events()
            if got:
                position = int(got[-1].id.rsplit(".", 1)[1])
            if ended is Ended.FINAL:
                break
            await asyncio.sleep(delay)  # the reconnect's delay, within the grace
        else:
            rest = RecordingSink()
            await kit.follow(gen, rest, after=position)
            got += rest.events()
        await whole_task
        kit.close()
        return got, whole.events()

    got, whole = run_virtual(scenario())  # a loop of its own per example
    assert [(e.id, e.event, e.data) for e in got] == [(e.id, e.event, e.data) for e in whole]
    assert whole[-1].event == "done" and len(whole) == 31


@virtual_time
async def test_nobody_following_for_the_grace_abandons_the_generation() -> None:
    # The default grace (30 s) on virtual time: the model would answer after 600 s.
    kit = Kit([chunk("a"), 600.0, chunk("b")], cfg())
    loop = asyncio.get_running_loop()
    started = loop.time()
    with capture_logs() as logs:
        gen = kit.start()
        await asyncio.wait_for(gen.wait_ended(), 60)
    # ended within one sweep (at most 250 ms) after the grace, not before it
    assert 30.0 <= loop.time() - started <= 30.5
    assert kit.body.closed
    assert [e.kind for e in gen.log.since(0)] == [TEXT, "error"]  # type: ignore[attr-defined]
    assert json.loads(gen.log.since(1)[0].data)["error"]["code"] == "abandoned"  # type: ignore
    assert [e["outcome"] for e in stream_lines(logs)] == ["abandoned"]
    kit.close()


@virtual_time
async def test_stop_cancels_the_upstream_and_ends_the_log_with_its_reason() -> None:
    kit = Kit([chunk("a"), 30.0, chunk("b")])
    with capture_logs() as logs:
        gen = kit.start()
        sink = RecordingSink()
        follow = asyncio.create_task(kit.follow(gen, sink))
        await asyncio.wait_for(until(lambda: gen.log.last >= 1), 5)
        gen.stop(Outcome.CANCELLED, errors.ServerShutdown())
        assert await asyncio.wait_for(follow, 5) is Ended.FINAL
    assert kit.body.closed
    last = sink.events()[-1]
    assert last.event == "error" and "retry: 1000" in b"".join(sink.writes).decode()
    assert json.loads(last.data)["error"]["code"] == "server_shutdown"
    assert [e["outcome"] for e in stream_lines(logs)] == ["cancelled"]
    kit.close()


@virtual_time
async def test_an_internal_failure_ends_the_log_with_an_error_and_no_detail() -> None:
    import httpx

    async def broken(request: httpx.Request) -> httpx.Response:
        raise RuntimeError("a bug")

    kit = Kit([])
    kit.upstream = client(broken)
    sink = RecordingSink()
    with capture_logs() as logs:
        gen = kit.start()
        await kit.follow(gen, sink)
    assert b"event: error" in b"".join(sink.writes) and b"a bug" not in b"".join(sink.writes)
    assert [e["outcome"] for e in stream_lines(logs)] == ["internal_error"]
    kit.close()


@virtual_time
async def test_a_subscriber_that_stops_reading_is_dropped_and_the_others_go_on() -> None:
    parts: list[Any] = [chunk("a"), 0.3, chunk("b"), chunk(finish="stop"), b"data: [DONE]\n\n"]
    kit = Kit(parts, cfg(stall=config.StallSettings(threshold_s=0.05, client_timeout_s=0.1)))
    gen = kit.start()
    stuck, good = Stuck(), RecordingSink()
    results = list(await asyncio.wait_for(
        asyncio.gather(kit.follow(gen, stuck), kit.follow(gen, good)), 5))
    assert results == [Ended.DROPPED, Ended.FINAL]
    assert stuck.dropped
    assert [e.event for e in good.events()] == ["message", "message", "done"]
    kit.close()


@virtual_time
async def test_a_live_log_pauses_the_upstream_until_its_reader_catches_up() -> None:
    big = "x" * 4096
    parts: list[Any] = [chunk(big) for _ in range(200)]
    parts += [chunk(finish="stop"), b"data: [DONE]\n\n"]
    kit = Kit(parts)
    gen = kit.start(retained=False)
    await asyncio.wait_for(until(lambda: gen._paused), 5)
    assert gen.log.unread_bytes > 256 * 1024
    follower = gen.log.follow(0)
    loop = asyncio.get_running_loop()
    text, done = "", False
    while not done:
        events = await follower.next(loop.time() + 5)
        text += "".join(e.data for e in events if e.kind == TEXT)
        done = bool(events) and events[-1].kind == DONE
    assert len(text) == 200 * 4096
    follower.close()
    kit.close()


@virtual_time
async def test_a_closed_follower_raises_and_a_finished_log_replays_without_waiting() -> None:
    kit = Kit(list(GOOD))
    gen = kit.start()
    await asyncio.wait_for(gen.wait_ended(), 5)
    loop = asyncio.get_running_loop()
    follower = gen.log.follow(1)
    assert [e.n for e in await follower.next(loop.time() + 60)] == [2, 3]
    follower.close()
    with pytest.raises(FollowerClosed):
        await follower.next(loop.time() + 60)
    kit.close()


@virtual_time
async def test_the_store_evicts_finished_logs_and_refuses_a_live_one_past_its_bytes() -> None:
    evicted: list[int] = []
    store = MemoryStore(max_events=100, max_bytes=10_000, ttl_s=600,
                        on_evict=lambda: evicted.append(1))
    for i in range(10_000):  # 10,000 finished streams stay within the bound
        log = await store.create(f"{i:032x}")
        log.append(TEXT, "x" * 100)
        log.append(DONE, "{}")
        log.end()
    assert store.bytes <= 10_000 and store.streams < 100 and evicted
    live = await store.create("f" * 32)
    with pytest.raises(errors.LogFull):
        for _ in range(200):
            live.append(TEXT, "y" * 200)
    assert store.bytes <= 10_000 + 120 + 2  # past it only by a final event
    await store.close()


@virtual_time
async def test_a_finished_log_expires_after_its_ttl() -> None:
    now = [0.0]
    store = MemoryStore(max_events=100, max_bytes=1 << 20, ttl_s=10, clock=lambda: now[0])
    log = await store.create(SID)
    log.append(DONE, "{}")
    log.end()
    now[0] = 9.9
    assert await store.get(SID) is log
    now[0] = 10.0
    assert await store.get(SID) is None and store.bytes == 0
    await store.close()


@virtual_time
async def test_the_virtual_clock_jumps_to_the_next_timer() -> None:
    loop = asyncio.get_running_loop()
    started = loop.time()
    await asyncio.sleep(3600)
    assert loop.time() - started == pytest.approx(3600)


async def until(condition: Callable[[], bool]) -> None:
    while not condition():
        await asyncio.sleep(0.005)


# --- news written from the appending code (issue 14, performance guard) ----------------


class DirectSink(RecordingSink):
    """A client whose socket can be written from a callback (like ConnectionSink): each
    write is recorded with how it came (``now``: from the append; ``loop``: the writer
    loop). While ``full`` its socket buffer takes nothing more: a write from a callback is
    queued, and ``send(b"")`` waits until ``drained`` is set."""

    def __init__(self) -> None:
        super().__init__()
        self.how: list[str] = []
        self.full = False
        self.queued = False
        self.drained = asyncio.Event()

    def ready(self) -> bool:
        return not self.queued

    def send_now(self, data: bytes) -> bool:
        self.writes.append(data)
        self.how.append("now")
        self.queued = self.full
        return not self.full

    async def send(self, data: bytes) -> None:
        if self.queued or (self.full and data):
            await self.drained.wait()
            self.queued = False
        if data:
            self.writes.append(data)
            self.how.append("loop")


def live_subscriber(store: MemoryStore, sink: RecordingSink, after: int = 0,
                    retained: bool = False, heartbeat_s: float = 15.0,
                    ) -> tuple[Any, Subscriber]:
    log = store.new_log(SID, retained=retained)
    record = StreamRecord(Metrics(), SID, "test")
    sub = Subscriber(log, after, EventSourceFrames(SID, 1000), sink, record,
                     heartbeat_s=heartbeat_s, stall_threshold_s=5.0, client_timeout_s=30.0)
    return log, sub


async def waiting(sub: Subscriber) -> None:
    """Until the subscriber's loop waits for news (caught up)."""
    follower = sub.follower
    assert isinstance(follower, MemoryFollower)
    await asyncio.wait_for(until(lambda: follower._fut is not None), 5)


def ids(sink: RecordingSink) -> list[str | None]:
    return [e.id for e in sink.events()]


@virtual_time
async def test_appends_held_over_one_read_reach_a_waiting_subscriber_in_one_write() -> None:
    store = MemoryStore(max_events=100, max_bytes=1 << 20, ttl_s=60)
    sink = DirectSink()
    log, sub = live_subscriber(store, sink)
    task = asyncio.create_task(sub.run())
    await waiting(sub)
    log.hold()
    for text in ("a", "b", "c"):
        log.append(TEXT, text)
    assert sink.writes == []  # held: nothing told yet
    log.release()
    # written at once, from the release, in one write, before the loop ran again
    assert sink.how == ["now"]
    assert ids(sink) == [f"{SID}.1", f"{SID}.2", f"{SID}.3"]
    log.append(DONE, "{}")
    assert await asyncio.wait_for(task, 5) is Ended.FINAL
    assert sink.how == ["now", "now"] and ids(sink)[-1] == f"{SID}.4"
    store.stop()


@virtual_time
async def test_a_full_socket_buffer_hands_the_news_to_the_loop_in_order() -> None:
    store = MemoryStore(max_events=100, max_bytes=1 << 20, ttl_s=60)
    sink = DirectSink()
    log, sub = live_subscriber(store, sink)
    task = asyncio.create_task(sub.run())
    await waiting(sub)
    sink.full = True
    log.append(TEXT, "a")  # goes out in part; the rest is queued: the loop waits for it
    assert sink.how == ["now"] and sink.queued
    await asyncio.sleep(0)
    log.append(TEXT, "b")  # not written from here while something is queued
    log.append(TEXT, "c")
    assert sink.how == ["now"]
    assert log.unread_bytes > 0  # unread: counted for the upstream's backpressure
    sink.full = False
    sink.drained.set()
    await waiting(sub)
    assert log.unread_bytes == 0
    assert sink.how == ["now", "loop"]  # b and c, in one write of the loop
    log.append(DONE, "{}")
    assert await asyncio.wait_for(task, 5) is Ended.FINAL
    assert ids(sink) == [f"{SID}.{n}" for n in range(1, 5)]
    store.stop()


@virtual_time
async def test_a_replay_racing_live_appends_keeps_the_log_order_without_duplicates() -> None:
    store = MemoryStore(max_events=100, max_bytes=1 << 20, ttl_s=60)
    sink = DirectSink()
    log, sub = live_subscriber(store, sink, retained=True)
    for n in range(1, 6):
        log.append(TEXT, str(n))
    sub2 = Subscriber(
        log, 2, EventSourceFrames(SID, 1000), sink2 := DirectSink(),
        StreamRecord(Metrics(), SID, "test"), heartbeat_s=15.0, stall_threshold_s=5.0,
        client_timeout_s=30.0)
    sink2.full = True  # the replay's write waits in the loop…
    tasks = [asyncio.create_task(sub.run()), asyncio.create_task(sub2.run())]
    await asyncio.sleep(0)
    for n in range(6, 9):  # … while the generation appends
        log.append(TEXT, str(n))
        await asyncio.sleep(0)
    sink2.full = False
    sink2.drained.set()
    log.append(DONE, "{}")
    assert await asyncio.wait_for(asyncio.gather(*tasks), 5) == [Ended.FINAL] * 2
    assert ids(sink) == [f"{SID}.{n}" for n in range(1, 10)]
    assert ids(sink2) == [f"{SID}.{n}" for n in range(3, 10)]
    assert "now" in sink.how  # the caught-up one took the direct path
    assert log.subscribers == 0
    store.stop()


@virtual_time
async def test_a_heartbeat_follows_the_last_write_from_the_append() -> None:
    store = MemoryStore(max_events=100, max_bytes=1 << 20, ttl_s=60)
    sink = DirectSink()
    log, sub = live_subscriber(store, sink, heartbeat_s=10.0)
    loop = asyncio.get_running_loop()
    task = asyncio.create_task(sub.run())
    await waiting(sub)
    await asyncio.sleep(6)
    log.append(TEXT, "a")  # at 6 s, written from the append
    wrote_at = loop.time()
    assert sink.how == ["now"]
    await asyncio.wait_for(until(lambda: len(sink.writes) == 2), 30)
    assert sink.writes[1] == b": ping\n\n"
    assert loop.time() >= wrote_at + 10.0 - 0.01  # not at 10 s, the deadline before it
    sub.client_closed()
    assert await asyncio.wait_for(task, 5) is Ended.GONE
    store.stop()


@virtual_time
async def test_a_client_gone_during_a_write_from_the_append_ends_its_subscriber() -> None:
    store = MemoryStore(max_events=100, max_bytes=1 << 20, ttl_s=60)

    class Gone(DirectSink):
        def send_now(self, data: bytes) -> bool:
            raise ClientGone

    log, sub = live_subscriber(store, Gone())
    task = asyncio.create_task(sub.run())
    await waiting(sub)
    log.append(TEXT, "a")
    assert await asyncio.wait_for(task, 5) is Ended.GONE
    assert log.subscribers == 0
    store.stop()


@virtual_time
async def test_a_final_event_that_shows_as_nothing_ends_a_subscriber_told_from_the_append(
) -> None:
    # A relayed Responses stream whose upstream's own final event already went out: the
    # log's final event adds no bytes, and the subscriber must end all the same.
    store = MemoryStore(max_events=100, max_bytes=1 << 20, ttl_s=60)

    class Silent(EventSourceFrames):
        def events(self, events: list[Any]) -> bytes:
            return super().events([e for e in events if not e.final])

    sink = DirectSink()
    log = store.new_log(SID, retained=False)
    record = StreamRecord(Metrics(), SID, "test")
    sub = Subscriber(log, 0, Silent(SID, 1000), sink, record,
                     heartbeat_s=15.0, stall_threshold_s=5.0, client_timeout_s=30.0)
    task = asyncio.create_task(sub.run())
    await waiting(sub)
    log.append(TEXT, "a")
    assert sink.how == ["now"]
    log.append(DONE, "{}")
    log.end()
    assert await asyncio.wait_for(task, 5) is Ended.FINAL
    assert ids(sink) == [f"{SID}.1"]
    store.stop()
