"""The event-loop lag monitor (issue 13): on a fake loop and clock, then through a real
sseproxy whose loop is blocked on purpose."""

from __future__ import annotations

import re
import time
from collections.abc import Callable
from typing import Any

import httpx
from servers import running

from sseproxy.looplag import LoopLagMonitor


class FakeTimer:
    def __init__(self, when: float, callback: Callable[[], None]) -> None:
        self.when, self.callback, self.cancelled = when, callback, False

    def cancel(self) -> None:
        self.cancelled = True


class FakeLoop:
    """The two things the monitor uses of a loop: its clock and ``call_at``."""

    def __init__(self) -> None:
        self.now = 0.0
        self.timers: list[FakeTimer] = []

    def time(self) -> float:
        return self.now

    def call_at(self, when: float, callback: Callable[[], None]) -> FakeTimer:
        timer = FakeTimer(when, callback)
        self.timers.append(timer)
        return timer

    def run_next(self, blocked_for: float = 0.0) -> None:
        """Run the next timer, ``blocked_for`` seconds after it was due."""
        timer = min((t for t in self.timers if not t.cancelled), key=lambda t: t.when)
        self.timers.remove(timer)
        self.now = timer.when + blocked_for
        timer.callback()


def monitor(loop: FakeLoop) -> tuple[LoopLagMonitor, list[float]]:
    lags: list[float] = []
    lag = LoopLagMonitor(lags.append, interval=0.1, loop=loop)  # type: ignore[arg-type]
    return lag, lags


def test_a_timer_that_fires_when_due_records_no_lag() -> None:
    loop = FakeLoop()
    lag, lags = monitor(loop)
    lag.start()
    for _ in range(3):
        loop.run_next()
    assert lags == [0.0, 0.0, 0.0]
    assert abs(loop.now - 0.3) < 1e-9


def test_a_blocked_loop_records_how_long_it_was_blocked_and_then_recovers() -> None:
    loop = FakeLoop()
    lag, lags = monitor(loop)
    lag.start()
    loop.run_next()
    loop.run_next(blocked_for=0.75)  # a synchronous step held the loop 0.75 s past the tick
    loop.run_next()
    assert lags[0] == 0.0 and abs(lags[1] - 0.75) < 1e-9 and lags[2] == 0.0
    # the next tick is due one interval after the late one ran, not at the old cadence
    assert [abs(t.when - (loop.now + 0.1)) < 1e-9 for t in loop.timers] == [True]


def test_stop_cancels_the_timer_and_start_is_idempotent() -> None:
    loop = FakeLoop()
    lag, lags = monitor(loop)
    lag.start()
    lag.start()
    assert len(loop.timers) == 1
    lag.stop()
    assert all(t.cancelled for t in loop.timers)
    assert lags == []


def lag_histogram(exposition: str) -> dict[str, float]:
    return {m.group(1): float(m.group(2)) for m in re.finditer(
        r'^sseproxy_event_loop_lag_seconds_bucket\{le="([^"]+)"\} (\S+)$', exposition, re.M)}


async def test_a_blocked_event_loop_shows_in_the_lag_histogram(io_loop: Any) -> None:
    async with running() as r, httpx.AsyncClient(timeout=10) as client:
        before = lag_histogram((await client.get(r.url + "/metrics")).text)
        assert before, "sseproxy_event_loop_lag_seconds is not exported"
        time.sleep(0.6)  # the subject of the test: this blocks sseproxy's event loop
        deadline = time.monotonic() + 10
        while True:
            after = lag_histogram((await client.get(r.url + "/metrics")).text)
            late = (after["+Inf"] - after["0.5"]) - (before["+Inf"] - before["0.5"])
            if late >= 1 or time.monotonic() > deadline:
                break
    assert late >= 1, after
