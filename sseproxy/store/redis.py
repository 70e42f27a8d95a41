"""The EventLog on Redis Streams (``store.backend = "redis"``): any instance serves any stream.

Keys of stream ``S``, hash-tagged so that one stream's keys share a Redis Cluster slot:

* ``sseproxy:{S}:events`` — a Redis Stream; event ``n`` is the entry ``0-n`` with fields
  ``k`` (kind) and ``d`` (data). Explicit ids make an entry's id and the ``n`` of
  ``Last-Event-ID`` the same number, and make a write that is retried harmless (Redis
  refuses an id it already holds). ``XADD … MAXLEN ~ store.max_events``.
* ``sseproxy:{S}:meta`` — a hash written before the stream is announced (``owner``,
  ``role``): any instance finds the stream as soon as ``POST /v1/streams`` answered.
* ``sseproxy:{S}:cancel`` — set by a ``DELETE`` served by an instance that does not run the
  generation; the owner polls it every :data:`POLL_S`.
* ``sseproxy:{S}:readers`` — a sorted set: instance id → until when (ms since the epoch)
  that instance has subscribers of ``S``; the owner counts the members still valid, so the
  orphan grace is judged across all instances. Entries are refreshed every :data:`POLL_S`
  and expire after :data:`READER_TTL_MS` (an instance that died stops counting).

A running stream's keys expire ``store.ttl_s`` + ``upstream.max_duration_s`` after its
start (an owner that crashed leaks nothing); at its end they expire after ``store.ttl_s``.

**The owner** (the instance running the generation) keeps its log in memory as well: its
own subscribers follow it there, with no round trip. One writer task per process sends
what every log appended since the last write in one pipeline, at most every
:data:`FLUSH_INTERVAL_S`: a fast stream costs one ``XADD`` per event but no round trip of
its own. The same task polls the cancel keys and readers of the running streams every
:data:`POLL_S`, refreshes this instance's reader entries, and sends a ``PING`` when there
is nothing else, so an outage is noticed within ``POLL_S`` + ``store.redis_timeout_s``.

**Another instance** reads a stream through a *mirror*: ``XRANGE`` loads it, then one task
per (instance, stream) follows it with ``XREAD BLOCK`` into an in-memory copy that the
instance's subscribers follow. The mirror goes away with its last subscriber.

**Failures**: every call is bounded by ``store.redis_timeout_s`` (``XREAD`` by its block
time plus that); redis-py's own retries are off. A failed call is counted
(``sseproxy_store_errors_total{op}``) and sets :attr:`RedisStore.problem` (``/readyz``
answers 503 with it; new resumable streams are refused with ``store_unavailable``) until a
call succeeds again, which the writer's ``PING`` finds out by itself. Running generations of
this instance get :class:`~sseproxy.errors.StoreUnavailable` as their
:attr:`~sseproxy.store.EventLog.interrupt` and end with that error (their local subscribers
read it from memory); mirrors close their followers, so EventSource clients reconnect and
resume once Redis answers.
"""

from __future__ import annotations

import asyncio
import secrets
import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import structlog
from redis.asyncio import Redis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import RedisError

from .. import errors
from . import DONE, ERROR, Event
from .memory import MemoryFollower, MemoryLog, MemoryStore

log = structlog.get_logger("sseproxy.store")

T = TypeVar("T")

KEY_PREFIX = "sseproxy:"
#: The writer sends at most this often (what is appended meanwhile goes in one pipeline).
FLUSH_INTERVAL_S = 0.01
#: How often the owner reads cancel keys and readers, and a reader refreshes its entries.
POLL_S = 0.25
#: How long one ``XREAD`` blocks waiting for new entries.
BLOCK_MS = 1000
#: How long a reader entry counts without being refreshed.
READER_TTL_MS = 5000
#: Events of one stream written in one pipeline at most.
FLUSH_BATCH = 2000
#: How long the unwritten events of a log that ended are retried while Redis is away.
GIVE_UP_S = 30.0
#: How long a cancel request waits for its owner to see it.
CANCEL_TTL_MS = 60_000


def key(stream_id: str, part: str) -> str:
    """The Redis key of one part of a stream (hash-tagged by the stream id)."""
    return f"{KEY_PREFIX}{{{stream_id}}}:{part}"


def _reason(exc: BaseException, timeout_s: float) -> str:
    if isinstance(exc, TimeoutError):
        return f"redis did not answer within {timeout_s:g} s (store.redis_timeout_s)"
    return f"redis: {exc or type(exc).__name__}"


class RedisLog:
    """A log whose generation runs in this process: in memory for the local subscribers,
    written to Redis for every other instance."""

    retained = True

    def __init__(self, store: RedisStore, local: MemoryLog) -> None:
        self.store = store
        self.local = local
        self.stream_id = local.stream_id
        self.interrupt: errors.SSEProxyError | None = None
        #: Subscribers on other instances (as of the last poll).
        self.remote = 0
        #: Appended, not yet written to Redis.
        self.pending: list[Event] = []
        self.role_dirty = False
        self.expiring = False
        self.ended_at: float | None = None

    @property
    def last(self) -> int:
        return self.local.last

    @property
    def ended(self) -> bool:
        return self.local.ended

    @property
    def role(self) -> str | None:
        return self.local.role

    @role.setter
    def role(self, role: str | None) -> None:
        self.local.role = role
        self.role_dirty = True
        self.store.kick(self)

    @property
    def on_space(self) -> Callable[[], None] | None:
        return self.local.on_space

    @on_space.setter
    def on_space(self, callback: Callable[[], None] | None) -> None:
        self.local.on_space = callback

    def append(self, kind: str, data: str) -> int:
        n = self.local.append(kind, data)
        self.pending.append(Event(n, kind, data))
        self.store.kick(self)
        return n

    def touch(self) -> None:
        self.local.touch()

    def hold(self) -> None:
        self.local.hold()

    def release(self) -> None:
        self.local.release()

    def end(self) -> None:
        if not self.local.ended:
            self.local.end()
            self.ended_at = self.store.loop.time()
            self.store.kick(self)

    def follow(self, after: int) -> MemoryFollower:
        return self.local.follow(after)

    @property
    def subscribers(self) -> int:
        return self.local.subscribers + self.remote

    @property
    def unread_bytes(self) -> int:
        return 0


class RedisStore:
    """Every stream's log in Redis; see the module docstring."""

    shared = True

    def __init__(self, *, url: str, timeout_s: float, max_events: int, max_bytes: int,
                 ttl_s: float, running_ttl_s: float,
                 on_error: Callable[[str], None] | None = None) -> None:
        self.loop = asyncio.get_running_loop()
        self.timeout_s = timeout_s
        self.max_events = max_events
        self.ttl_ms = max(1, int(ttl_s * 1000))
        self.running_ttl_ms = int((ttl_s + running_ttl_s) * 1000)
        self._on_error = on_error
        #: This process's logs in memory (owned and mirrored); a finished one is dropped
        #: at once (Redis keeps it for ``store.ttl_s``).
        self.memory = MemoryStore(max_events=max_events, max_bytes=max_bytes, ttl_s=0.0)
        self.redis = Redis.from_url(
            url, socket_connect_timeout=timeout_s, socket_timeout=timeout_s + BLOCK_MS / 1000,
            retry=Retry(NoBackoff(), 0), decode_responses=True,
            encoding_errors="surrogatepass")
        self.instance = secrets.token_hex(8)
        self._owned: dict[str, RedisLog] = {}
        self._dirty: dict[RedisLog, None] = {}
        self._mirrors: dict[str, MemoryLog] = {}
        self._mirror_tasks: set[asyncio.Task[None]] = set()
        #: Streams whose mirror went away: this instance's reader entry is removed.
        self._left: set[str] = set()
        self._problem: str | None = None
        self._wake = asyncio.Event()
        self._closing = False
        self._writer = self.loop.create_task(self._write_loop(), name="redis-writer")

    # -- health ------------------------------------------------------------------------

    @property
    def problem(self) -> str | None:
        return self._problem

    def check(self) -> None:
        if self._problem is not None:
            raise errors.StoreUnavailable(self._problem)

    async def _call(self, op: str, call: Awaitable[T], timeout_s: float | None = None) -> T:
        """One Redis call within its timeout; a failure is counted and raised as
        :class:`~sseproxy.errors.StoreUnavailable`."""
        try:
            result = await asyncio.wait_for(call, timeout_s or self.timeout_s)
        except (RedisError, OSError, TimeoutError) as exc:
            self._failed(op, exc)
            raise errors.StoreUnavailable(self._problem or "") from exc
        if self._problem is not None:
            log.info("store_available", backend="redis")
            self._problem = None
        return result

    def _failed(self, op: str, exc: BaseException) -> None:
        if self._on_error is not None:
            self._on_error(op)
        reason = _reason(exc, self.timeout_s)
        if self._problem is None:
            log.warning("store_unavailable", backend="redis", op=op, reason=reason)
        self._problem = reason
        for owned in self._owned.values():
            if not owned.ended and owned.interrupt is None:
                owned.interrupt = errors.StoreUnavailable(reason)

    # -- the memory side, for metrics --------------------------------------------------

    @property
    def streams(self) -> int:
        return self.memory.streams

    @property
    def events(self) -> int:
        return self.memory.events

    @property
    def bytes(self) -> int:
        return self.memory.bytes

    # -- creating and finding logs -----------------------------------------------------

    async def create(self, stream_id: str, *, retained: bool = True) -> RedisLog | MemoryLog:
        if not retained:  # a live log is read once, here: it never goes to Redis
            return self.memory.new_log(stream_id, retained=False)
        self.check()
        meta = key(stream_id, "meta")
        pipe = self.redis.pipeline(transaction=False)
        pipe.hset(meta, mapping={"owner": self.instance})
        pipe.pexpire(meta, self.running_ttl_ms)
        await self._call("create", pipe.execute())
        owned = RedisLog(self, self.memory.new_log(stream_id))
        self._owned[stream_id] = owned
        return owned

    async def get(self, stream_id: str) -> RedisLog | MemoryLog | None:
        owned = self._owned.get(stream_id)
        if owned is not None:
            return owned
        mirror = self._mirrors.get(stream_id)
        if mirror is not None:
            return mirror
        self.check()
        readers = key(stream_id, "readers")
        pipe = self.redis.pipeline(transaction=False)
        pipe.exists(key(stream_id, "meta"))
        pipe.hget(key(stream_id, "meta"), "role")
        pipe.xrange(key(stream_id, "events"), "-", "+")
        pipe.zadd(readers, {self.instance: int(time.time() * 1000) + READER_TTL_MS})
        pipe.pexpire(readers, READER_TTL_MS)
        exists, role, entries, _, _ = await self._call("get", pipe.execute())
        mirror = self._mirrors.get(stream_id)  # made by a get that ran meanwhile
        if mirror is not None:
            return mirror
        if not exists and not entries:
            return None
        mirror = self.memory.new_log(stream_id)
        mirror.role = role
        try:
            self._add(mirror, entries)
        except errors.LogFull:
            self.memory.discard(mirror)
            raise errors.StoreUnavailable("this instance holds too many stream logs") from None
        if not mirror.ended:
            self._mirrors[stream_id] = mirror
            task = self.loop.create_task(self._follow(mirror), name=f"mirror-{stream_id}")
            self._mirror_tasks.add(task)
            task.add_done_callback(self._mirror_tasks.discard)
        return mirror

    async def cancel(self, stream_id: str) -> bool:
        if stream_id in self._owned:
            return True  # this process runs it: the registry has stopped it already
        self.check()
        pipe = self.redis.pipeline(transaction=False)
        pipe.exists(key(stream_id, "meta"), key(stream_id, "events"))
        pipe.set(key(stream_id, "cancel"), "1", px=CANCEL_TTL_MS)
        found, _ = await self._call("cancel", pipe.execute())
        return bool(found)

    # -- mirrors -----------------------------------------------------------------------

    @staticmethod
    def _add(mirror: MemoryLog, entries: list[tuple[str, dict[str, str]]]) -> None:
        mirror.hold()  # the entries of one read reach each subscriber in one write
        try:
            for entry_id, fields in entries:
                n = int(entry_id.rsplit("-", 1)[1])
                if n != mirror.last + 1:
                    continue  # already held (a read that overlapped the load)
                mirror.append(fields["k"], fields["d"])
                if fields["k"] in (DONE, ERROR):  # not a format's own kind (a response's meta)
                    mirror.end()
                    return
        finally:
            mirror.release()

    async def _follow(self, mirror: MemoryLog) -> None:
        """Follow one stream with ``XREAD BLOCK`` while this instance has subscribers."""
        stream_id = mirror.stream_id
        events = key(stream_id, "events")
        try:
            while not mirror.ended and mirror.subscribers > 0 and not self._closing:
                reply: Any = await self._call(
                    "read", self.redis.xread({events: f"0-{mirror.last}"}, count=FLUSH_BATCH,
                                             block=BLOCK_MS),
                    timeout_s=BLOCK_MS / 1000 + self.timeout_s)
                streams = reply.items() if isinstance(reply, dict) else reply or ()
                for _, entries in streams:
                    self._add(mirror, entries)
        except (errors.StoreUnavailable, errors.LogFull):
            pass
        except Exception:  # a mirror's failure must not outlive it silently
            log.exception("mirror_failed", stream_id=stream_id)
        finally:
            if self._mirrors.get(stream_id) is mirror:
                del self._mirrors[stream_id]
            self._left.add(stream_id)
            if not mirror.ended:
                # Its subscribers end without a final event: EventSource reconnects (here
                # or elsewhere) and resumes from Redis.
                mirror.close_followers()
                self.memory.discard(mirror)

    # -- the writer --------------------------------------------------------------------

    def kick(self, owned: RedisLog) -> None:
        self._dirty[owned] = None
        self._wake.set()

    async def _write_loop(self) -> None:
        next_poll = 0.0
        while True:
            now = self.loop.time()
            if not self._dirty and not self._closing and now < next_poll:
                try:
                    await asyncio.wait_for(self._wake.wait(), next_poll - now)
                except TimeoutError:
                    pass
            self._wake.clear()
            now = self.loop.time()
            poll = now >= next_poll and not self._closing
            if poll:
                next_poll = now + POLL_S
            try:
                await self._write(poll)
            except errors.StoreUnavailable:
                if self._closing:
                    return
                await asyncio.sleep(POLL_S)  # Redis is away: try again a little later
            except Exception:
                log.exception("store_writer_error")
                await asyncio.sleep(POLL_S)
            if self._closing and not self._dirty:
                return
            await asyncio.sleep(FLUSH_INTERVAL_S)  # what is appended meanwhile goes together

    async def _write(self, poll: bool) -> None:
        pipe = self.redis.pipeline(transaction=False)
        #: What each command of the pipeline is for, to read its answer.
        tags: list[tuple[str, RedisLog | None]] = []
        batches: list[tuple[RedisLog, int, bool]] = []
        for owned in list(self._dirty):
            batch = owned.pending[:FLUSH_BATCH]
            sid = owned.stream_id
            events, meta = key(sid, "events"), key(sid, "meta")
            for event in batch:
                pipe.xadd(events, {"k": event.kind, "d": event.data}, id=f"0-{event.n}",
                          maxlen=self.max_events, approximate=True)
                tags.append(("xadd", owned))
            role = owned.role_dirty and owned.role is not None
            if role:
                pipe.hset(meta, "role", owned.role or "")
                tags.append(("", None))
            if batch and batch[-1].final:
                pipe.pexpire(events, self.ttl_ms)
                pipe.pexpire(meta, self.ttl_ms)
                tags += [("", None), ("", None)]
            elif batch and not owned.expiring:
                pipe.pexpire(events, self.running_ttl_ms)
                tags.append(("", None))
            batches.append((owned, len(batch), role))
        self._dirty.clear()
        left: list[str] = []
        if poll:
            now_ms = int(time.time() * 1000)
            for owned in self._owned.values():
                if not owned.ended:
                    pipe.exists(key(owned.stream_id, "cancel"))
                    pipe.zcount(key(owned.stream_id, "readers"), now_ms, "+inf")
                    tags += [("cancel", owned), ("remote", owned)]
            for sid, mirror in self._mirrors.items():
                if mirror.subscribers:
                    readers = key(sid, "readers")
                    pipe.zadd(readers, {self.instance: now_ms + READER_TTL_MS})
                    pipe.pexpire(readers, READER_TTL_MS)
                    tags += [("", None), ("", None)]
            left = [sid for sid in self._left if sid not in self._mirrors]
            for sid in left:
                pipe.zrem(key(sid, "readers"), self.instance)
                tags.append(("", None))
            self._left.clear()
            if not tags:
                pipe.ping()
                tags.append(("", None))
        if not tags:
            return
        try:
            results = await self._call("write", pipe.execute(raise_on_error=False))
        except errors.StoreUnavailable:
            now = self.loop.time()
            for owned, _, _ in batches:
                if owned.ended_at is not None and now - owned.ended_at > GIVE_UP_S:
                    self._forget(owned)
                else:
                    self._dirty[owned] = None
            self._left.update(left)
            raise
        # (An XADD answered with an error is an id Redis holds already: written by a try
        # whose answer was lost.)
        for (tag, owned_), result in zip(tags, results, strict=True):
            if owned_ is None:
                continue
            if tag == "cancel" and result == 1 and owned_.interrupt is None:
                owned_.interrupt = errors.StreamCancelled()
            elif tag == "remote" and isinstance(result, int):
                owned_.remote = result
        for owned, count, role in batches:
            del owned.pending[:count]
            if count:
                owned.expiring = True
            if role:
                owned.role_dirty = False
            if owned.pending or owned.role_dirty:
                self._dirty[owned] = None
            elif owned.ended:
                self._forget(owned)

    def _forget(self, owned: RedisLog) -> None:
        if self._owned.get(owned.stream_id) is owned:
            del self._owned[owned.stream_id]
        self._dirty.pop(owned, None)

    # -- closing -----------------------------------------------------------------------

    async def close(self) -> None:
        """Write what is still pending (within a few timeouts), then stop."""
        self._closing = True
        self._wake.set()
        await asyncio.wait([self._writer], timeout=3 * self.timeout_s + 1.0)
        if not self._writer.done():
            self._writer.cancel()
        for task in list(self._mirror_tasks):
            task.cancel()
        if self._mirror_tasks:
            await asyncio.wait(list(self._mirror_tasks), timeout=self.timeout_s)
        try:
            await asyncio.wait_for(self.redis.aclose(), self.timeout_s)
        except (RedisError, OSError, TimeoutError):
            pass
        self.memory.stop()


__all__ = ["RedisStore", "RedisLog", "key"]
