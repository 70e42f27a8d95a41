"""One stream's record: its outcome, its figures, its metrics and its canonical log line.

Every part of a stream reports here — the generation (upstream status, pacing lag, how it
ended), each subscriber (events and bytes written, heartbeats, stalls, resumes) — and the
record writes the one ``stream`` log line and the end-of-stream metrics exactly once, in
:meth:`StreamRecord.close`, when the generation has ended and no subscriber is attached.

Also :class:`StallWatch`, one side (upstream or a client) of one stream, whose waits the
registry's sweep turns into stall episodes.
"""

from __future__ import annotations

import enum
import time
from collections.abc import Callable, Mapping
from typing import Any

import structlog

from . import errors
from .metrics import Metrics, upstream_status_label

log = structlog.get_logger("sseproxy.stream")


class Outcome(enum.StrEnum):
    """How a stream ended (the ``outcome`` label and log field)."""

    COMPLETED = "completed"
    CLIENT_CLOSED = "client_closed"
    CLIENT_STALLED = "client_stalled"
    ABANDONED = "abandoned"
    UPSTREAM_ERROR = "upstream_error"
    UPSTREAM_TIMEOUT = "upstream_timeout"
    CANCELLED = "cancelled"
    REJECTED = "rejected"
    INTERNAL_ERROR = "internal_error"


def outcome_of(error: errors.SSEProxyError) -> Outcome:
    if isinstance(error, errors.Abandoned):
        return Outcome.ABANDONED
    if isinstance(error, (errors.ServerShutdown, errors.StreamCancelled, errors.LogFull)):
        return Outcome.CANCELLED
    if isinstance(error, errors.UpstreamTimeout):
        return Outcome.UPSTREAM_TIMEOUT
    if isinstance(error, errors.UpstreamError):
        return Outcome.UPSTREAM_ERROR
    if isinstance(error, errors.RequestError):
        return Outcome.REJECTED
    return Outcome.INTERNAL_ERROR


class StallWatch:
    """One side of one stream: a wait that lasts ``threshold`` seconds is a stall episode.

    ``begin()``/``end()`` bracket each wait (an upstream read, a client flush) and only
    note the time: they run for every token, so they start no timer. The registry sweeps
    the running streams a few times per threshold and calls :meth:`check`.
    """

    __slots__ = ("side", "threshold", "episodes", "stalled", "since", "_on_change", "_clock")

    def __init__(self, side: str, threshold: float, clock: Callable[[], float],
                 on_change: Callable[[StallWatch, bool], None]) -> None:
        self.side = side
        self.threshold = threshold
        self.episodes = 0
        self.stalled = False
        #: When the current wait began (clock time), None between waits.
        self.since: float | None = None
        self._on_change = on_change
        self._clock = clock

    def begin(self) -> None:
        if self.since is None:
            self.since = self._clock()

    def end(self) -> None:
        self.since = None
        if self.stalled:
            self.stalled = False
            self._on_change(self, False)

    def check(self, now: float) -> float:
        """Start an episode if the current wait passed the threshold; return its length."""
        if self.since is None:
            return 0.0
        waited = now - self.since
        if waited >= self.threshold and not self.stalled:
            self.stalled = True
            self.episodes += 1
            self._on_change(self, True)
        return waited


def _p99(values: list[float]) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(0.99 * len(ordered)))]


class StreamRecord:
    """The bookkeeping of one stream, closed once."""

    __slots__ = (
        "late",
        "metrics",
        "stream_id",
        "endpoint",
        "fields",
        "started",
        "ttft_s",
        "events",
        "bytes",
        "heartbeats",
        "max_gap_s",
        "lags",
        "smoothed_chars",
        "stalls",
        "subscribers",
        "resumes",
        "outcome",
        "error",
        "finish_reason",
        "usage",
        "upstream_status",
        "client_left_at",
        "upstream_cancelled_at",
        "upstream_closed_at",
        "closed",
        "_last_event_at",
        "tally",
    )

    def __init__(self, metrics: Metrics, stream_id: str, endpoint: str,
                 fields: Mapping[str, Any] | None = None, *, late: bool = False) -> None:
        """``late``: the record of a subscriber that came after the stream's own record was
        closed (a resume of a finished stream): it adds its writes to the metrics and logs
        one ``resume`` line, but is not another stream (no outcome, no ``stream`` line)."""
        self.late = late
        self.metrics = metrics
        self.stream_id = stream_id
        self.endpoint = endpoint
        self.fields = dict(fields or {})
        self.started = time.monotonic()
        self.ttft_s: float | None = None
        self.events = 0
        self.bytes = 0
        self.heartbeats = 0
        self.max_gap_s = 0.0
        self.lags: list[float] = []
        #: Characters the pacer spread over target_lag_s because they came as a burst.
        self.smoothed_chars = 0
        self.stalls = 0
        self.subscribers = 0
        self.resumes = 0
        self.outcome: Outcome | None = None
        self.error: errors.SSEProxyError | None = None
        self.finish_reason: str | None = None
        self.usage: Mapping[str, Any] | None = None
        self.upstream_status: int | None = None
        #: "Who pays when a client leaves" (monotonic): when the last client went away, when
        #: an upstream request still running was cancelled, when that request was closed.
        self.client_left_at: float | None = None
        self.upstream_cancelled_at: float | None = None
        self.upstream_closed_at: float | None = None
        self.closed = False
        self._last_event_at: float | None = None
        if not late:
            metrics.streams_active.inc()
        #: This stream's share of the per-event metrics (summed at each scrape).
        self.tally = metrics.tallies.open()

    # -- reports -----------------------------------------------------------------------

    def upstream_answered(self, status: int | None, error: errors.SSEProxyError | None
                          ) -> None:
        self.upstream_status = status
        timed_out = isinstance(error, errors.UpstreamTimeout)
        malformed = isinstance(error, errors.UpstreamProtocolError)
        self.metrics.upstream_requests.labels(
            upstream_status_label(status, timed_out, malformed)).inc()

    def released(self, lag: float) -> None:
        """A piece of text left the pacer after waiting ``lag`` seconds."""
        self.lags.append(lag)
        self.tally.lag(lag)

    def first_text(self) -> None:
        if self.ttft_s is None:
            self.ttft_s = time.monotonic() - self.started
            self.metrics.ttft.observe(self.ttft_s)

    def sent(self, events: int, size: int) -> None:
        """A write of ``events`` events, ``size`` bytes, went to a client."""
        if events:
            now = time.monotonic()
            if self._last_event_at is not None:
                gap = now - self._last_event_at
                if gap > self.max_gap_s:
                    self.max_gap_s = gap
                self.tally.gap(gap)
            self._last_event_at = now
            self.events += events
            self.tally.events += events
        self.bytes += size
        self.tally.bytes += size

    def heartbeat(self) -> None:
        self.heartbeats += 1
        self.metrics.heartbeats.inc()

    def stall_changed(self, watch: StallWatch, stalled: bool) -> None:
        if stalled:
            self.stalls += 1
            self.metrics.stalls.labels(watch.side).inc()
            self.metrics.streams_stalled.labels(watch.side).inc()
            log.info("stall", stream_id=self.stream_id, side=watch.side,
                     threshold_s=watch.threshold)
        else:
            self.metrics.streams_stalled.labels(watch.side).dec()

    def finished(self, outcome: Outcome, error: errors.SSEProxyError | None = None) -> None:
        """Record how the stream ended; the first report wins (a client that left stays
        ``client_closed`` even when the cancelled upstream then reports an error)."""
        if self.outcome is None:
            self.outcome = outcome
            self.error = error

    def client_left(self) -> None:
        """A client went away. Until the upstream request is cancelled, the latest leave
        counts (a resumed stream is cancelled after its last client left); after it, none
        does (a connection that ends after its own cancellation is not a new cause)."""
        if self.upstream_cancelled_at is None:
            self.client_left_at = time.monotonic()

    def upstream_cancelled(self) -> None:
        if self.upstream_cancelled_at is None:
            self.upstream_cancelled_at = time.monotonic()

    def upstream_closed(self) -> None:
        """The upstream response is closed (noted only when it was cancelled)."""
        if self.upstream_cancelled_at is not None and self.upstream_closed_at is None:
            self.upstream_closed_at = time.monotonic()

    # -- the end -----------------------------------------------------------------------

    def close(self) -> None:
        """End the stream's bookkeeping: metrics and the canonical log line (once)."""
        if self.closed:
            return
        self.closed = True
        duration = time.monotonic() - self.started
        m = self.metrics
        m.tallies.close(self.tally)
        if self.late:
            log.info("resume", stream_id=self.stream_id, endpoint=self.endpoint,
                     duration_s=round(duration, 4), events=self.events, bytes=self.bytes)
            return
        outcome = self.outcome or Outcome.CANCELLED
        m.streams_active.dec()
        m.streams.labels(str(outcome)).inc()
        m.endpoint_streams.labels(self.endpoint, str(outcome)).inc()
        m.stream_duration.observe(duration)
        usage = self.usage or {}
        p99 = _p99(self.lags)
        # upstream_cancelled: an upstream request still running was cancelled; cancel_after_s:
        # from the last client leaving (or sseproxy deciding to stop) until it was closed.
        since = self.client_left_at or self.upstream_cancelled_at
        closed = self.upstream_closed_at
        extra: dict[str, Any] = {
            "upstream_cancelled": self.upstream_cancelled_at is not None,
            "cancel_after_s": (None if closed is None or since is None
                               else round(max(0.0, closed - since), 4)),
        }
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
            stalls=self.stalls,
            max_gap_s=round(self.max_gap_s, 4),
            pacing_lag_p99_s=None if p99 is None else round(p99, 4),
            pacing_smoothed_chars=self.smoothed_chars,
            subscribers=self.subscribers,
            resumes=self.resumes,
            upstream_status=self.upstream_status,
            finish_reason=self.finish_reason,
            error_code=self.error.error_code() if self.error else None,
            prompt_tokens=usage.get("prompt_tokens"),
            completion_tokens=usage.get("completion_tokens"),
            **extra,
            **self.fields,
        )
