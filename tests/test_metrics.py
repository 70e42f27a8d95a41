"""Metrics and the canonical log line agree, and stalls are told apart by side (issue 4)."""

from __future__ import annotations

import asyncio
import json
import socket
from collections.abc import Mapping, Sequence
from typing import Any
from urllib.parse import quote

import httpx
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from prometheus_client import CollectorRegistry, Histogram
from servers import Running, eventually, running, silent_client, stream, stream_logged
from structlog.testing import capture_logs
from tornado.testing import bind_unused_port

from sseproxy import __version__, app, metrics
from sseproxy.metrics import Metrics
from sseproxy.mockupstream import Scenario

FAST = Scenario(rate=0, tokens=5)
CHAT = [{"role": "user", "content": "hi"}]


def value(r: Running | Metrics, name: str, **labels: str) -> float:
    registry = (r.deps.metrics if isinstance(r, Running) else r).registry
    got = registry.get_sample_value(name, labels)
    assert got is not None, f"{name}{labels} is not exported"
    return got


def outcomes(logs: Sequence[Mapping[str, Any]]) -> list[str]:
    return [e["outcome"] for e in logs if e["event"] == "stream"]


def es_url(base: str, prompt: str = "hi") -> str:
    return f"{base}/v1/chat/stream?prompt={quote(prompt)}"


async def scrape(r: Running) -> str:
    async with httpx.AsyncClient() as c:
        resp = await c.get(r.url + "/metrics")
    assert resp.status_code == 200
    return resp.text


@pytest.mark.parametrize("separate_port", [False, True])
async def test_head_metrics_answers_the_get_headers_without_a_body(
    io_loop: Any, separate_port: bool
) -> None:
    # issue 12: HEAD /metrics was 405
    async with running() as r:
        url = r.url
        if separate_port:
            server = app.make_server(app.make_metrics_app(r.deps), r.settings)
            sock, port = bind_unused_port()
            server.add_sockets([sock])
            url = f"http://127.0.0.1:{port}"
        try:
            async with httpx.AsyncClient() as c:
                get = await c.get(url + "/metrics")
                head = await c.head(url + "/metrics")
        finally:
            if separate_port:
                server.stop()
                await server.close_all_connections()
    assert (get.status_code, head.status_code) == (200, 200)
    assert head.content == b"" and int(head.headers["Content-Length"]) > 0
    varying = {"date", "content-length", "etag", "x-request-id"}
    assert {k: v for k, v in head.headers.items() if k not in varying} == {
        k: v for k, v in get.headers.items() if k not in varying}


def test_every_labelled_series_exists_at_zero() -> None:
    m = Metrics()
    for outcome in metrics.OUTCOMES:
        assert value(m, "sseproxy_streams_total", outcome=outcome) == 0
    for side in metrics.SIDES:
        assert value(m, "sseproxy_stalls_total", side=side) == 0
        assert value(m, "sseproxy_streams_stalled", side=side) == 0
    for status in metrics.UPSTREAM_STATUSES:
        assert value(m, "sseproxy_upstream_requests_total", status=status) == 0
    assert value(m, "sseproxy_build_info", version=__version__) == 1
    assert value(m, "process_resident_memory_bytes") > 0


@pytest.mark.parametrize("status, label", [
    (200, "2xx"), (302, "3xx"), (404, "4xx"), (429, "429"), (500, "5xx"), (503, "5xx"),
    (None, "unreachable")])
def test_upstream_status_labels_are_bounded(status: int | None, label: str) -> None:
    assert metrics.upstream_status_label(status) == label
    assert metrics.upstream_status_label(None, timed_out=True) == "timeout"
    assert metrics.upstream_status_label(None, protocol_error=True) == "protocol_error"


# --- outcomes: the counter and the log line agree ------------------------------------------


async def check_outcome(r: Running, logs: Sequence[Mapping[str, Any]], outcome: str) -> None:
    await eventually(stream_logged(logs))
    assert outcomes(logs) == [outcome]
    for other in metrics.OUTCOMES:
        assert value(r, "sseproxy_streams_total", outcome=other) == (other == outcome), other
    assert value(r, "sseproxy_streams_active") == 0


async def test_outcome_completed_with_its_figures(io_loop: Any) -> None:
    # tokens 20 ms apart: separate writes, so there are gaps to count
    async with running(Scenario(tokens=5, rate=50)) as r:
        with capture_logs() as logs:
            got = await stream("GET", es_url(r.url))
        await check_outcome(r, logs, "completed")
        line = next(e for e in logs if e["event"] == "stream")
        assert value(r, "sseproxy_events_sent_total") == line["events"] == len(got.events)
        assert value(r, "sseproxy_sent_bytes_total") == line["bytes"] == len(got.raw)
        assert value(r, "sseproxy_time_to_first_token_seconds_count") == 1
        assert value(r, "sseproxy_stream_duration_seconds_count") == 1
        # one gap per write: events due together share a write (and have no gap between)
        assert 1 <= value(r, "sseproxy_event_gap_seconds_count") <= line["events"] - 1
        assert value(r, "sseproxy_upstream_requests_total", status="2xx") == 1
        assert value(r, "sseproxy_pacing_lag_seconds_count") == 5  # pacing off: 5 pieces
        assert line["stalls"] == 0 and line["upstream_status"] == 200
        assert line["max_gap_s"] >= 0 and line["pacing_lag_p99_s"] is not None


async def test_outcome_client_closed(io_loop: Any) -> None:
    # The OpenAI endpoint's client left: its generation is cancelled at once.
    scenario = Scenario(rate=20, tokens=1000)
    async with running(scenario) as r:
        with capture_logs() as logs:
            await stream("POST", r.url + "/v1/chat/completions", stop_after=3,
                         json={"model": scenario.to_model(), "messages": CHAT, "stream": True})
            await r.wait_mock("open", 0, within=3)
        await check_outcome(r, logs, "client_closed")


async def test_outcome_abandoned(io_loop: Any) -> None:
    # An EventSource client left and nobody came back within store.orphan_grace_s.
    async with running(Scenario(rate=20, tokens=1000), store__orphan_grace_s=0.2) as r:
        with capture_logs() as logs:
            await stream("GET", es_url(r.url), stop_after=3)
            await r.wait_mock("open", 0, within=3)
        await check_outcome(r, logs, "abandoned")


@pytest.mark.parametrize("scenario, outcome, status", [
    (Scenario(error_status=500), "upstream_error", "5xx"),
    (Scenario(error_status=429), "upstream_error", "429"),
    (Scenario(rate=0, tokens=5, error_at=2), "upstream_error", "2xx"),
    (Scenario(header_delay_s=10), "upstream_timeout", "timeout"),
    (Scenario(rate=0, tokens=5, stall_at=2, stall_s=10), "upstream_timeout", "2xx"),
])
async def test_outcome_of_upstream_failures_on_both_endpoints(
    io_loop: Any, scenario: Scenario, outcome: str, status: str
) -> None:
    # The first-token deadline also covers the wait for the upstream's headers: it is
    # generous, so a simulator slowed by a busy machine still answers within it.
    async with running(scenario, upstream__first_token_timeout_s=2.0,
                       upstream__idle_timeout_s=0.5) as r:
        with capture_logs() as logs:
            await stream("GET", es_url(r.url))
        await check_outcome(r, logs, outcome)
        assert value(r, "sseproxy_upstream_requests_total", status=status) == 1


async def test_outcome_upstream_unreachable(io_loop: Any) -> None:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()
    async with running(upstream_url=f"http://127.0.0.1:{port}/v1") as r:
        with capture_logs() as logs:
            async with httpx.AsyncClient() as c:
                resp = await c.post(r.url + "/v1/chat/completions",
                                    json={"messages": CHAT, "stream": True})
        assert resp.status_code == 502
        await check_outcome(r, logs, "upstream_error")
        assert value(r, "sseproxy_upstream_requests_total", status="unreachable") == 1


@pytest.mark.parametrize("request_", [
    {"content": b"{broken"},
    {"json": {"messages": CHAT, "persona": "nobody"}},
    {"json": {"messages": [{"role": "user", "content": "x" * 5000}]}},
])
async def test_outcome_rejected(io_loop: Any, request_: dict[str, Any]) -> None:
    async with running(limits__max_body_bytes=4096) as r:
        with capture_logs() as logs:
            async with httpx.AsyncClient() as c:
                resp = await c.post(r.url + "/v1/chat/completions", **request_)
        assert resp.status_code in (400, 413)
        await check_outcome(r, logs, "rejected")
        assert (await r.mock_stats())["requests"] == 0


async def test_outcome_rejected_when_overloaded(io_loop: Any) -> None:
    async with running(Scenario(rate=1, tokens=100), limits__max_streams=1) as r:
        first = asyncio.create_task(stream("GET", es_url(r.url)))
        try:
            await r.wait_mock("open", 1, within=3)
            with capture_logs() as logs:
                got = await stream("GET", es_url(r.url))
        finally:
            first.cancel()
            await asyncio.gather(first, return_exceptions=True)
        assert got.events[-1].event == "error"
        assert outcomes(logs) == ["rejected"]
        assert value(r, "sseproxy_streams_total", outcome="rejected") == 1


# The cancelled and internal_error outcomes: tests/test_streams.py.


# --- stalls, told apart by side ------------------------------------------------------------


def stalled(text: str, side: str) -> float:
    for line in text.splitlines():
        if line.startswith(f'sseproxy_streams_stalled{{side="{side}"}}'):
            return float(line.split()[-1])
    raise AssertionError(f"no stalled gauge for {side} in the scrape")


async def test_an_upstream_pause_is_an_upstream_stall_while_it_lasts(io_loop: Any) -> None:
    scenario = Scenario(rate=0, tokens=4, stall_at=2, stall_s=2.5)
    async with running(scenario, stall__threshold_s=0.5, heartbeat__interval_s=0.2) as r:
        with capture_logs() as logs:
            reader = asyncio.create_task(stream("GET", es_url(r.url)))
            await r.wait_mock("open", 1, within=3)
            # inside the simulator's pause, past the threshold
            await eventually(
                lambda: value(r, "sseproxy_streams_stalled", side="upstream") == 1, within=5)
            during = await scrape(r)
            got = await reader
        after = await scrape(r)
    assert stalled(during, "upstream") == 1 and stalled(during, "client") == 0
    assert stalled(after, "upstream") == 0
    assert value(r, "sseproxy_stalls_total", side="upstream") == 1
    assert value(r, "sseproxy_stalls_total", side="client") == 0
    assert got.events[-1].event == "done" and got.pings  # heartbeats kept it open
    line = next(e for e in logs if e["event"] == "stream")
    assert line["outcome"] == "completed" and line["stalls"] == 1
    assert line["max_gap_s"] > 2.0  # the gap between the 2nd and 3rd token


async def test_a_client_that_stops_reading_is_a_client_stall_then_dropped(io_loop: Any) -> None:
    # a long, steady reply: the upstream never pauses, the client never reads
    # (the OpenAI endpoint: its only client is dropped, so its generation is cancelled)
    flood = Scenario(rate=5000, tokens=100_000)
    body = json.dumps({"model": flood.to_model(), "messages": CHAT, "stream": True}).encode()
    request = (b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n"
               b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n%b"
               % (len(body), body))
    async with running(flood, stall__threshold_s=0.5, stall__client_timeout_s=2.0,
                       sndbuf=8192) as r:
        with capture_logs() as logs:
            async with silent_client(r, request=request):
                await r.wait_mock("open", 1, within=5)
                # the client side stalls once its buffers are full
                await eventually(lambda: value(r, "sseproxy_streams_stalled", side="client") == 1,
                                 within=15, what="a client stall")
                during_client = value(r, "sseproxy_streams_stalled", side="client")
                during_upstream = value(r, "sseproxy_streams_stalled", side="upstream")
                # (a busy machine may delay the simulator's first token past the threshold:
                # that upstream stall is real; the paused upstream that follows is not one)
                upstream_stalls = value(r, "sseproxy_stalls_total", side="upstream")
                await r.wait_mock("open", 0, within=20)
                await eventually(stream_logged(logs))
        stats = await r.mock_stats()
        assert during_client == 1 and during_upstream == 0
        assert value(r, "sseproxy_streams_stalled", side="client") == 0
        assert value(r, "sseproxy_stalls_total", side="client") == 1
        assert value(r, "sseproxy_stalls_total", side="upstream") == upstream_stalls
        assert value(r, "sseproxy_streams_total", outcome="client_stalled") == 1
    assert stats["cancelled"] == 1
    assert outcomes(logs) == ["client_stalled"]


async def test_heartbeats_are_counted(io_loop: Any) -> None:
    async with running(Scenario(rate=0, tokens=2, first_delay_s=1.0),
                       heartbeat__interval_s=0.2) as r:
        got = await stream("GET", es_url(r.url))
        assert value(r, "sseproxy_heartbeats_total") == len(got.pings) >= 2


async def test_metrics_exposition_is_prometheus_text(io_loop: Any) -> None:
    async with running(FAST) as r:
        await stream("GET", es_url(r.url))
        async with httpx.AsyncClient() as c:
            resp = await c.get(r.url + "/metrics")
    assert resp.headers["Content-Type"].startswith("text/plain")
    assert 'sseproxy_streams_total{outcome="completed"} 1.0' in resp.text
    assert "# TYPE sseproxy_time_to_first_token_seconds histogram" in resp.text


# --- per-event metrics, tallied per stream -------------------------------------------------

_seconds = st.floats(min_value=0.0, max_value=5000.0, allow_nan=False)


@settings(max_examples=60, deadline=None)
@given(gaps=st.lists(_seconds, max_size=40), lags=st.lists(_seconds, max_size=40),
       bounds=st.sampled_from([metrics.GAP_BUCKETS[3], metrics.LAG_BUCKETS[0]]))
def test_tallied_histograms_expose_what_prometheus_histograms_would(
        gaps: list[float], lags: list[float], bounds: float) -> None:
    # A bound itself is inclusive (le): values exactly on a bound must land in that bucket.
    gaps, lags = [*gaps, bounds], [*lags, bounds]
    m = Metrics(process=False)
    tallies = [m.tallies.open() for _ in range(3)]
    for i, g in enumerate(gaps):
        tallies[i % 3].gap(g)
    for i, lag in enumerate(lags):
        tallies[i % 3].lag(lag)
    m.tallies.close(tallies[0])  # one ended, two still running: all count
    m.tallies.close(tallies[0])  # closing twice adds nothing

    ref = CollectorRegistry()
    ref_gap = Histogram("sseproxy_event_gap_seconds", "", buckets=metrics.GAP_BUCKETS,
                        registry=ref)
    ref_lag = Histogram("sseproxy_pacing_lag_seconds", "", buckets=metrics.LAG_BUCKETS,
                        registry=ref)
    for g in gaps:
        ref_gap.observe(g)
    for lag in lags:
        ref_lag.observe(lag)
    for name, bounds_ in (("sseproxy_event_gap_seconds", metrics.GAP_BUCKETS),
                          ("sseproxy_pacing_lag_seconds", metrics.LAG_BUCKETS)):
        for le in [*map(str, bounds_), "+Inf"]:
            assert value(m, f"{name}_bucket", le=le) == \
                ref.get_sample_value(f"{name}_bucket", {"le": le}), (name, le)
        assert value(m, f"{name}_count") == ref.get_sample_value(f"{name}_count", {})
        assert value(m, f"{name}_sum") == pytest.approx(ref.get_sample_value(f"{name}_sum", {}))


def test_tallied_counters_count_running_and_ended_streams_once() -> None:
    m = Metrics(process=False)
    assert value(m, "sseproxy_events_sent_total") == 0
    assert value(m, "sseproxy_event_gap_seconds_count") == 0
    a, b = m.tallies.open(), m.tallies.open()
    a.events, a.bytes = 3, 30
    b.events, b.bytes = 4, 40
    assert value(m, "sseproxy_events_sent_total") == 7  # running streams are seen at once
    m.tallies.close(a)
    m.tallies.close(a)
    assert value(m, "sseproxy_events_sent_total") == 7
    assert value(m, "sseproxy_sent_bytes_total") == 70
    m.tallies.close(b)
    assert m.tallies.running == set()
    assert value(m, "sseproxy_sent_bytes_total") == 70


@settings(max_examples=200, deadline=None)
@given(streams=st.lists(st.lists(_seconds, min_size=1, max_size=5), min_size=2, max_size=5),
       ending=st.integers(min_value=0))
def test_a_stream_that_ends_never_lowers_a_sum(streams: list[list[float]], ending: int) -> None:
    # The sums are recomputed at each scrape; a stream moving from running to ended must not
    # make them smaller, not even by rounding (Prometheus would read a counter reset).
    m = Metrics(process=False)
    tallies = [m.tallies.open() for _ in streams]
    for tally, gaps in zip(tallies, streams):
        for g in gaps:
            tally.gap(g)
    before = value(m, "sseproxy_event_gap_seconds_sum")
    m.tallies.close(tallies[ending % len(tallies)])
    assert value(m, "sseproxy_event_gap_seconds_sum") == before
