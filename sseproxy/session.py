"""One generation: upstream deltas → outgoing frames, with its outcome and canonical log line.

A :class:`StreamSession` runs two coroutines:

* the *pump* (a task the session owns) opens the upstream request, reads its
  deltas and puts them in a :class:`Channel` bounded in bytes, ending with an end or a
  failure item. When the channel is full the pump waits, so a slow client
  slows the upstream read instead of growing memory;
* the *writer* (:meth:`StreamSession.relay`, run by the handler) writes to the
  client: it takes every item that is ready, turns them into bytes with a
  :class:`~sseproxy.frames.Frames` format, writes them in one write and waits
  for the flush (backpressure, and the way a closed client is noticed). When
  nothing arrives for ``heartbeat.interval_s`` it writes a ``: ping`` comment
  instead. With pacing off and a :class:`DirectSink`, a text delta that arrives
  while the writer idles (nothing queued, nothing being flushed) is written
  from the upstream callback instead, saving a task switch per token; whatever
  the socket does not take at once is queued in order, so the writer's next
  write waits behind it and a ping never lands inside a frame.

When the client goes away (a failed flush, or the handler's
``on_connection_close``), the pump is cancelled and the upstream response
closed at once. The session logs one canonical ``stream`` line at its end.
"""

from __future__ import annotations

import asyncio
import enum
import time
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

import structlog

from . import errors
from .frames import Frames
from .config import Settings
from .metrics import Metrics, upstream_status_label
from .pacing import Pacer
from .upstream import ChatStream, Delta, UpstreamClient

log = structlog.get_logger("sseproxy.stream")

#: Bytes the pump may queue before it pauses the upstream read: the text of the queued
#: deltas (its length: one byte per character for ASCII, as Python stores it) plus
#: ``ITEM_OVERHEAD_BYTES`` per item. Counted in bytes, not deltas, so 1 MB deltas do not
#: queue 256 MB.
CHANNEL_HIGH_WATER_BYTES = 256 * 1024
#: What one queued item costs besides its text (the objects that carry it).
ITEM_OVERHEAD_BYTES = 128
#: A deadline timer that fires this close to its deadline counts as on time.
_TIMER_SLACK_S = 0.001
#: How long a cancelled pump gets to close the upstream response.
PUMP_CLOSE_TIMEOUT_S = 2.0


class Outcome(enum.StrEnum):
    """How a stream ended (the ``outcome`` label and log field)."""

    COMPLETED = "completed"
    CLIENT_CLOSED = "client_closed"
    CLIENT_STALLED = "client_stalled"
    UPSTREAM_ERROR = "upstream_error"
    UPSTREAM_TIMEOUT = "upstream_timeout"
    CANCELLED = "cancelled"
    REJECTED = "rejected"
    INTERNAL_ERROR = "internal_error"


def outcome_of(error: errors.SSEProxyError) -> Outcome:
    if isinstance(error, errors.ServerShutdown):
        return Outcome.CANCELLED
    if isinstance(error, errors.UpstreamTimeout):
        return Outcome.UPSTREAM_TIMEOUT
    if isinstance(error, errors.UpstreamError):
        return Outcome.UPSTREAM_ERROR
    if isinstance(error, errors.RequestError):
        return Outcome.REJECTED
    return Outcome.INTERNAL_ERROR


class ClientGone(Exception):
    """The client closed the connection (raised by a sink or a closed channel)."""


class Sink(Protocol):
    async def send(self, data: bytes) -> None:
        """Write and flush (``b""``: wait for what was written before); raise
        :class:`ClientGone` when the client has left."""


@runtime_checkable
class DirectSink(Sink, Protocol):
    """A sink that can also take a frame at once, without a task switch."""

    def ready(self) -> bool:
        """Whether a frame written now goes straight out (nothing queued before it)."""

    def send_now(self, data: bytes) -> bool:
        """Write ``data`` now (after :meth:`ready`); whether it all went out. What did not
        is queued, and the next :meth:`~Sink.send` waits behind it (``send(b"")`` waits
        for it alone). Raises :class:`ClientGone`."""


@dataclass(frozen=True, slots=True)
class End:
    finish_reason: str
    usage: Mapping[str, Any] | None


@dataclass(frozen=True, slots=True)
class Failed:
    error: errors.SSEProxyError


@dataclass(frozen=True, slots=True)
class Drain:
    """A frame written from the upstream callback did not go out whole: the writer waits
    until it has (watched for a client stall, as any write of its own)."""


DRAIN = Drain()

Item = Delta | End | Failed | Drain


class Channel:
    """A single-producer, single-consumer queue with a high-water mark in bytes and
    ``close()``.

    The producer (the upstream's byte callback) never waits: once the channel is
    :attr:`full` it pauses the upstream, and ``on_space`` is called when the consumer has
    taken the items. ``get_batch`` returns every queued item at once (so frames due
    together go out in one write), or ``None`` when its deadline passes with nothing
    queued. The deadline timer is kept and moved on lazily rather than made per wait.
    """

    def __init__(self, high_water: int = CHANNEL_HIGH_WATER_BYTES,
                 on_space: Callable[[], None] | None = None) -> None:
        self._items: deque[Item] = deque()
        #: What the queued items cost, in bytes (see ``CHANNEL_HIGH_WATER_BYTES``).
        self.queued_bytes = 0
        self._high_water = high_water
        self._on_space = on_space
        self._loop = asyncio.get_running_loop()
        self._getter: asyncio.Future[None] | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._deadline = 0.0
        self.closed = False

    def __len__(self) -> int:
        return len(self._items)

    @property
    def full(self) -> bool:
        return self.queued_bytes >= self._high_water

    def _wake(self) -> None:
        fut = self._getter
        if fut is not None and not fut.done():
            fut.set_result(None)

    @property
    def waiting(self) -> bool:
        """The consumer waits in ``get_batch`` with nothing queued (and was not woken)."""
        fut = self._getter
        return fut is not None and not fut.done() and not self._items

    def put_nowait(self, item: Item) -> None:
        self._items.append(item)
        if isinstance(item, Delta):
            self.queued_bytes += len(item.content) + ITEM_OVERHEAD_BYTES
        else:
            self.queued_bytes += ITEM_OVERHEAD_BYTES
        if self._getter is not None:
            self._wake()

    def close(self) -> None:
        """Wake the consumer; ``get_batch`` then raises :class:`ClientGone`."""
        self.closed = True
        self._wake()
        self.cancel_timer()

    def cancel_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _on_timer(self) -> None:
        self._timer = None
        if self._getter is None:
            return  # nobody waits: the next get_batch sets its own deadline
        if self._loop.time() + _TIMER_SLACK_S >= self._deadline:
            self._wake()
        else:
            self._timer = self._loop.call_at(self._deadline, self._on_timer)

    async def get_batch(self, deadline: float) -> list[Item] | None:
        """Every queued item, waiting until ``deadline`` (loop time) if there is none."""
        if not self._items and not self.closed:
            self._deadline = deadline
            timer = self._timer
            if timer is None or timer.when() > deadline:
                if timer is not None:
                    timer.cancel()
                self._timer = self._loop.call_at(deadline, self._on_timer)
            self._getter = fut = self._loop.create_future()
            try:
                await fut
            finally:
                self._getter = None
        if self.closed:
            raise ClientGone
        if not self._items:
            return None
        was_full = self.queued_bytes >= self._high_water
        items = list(self._items)
        self._items.clear()
        self.queued_bytes = 0
        if was_full and self._on_space is not None:
            self._on_space()
        return items


class StallWatch:
    """One side of one stream: a wait that lasts ``threshold`` seconds is a stall episode.

    ``begin()``/``end()`` bracket each wait (an upstream read, a client flush) and only
    note the time: they run for every token, so they start no timer. :class:`StallMonitor`
    sweeps the running sessions a few times per threshold and calls :meth:`check`. The
    episode ends when the wait ends (or the stream does, through :meth:`end`).
    """

    __slots__ = ("side", "threshold", "episodes", "stalled", "since", "_session", "_loop")

    def __init__(self, session: StreamSession, side: str, threshold: float) -> None:
        self.side = side
        self.threshold = threshold
        self.episodes = 0
        self.stalled = False
        #: When the current wait began (loop time), None between waits.
        self.since: float | None = None
        self._session = session
        self._loop = asyncio.get_running_loop()

    def begin(self) -> None:
        if self.since is None:
            self.since = self._loop.time()

    def end(self) -> None:
        self.since = None
        if self.stalled:
            self.stalled = False
            self._session.stall_changed(self, False)

    def check(self, now: float) -> float:
        """Start an episode if the current wait passed the threshold; return its length."""
        if self.since is None:
            return 0.0
        waited = now - self.since
        if waited >= self.threshold and not self.stalled:
            self.stalled = True
            self.episodes += 1
            self._session.stall_changed(self, True)
        return waited


class StallMonitor:
    """Sweeps the running sessions: stall episodes on both sides, and clients that have not
    read for ``stall.client_timeout_s`` are disconnected. One timer per process, whatever
    the number of streams; it runs every quarter of the shortest threshold (20 ms–250 ms).
    """

    def __init__(self, sessions: set[StreamSession], settings: Callable[[], Settings]) -> None:
        self.sessions = sessions
        self.settings = settings
        self._loop = asyncio.get_running_loop()
        self._timer: asyncio.TimerHandle | None = None

    def start(self) -> None:
        if self._timer is None:
            self._schedule()

    def stop(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _schedule(self) -> None:
        stall = self.settings().stall
        tick = min(max(min(stall.threshold_s, stall.client_timeout_s) / 4, 0.02), 0.25)
        self._timer = self._loop.call_later(tick, self.sweep)

    def sweep(self) -> None:
        now = self._loop.time()
        try:
            for session in list(self.sessions):
                try:
                    session.upstream_watch.check(now)
                    if session.client_watch.check(now) >= session.client_timeout_s:
                        session.client_timed_out()
                except Exception:  # one broken session must not stop the monitor
                    log.exception("stall_monitor_error", stream_id=session.stream_id)
        finally:
            self._schedule()


def _p99(values: list[float]) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(0.99 * len(ordered)))]


class StreamSession:
    """One upstream generation relayed to one client.

    It takes the settings snapshot of the request that started it (a reload applies to
    later streams), and records its metrics and its canonical log line.
    """

    def __init__(
        self,
        upstream: UpstreamClient,
        body: Mapping[str, Any],
        *,
        settings: Settings,
        metrics: Metrics,
        stream_id: str,
        endpoint: str,
        request_id: str | None = None,
        log_fields: Mapping[str, Any] | None = None,
    ) -> None:
        self.upstream = upstream
        self.body = body
        self.settings = settings
        self.heartbeat_s = settings.heartbeat.interval_s
        self.metrics = metrics
        self.stream_id = stream_id
        self.endpoint = endpoint
        self.request_id = request_id
        self.log_fields = dict(log_fields or {})
        self.channel = Channel(on_space=self._channel_has_space)
        self.started = time.monotonic()
        self.ttft_s: float | None = None
        self.events = 0
        self.bytes = 0
        self.heartbeats = 0
        self.max_gap_s = 0.0
        self.lags: list[float] = []
        self.outcome: Outcome | None = None
        self.error: errors.SSEProxyError | None = None
        self.finish_reason: str | None = None
        self.usage: Mapping[str, Any] | None = None
        threshold = settings.stall.threshold_s
        self.client_timeout_s = settings.stall.client_timeout_s
        #: Called to drop a client that stopped reading (set by the handler).
        self.disconnect: Callable[[], None] | None = None
        self.upstream_watch = StallWatch(self, "upstream", threshold)
        self.client_watch = StallWatch(self, "client", threshold)
        self._chat: ChatStream | None = None
        self._up_usage: Mapping[str, Any] | None = None
        self._up_finish: str | None = None
        self._accepted = asyncio.Event()
        self._open_error: errors.SSEProxyError | None = None
        self._pump_task: asyncio.Task[None] | None = None
        self._last_event_at: float | None = None
        self._loop = asyncio.get_running_loop()
        #: Loop time of the last write to the client (heartbeats are owed from it).
        self._last_write = 0.0
        #: Set while ``relay`` runs with pacing off and a :class:`DirectSink`: text deltas
        #: that arrive while the writer idles are written from the upstream callback.
        self._direct: tuple[DirectSink, Frames] | None = None
        #: Frames of the current upstream read, written when the read has been parsed.
        self._held: list[bytes] = []
        self._logged = False
        metrics.streams_active.inc()
        #: This stream's share of the per-event metrics (summed at each scrape).
        self.tally = metrics.tallies.open()

    # --- the pump ------------------------------------------------------------

    def start(self) -> None:
        if self._pump_task is None:
            self._pump_task = asyncio.create_task(self._pump(), name=f"pump-{self.stream_id}")

    @property
    def upstream_status(self) -> int | None:
        return self._chat.status if self._chat is not None else None

    @property
    def model(self) -> str | None:
        return self._chat.model if self._chat is not None else None

    def _on_delta(self, delta: Delta) -> None:
        """Called by the upstream stream for each delta, as its bytes arrive."""
        if delta.usage is not None:
            self._up_usage = delta.usage
        if delta.finish_reason is not None:
            self._up_finish = delta.finish_reason
        direct = self._direct
        if (direct is not None and delta.content and delta.role is None
                and self.channel.waiting and direct[0].ready()):
            # Nothing queued and the writer idle: the frame is written at the end of this
            # read (with the others of the same read), without waking the writer task.
            # The same frame and bookkeeping as the writer's; pacing is off.
            self._held.append(direct[1].text(delta.content))
            self._text_sent(0.0)
            return
        if self._held:
            self._send_held()  # what came before goes first
        if delta.content or delta.role:
            channel = self.channel
            channel.put_nowait(delta)
            if channel.full and self._chat is not None:
                self._chat.pause()  # a slow client slows the upstream read, not memory

    def _send_held(self) -> None:
        """Write the frames held during this upstream read, in one write."""
        held, self._held = self._held, []
        direct = self._direct
        if not held or direct is None:
            return
        data = b"".join(held)
        try:
            whole = direct[0].send_now(data)
        except ClientGone:
            return  # the handler was told (on_connection_close) and ends the stream
        if not whole:
            self.channel.put_nowait(DRAIN)
        self._last_write = self._loop.time()
        self._count_events(len(held))
        self._count_bytes(len(data))

    def _channel_has_space(self) -> None:
        if self._chat is not None:
            self._chat.resume()

    async def _pump(self) -> None:
        try:
            self._chat = chat = self.upstream.open(self.body, request_id=self.request_id)
            chat.waits = self.upstream_watch
            try:
                await chat.connect()
            except errors.SSEProxyError as exc:
                self._count_upstream(chat.status, exc)
                raise
            self._count_upstream(chat.status, None)
            async with chat:
                self._accepted.set()
                await chat.run(self._on_delta, self._send_held)
            self.channel.put_nowait(End(self._up_finish or "stop", self._up_usage))
        except errors.SSEProxyError as exc:
            self._fail(exc)
        except Exception:
            log.exception("stream_internal_error", stream_id=self.stream_id)
            self._fail(errors.SSEProxyError("sseproxy failed while relaying this reply"))
        finally:
            self.upstream_watch.end()
            self._accepted.set()

    def _count_upstream(self, status: int | None, error: errors.SSEProxyError | None) -> None:
        timed_out = isinstance(error, errors.UpstreamTimeout)
        self.metrics.upstream_requests.labels(upstream_status_label(status, timed_out)).inc()

    def stall_changed(self, watch: StallWatch, stalled: bool) -> None:
        """A :class:`StallWatch` began or ended an episode."""
        if stalled:
            self.metrics.stalls.labels(watch.side).inc()
            self.metrics.streams_stalled.labels(watch.side).inc()
            log.info("stall", stream_id=self.stream_id, side=watch.side,
                     threshold_s=watch.threshold)
        else:
            self.metrics.streams_stalled.labels(watch.side).dec()

    def _fail(self, error: errors.SSEProxyError) -> None:
        if not self._accepted.is_set():
            self._open_error = error
        self.channel.put_nowait(Failed(error))

    async def accepted(self) -> None:
        """Wait until the upstream accepted the request; raise its error if it did not.

        Raises :class:`ClientGone` when the client left while waiting.
        """
        self.start()
        await self._accepted.wait()
        if self.channel.closed:
            raise ClientGone
        if self._open_error is not None:
            raise self._open_error

    def _cancel_pump(self) -> None:
        """Cancel the pump once: a second cancel would interrupt its clean-up (closing the
        upstream response) half-way."""
        task = self._pump_task
        if task is not None and not task.done() and not task.cancelling():
            task.cancel()

    async def stop(self) -> None:
        """Cancel the upstream request (if still running) and wait until it is closed."""
        task = self._pump_task
        if task is None or task.done():
            return
        self._cancel_pump()
        await asyncio.wait([task], timeout=PUMP_CLOSE_TIMEOUT_S)

    def shut_down(self) -> None:
        """The server is stopping: cancel the upstream; what was received is still sent
        (within ``pacing.drain_s``), then a ``server_shutdown`` error ends the stream."""
        error = errors.ServerShutdown()
        if not self._accepted.is_set():
            self._open_error = error  # no headers yet: the OpenAI endpoint answers 503
        self._cancel_pump()
        self.channel.put_nowait(Failed(error))

    def client_timed_out(self) -> None:
        """The client has not read for ``stall.client_timeout_s``: drop it (its buffers go
        with the connection) and stop the upstream."""
        self._finish(Outcome.CLIENT_STALLED)
        if self.disconnect is not None:
            self.disconnect()
        self.client_closed()

    def client_closed(self) -> None:
        """The client went away: stop the upstream now and wake the writer."""
        if self.outcome is None:
            self.outcome = Outcome.CLIENT_CLOSED
        self.channel.close()
        self._accepted.set()
        self._cancel_pump()

    # --- the writer ------------------------------------------------------------

    async def relay(self, sink: Sink, frames: Frames) -> Outcome:
        """Write the generation to ``sink`` until it ends; return the outcome.

        Deltas go through the pacer: the loop sleeps until the next piece is due, new
        text arrives, or a heartbeat is owed, whichever comes first, and writes all
        that is due at once. The end (or failure) is written after the pacer drained.
        """
        self.start()
        loop = asyncio.get_running_loop()
        pacer = Pacer(self.settings.pacing)
        end: End | Failed | None = None
        self._last_write = loop.time()
        if self.settings.pacing.mode == "off" and isinstance(sink, DirectSink):
            self._direct = (sink, frames)
        try:
            while True:
                wake = self._last_write + self.heartbeat_s
                due = pacer.next_due()
                if due is not None and due < wake:
                    wake = due
                items = await self.channel.get_batch(wake)
                now = loop.time()
                parts: list[bytes] = []
                drain = False
                for item in items or ():
                    if isinstance(item, Delta):
                        if item.role is not None:
                            # The role chunk leaves at once (before any text, as it came).
                            parts.append(frames.delta(Delta(role=item.role)))
                        if item.content:
                            pacer.push(item.content, now)
                    elif isinstance(item, Drain):
                        drain = True
                    elif end is None:
                        end = item
                        pacer.finish(now)
                for piece in pacer.pull(now):
                    parts.append(frames.text(piece.text))
                    self._text_sent(max(0.0, now - piece.arrived))
                done = end is not None and not pacer.pending
                if done:
                    parts.append(self._end_frame(end, frames))
                parts = [part for part in parts if part]
                if parts:
                    await self._send_events(sink, parts)
                    self._last_write = loop.time()
                elif drain:
                    await self.write(sink, b"")  # waits until what is queued has gone out
                elif now - self._last_write >= self.heartbeat_s:
                    self.heartbeats += 1
                    self.metrics.heartbeats.inc()
                    await self.write(sink, frames.heartbeat)
                    self._last_write = loop.time()
                if done:
                    break
        except ClientGone:
            self._finish(Outcome.CLIENT_CLOSED)
        finally:
            self._direct = None  # nothing is written after the writer is done
            self.channel.cancel_timer()
            if self.outcome is None:
                self._finish(Outcome.CANCELLED)
            await self.stop()
            self.log_line()
        assert self.outcome is not None
        return self.outcome

    def _end_frame(self, end: End | Failed | None, frames: Frames) -> bytes:
        if isinstance(end, End):
            self.finish_reason, self.usage = end.finish_reason, end.usage
            self._finish(Outcome.COMPLETED)
            return frames.end(end.finish_reason, end.usage)
        assert end is not None
        self.error = end.error
        self._finish(outcome_of(end.error))
        return frames.error(end.error)

    async def collect(self) -> str:
        """Read the whole reply (for ``stream: false``); raise the failure if there is one.

        The caller writes the response and then calls :meth:`log_line`.
        """
        self.start()
        loop = asyncio.get_running_loop()
        text: list[str] = []
        try:
            while True:
                items = await self.channel.get_batch(loop.time() + self.heartbeat_s)
                for item in items or ():
                    if isinstance(item, Delta):
                        if item.content:
                            self._first_text()
                        text.append(item.content)
                    elif isinstance(item, End):
                        self.finish_reason, self.usage = item.finish_reason, item.usage
                        self._finish(Outcome.COMPLETED)
                        return "".join(text)
                    elif isinstance(item, Failed):
                        self.error = item.error
                        self._finish(outcome_of(item.error))
                        raise item.error
        except ClientGone:
            self._finish(Outcome.CLIENT_CLOSED)
            raise
        finally:
            self.channel.cancel_timer()
            if self.outcome is None:
                self._finish(Outcome.CANCELLED)
            await self.stop()

    def _text_sent(self, lag: float) -> None:
        """A text frame is on its way; ``lag``: how long its text waited in the pacer."""
        self._first_text()
        self.lags.append(lag)
        self.tally.lag(lag)

    def _first_text(self) -> None:
        if self.ttft_s is None:
            self.ttft_s = time.monotonic() - self.started
            self.metrics.ttft.observe(self.ttft_s)

    async def _send_events(self, sink: Sink, parts: list[bytes]) -> None:
        """Write events (several due together go in one write) and record their gap."""
        await self.write(sink, b"".join(parts))
        self._count_events(len(parts))

    def _count_events(self, n: int) -> None:
        now = time.monotonic()
        if self._last_event_at is not None:
            gap = now - self._last_event_at
            if gap > self.max_gap_s:
                self.max_gap_s = gap
            self.tally.gap(gap)
        self._last_event_at = now
        self.events += n
        self.tally.events += n

    def _count_bytes(self, size: int) -> None:
        self.bytes += size
        self.tally.bytes += size

    async def write(self, sink: Sink, data: bytes) -> None:
        """Write ``data`` to the client through this session (counted, watched for stalls)."""
        self.client_watch.begin()
        try:
            await sink.send(data)
        finally:
            self.client_watch.end()
        self._count_bytes(len(data))

    def record_body(self, size: int) -> None:
        """A non-streaming reply of ``size`` bytes was written (one event)."""
        self.events, self.bytes = 1, size
        self.tally.events += 1
        self.tally.bytes += size

    def _finish(self, outcome: Outcome) -> None:
        """Record the outcome; the first one wins (a client that left stays ``client_closed``)."""
        if self.outcome is None:
            self.outcome = outcome

    def reject(self, error: errors.SSEProxyError) -> None:
        """Record a failure that ended the stream before any relay (an HTTP error status)."""
        self.error = error
        self._finish(outcome_of(error))
        self.log_line()

    def log_line(self) -> None:
        """End the stream's bookkeeping: metrics and the canonical log line (once)."""
        if self._logged:
            return
        self._logged = True
        self.upstream_watch.end()
        self.client_watch.end()
        duration = time.monotonic() - self.started
        outcome = self.outcome or Outcome.CANCELLED
        m = self.metrics
        m.streams_active.dec()
        m.tallies.close(self.tally)
        m.streams.labels(str(outcome)).inc()
        m.stream_duration.observe(duration)
        usage = self.usage or {}
        p99 = _p99(self.lags)
        log.info(
            "stream",
            stream_id=self.stream_id,
            endpoint=self.endpoint,
            outcome=str(outcome),
            duration_s=round(duration, 4),
            ttft_s=None if self.ttft_s is None else round(self.ttft_s, 4),
            events=self.events,
            bytes=self.bytes,
            heartbeats=self.heartbeats,
            stalls=self.upstream_watch.episodes + self.client_watch.episodes,
            max_gap_s=round(self.max_gap_s, 4),
            pacing_lag_p99_s=None if p99 is None else round(p99, 4),
            upstream_status=self.upstream_status,
            finish_reason=self.finish_reason,
            error_code=self.error.error_code() if self.error else None,
            prompt_tokens=usage.get("prompt_tokens"),
            completion_tokens=usage.get("completion_tokens"),
            **self.log_fields,
        )
