"""The EventLog: where a generation's events wait for the subscribers that read them.

A stream's log is an append-only sequence of :class:`Event` numbered 1, 2, 3, … without
gaps; it ends with exactly one final event (``done`` or ``error``). A generation appends
(synchronously: it runs in the upstream's byte callback); every client connection reads
through a :class:`Follower`: the events after a position, then waits for more. That is all
a reconnect needs: a new follower at the position its ``Last-Event-ID`` names.

The interface is shaped so that Redis Streams fit it without change: ``append`` buffers and
returns at once (a backend may batch appends into one ``XADD`` pipeline), ``Follower.next``
is ``XREAD BLOCK`` from a position with a deadline, and ``end`` starts the time-to-live
(``EXPIRE``). :mod:`sseproxy.store.memory` is the in-process backend (the default);
:mod:`sseproxy.store.redis` keeps logs in Redis Streams, shared by every instance.

The store's own calls are asynchronous (``create``, ``get``, ``cancel``, ``close``): with
Redis each is a round trip that may fail (:class:`~sseproxy.errors.StoreUnavailable`),
bounded by ``store.redis_timeout_s``. What happens elsewhere reaches a running generation
through :attr:`EventLog.interrupt`, which the registry's sweep reads: a ``DELETE`` served by
another instance, or the store failing under it.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple, Protocol

from ..errors import SSEProxyError

#: Event kinds. Text is relayed text; ``done`` and ``error`` end the log (JSON data). A
#: format may put other kinds before the text (a Responses stream's ``meta``).
TEXT = "text"
DONE = "done"
ERROR = "error"

#: A live log pauses its generation's upstream read past this many unread bytes…
LIVE_HIGH_WATER = 256 * 1024
#: … and lets it read again once its reader brought them under this.
LIVE_LOW_WATER = 64 * 1024


class Event(NamedTuple):
    """One event of a stream's log: position ``n`` (from 1), its kind and its data."""

    n: int
    kind: str
    data: str

    @property
    def final(self) -> bool:
        return self.kind == DONE or self.kind == ERROR


class FollowerClosed(Exception):
    """The follower was closed (its client left or was dropped) while it waited."""


class Follower(Protocol):
    """One reader of one log, at a position."""

    #: The position of the last event returned (0 before the first).
    position: int

    async def next(self, deadline: float) -> list[Event]:
        """The events after :attr:`position` (advancing it), waiting until ``deadline``
        (event-loop time) for one; ``[]`` when the deadline passed, or when the log was
        touched without a new event. Raises :class:`FollowerClosed` once closed."""

    def close(self) -> None:
        """Stop following (wakes a pending :meth:`next`, which raises)."""

    #: Called instead of waking a pending :meth:`next` when the log has news; it may
    #: :meth:`take` them itself and returns True when it did (the wait goes on).
    listener: Callable[[], bool] | None

    def take(self) -> list[Event]:
        """The events after :attr:`position` now (advancing it), without waiting."""

    def postpone(self, deadline: float) -> None:
        """Move the deadline of a pending :meth:`next` later."""


class EventLog(Protocol):
    """One stream's log."""

    stream_id: str

    @property
    def last(self) -> int:
        """The number of the last event appended (0 when empty)."""

    @property
    def ended(self) -> bool:
        """Whether the final event was appended."""

    #: The role the upstream announced (``assistant``), when it did.
    role: str | None
    #: Whether the log is kept for replay (False: a live log, one reader, nothing kept).
    retained: bool
    #: A live log calls this when its reader brought the unread bytes back under
    #: :data:`LIVE_LOW_WATER` (the generation reads the upstream again).
    on_space: Callable[[], None] | None
    #: Set when the generation must stop for a reason outside this process (a ``DELETE``
    #: served by another instance; the store failing): the registry's sweep stops it.
    interrupt: SSEProxyError | None

    def append(self, kind: str, data: str) -> int:
        """Append one event; return its number. Raises :class:`~sseproxy.errors.LogFull`
        when a text event would take the stream or the store over its bound (nothing is
        appended then); a final event is never refused (one per stream)."""

    def touch(self) -> None:
        """Wake every follower without an event (e.g. after :attr:`role` was set)."""

    def hold(self) -> None:
        """Tell the followers of the appends from now on only at :meth:`release` (the
        appends of one upstream read then reach a connection in one write)."""

    def release(self) -> None:
        """Tell the followers, once, of what was appended since :meth:`hold`."""

    def end(self) -> None:
        """The final event is in: the log is kept ``store.ttl_s`` for late readers."""

    def follow(self, after: int) -> Follower:
        """A follower that reads the events after ``after``."""

    @property
    def subscribers(self) -> int:
        """How many followers are open now (with a shared store: on every instance)."""

    @property
    def unread_bytes(self) -> int:
        """Bytes appended that the followers have not read yet (a live log only)."""


class Store(Protocol):
    """Every stream's log, by id."""

    #: Whether other instances can serve this store's streams (Redis): then a shutting-down
    #: instance sends its EventSource subscribers away to reconnect elsewhere.
    shared: bool

    async def create(self, stream_id: str, *, retained: bool = True) -> EventLog:
        """A new, empty log. ``retained=False`` makes a live log: one reader, events dropped
        once read, and its unread bytes counted for backpressure. Raises
        :class:`~sseproxy.errors.StoreUnavailable` when a retained log cannot be made."""

    async def get(self, stream_id: str) -> EventLog | None:
        """The log of ``stream_id`` when it exists and has not expired (raises
        :class:`~sseproxy.errors.StoreUnavailable` when that cannot be known)."""

    async def cancel(self, stream_id: str) -> bool:
        """Ask whoever runs ``stream_id``'s generation, on any instance, to stop it; False
        when the stream is unknown. (A generation of this process is stopped through the
        registry instead, at once.)"""

    @property
    def problem(self) -> str | None:
        """Why the store cannot be used now (readiness fails with it), or None."""

    def check(self) -> None:
        """Raise :class:`~sseproxy.errors.StoreUnavailable` if :attr:`problem` is set."""

    async def close(self) -> None:
        """Stop the store's timers and tasks (a shared store writes what it holds first)."""
