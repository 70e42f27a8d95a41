"""The in-process EventLog backend (``store.backend = "memory"``, the default).

Logs live in a dict of this process. Bounds, all in :class:`MemoryStore`:

* a stream holds at most ``store.max_events`` events; an append past it raises
  :class:`~sseproxy.errors.LogFull` (the generation ends with that error rather than grow);
* all retained logs together hold at most ``store.max_bytes`` (each event counted as its
  text's length plus :data:`EVENT_OVERHEAD`, about what CPython holds for it): an append
  that would pass it first evicts the finished logs that ended longest ago, and raises
  :class:`~sseproxy.errors.LogFull` if that is not enough (live streams are never evicted);
* a finished log is kept ``store.ttl_s`` after its final event, then dropped.

A *live* log (``retained=False``, for ``POST /v1/chat/completions``, which never resumes)
has one reader and drops events once read; it counts its unread bytes so the generation can
pause the upstream read when the client is slow (:data:`LIVE_HIGH_WATER`).

Waiting readers cost one future each, and one timer per reader that is moved on lazily
(as the deadline moves later it is re-armed only when it fires), not one per event.

A reader that waits may instead be told synchronously (:attr:`MemoryFollower.listener`):
its connection writes the news from the appending code when its socket takes them at once,
and the waiting task is woken only when that is not possible. The appends of one upstream
read are held (:meth:`MemoryLog.hold`, :meth:`MemoryLog.release`) and told once, so a
burst of tokens makes one write, not one per token.
"""

from __future__ import annotations

import asyncio
from collections import OrderedDict, deque
from collections.abc import Callable

from .. import errors
from . import LIVE_HIGH_WATER, TEXT, Event, FollowerClosed

#: What one event costs beside its text (the tuple, the str header, the list slot).
EVENT_OVERHEAD = 120
#: A timer that fires this close to its deadline counts as on time.
_TIMER_SLACK_S = 0.001


class MemoryFollower:
    """One reader's position in a :class:`MemoryLog`, and its wait."""

    __slots__ = ("_log", "position", "_fut", "_timer", "_deadline", "_closed", "_loop",
                 "listener")

    def __init__(self, log: MemoryLog, after: int) -> None:
        self._log = log
        self.position = after
        self._fut: asyncio.Future[None] | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._deadline = 0.0
        self._closed = False
        self._loop = log.loop
        #: Called instead of waking a pending :meth:`next` when the log has news (not when
        #: the follower closes or its deadline passes); it may :meth:`take` the events
        #: itself and returns True when it handled them (the wait goes on), False to wake it.
        self.listener: Callable[[], bool] | None = None

    async def next(self, deadline: float) -> list[Event]:
        if self._closed:
            raise FollowerClosed
        log = self._log
        if log.last <= self.position:
            self._deadline = deadline
            timer = self._timer
            if timer is None or timer.when() > deadline:
                if timer is not None:
                    timer.cancel()
                self._timer = self._loop.call_at(deadline, self._on_timer)
            self._fut = fut = self._loop.create_future()
            try:
                await fut
            finally:
                self._fut = None
            if self._closed:
                raise FollowerClosed
        return self.take()

    def take(self) -> list[Event]:
        """The events after :attr:`position` now, without waiting (for a listener)."""
        events = self._log.since(self.position)
        if events:
            self.position = events[-1].n
        return events

    def postpone(self, deadline: float) -> None:
        """Move the deadline of a pending :meth:`next` (its timer follows lazily)."""
        self._deadline = deadline

    def wake(self) -> None:
        """The log has news: tell the listener, or wake a pending :meth:`next`."""
        fut = self._fut
        if fut is not None and not fut.done():
            listener = self.listener
            if listener is not None and not self._closed:
                try:
                    if listener():
                        return
                except Exception as exc:  # the waiting loop reads the news itself
                    self._loop.call_exception_handler(
                        {"message": "a follower's listener failed", "exception": exc})
            fut.set_result(None)

    def _resolve(self) -> None:
        fut = self._fut
        if fut is not None and not fut.done():
            fut.set_result(None)

    def _on_timer(self) -> None:
        self._timer = None
        if self._fut is None:
            return  # nobody waits: the next wait sets its own timer
        if self._loop.time() + _TIMER_SLACK_S >= self._deadline:
            self._resolve()  # the deadline is the waiting loop's own (a heartbeat)
        else:
            self._timer = self._loop.call_at(self._deadline, self._on_timer)

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._log.unfollow(self)
        self._resolve()


class MemoryLog:
    """One stream's events in this process."""

    __slots__ = (
        "store",
        "stream_id",
        "loop",
        "retained",
        "last",
        "ended",
        "role",
        "_kept",
        "_unread_events",
        "_followers",
        "on_space",
        "bytes",
        "_unread",
        "interrupt",
        "_held",
        "_news",
    )

    def __init__(self, store: MemoryStore, stream_id: str, retained: bool) -> None:
        self.store = store
        self.stream_id = stream_id
        self.loop = store.loop
        self.retained = retained
        self.last = 0
        self.ended = False
        self.role: str | None = None
        #: Retained: every event (``_kept[i].n == i + 1``). Live: the unread ones only.
        self._kept: list[Event] = []
        self._unread_events: deque[Event] = deque()
        self._followers: list[MemoryFollower] = []
        self.on_space: Callable[[], None] | None = None
        self.interrupt: errors.SSEProxyError | None = None
        self.bytes = 0
        self._unread = 0
        self._held = False
        self._news = False

    # -- the generation's side ---------------------------------------------------------

    def append(self, kind: str, data: str) -> int:
        size = len(data) + EVENT_OVERHEAD
        n = self.last + 1
        store = self.store
        if self.retained:
            if kind == TEXT and n > store.max_events:
                raise errors.LogFull(
                    f"the stream passed its limit of {store.max_events} events "
                    "(store.max_events)")
            store.reserve(size, kind == TEXT)
            self.bytes += size
        else:
            self._unread += size
        self.last = n
        (self._kept if self.retained else self._unread_events).append(Event(n, kind, data))
        if self._held:
            self._news = True
        else:
            self._tell()
        return n

    def touch(self) -> None:
        if self._held:
            self._news = True
        else:
            self._tell()

    def hold(self) -> None:
        """Tell the followers of what is appended from now on only at :meth:`release`."""
        self._held = True

    def release(self) -> None:
        """Tell the followers, once, of what was appended since :meth:`hold`."""
        self._held = False
        if self._news:
            self._news = False
            self._tell()

    def _tell(self) -> None:
        followers = self._followers
        if len(followers) == 1:
            followers[0].wake()
        else:  # a listener may close its follower (its client left) while this runs
            for follower in list(followers):
                follower.wake()

    def end(self) -> None:
        if not self.ended:
            self.ended = True
            self.store.ended(self)

    # -- the readers' side -------------------------------------------------------------

    def follow(self, after: int) -> MemoryFollower:
        follower = MemoryFollower(self, max(0, min(after, self.last)))
        self._followers.append(follower)
        return follower

    def unfollow(self, follower: MemoryFollower) -> None:
        try:
            self._followers.remove(follower)
        except ValueError:
            pass

    def close_followers(self) -> None:
        """Close every follower (their subscribers end; EventSource clients reconnect)."""
        for follower in list(self._followers):
            follower.close()

    def since(self, position: int) -> list[Event]:
        """The events after ``position`` (a live log forgets them once read)."""
        if self.retained:
            return self._kept[position:] if position < self.last else []
        events = self._unread_events
        out = list(events)
        events.clear()
        if out:
            was = self._unread
            self._unread = 0
            if was > LIVE_HIGH_WATER and self.on_space is not None:
                self.on_space()
        return out

    @property
    def subscribers(self) -> int:
        return len(self._followers)

    @property
    def unread_bytes(self) -> int:
        return self._unread

    @property
    def events(self) -> int:
        return len(self._kept)


class MemoryStore:
    """Every retained log of this process, with the bounds of the module docstring."""

    def __init__(self, *, max_events: int, max_bytes: int, ttl_s: float,
                 clock: Callable[[], float] | None = None,
                 on_evict: Callable[[], None] | None = None) -> None:
        self.loop = asyncio.get_running_loop()
        self.max_events = max_events
        self.max_bytes = max_bytes
        self.ttl_s = ttl_s
        self._clock = clock or self.loop.time
        self._on_evict = on_evict
        self._logs: dict[str, MemoryLog] = {}
        #: Finished logs, oldest end first, with the time they expire.
        self._finished: OrderedDict[str, float] = OrderedDict()
        self.bytes = 0
        self._timer: asyncio.TimerHandle | None = None

    shared = False
    problem = None

    async def create(self, stream_id: str, *, retained: bool = True) -> MemoryLog:
        return self.new_log(stream_id, retained=retained)

    async def get(self, stream_id: str) -> MemoryLog | None:
        return self.find(stream_id)

    async def cancel(self, stream_id: str) -> bool:
        return self.find(stream_id) is not None  # a running one is the registry's

    def check(self) -> None:
        pass

    def new_log(self, stream_id: str, *, retained: bool = True) -> MemoryLog:
        log = MemoryLog(self, stream_id, retained)
        if retained:
            self._logs[stream_id] = log
        return log

    def find(self, stream_id: str) -> MemoryLog | None:
        self.expire()
        return self._logs.get(stream_id)

    def discard(self, log: MemoryLog) -> None:
        """Forget ``log`` now (its followers keep what they hold)."""
        if self._logs.get(log.stream_id) is log:
            self._finished.pop(log.stream_id, None)
            self._drop(log.stream_id)

    @property
    def streams(self) -> int:
        return len(self._logs)

    @property
    def events(self) -> int:
        return sum(log.events for log in self._logs.values())

    def reserve(self, size: int, strict: bool = True) -> None:
        """Room for ``size`` more bytes, evicting the oldest finished logs if needed; past
        the bound, raise if ``strict`` (a final event is let through)."""
        if self.bytes + size > self.max_bytes:
            self.expire()
            while self.bytes + size > self.max_bytes and self._finished:
                stream_id, _ = self._finished.popitem(last=False)
                self._drop(stream_id)
                if self._on_evict is not None:
                    self._on_evict()
            if strict and self.bytes + size > self.max_bytes:
                raise errors.LogFull(
                    f"the event store is full ({self.max_bytes} bytes, store.max_bytes) "
                    "with running streams")
        self.bytes += size

    def ended(self, log: MemoryLog) -> None:
        if log.retained and self._logs.get(log.stream_id) is log:
            self._finished[log.stream_id] = self._clock() + self.ttl_s
            if self._timer is None:
                self._schedule()

    def expire(self) -> None:
        """Drop the finished logs whose time-to-live is over."""
        now = self._clock()
        finished = self._finished
        while finished:
            stream_id, until = next(iter(finished.items()))
            if until > now:
                break
            del finished[stream_id]
            self._drop(stream_id)

    def _drop(self, stream_id: str) -> None:
        log = self._logs.pop(stream_id, None)
        if log is not None:
            self.bytes -= log.bytes

    def _schedule(self) -> None:
        self._timer = self.loop.call_later(min(max(self.ttl_s / 4, 0.05), 5.0), self._sweep)

    def _sweep(self) -> None:
        self._timer = None
        self.expire()
        if self._finished:
            self._schedule()

    async def close(self) -> None:
        self.stop()

    def stop(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None


__all__ = ["MemoryStore", "MemoryLog", "MemoryFollower", "TEXT"]
