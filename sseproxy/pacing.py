"""Pacing: turn an upstream's bursts into a smooth stream of pieces with a bound on added delay.

The upstream decides how fast text arrives; the :class:`Pacer` decides when it leaves. It
is a pure state machine with an injected clock (issue 3): the stream loop tells it when a
delta arrived (:meth:`Pacer.push`) and when the upstream ended or failed
(:meth:`Pacer.finish`), asks for the pieces due by now (:meth:`Pacer.pull`) and sleeps
until :meth:`Pacer.next_due`, waking early when new text or the end arrives. It never
sleeps, never reads a clock and does no I/O, so every rule below is tested in virtual time.

Rules (``T`` is ``target_lag_s``; one *tick* is ``1 / max_events_per_s``):

- **Time to first token is untouched.** A small first delta goes out whole at once; of a
  large one, the first unit goes out at once and the rest is paced.
- **Pass-through.** A delta of at most ``burst_threshold`` units that arrives when
  nothing is queued and at least a tick after the previous event is one piece, at once,
  cut as the upstream cut it. Any other delta is queued.
- **Rate limit.** Pieces are at least a tick apart, so a stream makes at most
  ``max_events_per_s`` events a second: faster text makes pieces bigger, never events
  more numerous (a steady 300 tok/s reply becomes 40 events a second of ~6 words each).
- **Backlog plan.** Between two events, up to ``burst_threshold`` newly queued units
  are owed at the next tick; anything beyond that (a burst) is owed linearly over ``T``
  from its arrival. Each piece takes, in order, what is owed by then. So a burst is
  spread over ``T`` in even pieces on a steady tick; text arriving meanwhile rides along
  (pieces grow, the drain does not stretch); a steady stream is merged tick by tick; and
  every unit leaves within ``max(T, tick)`` plus one tick of its arrival. The plan is a
  running sum kept in O(1) per arrival and per piece: no piece rescans the queue.
- **Hard bound.** No text waits longer than ``max_lag_s``: a unit that would pass it by
  the next tick leaves with the current piece (pieces grow; events never multiply).
- **Drain.** After :meth:`Pacer.finish`, everything queued leaves within ``drain_s``,
  spread over the ticks left (at once when ``drain_s`` is 0); then ``pending`` is False.
- **Exact text.** Nothing is dropped, reordered or rewritten: the pieces' texts
  concatenate to exactly the pushed texts.
- ``mode = "off"``: every delta is one piece, due at its arrival.

Units (``unit``): ``token`` keeps the deltas as the upstream cut them (an oversized
delta stays one unit, so only merging and the rate limit apply); ``word`` is a word with
its trailing whitespace (whitespace at the very start rides with the first word);
``grapheme`` is one extended grapheme cluster; ``auto`` is a word in spaced scripts and
one grapheme cluster in unspaced ones (Han, Hiragana, Katakana, Thai, Lao, Khmer,
Myanmar, by the script of the cluster's first character). Clusters come from the
``regex`` package's ``\\X`` (UAX #29: emoji ZWJ sequences, flags, skin tones, keycaps,
combining marks, Indic and Thai clusters), so the pacer itself never cuts inside one.
Each delta is segmented once, on arrival (pure ASCII takes a stdlib fast path).

Clusters and words the upstream splits (tokenizers split ZWJ sequences, Indic and Thai
clusters, and long words): a delta is segmented together with the last queued unit
while that unit is younger than a tick, so a split word or cluster is one unit again;
an older last unit only takes a cluster that straddles the two deltas (so a long run
without spaces keeps flowing instead of growing one unit forever). A delta that starts
by continuing the last cluster already sent keeps that continuation in its first unit.
The last queued unit is held back while more of it may still come: it leaves once more
text arrives behind it, at :meth:`Pacer.finish`, when ``max_lag_s`` forces it, or one
tick after it last grew (at most ``max(T, tick)`` after it arrived). So a piece ends
inside a cluster only at the end of all text received so far, and only when that text
was passed through as it came, or had waited its tick, or the stream had ended.

Deliberate divergences from the issue's wording, and details:

- The hold above ends after a tick, not at ``max_lag_s``: a longer hold would stall the
  last word before every pause of the model for up to ``max_lag_s``, to guard against a
  split that pass-through makes anyway and that the client renders correctly (it
  concatenates). The hold costs at most a tick: a delta queued by the rate limit goes
  out a tick after it arrived, rather than at the next tick.
- A mid-stream burst arriving to an empty queue sends its first ``burst_threshold``
  units at once (the budget that lets a small delta pass whole), then is paced.
- ``max_lag_s`` must be at least ``target_lag_s`` and at least one tick (else the bound
  cannot be kept). ``drain_s`` may exceed ``max_lag_s``: the bound still holds during
  the drain, which then simply ends sooner.
- When ``drain_s`` is shorter than a tick, the end of a stream may bring one piece less
  than a tick after the previous one (the drain deadline wins over the rate limit).
- :meth:`Pacer.pull` called late (the loop overslept) returns one piece holding all that
  is due, not one per missed tick; the rate limit counts from that ``now``.
- An empty delta is ignored; :meth:`Pacer.push` after :meth:`Pacer.finish` is an error.

Defaults, from ``python bench/pacing.py`` (virtual time; table in the README; CPU on one
core of a 2-CPU x86-64 Linux VM, Python 3.11):

- ``target_lag_s = 0.5``: an 8 KB burst after a 2 s pause is shown over half a second
  in ~20 pieces of at most 462 characters, p99 added lag 0.50 s (gap CV 4.0 against
  26.8 with no pacing). 0.25 s halves the lag but doubles the piece size (882
  characters, a visible jump); 1.0 s gives 328-character pieces for nearly twice the
  lag (p99 0.90 s).
- ``max_lag_s = 1.5``: a safety net three times the target; the plan never gets near it
  (the worst lag on any bench pattern is 0.50 s).
- ``burst_threshold = 8``: a 300 tok/s English reply (~6 words a tick) is merged, never
  treated as a burst (p50 / p99 added lag 0.017 / 0.032 s), while a gateway that sends
  20 tokens every 250 ms is smoothed into 25 events a second (p99 0.275 s). 16 would
  pass those chunks whole (4 jumps a second of ~90 characters); 4 triples the lag of a
  fast English reply (p99 0.097 s). The cost of 8: a 300 tok/s CJK reply (~10 clusters
  a tick) waits p99 0.097 s instead of 0.028 s.
- ``max_events_per_s = 40``: a 25 ms tick; 60 events a second shaves little lag (fast
  CJK p99 0.027 s) for 50 % more SSE writes and flushes, which cost far more than the
  pacer itself (~3.7 ms CPU per 1,000 units, about 2.5 µs per delta including the
  loop); 20 a second makes fast replies wait longer (p99 0.120 s) in 2x larger pieces.
- ``drain_s = 0.25``: a reply that ends with an 8 KB burst still shows it in ~10 pieces
  (at most 871 characters, against one 8 KB jump with 0) and its done event comes at
  most a quarter second after the upstream's; 0.5 s would pace it like any burst
  (472-character pieces) for twice the wait.
"""

from __future__ import annotations

import math
import re
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields
from typing import Any

# regex ships no type stubs (and typeshed has none); every result taken from it below is
# annotated where it is used.
import regex  # type: ignore[import-untyped]

__all__ = ["PacingSettings", "Piece", "Pacer", "check_field", "segment"]

# --- settings ----------------------------------------------------------------------------


@dataclass(frozen=True)
class PacingSettings:
    """The ``[pacing]`` config section. Field metadata is the per-key validation config.py
    applies; :meth:`__post_init__` checks it again (for direct construction) and adds the
    rules that tie keys together."""

    #: ``smooth`` paces bursts; ``off`` relays each upstream delta as it came.
    mode: str = field(default="smooth", metadata={"choices": ("smooth", "off")})
    #: How a backlog is cut: see the module docstring.
    unit: str = field(
        default="auto", metadata={"choices": ("auto", "grapheme", "word", "token")}
    )
    #: A burst is spread so that each unit leaves within this long of its arrival.
    target_lag_s: float = field(default=0.5, metadata={"min": 0.0, "max": 60.0})
    #: Hard bound on the delay the pacer adds to any text.
    max_lag_s: float = field(default=1.5, metadata={"min": 0.001, "max": 60.0})
    #: Deltas of at most this many units pass whole when nothing is queued.
    burst_threshold: int = field(default=8, metadata={"min": 0, "max": 100_000})
    #: Events per stream per second, at most; one tick is the inverse.
    max_events_per_s: float = field(default=40.0, metadata={"min": 1.0, "max": 1000.0})
    #: After the upstream ends or fails, what is queued leaves within this long.
    drain_s: float = field(default=0.25, metadata={"min": 0.0, "max": 60.0})

    def __post_init__(self) -> None:
        for f in fields(self):
            check_field(f"pacing.{f.name}", getattr(self, f.name), f.metadata)
        tick = 1.0 / self.max_events_per_s
        if self.max_lag_s < self.target_lag_s:
            raise ValueError(
                f"pacing.max_lag_s = {self.max_lag_s!r}: must be at least "
                f"pacing.target_lag_s ({self.target_lag_s!r})"
            )
        if self.max_lag_s < tick:
            raise ValueError(
                f"pacing.max_lag_s = {self.max_lag_s!r}: must be at least one tick, "
                f"1 / pacing.max_events_per_s ({tick:g})"
            )

    @property
    def tick_s(self) -> float:
        """The shortest time between two events of one stream."""
        return 1.0 / self.max_events_per_s


def check_field(key: str, value: Any, meta: Mapping[str, Any]) -> None:
    """Check ``value`` against a field's ``choices`` / ``min`` / ``max`` metadata (the
    format of every settings section; :mod:`sseproxy.config` uses this too)."""
    choices = meta.get("choices")
    if choices is not None and value not in choices:
        allowed = ", ".join(repr(c) for c in choices)
        raise ValueError(f"{key} = {value!r}: must be one of {allowed}")
    lo, hi = meta.get("min"), meta.get("max")
    if lo is not None or hi is not None:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ValueError(f"{key} = {value!r}: expected a number")
        if not math.isfinite(value):
            raise ValueError(f"{key} = {value!r}: expected a finite number")
        if lo is not None and value < lo:
            raise ValueError(f"{key} = {value!r}: must be at least {lo}")
        if hi is not None and value > hi:
            raise ValueError(f"{key} = {value!r}: must be at most {hi}")


# --- segmentation --------------------------------------------------------------------------

_UNSPACED = r"[\p{Han}\p{Hiragana}\p{Katakana}\p{Thai}\p{Lao}\p{Khmer}\p{Myanmar}\u30fc]"
_SPACE = r"(?=\s)\X"  # a cluster that starts with whitespace
_CLUSTER = regex.compile(r"\X")
_WORD = regex.compile(rf"(?:{_SPACE})*(?:(?!\s)\X)+(?:{_SPACE})*|(?:{_SPACE})+")
_AUTO = regex.compile(
    rf"(?:{_SPACE})*(?:(?={_UNSPACED})\X|(?:(?!\s|{_UNSPACED})\X)+)(?:{_SPACE})*"
    rf"|(?:{_SPACE})+"
)
# ASCII text has no multi-character clusters outside whitespace (CR LF stays inside a
# whitespace run), so the stdlib engine cuts its words identically and about 8x faster.
# Its whitespace is spelled out: re's \s also matches \x1c-\x1f, regex's does not.
_ASCII_WORD = re.compile(r"[\t-\r ]*[^\t-\r ]+[\t-\r ]*|[\t-\r ]+")


def _graphemes(text: str) -> list[str]:
    units: list[str] = _CLUSTER.findall(text)
    return units


def _words(text: str) -> list[str]:
    if text.isascii():
        return _ASCII_WORD.findall(text)
    units: list[str] = _WORD.findall(text)
    return units


def _auto(text: str) -> list[str]:
    if text.isascii():
        return _ASCII_WORD.findall(text)
    units: list[str] = _AUTO.findall(text)
    return units


def _tokens(text: str) -> list[str]:
    return [text]


def _last_cluster(text: str) -> str:
    """The last grapheme cluster of ``text``, which must start at a cluster boundary."""
    if text.isascii():
        return text[-2:] if text.endswith("\r\n") else text[-1:]
    clusters: list[str] = _CLUSTER.findall(text)
    return clusters[-1]


def _continuation(cluster: str, text: str) -> int:
    """How many leading characters of ``text`` extend ``cluster``, the grapheme cluster
    just before it (a ZWJ sequence, combining marks, a flag's second half, ...)."""
    if not cluster or not text:
        return 0
    if cluster.isascii() and text[0].isascii():  # in ASCII only CR LF is one cluster
        return 1 if cluster[-1] == "\r" and text[0] == "\n" else 0
    end: int = _CLUSTER.match(cluster + text).end()
    return end - len(cluster)


_SEGMENTERS: dict[str, Callable[[str], list[str]]] = {
    "auto": _auto,
    "grapheme": _graphemes,
    "word": _words,
    "token": _tokens,
}


def segment(text: str, unit: str) -> list[str]:
    """Cut ``text`` into pacing units of kind ``unit``; the parts join to ``text``."""
    return _SEGMENTERS[unit](text)


# --- the pacer ---------------------------------------------------------------------------


@dataclass(slots=True)
class Piece:
    """Text to send as one event (read-only by convention; not frozen, see ``sse.Event``)."""

    text: str
    #: When it was due (loop time). Queued pieces are due at a tick or a plan time; the
    #: stream loop sends it when :meth:`Pacer.pull` returns it.
    due: float
    #: Arrival time of the oldest text in the piece: its added lag is ``sent - arrived``.
    arrived: float


_EPS = 1e-9


class _Group:
    """A run of queued units that arrived at the same time."""

    __slots__ = ("arrived", "count")

    def __init__(self, arrived: float, count: int) -> None:
        self.arrived = arrived
        self.count = count


class Pacer:
    """The pacing state of one stream; see the module docstring for the rules.

    The stream loop: ``push(delta, now)`` then ``pull(now)`` on every delta; ``finish(now)``
    then ``pull(now)`` when the upstream ends or fails; and between those, sleep until
    ``next_due()`` and ``pull`` there. Send each returned piece as one event, then the
    done or error event once ``pending`` is False.
    """

    __slots__ = (
        "_off", "_split", "_token", "_tick", "_target", "_max_lag", "_threshold",
        "_drain", "_ready", "_units", "_head", "_groups", "_last_event",
        "_released", "_owed", "_window", "_batches", "_sum_e", "_sum_ea", "_base",
        "_finished_at", "_due", "_due_stale", "_sent_cluster", "_last_arrival", "_hold_cap",
    )

    def __init__(self, settings: PacingSettings) -> None:
        self._off = settings.mode == "off"
        self._split = _SEGMENTERS[settings.unit]
        self._token = settings.unit == "token"
        self._tick = settings.tick_s
        self._target = settings.target_lag_s
        self._max_lag = settings.max_lag_s
        self._threshold = settings.burst_threshold
        self._drain = settings.drain_s
        self._hold_cap = max(self._target, self._tick)
        #: Pieces decided on arrival (pass-through, mode off), waiting for pull().
        self._ready: list[Piece] = []
        #: The queue: units[head:] in order, with their arrival times run-length encoded
        #: in groups (oldest first; their counts sum to the queue's length).
        self._units: list[str] = []
        self._head = 0
        self._groups: deque[_Group] = deque()
        self._last_event: float | None = None
        self._last_arrival = -math.inf  # the last push: when the last queued unit last grew
        #: The last grapheme cluster of all text decided so far (context for what follows).
        self._sent_cluster = ""
        # The plan, in units counted since the stream began: R(t) = owed + the part of
        # each active batch's excess that has matured by t (linear over target_lag_s).
        self._released = 0
        self._owed = 0
        self._window = 0  # units owed at the next tick since the last event
        self._batches: deque[tuple[float, int]] = deque()  # (arrived - base, excess)
        self._sum_e = 0
        self._sum_ea = 0.0
        self._base: float | None = None
        self._finished_at: float | None = None
        #: _queue_due() cached until the queue, the plan or the clock of events changes.
        self._due: float | None = None
        self._due_stale = True

    # -- public API ---------------------------------------------------------------------

    @property
    def pending(self) -> bool:
        """Text is queued or due and not yet pulled."""
        return bool(self._ready) or self._head < len(self._units)

    def push(self, text: str, now: float) -> None:
        """A delta arrived from the upstream at ``now``."""
        if not text:
            return
        if self._finished_at is not None:
            raise RuntimeError("Pacer.push() after finish()")
        if self._off:
            self._ready.append(Piece(text, now, now))
            return
        if self._base is None:
            self._base = now
        self._due_stale = True
        self._last_arrival = now
        queued = len(self._units) - self._head
        if queued == 0 and self._rate_allows(now):
            units = None
            if len(text) > self._threshold:  # cheap: a unit is at least one character
                units = self._split_after(self._sent_cluster, text)
            if units is None or len(units) <= self._threshold:
                self._ready.append(Piece(text, now, now))
                self._sent_cluster = _last_cluster(self._sent_cluster + text)
                self._event(now)
                return
            if self._last_event is None:  # the stream's first unit leaves at once
                self._ready.append(Piece(units[0], now, now))
                self._sent_cluster = _last_cluster(units[0])
                self._event(now)
                del units[0]
            added = self._enqueue_fresh(units, now)
        elif queued == 0:
            added = self._enqueue_fresh(self._split_after(self._sent_cluster, text), now)
        else:
            added = self._enqueue_after_tail(text, now)
        self._plan(added, now)

    def finish(self, now: float) -> None:
        """The upstream ended or failed at ``now``: drain the queue within ``drain_s``."""
        if self._finished_at is None:
            self._finished_at = now
            self._due_stale = True

    def next_due(self) -> float | None:
        """When the next piece is due; None when nothing is queued."""
        if self._ready:
            return self._ready[0].due
        return self._queue_due()

    def pull(self, now: float) -> list[Piece]:
        """Every piece due at or before ``now``, in order (usually none or one)."""
        out: list[Piece] = []
        if self._ready:
            keep = [p for p in self._ready if p.due > now]
            out = [p for p in self._ready if p.due <= now]
            self._ready = keep
        due = self._queue_due()
        if due is not None and due <= now:
            out.append(self._release(now, due))
        return out

    # -- queue --------------------------------------------------------------------------

    def _rate_allows(self, now: float) -> bool:
        return self._last_event is None or now >= self._last_event + self._tick

    def _event(self, now: float) -> None:
        self._last_event = now
        self._window = 0

    def _append_group(self, arrived: float, count: int) -> None:
        groups = self._groups
        if groups and groups[-1].arrived == arrived:
            groups[-1].count += count
        else:
            groups.append(_Group(arrived, count))

    def _enqueue_fresh(self, units: list[str], now: float) -> int:
        if not units:
            return 0
        self._units.extend(units)
        self._append_group(now, len(units))
        return len(units)

    def _split_after(self, before: str, text: str) -> list[str]:
        """The units of ``text``, which follows the cluster ``before``: a continuation of
        that cluster at its start stays in the first unit instead of being cut apart."""
        if self._token:
            return [text]
        if not _continuation(before, text):
            return self._split(text)
        parts = self._split(before + text)
        parts[0] = parts[0][len(before):]
        return parts

    def _enqueue_after_tail(self, text: str, now: float) -> int:
        """Queue ``text`` behind a non-empty queue, making whole again a cluster (or, for
        word units, a word) that the upstream split across the two deltas."""
        units = self._units
        tail = units[-1]
        # Every queued unit but the first starts at a cluster boundary; the first may
        # continue the last cluster already sent, so it is read in that context.
        before = self._sent_cluster if len(units) - self._head == 1 else ""
        if self._token or now >= self._groups[-1].arrived + self._tick:
            # Token units, or a tail older than a tick (a long run without spaces must
            # not grow one unit forever): only a straddling cluster joins the tail.
            joins = _continuation(_last_cluster(before + tail), text)
            units[-1] = tail + text[:joins]
            rest = text[joins:]
            if not rest:
                return 0
            new = [rest] if self._token else self._split(rest)
            units.extend(new)
            self._append_group(now, len(new))
            return len(new)
        units.pop()
        last = self._groups[-1]
        tail_arrived = last.arrived
        last.count -= 1
        if last.count == 0:
            self._groups.pop()
        parts = self._split_after(before, tail + text)
        # Units that start inside the old tail keep its arrival time (the oldest text).
        old = 0
        pos = 0
        for part in parts:
            if pos >= len(tail):
                break
            old += 1
            pos += len(part)
        units.extend(parts)
        self._append_group(tail_arrived, old)
        if len(parts) > old:
            self._append_group(now, len(parts) - old)
        return len(parts) - 1

    def _plan(self, added: int, now: float) -> None:
        """Owe ``added`` new units: up to the threshold's budget at the next tick, the
        excess spread linearly over target_lag_s."""
        if added <= 0:
            return
        immediate = min(added, max(0, self._threshold - self._window))
        self._window += immediate
        self._owed += immediate
        excess = added - immediate
        if excess <= 0:
            return
        if self._target <= 0:
            self._owed += excess
            return
        assert self._base is not None
        rel = now - self._base
        batches = self._batches
        if batches and batches[-1][0] == rel:
            batches[-1] = (rel, batches[-1][1] + excess)
        else:
            batches.append((rel, excess))
        self._sum_e += excess
        self._sum_ea += excess * rel

    def _expire(self, now: float) -> None:
        """Fold the batches fully matured by ``now`` into the integer part of the plan."""
        assert self._base is not None
        rel = now - self._base
        batches = self._batches
        while batches and batches[0][0] + self._target <= rel:
            a, e = batches.popleft()
            self._owed += e
            self._sum_e -= e
            self._sum_ea -= e * a
        if not batches:
            self._sum_e = 0
            self._sum_ea = 0.0

    def _owed_at(self, now: float) -> int:
        """Units the plan wants released by ``now`` and not released yet (after _expire)."""
        assert self._base is not None
        owed = self._owed - self._released
        if self._sum_e:
            spread = ((now - self._base) * self._sum_e - self._sum_ea) / self._target
            owed += math.ceil(min(max(spread, 0.0), float(self._sum_e)) - _EPS)
        return owed

    def _plan_due(self) -> float:
        """The first time the plan owes at least one unit (loop time)."""
        assert self._base is not None
        gap = self._released - self._owed  # the batches must mature more than this
        if gap < 0:
            return -math.inf
        sum_e, sum_ea, matured = self._sum_e, self._sum_ea, 0
        for a, e in self._batches:
            # Until this batch matures: matured + (t * sum_e - sum_ea) / T  >  gap.
            t = ((gap + 1e-6 - matured) * self._target + sum_ea) / sum_e
            if t < a + self._target:
                return t + self._base
            matured += e
            if matured > gap:
                return a + self._target + self._base
            sum_e -= e
            sum_ea -= e * a
        return math.inf  # pragma: no cover - the plan always covers the whole queue

    def _queue_due(self) -> float | None:
        if self._due_stale:
            self._due = self._compute_due()
            self._due_stale = False
        return self._due

    def _compute_due(self) -> float | None:
        queued = len(self._units) - self._head
        if queued == 0:
            return None
        earliest = -math.inf if self._last_event is None else self._last_event + self._tick
        if self._finished_at is not None:
            deadline = self._finished_at + self._drain
            return max(self._finished_at, min(earliest, deadline))
        groups = self._groups
        forced = groups[0].arrived + self._max_lag
        planned = self._plan_due()
        if queued == 1:  # only the held last unit
            planned = max(planned, self._hold_end())
        # Never before the oldest queued text arrived (the plan may owe units "since ever").
        return max(earliest, min(planned, forced), groups[0].arrived)

    def _hold_end(self) -> float:
        """When the last queued unit may leave even if more text could still extend it:
        a tick after it last grew, and at most max(target_lag_s, tick) after it arrived."""
        return min(self._last_arrival + self._tick, self._groups[-1].arrived + self._hold_cap)

    def _release(self, now: float, due: float) -> Piece:
        """Cut the piece sent at ``now``: what the plan owes, what max_lag_s or the drain
        forces, at least one unit, never the held last unit."""
        self._expire(now)
        queued = len(self._units) - self._head
        take = self._owed_at(now)
        horizon = now + self._tick - self._max_lag  # arrived before this: too late later
        forced = 0
        for group in self._groups:
            if group.arrived >= horizon:
                break
            forced += group.count
        take = max(take, forced, 1)
        finished_at = self._finished_at
        finished = finished_at is not None
        if finished_at is not None:
            deadline = finished_at + self._drain
            if now + self._tick > deadline + _EPS:
                take = queued
            else:
                slots = math.floor((deadline - now) / self._tick + _EPS) + 1
                take = max(take, -(-queued // slots))
        held = not (finished or forced >= queued or now >= self._hold_end())
        take = min(take, queued - 1 if held else queued)
        take = max(take, 1)

        arrived_first = self._groups[0].arrived
        head = self._head
        text = "".join(self._units[head:head + take])
        last = self._units[head + take - 1]
        self._sent_cluster = _last_cluster(self._sent_cluster + last if take == 1 else last)
        self._head = head + take
        self._released += take
        left = take
        groups = self._groups
        while left:
            first = groups[0]
            if first.count <= left:
                left -= first.count
                groups.popleft()
            else:
                first.count -= left
                left = 0
        if self._head >= 1024 and self._head * 2 >= len(self._units):
            del self._units[: self._head]
            self._head = 0
        self._event(now)
        self._due_stale = True
        return Piece(text, due, arrived_first)
