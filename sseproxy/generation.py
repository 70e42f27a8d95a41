"""A generation: one upstream request whose deltas go through the pacer into a stream's log.

The data path is ``upstream → pacer → EventLog``; nothing here writes to a client. Text
arrives in the upstream's byte callback (:meth:`Generation._on_delta`); with pacing off it
is appended to the log at once, otherwise the pacer decides when each piece leaves and one
timer per stream releases the queued pieces at their due time. When the upstream ends, what
the pacer still holds is drained within ``pacing.drain_s`` and the log ends with exactly
one ``done`` or ``error`` event; ``done`` also tells what pacing did (its ``pacing`` field:
the characters a burst had spread, the longest added lag).

A ``/v1/responses`` stream whose upstream speaks the Responses API (:attr:`Generation.relay`)
also gets the upstream's own events into its log (a delta's ``event``). Such an event must
not overtake text the pacer still holds: while the pacer holds text, it waits (with every
delta after it) in a short queue, which moves on as the pacer empties.

Backpressure pauses the upstream socket (its TCP window fills) in two cases: the pacer
holds more than :data:`PACER_HIGH_WATER` characters not yet released, or a live log (one
reader, ``POST /v1/chat/completions``) holds more than its high-water mark unread. A
retained log never waits for its readers: a subscriber that stops reading is dropped, and
the generation goes on for the others (the log is bounded by ``store.*`` instead).

A generation is stopped with :meth:`Generation.stop` and a reason (a client that left, a
``DELETE``, the orphan grace, the server shutting down): the upstream request is cancelled
and closed, the received text is drained, and the reason becomes the final event.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Callable, Mapping
from typing import Any

import structlog

from . import errors
from .config import Settings
from .frames import dumps, error_object
from .pacing import UNPACED, Pacer, Unpaced
from .record import Outcome, StallWatch, StreamRecord, outcome_of
from .store import DONE, ERROR, LIVE_HIGH_WATER, LIVE_LOW_WATER, TEXT, EventLog
from .upstream import ChatStream, Delta, UpstreamClient

log = structlog.get_logger("sseproxy.generation")

#: Characters the pacer may hold before the upstream read is paused…
PACER_HIGH_WATER = 256 * 1024
#: … and resumed.
PACER_LOW_WATER = 64 * 1024
#: A pacing timer that fires this close to a piece's due time releases it.
_TIMER_SLACK_S = 0.0005
#: How long a cancelled upstream request gets to close its response.
CLOSE_TIMEOUT_S = 2.0


class Generation:
    """One upstream generation appending to one log (one task, ``_drive``)."""

    __slots__ = (
        "upstream", "body", "log", "record", "settings", "stream_id", "request_id", "_loop",
        "_pacer", "_paced", "upstream_watch", "_chat", "_usage", "_finish", "_accepted",
        "_open_error", "_task", "_running", "_upstream_done", "_timer", "_backlog", "_paused",
        "_stop_reason", "_halt", "_ended", "on_end", "orphan_since", "detached",
        "received_chars", "relay", "_held",
    )

    def __init__(
        self,
        upstream: UpstreamClient,
        body: Mapping[str, Any],
        *,
        log: EventLog,
        record: StreamRecord,
        settings: Settings,
        request_id: str | None = None,
    ) -> None:
        self.upstream = upstream
        self.body = body
        self.log = log
        log.on_space = self.on_space
        self.record = record
        self.settings = settings
        self.stream_id = log.stream_id
        self.request_id = request_id
        self._loop = asyncio.get_running_loop()
        self._paced = settings.pacing.mode != "off"
        #: Pacing off: a pacer that never holds anything (a real one is a few KB a stream).
        self._pacer: Pacer | Unpaced = Pacer(settings.pacing) if self._paced else UNPACED
        self.upstream_watch = StallWatch("upstream", settings.stall.threshold_s,
                                         self._loop.time, record.stall_changed)
        self._chat: ChatStream | None = None
        self._usage: Mapping[str, Any] | None = None
        self._finish: str | None = None
        #: Resolved once the upstream accepted the request or failed to.
        self._accepted: asyncio.Future[None] = self._loop.create_future()
        self._open_error: errors.SSEProxyError | None = None
        self._task: asyncio.Task[None] | None = None
        self._running = False  # the task has begun (a cancel now reaches its try blocks)
        self._upstream_done = False  # the upstream request is over: nothing to cancel
        self._timer: asyncio.TimerHandle | None = None
        self._backlog = 0
        self._paused = False
        self._stop_reason: tuple[Outcome, errors.SSEProxyError | None] | None = None
        #: Set when the rest of the text is not worth draining (the readers are gone, or
        #: the stream was cancelled); a shutdown still drains within ``pacing.drain_s``.
        self._halt: asyncio.Future[None] = self._loop.create_future()
        #: Resolved once the final event is in the log.
        self._ended: asyncio.Future[None] = self._loop.create_future()
        #: Called once, after the final event (the registry frees the stream's slot).
        self.on_end: Callable[[Generation], None] | None = None
        #: Loop time since when nobody follows the stream (the registry's orphan grace).
        self.orphan_since: float | None = None
        #: Runs to its end whether anybody follows it or not (a background response).
        self.detached = False
        #: Characters of text the upstream sent (the token estimate when it sends no usage).
        self.received_chars = 0
        #: The upstream's own Responses events go into the log too (see the module doc).
        self.relay = False
        #: Deltas waiting behind text the pacer holds (an event came while it held some);
        #: made by the first one (only a relayed Responses stream has any).
        self._held: deque[Delta] | None = None

    @property
    def usage(self) -> Mapping[str, Any] | None:
        """The upstream's ``usage``, once it sent it."""
        return self._usage

    @property
    def model(self) -> str | None:
        """The model the upstream says it used, once it said so."""
        return self._chat.model if self._chat is not None else None

    # -- lifecycle ---------------------------------------------------------------------

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self._drive(), name=f"generation-{self.stream_id}")

    async def accepted(self) -> None:
        """Wait until the upstream accepted the request; raise its error if it did not."""
        self.start()
        await asyncio.shield(self._accepted)
        if self._open_error is not None:
            raise self._open_error

    def stop(self, outcome: Outcome, error: errors.SSEProxyError | None = None) -> None:
        """Cancel the upstream request; ``error`` (if any) becomes the final event after what
        was received has been drained. The first reason wins."""
        if self._stop_reason is None and not self._ended.done():
            self._stop_reason = (outcome, error)
            self.record.finished(outcome, error)
            if outcome is not Outcome.CANCELLED or isinstance(error, errors.StreamCancelled):
                _resolve(self._halt)  # nobody will read the rest: do not drain it
        self._cancel_upstream()

    @property
    def ended(self) -> bool:
        """The final event is in the log."""
        return self._ended.done()

    async def wait_ended(self) -> None:
        await asyncio.shield(self._ended)

    def _cancel_upstream(self) -> None:
        """Cancel the upstream request, once: a second cancel would interrupt its clean-up
        (closing the upstream response) half-way. A task that has not begun yet sees the
        stop reason when it does."""
        task = self._task
        if (task is not None and self._running and not self._upstream_done
                and not task.done() and not task.cancelling()):
            task.cancel()
            self.record.upstream_cancelled()

    async def wait_closed(self) -> None:
        """Wait until the generation ended (its upstream response closed)."""
        task = self._task
        if task is not None and not task.done():
            await asyncio.wait([task], timeout=CLOSE_TIMEOUT_S + self.settings.pacing.drain_s)

    # -- the upstream ------------------------------------------------------------------

    async def _pump(self) -> None:
        if self.relay:
            chat = self.upstream.open(self.body, request_id=self.request_id, relay=True)
        else:
            chat = self.upstream.open(self.body, request_id=self.request_id)
        self._chat = chat
        chat.waits = self.upstream_watch
        try:
            await chat.connect()
        except errors.SSEProxyError as exc:
            self.record.upstream_answered(chat.status, exc)
            raise
        self.record.upstream_answered(chat.status, None)
        async with chat:
            _resolve(self._accepted)
            await chat.run(self._on_delta, self.log.release)

    def _on_delta(self, delta: Delta) -> None:
        """Called by the upstream stream for each delta, as its bytes arrive. What it
        appends reaches the subscribers once the read is over (``log.release``, above), so
        the tokens of one read go out in one write."""
        self.log.hold()
        if delta.usage is not None:
            self._usage = delta.usage
        if delta.finish_reason is not None:
            self._finish = delta.finish_reason
        if delta.role is not None and self.log.role is None:
            self.log.role = delta.role
            self.log.touch()
        if delta.event is not None or self._held:
            self._hold(delta)
            return
        text = delta.content
        if not text:
            return
        self.received_chars += len(text)
        try:
            if self._paced:
                now = self._loop.time()
                self._pacer.push(text, now)
                self._backlog += len(text)
                self._release(now)
            else:
                self.log.append(TEXT, text)
                self.record.released(0.0)
        except errors.LogFull as exc:
            self.stop(outcome_of(exc), exc)
            return
        if ((self.log.unread_bytes > LIVE_HIGH_WATER or self._backlog > PACER_HIGH_WATER)
                and not self._paused and self._chat is not None):
            self._paused = True
            self._chat.pause()

    def on_space(self) -> None:
        """A live log's reader caught up (or the pacer drained): read the upstream again."""
        if self._paused and self._backlog <= PACER_LOW_WATER and self._chat is not None:
            if self.log.unread_bytes <= LIVE_LOW_WATER:
                self._paused = False
                self._chat.resume()

    # -- pacing ------------------------------------------------------------------------

    def _release(self, now: float) -> None:
        """Append every piece due by ``now``; arm the timer for the next one."""
        pacer = self._pacer
        for piece in pacer.pull(now):
            self.log.append(TEXT, piece.text)
            self._backlog -= len(piece.text)
            self.record.released(max(0.0, now - piece.arrived))
        if self._held and not pacer.pending:
            self._unhold(now)
        if self._paused:
            self.on_space()
        due = pacer.next_due()
        if due is None:
            return  # a timer still armed fires, finds nothing due and stops
        timer = self._timer
        # One timer, moved lazily: re-armed only when the next piece is due earlier than it
        # fires (a later due time is picked up when it fires), not on every delta.
        if timer is None or timer.when() > due + _TIMER_SLACK_S:
            if timer is not None:
                timer.cancel()
            self._timer = self._loop.call_at(due, self._on_timer)

    def _on_timer(self) -> None:
        self._timer = None
        self.log.hold()  # the pieces due now go out in one write
        try:
            self._release(self._loop.time() + _TIMER_SLACK_S)
        except errors.LogFull as exc:
            self.stop(outcome_of(exc), exc)
        finally:
            self.log.release()

    # -- the driver --------------------------------------------------------------------

    async def _drive(self) -> None:
        self._running = True
        final: errors.SSEProxyError | None = None
        try:
            try:
                if self._stop_reason is None:
                    await self._pump()
                else:
                    raise asyncio.CancelledError  # stopped before it began
            except asyncio.CancelledError:
                task = asyncio.current_task()
                if task is not None:
                    task.uncancel()  # the stop was ours: go on to drain and end the log
                reason = self._stop_reason[1] if self._stop_reason else None
                final = reason or errors.StreamCancelled()
            except errors.SSEProxyError as exc:
                final = exc
            except Exception:
                log.exception("generation_internal_error", stream_id=self.stream_id)
                final = errors.SSEProxyError("sseproxy failed while relaying this reply")
            finally:
                self._upstream_done = True
            self.record.upstream_closed()
            if not self._accepted.done():
                self._open_error = final or errors.IncompleteStream("the upstream ended early")
                _resolve(self._accepted)
            self.upstream_watch.end()
            await self._drain()
            self._append_final(final)
        except Exception:  # the log must end whatever happened here
            log.exception("generation_failed", stream_id=self.stream_id)
            self._append_final(errors.SSEProxyError("sseproxy failed while relaying this reply"))
        finally:
            if self._timer is not None:
                self._timer.cancel()
                self._timer = None
            self.upstream_watch.end()
            _resolve(self._accepted)
            self.log.on_space = None  # (a retained log outlives its generation)
            self.log.end()
            _resolve(self._ended)
            if self.on_end is not None:
                self.on_end(self)

    async def _drain(self) -> None:
        """Release what the pacer holds, on its schedule (within ``pacing.drain_s``)."""
        pacer = self._pacer
        while self._held and not self._halt.done():  # held text still goes through the pacer
            due = pacer.next_due()
            if due is not None:
                try:
                    await asyncio.wait_for(asyncio.shield(self._halt), due - self._loop.time())
                except TimeoutError:
                    pass
            try:
                self._release(self._loop.time())
            except errors.LogFull:
                return
        pacer.finish(self._loop.time())
        while pacer.pending and not self._halt.done():
            due = pacer.next_due()
            if due is None:
                break
            delay = due - self._loop.time()
            if delay > 0:
                try:
                    await asyncio.wait_for(asyncio.shield(self._halt), delay)
                except TimeoutError:
                    pass
            self.log.hold()
            try:
                self._release(self._loop.time())
            except errors.LogFull:
                break
            finally:
                self.log.release()

    # -- relayed events ----------------------------------------------------------------

    def _hold(self, delta: Delta) -> None:
        """Queue ``delta`` (an event, or text after one) behind what the pacer holds; take
        it in at once when the pacer holds nothing."""
        if self._held is None:
            self._held = deque()
        self._held.append(delta)
        self._backlog += len(delta.content)
        if not self._pacer.pending:
            try:
                self._release(self._loop.time())
            except errors.LogFull as exc:
                self.stop(outcome_of(exc), exc)
                return
        if self._backlog > PACER_HIGH_WATER and not self._paused and self._chat is not None:
            self._paused = True
            self._chat.pause()

    def _unhold(self, now: float) -> None:
        """Move held deltas on, in order, while the pacer holds no text: an event goes into
        the log, text into the pacer (which may then hold it, and stop the queue)."""
        held, pacer = self._held, self._pacer
        while held and not pacer.pending:
            delta = held.popleft()
            self._backlog -= len(delta.content)
            if delta.event is not None:
                self.log.append(*delta.event)
            if not delta.content:
                continue
            if self._paced:
                self._backlog += len(delta.content)
                pacer.push(delta.content, now)
                for piece in pacer.pull(now):  # the caller (_release) arms the timer
                    self.log.append(TEXT, piece.text)
                    self._backlog -= len(piece.text)
                    self.record.released(max(0.0, now - piece.arrived))
            else:
                self.log.append(TEXT, delta.content)
                self.record.released(0.0)

    def _append_final(self, error: errors.SSEProxyError | None) -> None:
        self.log.release()  # (a read that broke off half-way told nobody yet)
        if self.log.ended:
            return
        self.record.smoothed_chars = self._pacer.smoothed_chars
        if error is None:
            self.record.finish_reason = self._finish or "stop"
            self.record.usage = self._usage
            self.record.finished(Outcome.COMPLETED)
            data = dumps({"finish_reason": self._finish or "stop", "usage": self._usage,
                          "pacing": self._pacing_report()})
            kind = DONE
        else:
            self.record.finished(outcome_of(error), error)
            data = dumps(error_object(error))
            kind = ERROR
        self.log.append(kind, data)  # a final event is never refused (see EventLog.append)

    def _pacing_report(self) -> dict[str, Any]:
        """What pacing did to this stream, for its ``done`` event (an addition to the
        format: only the page reads it; the OpenAI and Responses frames leave it out)."""
        return {"mode": self.settings.pacing.mode,
                "smoothed_chars": self._pacer.smoothed_chars,
                "max_lag_s": round(max(self.record.lags, default=0.0), 3)}


def _resolve(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)
