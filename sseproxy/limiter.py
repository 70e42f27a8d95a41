"""Per-key limits, the shell: a request's permit, and where each key's numbers live.

:class:`Limiter` admits a request for a key (``limits.key_*``, ``[limits.keys.NAME]``)
before anything goes upstream and hands back a :class:`Permit`; the permit is released
once, when the stream's generation has put its final event in the log (after the paced
drain, and whether anybody still follows it or not: see
:meth:`sseproxy.registry.StreamRegistry.add`), and then the tokens charged at admission are
reconciled with what the stream used. The arithmetic is :mod:`sseproxy.limits`.

Where the numbers live:

* :class:`MemoryCounters` — this process (``store.backend = "memory"``).
* :class:`RedisCounters` — Redis (``store.backend = "redis"``), shared by every instance:
  each admission and each release is one Lua script (atomic), on two keys hash-tagged by
  the key name (``sseproxy:limits:{NAME}:rate``, a hash of the two budgets, and
  ``sseproxy:limits:{NAME}:streams``, a sorted set of permit leases), so a Redis Cluster
  keeps them in one slot. Times are this instance's wall clock (instances keep theirs in
  step with NTP; a skew of ``d`` seconds moves a budget by ``d``).

**When Redis fails** (an error, no answer within ``store.redis_timeout_s``, or the store
already known to be down), admission *fails open to this process's own counters*: every
instance goes on enforcing each key's limits by itself, so a key can use at most its
limits times the number of instances until Redis answers again, and ``limits.max_streams``
still bounds each process. Refusing every request while Redis is away would turn a Redis
outage into a full outage of the API; letting everything through would leave the spend
unbounded. The failure is logged and counted (``sseproxy_store_errors_total{op="limits"}``).
A permit taken from Redis whose release fails is freed by its lease (``lease_s``).
"""

from __future__ import annotations

import asyncio
import hashlib
import re
import secrets
import time
from collections.abc import Callable, Mapping
from typing import Any, Protocol

import structlog

from . import errors, limits
from .config import Settings
from .limits import Decision, KeyLimits, KeyState
from .metrics import Metrics
from .validate import ChatRequest

log = structlog.get_logger("sseproxy.limits")

_SAFE_NAME = re.compile(r"^[A-Za-z0-9._:@-]{1,64}$")
#: Redis keys of one key's numbers.
KEY_PREFIX = "sseproxy:limits:"


def key_limits(settings: Settings, name: str) -> KeyLimits:
    """The limits of key ``name``: its ``[limits.keys.NAME]`` table over ``limits.key_*``."""
    cfg = settings.limits
    own = settings.key_limits.get(name, {})
    return KeyLimits(
        max_streams=own.get("max_streams", cfg.key_max_streams),
        requests_per_minute=own.get("requests_per_minute", cfg.key_requests_per_minute),
        tokens_per_minute=own.get("tokens_per_minute", cfg.key_tokens_per_minute),
    )


def lease_s(settings: Settings) -> float:
    """How long a stream permit counts at most: the longest a generation can run, its
    drain, and a margin."""
    return settings.upstream.max_duration_s + settings.pacing.drain_s + 60.0


def redis_tag(name: str) -> str:
    """The hash tag of a key name in Redis keys (names with other characters are hashed)."""
    if _SAFE_NAME.match(name):
        return name
    return "h" + hashlib.sha256(name.encode("utf-8", "surrogatepass")).hexdigest()[:32]


class CountersUnavailable(Exception):
    """The shared counters could not be read or written."""


class Counters(Protocol):
    async def admit(self, name: str, key: KeyLimits, cost: int, permit: str, now: float,
                    window_s: float, lease_s: float) -> Decision: ...

    async def reconcile(self, name: str, key: KeyLimits, permit: str, difference: int,
                        now: float, window_s: float) -> None: ...


class MemoryCounters:
    """Each key's numbers in this process (one entry per key name that has limits)."""

    def __init__(self) -> None:
        self.keys: dict[str, KeyState] = {}

    async def admit(self, name: str, key: KeyLimits, cost: int, permit: str, now: float,
                    window_s: float, lease_s: float) -> Decision:
        state = self.keys.setdefault(name, KeyState())
        return limits.admit(state, key, cost, permit, now, window_s, lease_s)

    async def reconcile(self, name: str, key: KeyLimits, permit: str, difference: int,
                        now: float, window_s: float) -> None:
        self.reconcile_now(name, key, permit, difference, now, window_s)

    def reconcile_now(self, name: str, key: KeyLimits, permit: str, difference: int,
                      now: float, window_s: float) -> None:
        state = self.keys.get(name)
        if state is not None:
            limits.reconcile(state, key, permit, difference, now, window_s)


#: :func:`sseproxy.limits.admit` in Lua. KEYS: rate hash, streams zset. ARGV: now, window_s,
#: max_streams, requests_per_minute, tokens_per_minute, cost, permit, lease_s,
#: STREAMS_RETRY_S. Returns the two budgets and the waits of streams, requests, tokens.
ADMIT_LUA = """
local now = tonumber(ARGV[1])
local window = tonumber(ARGV[2])
local max_streams = tonumber(ARGV[3])
local lease = tonumber(ARGV[8])
local function f(x) return string.format('%.17g', x) end
local function take(tat, cost, limit)
  if limit <= 0 then return tat, 0 end
  if cost > limit then cost = limit end
  local new = math.max(tat, now) + cost * window / limit
  local over = new - now - window
  if over > 1e-9 then return tat, over end
  return new, 0
end
local rtat = tonumber(redis.call('HGET', KEYS[1], 'r') or '0')
local ttat = tonumber(redis.call('HGET', KEYS[1], 't') or '0')
local ws = 0
if max_streams > 0 then
  redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', f(now))
  if redis.call('ZCARD', KEYS[2]) >= max_streams then ws = tonumber(ARGV[9]) end
end
local nr, wr = take(rtat, 1, tonumber(ARGV[4]))
local nt, wt = take(ttat, tonumber(ARGV[6]), tonumber(ARGV[5]))
if ws == 0 and wr == 0 and wt == 0 then
  rtat, ttat = nr, nt
  redis.call('HSET', KEYS[1], 'r', f(rtat), 't', f(ttat))
  redis.call('PEXPIRE', KEYS[1], math.ceil((math.max(rtat, ttat) - now + window) * 1000))
  if max_streams > 0 then
    redis.call('ZADD', KEYS[2], f(now + lease), ARGV[7])
    redis.call('PEXPIRE', KEYS[2], math.ceil(lease * 1000))
  end
end
return {f(rtat), f(ttat), f(ws), f(wr), f(wt)}
"""

#: :func:`sseproxy.limits.reconcile` in Lua. KEYS: rate hash, streams zset. ARGV: permit,
#: difference, tokens_per_minute, window_s, now.
RECONCILE_LUA = """
redis.call('ZREM', KEYS[2], ARGV[1])
local diff = tonumber(ARGV[2])
local limit = tonumber(ARGV[3])
local window = tonumber(ARGV[4])
local now = tonumber(ARGV[5])
if limit > 0 and diff ~= 0 then
  local tat = tonumber(redis.call('HGET', KEYS[1], 't') or '0')
  if diff > 0 then
    tat = math.max(tat, now) + diff * window / limit
  else
    tat = tat + diff * window / limit
  end
  redis.call('HSET', KEYS[1], 't', string.format('%.17g', tat))
  local ttl = math.ceil((tat - now + window) * 1000)
  if ttl > 0 and ttl > redis.call('PTTL', KEYS[1]) then
    redis.call('PEXPIRE', KEYS[1], ttl)
  end
end
return 1
"""


class RedisCounters:
    """Each key's numbers in Redis (see the module docstring)."""

    def __init__(self, redis: Any, timeout_s: float) -> None:
        self.redis = redis
        self.timeout_s = timeout_s
        self._admit = redis.register_script(ADMIT_LUA)
        self._reconcile = redis.register_script(RECONCILE_LUA)

    @staticmethod
    def keys(name: str) -> list[str]:
        tag = redis_tag(name)
        return [f"{KEY_PREFIX}{{{tag}}}:rate", f"{KEY_PREFIX}{{{tag}}}:streams"]

    async def _run(self, script: Any, keys: list[str], args: list[Any]) -> Any:
        from redis.exceptions import RedisError  # redis-py only where it is used

        try:
            return await asyncio.wait_for(script(keys=keys, args=args), self.timeout_s)
        except (RedisError, OSError, TimeoutError) as exc:
            raise CountersUnavailable(str(exc) or type(exc).__name__) from exc

    async def admit(self, name: str, key: KeyLimits, cost: int, permit: str, now: float,
                    window_s: float, lease_s: float) -> Decision:
        args = [repr(now), repr(window_s), key.max_streams, key.requests_per_minute,
                key.tokens_per_minute, cost, permit, repr(lease_s),
                repr(limits.STREAMS_RETRY_S)]
        rtat, ttat, ws, wr, wt = (float(x) for x in
                                  await self._run(self._admit, self.keys(name), args))
        waits = [(w, n) for w, n in ((ws, "streams"), (wr, "requests"), (wt, "tokens")) if w]
        return limits.decide(rtat, ttat, waits, key, window_s, now)

    async def reconcile(self, name: str, key: KeyLimits, permit: str, difference: int,
                        now: float, window_s: float) -> None:
        args = [permit, difference, key.tokens_per_minute, repr(window_s), repr(now)]
        await self._run(self._reconcile, self.keys(name), args)


class Permit:
    """What one admitted stream holds against its key's limits; released exactly once."""

    __slots__ = ("limiter", "name", "id", "key", "window_s", "prompt_chars", "estimate",
                 "decision", "counters", "released")

    def __init__(self, limiter: Limiter, name: str, permit_id: str, key: KeyLimits,
                 window_s: float, prompt_chars: int, estimate: int, decision: Decision,
                 counters: Counters) -> None:
        self.limiter = limiter
        self.name = name
        self.id = permit_id
        self.key = key
        self.window_s = window_s
        self.prompt_chars = prompt_chars
        self.estimate = estimate
        self.decision = decision
        self.counters = counters
        self.released = False

    @property
    def headers(self) -> dict[str, str]:
        return limits.headers(self.decision)

    def release(self, usage: Mapping[str, Any] | None = None, output_chars: int = 0,
                answered: bool = False) -> None:
        """The stream ended (or never started: nothing ``answered``): free the permit and
        charge what it used (``usage``, else estimated from its characters)."""
        if self.released:
            return
        self.released = True
        tokens = limits.used(usage, self.prompt_chars, output_chars, answered)
        self.limiter.reconcile(self, tokens - self.estimate)


class Limiter:
    """Admission against per-key limits; see the module docstring."""

    def __init__(self, metrics: Metrics, shared: RedisCounters | None = None,
                 shared_problem: Callable[[], str | None] = lambda: None,
                 clock: Callable[[], float] = time.time) -> None:
        self.metrics = metrics
        self.memory = MemoryCounters()
        self.shared = shared
        self.shared_problem = shared_problem
        #: Seconds (wall clock: Redis counters are compared across instances).
        self.clock = clock
        self._tasks: set[asyncio.Task[None]] = set()
        self._failing = False

    async def acquire(self, name: str, req: ChatRequest, settings: Settings) -> Permit | None:
        """Admit a request of key ``name``; None when the key has no limits. Raises
        :class:`~sseproxy.errors.RateLimited` when it is over one."""
        key = key_limits(settings, name)
        if key.none:
            return None
        cfg = settings.limits
        chars = limits.prompt_chars(req.messages)
        max_tokens = req.params.get("max_completion_tokens", req.params.get("max_tokens"))
        cost = limits.estimate(chars, max_tokens if isinstance(max_tokens, int) else None,
                               cfg.estimate_output_tokens)
        permit_id = secrets.token_hex(8)
        counters: Counters = self.memory
        decision: Decision | None = None
        if self.shared is not None and self.shared_problem() is None:
            try:
                decision = await self.shared.admit(name, key, cost, permit_id, self.clock(),
                                                   cfg.window_s, lease_s(settings))
                counters = self.shared
                self._recovered()
            except CountersUnavailable as exc:
                self._failed("admit", str(exc))
        if decision is None:
            decision = await self.memory.admit(name, key, cost, permit_id, self.clock(),
                                               cfg.window_s, lease_s(settings))
        if not decision.admitted:
            assert decision.limit is not None
            self.metrics.rate_limited.labels(decision.limit).inc()
            raise errors.RateLimited(decision.limit, decision.retry_after_s,
                                     limits.headers(decision))
        return Permit(self, name, permit_id, key, cfg.window_s, chars, cost, decision,
                      counters)

    def reconcile(self, permit: Permit, difference: int) -> None:
        """Free ``permit`` and charge ``difference`` tokens, in the backend it came from:
        at once in memory; in Redis by a task kept until it is done."""
        args = (permit.name, permit.key, permit.id, difference, self.clock(), permit.window_s)
        if isinstance(permit.counters, MemoryCounters):
            permit.counters.reconcile_now(*args)
            return
        task = asyncio.get_running_loop().create_task(self._reconcile(permit.counters, args))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _reconcile(self, counters: Counters,
                         args: tuple[str, KeyLimits, str, int, float, float]) -> None:
        try:
            await counters.reconcile(*args)
        except CountersUnavailable as exc:
            self._failed("release", str(exc))

    def _failed(self, op: str, reason: str) -> None:
        self.metrics.store_errors.labels("limits").inc()
        if not self._failing:
            self._failing = True
            log.warning("limits_store_unavailable", op=op, reason=reason,
                        fallback="each instance enforces the limits by itself")

    def _recovered(self) -> None:
        if self._failing:
            self._failing = False
            log.info("limits_store_available")

    async def close(self) -> None:
        """Wait for the releases still being written."""
        if self._tasks:
            await asyncio.wait(list(self._tasks), timeout=2.0)
