"""Prometheus metrics, built against a registry passed in (tests use a fresh one).

Names follow DESIGN.md ("Metrics"): the ``sseproxy_`` prefix, base units as
suffixes (seconds, bytes), ``_total`` on counters, and label values from small
fixed sets that are created at start-up, so every series exists (at 0) from the
first scrape and dashboards never see a series appear out of nowhere.

Histogram buckets follow the real ranges: time to first token 50 ms–120 s,
gaps between events 5 ms–60 s, pacing lag 1 ms–10 s, event-loop lag 1 ms–10 s,
stream duration 100 ms–1 h.

The figures counted for every event (events and bytes sent, the gap between events, the
pacing lag) are kept per stream in a :class:`StreamTally` of plain numbers and summed when
``/metrics`` is scraped (on the same event loop), so an event costs no lock and no call into
prometheus_client. A scrape sees them exactly as of that moment, running streams included.
"""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Iterator, Sequence

from prometheus_client import (
    REGISTRY,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    Info,
)
from prometheus_client.core import CounterMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest
from prometheus_client.gc_collector import GCCollector
from prometheus_client.platform_collector import PlatformCollector
from prometheus_client.process_collector import ProcessCollector

from . import __version__

#: The ``outcome`` of a stream; the canonical log line uses the same words.
OUTCOMES = ("completed", "client_closed", "client_stalled", "abandoned", "upstream_error",
            "upstream_timeout", "cancelled", "rejected", "internal_error")
#: ``side`` of a stall: the model sent nothing, or the client (or a proxy) is not reading.
SIDES = ("upstream", "client")
#: The endpoints a stream starts from (the record's and the log line's ``endpoint``).
ENDPOINTS = ("chat_completions", "chat_stream", "streams", "responses")
#: ``status`` of an upstream request: the HTTP status class, or why there was none.
UPSTREAM_STATUSES = ("2xx", "3xx", "4xx", "429", "5xx", "unreachable", "timeout",
                     "protocol_error")
RELOAD_RESULTS = ("ok", "error")
#: Operations on the shared event store (see sseproxy.store.redis).
STORE_OPS = ("create", "get", "cancel", "write", "read", "limits")
#: ``limit`` of a refused request (see sseproxy.limits); never a key name (unbounded).
RATE_LIMITS = ("streams", "requests", "tokens")

TTFT_BUCKETS = (0.05, 0.1, 0.2, 0.3, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 5.0, 7.5, 10.0, 15.0,
                20.0, 30.0, 60.0, 120.0)
GAP_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 5.0, 10.0, 20.0, 30.0,
               60.0)
LAG_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 0.75, 1.0, 1.5, 2.0,
               3.0, 5.0, 10.0)
#: Event-loop lag: well under 1 ms when healthy; seconds when something blocks the loop.
LOOP_LAG_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
                    10.0)
DURATION_BUCKETS = (0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0, 300.0,
                    600.0, 1800.0, 3600.0)


class StreamTally:
    """What one stream's events add to the per-event metrics, as plain numbers."""

    __slots__ = ("events", "bytes", "gaps", "gap_ns", "lags", "lag_ns")

    def __init__(self) -> None:
        self.events = 0
        self.bytes = 0
        #: Observations per bucket (not cumulative); the last one is ``+Inf``.
        self.gaps = [0] * (len(GAP_BUCKETS) + 1)
        #: Sums in whole nanoseconds: integers add up the same in any order, so a sum that
        #: moves from a running stream to the ended ones never comes out lower (floats can,
        #: by an ulp, and Prometheus would read that as a counter reset).
        self.gap_ns = 0
        self.lags = [0] * (len(LAG_BUCKETS) + 1)
        self.lag_ns = 0

    def gap(self, seconds: float) -> None:
        self.gaps[bisect_left(GAP_BUCKETS, seconds)] += 1  # a bucket's bound is inclusive
        self.gap_ns += round(seconds * 1e9)

    def lag(self, seconds: float) -> None:
        self.lags[bisect_left(LAG_BUCKETS, seconds)] += 1
        self.lag_ns += round(seconds * 1e9)

    def add(self, other: StreamTally) -> None:
        self.events += other.events
        self.bytes += other.bytes
        self.gap_ns += other.gap_ns
        self.lag_ns += other.lag_ns
        for i, n in enumerate(other.gaps):
            self.gaps[i] += n
        for i, n in enumerate(other.lags):
            self.lags[i] += n


def _histogram(name: str, doc: str, bounds: Sequence[float], counts: Sequence[int],
               total_ns: int) -> HistogramMetricFamily:
    buckets: list[tuple[str, float]] = []
    seen = 0
    for bound, n in zip([*map(str, bounds), "+Inf"], counts):
        seen += n
        buckets.append((bound, seen))
    return HistogramMetricFamily(name, doc, buckets=buckets, sum_value=total_ns / 1e9)


class Tallies:
    """The per-event metrics: the tallies of ended streams plus those of running ones.

    A collector for ``prometheus_client``: :meth:`collect` runs at each scrape.
    """

    def __init__(self) -> None:
        self.ended = StreamTally()
        self.running: set[StreamTally] = set()

    def open(self) -> StreamTally:
        tally = StreamTally()
        self.running.add(tally)
        return tally

    def close(self, tally: StreamTally) -> None:
        """The stream ended: its figures join the ended streams' (once)."""
        if tally in self.running:
            self.running.discard(tally)
            self.ended.add(tally)

    def describe(self) -> Iterator[Metric]:
        return self._families(StreamTally())  # the names; the registry ignores the values

    def collect(self) -> Iterator[Metric]:
        total = StreamTally()
        total.add(self.ended)
        for tally in self.running:
            total.add(tally)
        return self._families(total)

    def _families(self, t: StreamTally) -> Iterator[Metric]:
        yield CounterMetricFamily(
            "sseproxy_events_sent", "Events written to clients (heartbeats excluded).",
            value=t.events)
        yield CounterMetricFamily(
            "sseproxy_sent_bytes", "Bytes of stream bodies written to clients.", value=t.bytes)
        yield _histogram(
            "sseproxy_event_gap_seconds",
            "Time between two consecutive events written to one client (heartbeats excluded).",
            GAP_BUCKETS, t.gaps, t.gap_ns)
        yield _histogram(
            "sseproxy_pacing_lag_seconds",
            "Time text waited in the pacer: a piece's send time minus its oldest text's arrival.",
            LAG_BUCKETS, t.lags, t.lag_ns)


def upstream_status_label(status: int | None, timed_out: bool = False,
                          protocol_error: bool = False) -> str:
    """The bounded ``status`` label of an upstream request (``protocol_error``: it answered
    with a response head that is not HTTP/1.1)."""
    if status is None:
        return "timeout" if timed_out else "protocol_error" if protocol_error else "unreachable"
    if status == 429:
        return "429"
    return f"{min(max(status // 100, 2), 5)}xx"


class Metrics:
    """Every metric sseproxy exports, registered on ``registry``.

    ``process=True`` also registers the standard process, platform and GC collectors
    (for a private registry; the global one has them already).
    """

    def __init__(self, registry: CollectorRegistry | None = None, *, process: bool = True
                 ) -> None:
        self.registry = r = registry if registry is not None else CollectorRegistry()
        if process and r is not REGISTRY:  # the global registry has them already
            ProcessCollector(registry=r)
            PlatformCollector(registry=r)
            GCCollector(registry=r)
        Info("sseproxy_build", "sseproxy's version.", registry=r).info({"version": __version__})

        self.endpoint_streams = Counter(
            "sseproxy_endpoint_streams", "Streams that ended, by the endpoint that started "
            "them and outcome.", ["endpoint", "outcome"], registry=r)
        self.streams_active = Gauge(
            "sseproxy_streams_active", "Streams being relayed now.", registry=r)
        self.streams = Counter(
            "sseproxy_streams", "Streams that ended, by outcome.", ["outcome"], registry=r)
        self.stream_duration = Histogram(
            "sseproxy_stream_duration_seconds", "From request to the end of the stream.",
            buckets=DURATION_BUCKETS, registry=r)
        self.ttft = Histogram(
            "sseproxy_time_to_first_token_seconds",
            "From request to the first text sent to the client.",
            buckets=TTFT_BUCKETS, registry=r)
        self.stalls = Counter(
            "sseproxy_stalls",
            "Stall episodes: no upstream bytes, or a client flush not completing, for "
            "stall.threshold_s.", ["side"], registry=r)
        self.streams_stalled = Gauge(
            "sseproxy_streams_stalled", "Streams stalled now, by side.", ["side"], registry=r)
        #: Events and bytes sent, event gaps and pacing lag: tallied per stream.
        self.tallies = Tallies()
        r.register(self.tallies)
        self.upstream_requests = Counter(
            "sseproxy_upstream_requests", "Upstream requests, by answer.", ["status"],
            registry=r)
        self.heartbeats = Counter(
            "sseproxy_heartbeats", "Heartbeat comments written.", registry=r)
        self.resumes = Counter(
            "sseproxy_resumes", "Reconnects that resumed a stream with Last-Event-ID.",
            registry=r)
        self.replayed_events = Counter(
            "sseproxy_replayed_events", "Events sent again to reconnecting subscribers.",
            registry=r)
        self.log_streams = Gauge(
            "sseproxy_log_streams", "Stream logs held for replay (running and finished).",
            registry=r)
        self.log_events = Gauge(
            "sseproxy_log_events", "Events held in stream logs.", registry=r)
        self.log_bytes = Gauge(
            "sseproxy_log_bytes", "Bytes held in stream logs (text plus per-event overhead).",
            registry=r)
        self.log_evictions = Counter(
            "sseproxy_log_evictions",
            "Finished stream logs dropped before their store.ttl_s to stay within "
            "store.max_bytes.", registry=r)
        self.store_errors = Counter(
            "sseproxy_store_errors",
            "Calls to the shared event store (Redis) that failed or timed out, by operation.",
            ["op"], registry=r)
        self.rate_limited = Counter(
            "sseproxy_rate_limited",
            "Requests refused because their key was over one of its limits, by limit.",
            ["limit"], registry=r)
        self.event_loop_lag = Histogram(
            "sseproxy_event_loop_lag_seconds",
            "How much later than due a periodic timer ran: time the event loop was blocked.",
            buckets=LOOP_LAG_BUCKETS, registry=r)
        self.config_reloads = Counter(
            "sseproxy_config_reloads", "Configuration reloads (SIGHUP), by result.",
            ["result"], registry=r)

        for outcome in OUTCOMES:
            self.streams.labels(outcome)
            for endpoint in ENDPOINTS:
                self.endpoint_streams.labels(endpoint, outcome)
        for side in SIDES:
            self.stalls.labels(side)
            self.streams_stalled.labels(side)
        for status in UPSTREAM_STATUSES:
            self.upstream_requests.labels(status)
        for result in RELOAD_RESULTS:
            self.config_reloads.labels(result)
        for op in STORE_OPS:
            self.store_errors.labels(op)
        for limit in RATE_LIMITS:
            self.rate_limited.labels(limit)

    def exposition(self) -> tuple[bytes, str]:
        """The registry in the Prometheus text format, with its content type."""
        return generate_latest(self.registry), CONTENT_TYPE_LATEST
