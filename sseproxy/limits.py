"""Per-key limits, the arithmetic: budgets, admission decisions, reconciliation, headers.

Pure: nothing here does I/O or reads a clock; ``now`` (seconds) is a parameter. The
backends in :mod:`sseproxy.limiter` keep the numbers (in this process, or in Redis with a
Lua script that mirrors :func:`take` and :func:`admit`) and call these functions.

Each key (the identity of a request, see :data:`ANONYMOUS`) has three limits, 0 meaning
none: concurrent streams, requests per window and tokens per window (``limits.window_s``,
60 s: "per minute").

* **Rates** are GCRA budgets (a token bucket kept as one number, the *theoretical arrival
  time* ``tat``): a budget of ``limit`` per ``window`` refills continuously at
  ``limit / window`` per second and holds at most ``limit``. A request costing ``c`` is
  admitted when ``c`` fits in what has refilled; ``reset`` (OpenAI's
  ``x-ratelimit-reset-*``) is the time until the budget is whole again. A cost over the
  whole budget is taken as the whole budget (such a request waits for a full budget
  rather than never running).
* **Tokens** are charged twice: an estimate at admission (:func:`estimate`: prompt
  characters / 4, plus ``max_tokens`` or ``limits.estimate_output_tokens``), then the
  difference to what the stream really used (:func:`used`: the upstream's ``usage``, or an
  estimate of what was exchanged when it sent none) when it ends (:func:`reconcile`). Use
  over the estimate is charged as of the end, so a stream that overran its budget holds
  back the key's next requests until the budget has refilled.
* **Streams** are leases (permit id → expiry), so a permit whose instance died is
  forgotten after ``lease_s``; a refused stream gets a fixed retry hint
  (:data:`STREAMS_RETRY_S`): nobody knows when a running stream ends.

When several limits refuse, the decision names the one with the longest wait and its
``retry_after_s`` is that wait: the request cannot run before all of them allow it.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

#: The identity of requests without a key (``auth.mode = none``): they share one budget.
ANONYMOUS = "anonymous"
#: The limits, as the ``limit`` label of ``sseproxy_rate_limited_total`` names them.
LIMITS = ("streams", "requests", "tokens")
#: The rough English average OpenAI quotes for its tokenizers.
CHARS_PER_TOKEN = 4
#: The retry hint of a request refused for the concurrent-stream limit.
STREAMS_RETRY_S = 1.0
#: Float slack when comparing times.
EPSILON = 1e-9


@dataclass(frozen=True)
class KeyLimits:
    """One key's limits (0: no limit)."""

    max_streams: int = 0
    requests_per_minute: int = 0
    tokens_per_minute: int = 0

    @property
    def none(self) -> bool:
        return not (self.max_streams or self.requests_per_minute or self.tokens_per_minute)


@dataclass(frozen=True)
class Quota:
    """One rate budget as the ``x-ratelimit-*`` headers report it."""

    limit: int
    remaining: int
    reset_s: float


@dataclass(frozen=True)
class Decision:
    """The answer to one admission."""

    admitted: bool
    #: The limit that refused (one of :data:`LIMITS`), None when admitted.
    limit: str | None = None
    retry_after_s: float = 0.0
    requests: Quota | None = None
    tokens: Quota | None = None


@dataclass
class KeyState:
    """The numbers of one key (the memory backend's; Redis holds the same ones)."""

    requests_tat: float = 0.0
    tokens_tat: float = 0.0
    #: Permit id → until when (``now`` units) its lease counts.
    streams: dict[str, float] = field(default_factory=dict)


# -- estimates -------------------------------------------------------------------------


def prompt_chars(messages: list[dict[str, Any]]) -> int:
    """Characters of text over all messages (the persona's system prompt included)."""
    total = 0
    for message in messages:
        content = message.get("content")
        if isinstance(content, str):
            total += len(content)
        elif isinstance(content, list):
            total += sum(len(p.get("text") or "") for p in content if isinstance(p, dict))
    return total


def tokens_of(chars: int) -> int:
    return -(-chars // CHARS_PER_TOKEN)


def estimate(chars: int, max_tokens: int | None, default_output: int) -> int:
    """The tokens a request is charged at admission."""
    return tokens_of(chars) + (max_tokens if max_tokens is not None else default_output)


def used(usage: Mapping[str, Any] | None, prompt: int, output: int, answered: bool) -> int:
    """The tokens a stream used: the upstream's ``usage`` (``total_tokens``, or prompt plus
    completion), else an estimate from ``prompt`` and ``output`` characters (the prompt
    only if the upstream accepted the request: a refusal costs nothing)."""
    if usage:
        total = usage.get("total_tokens")
        if isinstance(total, int) and not isinstance(total, bool) and total >= 0:
            return total
        parts = [usage.get("prompt_tokens"), usage.get("completion_tokens")]
        if all(isinstance(p, int) and not isinstance(p, bool) and p >= 0 for p in parts):
            return int(parts[0]) + int(parts[1])  # type: ignore[arg-type]  # checked above
    return (tokens_of(prompt) if answered else 0) + tokens_of(output)


# -- rates (GCRA) ----------------------------------------------------------------------


def take(tat: float, cost: float, limit: int, window_s: float, now: float
         ) -> tuple[float, float]:
    """Charge ``cost`` to a budget of ``limit`` per ``window_s``: ``(new_tat, 0.0)`` when it
    fits, ``(tat, wait)`` when it fits only after ``wait`` seconds. No limit: always fits."""
    if limit <= 0:
        return tat, 0.0
    cost = min(cost, limit)
    new = max(tat, now) + cost * window_s / limit
    over = new - now - window_s
    if over > EPSILON:
        return tat, over
    return new, 0.0


def quota(tat: float, limit: int, window_s: float, now: float) -> Quota:
    """What a budget holds at ``now``."""
    ahead = max(0.0, tat - now)
    remaining = math.floor((window_s - ahead) * limit / window_s + EPSILON)
    return Quota(limit, max(0, remaining), ahead)


def charge(tat: float, tokens: float, limit: int, window_s: float, now: float) -> float:
    """Add ``tokens`` (positive: as of ``now``; negative: a refund) to a budget."""
    if limit <= 0 or tokens == 0:
        return tat
    if tokens > 0:
        return max(tat, now) + tokens * window_s / limit
    return tat + tokens * window_s / limit


# -- decisions -------------------------------------------------------------------------


def admit(state: KeyState, limits: KeyLimits, cost: int, permit: str, now: float,
          window_s: float, lease_s: float) -> Decision:
    """Admit one request costing ``cost`` tokens, holding a stream under ``permit``;
    ``state`` changes only when it is admitted."""
    for held, until in list(state.streams.items()):
        if until <= now:
            del state.streams[held]
    waits: list[tuple[float, str]] = []
    if limits.max_streams and len(state.streams) >= limits.max_streams:
        waits.append((STREAMS_RETRY_S, "streams"))
    requests_tat, wait = take(state.requests_tat, 1, limits.requests_per_minute, window_s, now)
    if wait:
        waits.append((wait, "requests"))
    tokens_tat, wait = take(state.tokens_tat, cost, limits.tokens_per_minute, window_s, now)
    if wait:
        waits.append((wait, "tokens"))
    if not waits:
        state.requests_tat, state.tokens_tat = requests_tat, tokens_tat
        if limits.max_streams:
            state.streams[permit] = now + lease_s
    return decide(state.requests_tat, state.tokens_tat, waits, limits, window_s, now)


def decide(requests_tat: float, tokens_tat: float, waits: list[tuple[float, str]],
           limits: KeyLimits, window_s: float, now: float) -> Decision:
    """The decision from the budgets after admission (or as they stayed) and the waits of
    the limits that refused (none: admitted)."""
    rq = (quota(requests_tat, limits.requests_per_minute, window_s, now)
          if limits.requests_per_minute else None)
    tq = (quota(tokens_tat, limits.tokens_per_minute, window_s, now)
          if limits.tokens_per_minute else None)
    if not waits:
        return Decision(True, requests=rq, tokens=tq)
    wait, limit = max(waits)
    return Decision(False, limit, wait, rq, tq)


def reconcile(state: KeyState, limits: KeyLimits, permit: str, difference: int,
              now: float, window_s: float) -> None:
    """A stream ended: free its permit, charge (or refund) ``used - estimate`` tokens."""
    state.streams.pop(permit, None)
    state.tokens_tat = charge(state.tokens_tat, difference, limits.tokens_per_minute,
                              window_s, now)


# -- headers ---------------------------------------------------------------------------


def duration(seconds: float) -> str:
    """A duration as OpenAI writes ``x-ratelimit-reset-*``: ``20ms``, ``1.5s``, ``6m0s``."""
    if seconds < 1.0:
        return f"{max(0, math.ceil(seconds * 1000))}ms"
    if seconds < 60.0:
        text = f"{math.ceil(seconds * 1000) / 1000:.3f}".rstrip("0").rstrip(".")
        return f"{text}s"
    whole = math.ceil(seconds)
    hours, rest = divmod(whole, 3600)
    minutes, secs = divmod(rest, 60)
    return (f"{hours}h" if hours else "") + f"{minutes}m{secs}s"


def headers(decision: Decision) -> dict[str, str]:
    """OpenAI's ``x-ratelimit-*`` headers for the rates a key has, and ``Retry-After``
    (whole seconds, rounded up) on a refusal."""
    out: dict[str, str] = {}
    for name, q in (("requests", decision.requests), ("tokens", decision.tokens)):
        if q is not None:
            out[f"x-ratelimit-limit-{name}"] = str(q.limit)
            out[f"x-ratelimit-remaining-{name}"] = str(q.remaining)
            out[f"x-ratelimit-reset-{name}"] = duration(q.reset_s)
    if not decision.admitted:
        out["Retry-After"] = str(max(1, math.ceil(decision.retry_after_s - EPSILON)))
    return out
