"""The registry of a process's running streams: admission, lookup, the sweep and draining.

* **Admission** — a generation takes one of ``limits.max_streams`` slots from when it is
  admitted until its final event is in the log; none is given while the process drains.
  Its key's permit (:class:`~sseproxy.limiter.Permit`) is released at the same moment,
  once, with the tokens the stream used: after the paced drain, however it ended, and
  whether a client still follows it or not (a background response runs on without one).
* **Lookup** — running generations by stream id (``DELETE /v1/streams/{id}``).
* **The sweep** — one timer per process, every quarter of the shortest threshold
  (20–250 ms), whatever the number of streams: stall episodes on both sides; subscribers
  whose client has not read for ``stall.client_timeout_s`` are dropped; generations that
  nobody has followed for ``store.orphan_grace_s`` are stopped (``abandoned``).
* **Records** — a stream's record is closed (its canonical log line written) once its
  generation has ended and no subscriber is attached.
* **Draining** — on shutdown, running generations get ``server.shutdown_grace_s`` to
  finish, then end with ``server_shutdown``. With a shared store (Redis) the EventSource
  subscribers are sent away first (their connections closed, so they reconnect to another
  instance and follow the log there) while the generations go on writing into the store.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import structlog

from . import errors
from .config import Settings
from .generation import Generation
from .limiter import Permit
from .record import Outcome, StreamRecord, outcome_of
from .subscriber import Subscriber

log = structlog.get_logger("sseproxy.registry")


class StreamRegistry:
    """See the module docstring."""

    def __init__(self, limit: int, settings: Callable[[], Settings]) -> None:
        self.limit = limit
        self.settings = settings
        self.generations: dict[str, Generation] = {}
        self.subscribers: set[Subscriber] = set()
        #: Records of streams still open (running, or followed after their generation).
        self.records: dict[str, StreamRecord] = {}
        #: The key permits of running generations.
        self.permits: dict[str, Permit] = {}
        #: Set when the process is shutting down: /readyz fails, new streams are refused.
        self.draining = False
        self._loop = asyncio.get_running_loop()
        self._timer: asyncio.TimerHandle | None = None

    # -- admission ---------------------------------------------------------------------

    @property
    def active(self) -> int:
        return len(self.generations)

    def check_admission(self) -> None:
        """Raise why a new stream cannot start now, if it cannot."""
        if self.draining:
            raise errors.ServerShutdown()
        if len(self.generations) >= self.limit:
            raise errors.Overloaded(self.limit)

    def add(self, generation: Generation, permit: Permit | None = None) -> None:
        """Run ``generation`` in a slot (after :meth:`check_admission`), holding ``permit``
        until it ends."""
        self.generations[generation.stream_id] = generation
        if permit is not None:
            self.permits[generation.stream_id] = permit
        self.records[generation.stream_id] = generation.record
        generation.on_end = self._generation_ended
        generation.start()

    def get(self, stream_id: str) -> Generation | None:
        return self.generations.get(stream_id)

    def _generation_ended(self, generation: Generation) -> None:
        if self.generations.get(generation.stream_id) is generation:
            del self.generations[generation.stream_id]
        permit = self.permits.pop(generation.stream_id, None)
        if permit is not None:
            status = generation.record.upstream_status
            permit.release(generation.usage, generation.received_chars,
                           answered=status is not None and 200 <= status < 300)
        if generation.log.subscribers == 0:
            self._close(generation.record)

    # -- subscribers -------------------------------------------------------------------

    def attach(self, subscriber: Subscriber) -> None:
        self.subscribers.add(subscriber)

    def detach(self, subscriber: Subscriber) -> None:
        """A subscriber ended: close its stream's record if nothing else keeps it open."""
        self.subscribers.discard(subscriber)
        if subscriber.record.late:
            subscriber.record.close()
            return
        running = self.generations.get(subscriber.log.stream_id)
        if running is None and subscriber.log.subscribers == 0:
            self._close(subscriber.record)

    def reader_done(self, generation: Generation) -> None:
        """A reader without a subscriber (``stream: false``) finished with ``generation``."""
        if (self.generations.get(generation.stream_id) is not generation
                and generation.log.subscribers == 0):
            self._close(generation.record)

    def record_of(self, stream_id: str) -> StreamRecord | None:
        """The open record of a stream (None once its canonical line was written)."""
        return self.records.get(stream_id)

    def _close(self, record: StreamRecord) -> None:
        if self.records.get(record.stream_id) is record:
            del self.records[record.stream_id]
        record.close()

    # -- the sweep ---------------------------------------------------------------------

    def start(self) -> None:
        if self._timer is None:
            self._schedule()

    def stop(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _schedule(self) -> None:
        cfg = self.settings()
        shortest = min(cfg.stall.threshold_s, cfg.stall.client_timeout_s,
                       cfg.store.orphan_grace_s or 1.0)
        tick = min(max(shortest / 4, 0.02), 0.25)
        self._timer = self._loop.call_later(tick, self.sweep)

    def sweep(self) -> None:
        now = self._loop.time()
        try:
            for subscriber in list(self.subscribers):
                try:
                    if subscriber.watch.check(now) >= subscriber.client_timeout_s:
                        subscriber.drop()
                except Exception:  # one broken stream must not stop the sweep
                    log.exception("sweep_error", stream_id=subscriber.log.stream_id)
            for generation in list(self.generations.values()):
                try:
                    generation.upstream_watch.check(now)
                    interrupt = generation.log.interrupt
                    if interrupt is not None:  # a DELETE elsewhere; the store failing
                        generation.stop(outcome_of(interrupt), interrupt)
                    self._check_orphan(generation, now)
                except Exception:
                    log.exception("sweep_error", stream_id=generation.stream_id)
        finally:
            self._schedule()

    def _check_orphan(self, generation: Generation, now: float) -> None:
        if not generation.log.retained or generation.log.subscribers or generation.detached:
            generation.orphan_since = None
            return
        grace = generation.settings.store.orphan_grace_s
        if generation.orphan_since is None:
            generation.orphan_since = now
        if now - generation.orphan_since >= grace:
            generation.stop(Outcome.ABANDONED, errors.Abandoned(grace))

    # -- draining ----------------------------------------------------------------------

    async def drain(self, grace_s: float, drain_s: float, handoff: bool = False) -> None:
        """Let running generations finish for ``grace_s``, then end the rest with a
        ``server_shutdown`` error (after what they already received, within ``drain_s``),
        and wait (boundedly) for their subscribers to write it. ``handoff`` (a shared
        store) first closes the connections of the subscribers of resumable streams."""
        self.draining = True
        log.info("draining", streams=self.active, grace_s=grace_s)
        if handoff:
            moved = [s for s in self.subscribers if s.log.retained and s.ended is None]
            for subscriber in moved:
                subscriber.drop()
            log.info("subscribers_sent_away", subscribers=len(moved))
        await self._wait_until(lambda: not self.generations, grace_s)
        if self.generations:
            log.info("ending_streams", streams=self.active)
            for generation in list(self.generations.values()):
                generation.stop(Outcome.CANCELLED, errors.ServerShutdown())
            await self._wait_until(lambda: not self.generations, drain_s + 2.0)
        await self._wait_until(lambda: not self.subscribers, 2.0)

    async def _wait_until(self, done: Callable[[], bool], timeout: float) -> None:
        deadline = self._loop.time() + timeout
        while not done() and self._loop.time() < deadline:
            await asyncio.sleep(0.05)
