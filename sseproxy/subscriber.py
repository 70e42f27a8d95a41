"""A subscriber: one client connection reading one stream's log, from a position, then live.

Each connection has exactly one writer loop (:meth:`Subscriber.run`): it takes every event
the log has after its position (all that is ready goes in one write), turns them into bytes
with the connection's wire format, writes them through the connection's sink and waits
until they are out. When nothing arrives for ``heartbeat.interval_s`` it writes a ``: ping``
comment instead — from the same loop, so a heartbeat never splits a frame.

While the loop waits, caught up, the log tells the subscriber of new events synchronously
(:meth:`Subscriber._on_news`, the follower's listener): when the sink can put the frames on
the socket at once (:class:`DirectSink`, nothing queued), they are written from there,
which saves waking the loop for every token; otherwise the loop is woken and writes them
itself. Either way the writes of a connection happen one at a time and in log order: the
loop does not write while it waits, and the listener runs only while it does.

A reconnect is simply a new subscriber whose position is the ``Last-Event-ID`` it sent:
it replays what it missed, then follows live. A subscriber ends when it has written the
final event (``done`` or ``error``), when its client leaves (:meth:`Subscriber.client_closed`,
or a write that fails), or when it is dropped because its client stopped reading for
``stall.client_timeout_s`` (:meth:`Subscriber.drop`, called by the registry's sweep). It
never stops the generation itself: who does what when a client leaves is the handler's
decision (the OpenAI endpoint cancels at once; resumable streams wait for the orphan grace).
"""

from __future__ import annotations

import asyncio
import enum
from typing import Protocol, runtime_checkable

from .frames import Frames
from .record import StallWatch, StreamRecord
from .sink import ClientGone
from .store import TEXT, Event, EventLog, FollowerClosed

#: A heartbeat due this close counts as due (the follower's timer may fire a hair early).
_SLACK_S = 0.001


class Sink(Protocol):
    async def send(self, data: bytes) -> None:
        """Write and wait until it is out; raise :class:`ClientGone` when the client left."""

    def drop(self) -> None:
        """Close the connection of a client that stopped reading."""


@runtime_checkable
class DirectSink(Sink, Protocol):
    """A sink that can also write at once, from a callback."""

    def ready(self) -> bool:
        """Whether :meth:`send_now` would reach the socket (nothing queued before it)."""

    def send_now(self, data: bytes) -> bool:
        """Write at once: True when all is out, False when the rest waits in a queue (then
        ``send(b"")`` waits for it); raise :class:`ClientGone` when the client left."""


class Ended(enum.StrEnum):
    """How a subscriber ended."""

    FINAL = "final"  # wrote the stream's final event
    GONE = "gone"  # the client left
    DROPPED = "dropped"  # the client stopped reading and was dropped


class Subscriber:
    """One connection following one log; see the module docstring."""

    __slots__ = (
        "log",
        "frames",
        "sink",
        "record",
        "heartbeat_s",
        "client_timeout_s",
        "_loop",
        "follower",
        "replayed",
        "watch",
        "ended",
        "_role_sent",
        "_texted",
        "_direct",
        "_last_write",
        "_queued",
        "_gone",
        "_final",
    )

    def __init__(
        self,
        log: EventLog,
        after: int,
        frames: Frames,
        sink: Sink,
        record: StreamRecord,
        *,
        heartbeat_s: float,
        stall_threshold_s: float,
        client_timeout_s: float,
    ) -> None:
        self.log = log
        self.frames = frames
        self.sink = sink
        self.record = record
        self.heartbeat_s = heartbeat_s
        self.client_timeout_s = client_timeout_s
        self._loop = asyncio.get_running_loop()
        #: Following starts now, so the stream counts this subscriber from the first moment.
        self.follower = log.follow(after)
        #: Events already in the log behind the start position (a resume replays them).
        self.replayed = log.last - self.follower.position
        self.watch = StallWatch("client", stall_threshold_s, self._loop.time,
                                record.stall_changed)
        self.ended: Ended | None = None
        self._role_sent = False
        self._texted = False
        #: Loop time of the last write (the heartbeat is due ``heartbeat_s`` after it).
        self._direct: DirectSink | None = sink if isinstance(sink, DirectSink) else None
        self._last_write = 0.0
        #: Set by the listener: part of its write is queued (the loop waits for it), the
        #: client left, it wrote the final event.
        self._queued = False
        self._gone = False
        self._final = False
        record.subscribers += 1

    async def run(self, opening: bytes = b"") -> Ended:
        """Write the log to the client until the final event or the client's end."""
        loop = self._loop
        frames = self.frames
        follower = self.follower
        heartbeat_s = self.heartbeat_s
        record = self.record
        try:
            if opening:
                await self._write(opening)
                record.sent(0, len(opening))
            self._last_write = loop.time()
            if self._direct is not None:
                follower.listener = self._on_news
            while True:
                events = await follower.next(self._last_write + heartbeat_s)
                if self._gone:
                    raise ClientGone
                if self._queued:  # the listener's write did not all go out at once
                    self._queued = False
                    await self._write(b"")
                if self._final:
                    self.ended = Ended.FINAL
                    return self.ended
                data = self._frames(events)
                if data:
                    await self._write(data)
                    record.sent(len(events), len(data))
                    self._last_write = loop.time()
                    if events and events[-1].final:
                        self.ended = Ended.FINAL
                        return self.ended
                elif events and events[-1].final:  # a final event this format shows as nothing
                    self.ended = Ended.FINAL
                    return self.ended
                elif loop.time() - self._last_write >= heartbeat_s - _SLACK_S:
                    await self._write(frames.heartbeat)
                    record.heartbeat()
                    record.sent(0, len(frames.heartbeat))
                    self._last_write = loop.time()
        except (ClientGone, FollowerClosed):
            if self.ended is None:
                self.ended = Ended.GONE
            return self.ended
        finally:
            follower.listener = None
            follower.close()
            self.watch.end()

    def _frames(self, events: list[Event]) -> bytes:
        """The bytes of ``events`` (with the role frame first, once it is known)."""
        data = b""
        if not self._role_sent and self.log.role is not None:
            self._role_sent = True
            data = self.frames.role(self.log.role)
        if events:
            data += self.frames.events(events)
            if not self._texted and any(e.kind == TEXT for e in events):
                self._texted = True
                self.record.first_text()
        return data

    def _on_news(self) -> bool:
        """The log has news while the loop waits: write it from here if the socket takes it
        at once. True when handled (the loop sleeps on); False wakes the loop."""
        sink = self._direct
        if sink is None or not sink.ready():
            return False  # something is queued (or the client left): the loop writes
        events = self.follower.take()
        data = self._frames(events)
        if not data:
            if events and events[-1].final:  # a final event this format shows as nothing
                self._final = True
                return False
            return True  # (a touch without news: nothing to write yet)
        try:
            whole = sink.send_now(data)
        except ClientGone:
            self._gone = True
            return False
        self.record.sent(len(events), len(data))
        self._last_write = now = self._loop.time()
        self.follower.postpone(now + self.heartbeat_s)
        if events and events[-1].final:
            self._final = True
        elif whole:
            return True
        self._queued = not whole
        return False

    async def _write(self, data: bytes) -> None:
        self.watch.begin()
        try:
            await self.sink.send(data)
        finally:
            self.watch.end()

    def client_closed(self) -> None:
        """The client went away: wake the loop, which ends."""
        if self.ended is None:
            self.ended = Ended.GONE
        self.follower.close()

    def drop(self) -> None:
        """The client has not read for ``stall.client_timeout_s``: close its connection."""
        if self.ended is None:
            self.ended = Ended.DROPPED
        self.sink.drop()
        self.follower.close()
