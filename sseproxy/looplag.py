"""Event-loop lag: how late a periodic timer fires, so an operator sees a blocked loop.

Every stream, heartbeat and ``/healthz`` answer of a process shares one event loop; a
synchronous step that runs long (a huge upstream event, a slow collector) delays all of
them. :class:`LoopLagMonitor` asks the loop to call it every ``interval`` seconds and
records how much later than due each call came (``sseproxy_event_loop_lag_seconds``).
An idle loop shows well under a millisecond; a loop blocked for ``B`` seconds shows one
observation of about ``B``. One monitor per process, started with the app; the loop
and its clock come in, so tests drive it on a fake one.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

#: How often the timer is due: ten callbacks a second cost nothing measurable and catch
#: any block longer than the interval.
INTERVAL_S = 0.1


class LoopLagMonitor:
    """Calls ``observe(lag_seconds)`` for every tick of a timer due each ``interval``."""

    def __init__(
        self,
        observe: Callable[[float], None],
        *,
        interval: float = INTERVAL_S,
        loop: asyncio.AbstractEventLoop | None = None,
    ) -> None:
        self.observe = observe
        self.interval = interval
        self._loop = loop if loop is not None else asyncio.get_running_loop()
        self._timer: asyncio.TimerHandle | None = None
        self._due = 0.0

    def start(self) -> None:
        if self._timer is None:
            self._schedule(self._loop.time())

    def stop(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _schedule(self, now: float) -> None:
        self._due = now + self.interval
        self._timer = self._loop.call_at(self._due, self._tick)

    def _tick(self) -> None:
        now = self._loop.time()
        self.observe(max(0.0, now - self._due))
        self._schedule(now)
