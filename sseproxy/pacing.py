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
  nothing is queued is one piece, at once, cut as the upstream cut it, if the rate limit
  has an event to spare. Any other delta is queued. So a stream that is not bursting
  leaves as it arrives (issue 12, point 8).
- **Rate limit.** A bucket of two events refilled one per tick (GCRA with a tolerance of
  one tick): a delta that comes less than a tick after the previous event borrows from
  the idle time before it instead of waiting for the tick; a queued piece leaves at least
  a tick after the previous event. A stream makes ``max_events_per_s`` events a second on
  average and at most one more in any second: faster text makes pieces bigger, never
  events more numerous (a steady 300 tok/s reply becomes 40 events a second).
- **Backlog plan.** Between two events, the characters of up to ``burst_threshold``
  newly queued units are owed at the next tick; the rest (a burst) is owed linearly over
  ``T`` from its arrival. Each piece takes what is owed by then, up to the next unit
  boundary. So a burst is spread over ``T`` in pieces of even size on a steady tick; text
  arriving meanwhile rides along; a steady stream is merged tick by tick; and every
  character leaves within ``max(T, tick)`` plus one tick of its arrival. The plan is a
  running sum kept in O(1) per arrival and per piece.
- **Hard bound.** No text waits longer than ``max_lag_s``: text that would pass it by
  the next tick leaves with the current piece (pieces grow; events never multiply).
- **Drain.** After :meth:`Pacer.finish`, everything queued leaves within ``drain_s``,
  spread over the ticks left (at once when ``drain_s`` is 0); then ``pending`` is False.
- **Exact text.** Nothing is dropped, reordered or rewritten: the pieces' texts
  concatenate to exactly the pushed texts.
- ``mode = "off"``: every delta is one piece, due at its arrival.
- **Smoothed.** :attr:`Pacer.smoothed_chars` counts the characters spread over ``T``
  because they came as a burst (beyond the threshold's immediate part); a stream that
  never bursts, ``T = 0`` and ``mode = "off"`` count 0. The stream's ``done`` event
  reports it, so a client can tell a burst the upstream sent from one it received.

Units (``unit``): ``token`` keeps the deltas as the upstream cut them (an oversized
delta stays one unit, so only merging and the rate limit apply); ``word`` is a word with
its trailing whitespace (whitespace at the very start rides with the first word);
``grapheme`` is one extended grapheme cluster; ``auto`` is a word in spaced scripts and
one grapheme cluster in unspaced ones (Han, Hiragana, Katakana, Thai, Lao, Khmer,
Myanmar, by the script of the cluster's first character), and a word of more than
``LONG_WORD`` (16) clusters (a URL, base64, a run of emoji or of code without spaces) is
cut one cluster per unit like an unspaced script, so it is paced too (issue 12, point 7).
Clusters come from the ``regex`` package's ``\\X`` (UAX #29: emoji ZWJ sequences,
flags, skin tones, keycaps, combining marks, Indic and Thai clusters), so the pacer
itself never cuts inside one.

Cost (issue 13, point 1): the queue is text with its arrival times; nothing is segmented
on arrival but the first ``burst_threshold`` units of a delta (within its first 4,096
characters). A piece is segmented from its start up to the unit boundary it ends at, so
each character is read about once. A piece longer than 4,096 characters (a huge burst,
the hard bound, the drain) instead ends at a *safe* cluster boundary found near its end
(two characters that UAX #29 keeps apart whatever surrounds them: the first within 1,024
characters after the plan's point, else the last within 1,024 before it, else the end of
the queue: a run with no safe boundary, only flags or combining marks, leaves whole). So
no push or pull reads more than a few thousand characters with the regex engine, however
large the delta. A unit longer than 1,024 characters (a huge ``word``) is cut that way
too; the cluster context at a cut is read from its last 64 characters (a cluster longer
than that is in no stream-safe text).

Clusters the upstream splits (tokenizers split ZWJ sequences, Indic and Thai clusters):
text is cut only where it is queued together, so a split cluster is whole again in the
queue; a delta that starts by continuing the last cluster already sent keeps that
continuation in its first unit. Only an incomplete cluster is held back: when the queue
ends after ZWJ, CR, an Indic virama, a Prepend character or a lone regional indicator,
that last cluster stays while more of it may still come, and leaves once more text
arrives, at :meth:`Pacer.finish`, when ``max_lag_s`` forces it, or one tick after it last
grew (at most ``max(T, tick)`` after it arrived). A complete last word leaves with its
piece (the client concatenates a word split across events).

Deliberate divergences from the issue's wording, and details:

- The hold above ends after a tick, not at ``max_lag_s``: a longer hold would stall the
  text before every pause of the model, to guard against a split that pass-through makes
  anyway and that the client renders correctly once the rest arrives. A cluster whose
  last character could take a follower without needing one (an emoji before a skin
  tone, a consonant before a vowel sign) is complete and not held.
- A mid-stream burst arriving to an idle stream sends its first ``burst_threshold``
  units at once (the budget that lets a small delta pass whole), then is paced; with
  ``target_lag_s = 0`` it leaves whole at once.
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
  in ~20 pieces of at most 455 characters, p99 added lag 0.50 s (gap CV 4.1 against
  26.8 with no pacing). 0.25 s halves the lag but doubles the piece size (866
  characters, a visible jump); 1.0 s gives 290-character pieces for nearly twice the
  lag (p99 0.90 s).
- ``max_lag_s = 1.5``: a safety net three times the target; the plan never gets near it
  (the worst lag on any bench pattern is 0.50 s).
- ``burst_threshold = 8``: a 300 tok/s English reply (~6 words a tick) is merged, never
  treated as a burst (p50 / p99 added lag 0.012 / 0.025 s), while a gateway that sends
  20 tokens every 250 ms is smoothed into ~28 events a second (p99 0.271 s). 16 would
  pass those chunks nearly whole (p99 0.025 s); 4 quadruples the lag of a fast English
  reply (p99 0.098 s). The cost of 8: a 300 tok/s CJK reply (~10 clusters a tick) waits
  p99 0.098 s instead of 0.025 s.
- ``max_events_per_s = 40``: a 25 ms tick; 60 events a second shaves little lag (fast
  CJK p99 0.027 s) for 50 % more SSE writes and flushes, which cost far more than the
  pacer itself (a few µs per delta); 20 a second makes fast replies wait longer (p99
  0.127 s) in 2x larger pieces.
- ``drain_s = 0.25``: a reply that ends with an 8 KB burst still shows it in ~10 pieces
  (at most 826 characters, against one 8 KB jump with 0) and its done event comes at
  most a quarter second after the upstream's; 0.5 s would pace it like any burst
  (452-character pieces) for twice the wait.
"""

from __future__ import annotations

import itertools
import math
import re
import sys
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field, fields
from typing import Any, Generic, TypeVar

# regex ships no type stubs (and typeshed has none); every result taken from it below is
# annotated where it is used.
import regex  # type: ignore[import-untyped]

__all__ = ["PacingSettings", "Piece", "Pacer", "check_field", "segment"]

_T = TypeVar("_T")

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

#: In ``auto``, a word of more than this many grapheme clusters (a URL, base64, a run of
#: emoji or of code without spaces) is cut like an unspaced script: one cluster per unit.
LONG_WORD = 16
#: The most a segmentation or boundary search reads past the point it looks for: a unit
#: longer than this (a huge ``word``, a cluster no stream-safe text has) is cut at the
#: nearest safe cluster boundary instead.
_LOOK = 1024
#: A piece longer than this is cut at a safe cluster boundary found by a local search
#: near its end rather than by segmenting it from its start, so no push or pull reads more
#: than a few thousand characters with the regex engine, however large the input.
_SEGMENT_MAX = 4096
_CONTEXT = 64  # characters read around a cut for the cluster that ends or continues there

_UNSPACED = r"[\p{Han}\p{Hiragana}\p{Katakana}\p{Thai}\p{Lao}\p{Khmer}\p{Myanmar}\u30fc]"
_UNSPACED_CHAR = regex.compile(_UNSPACED)
_SPACE = r"(?=\s)\X"  # a cluster that starts with whitespace
_CLUSTER = regex.compile(r"\X")
# Group 1 is a word's body (its clusters without the surrounding whitespace).
_WORD = regex.compile(rf"(?:{_SPACE})*((?:(?!\s)\X)+)(?:{_SPACE})*|(?:{_SPACE})+")
_AUTO = regex.compile(
    rf"(?:{_SPACE})*(?:(?={_UNSPACED})\X|((?:(?!\s|{_UNSPACED})\X)+))(?:{_SPACE})*"
    rf"|(?:{_SPACE})+"
)
# ASCII text has no multi-character clusters outside whitespace (CR LF stays inside a
# whitespace run), so the stdlib engine cuts its words identically and about 8x faster.
# Its whitespace is spelled out: re's \s also matches \x1c-\x1f, regex's does not.
_ASCII_WORD = re.compile(r"[\t-\r ]*([^\t-\r ]+)[\t-\r ]*|[\t-\r ]+")

# A safe cut: a boundary that UAX #29 keeps whatever surrounds the two characters (the
# match is the character before the cut). The character before is not one that joins
# what follows (CR, Prepend, ZWJ, a regional indicator, a mark or virama), and the one
# after is not a mark or ZWJ; after a Hangul jamo or syllable, not another.
_JOINING = r"\p{GCB=Extend}\p{GCB=ZWJ}\p{GCB=SpacingMark}"
_HANGUL = r"\p{GCB=L}\p{GCB=V}\p{GCB=T}\p{GCB=LV}\p{GCB=LVT}"
_SAFE_PATTERN = (
    "[^\\r" + _JOINING + r"\p{GCB=Prepend}\p{GCB=Regional_Indicator}" + _HANGUL + "]"
    "(?=[^" + _JOINING + "])"
    "|[" + _HANGUL + "](?=[^" + _JOINING + _HANGUL + "])"
)
_SAFE = regex.compile(_SAFE_PATTERN)
_SAFE_BACK = regex.compile("(?r)" + _SAFE_PATTERN)
# A last character after which the cluster is still incomplete: CR (before LF), ZWJ, a
# Prepend character, an Indic virama (a conjunct follows). A lone regional indicator too.
_JOINER = regex.compile(r"[\r\u200d\p{GCB=Prepend}\p{InCB=Linker}]")
_RI = "".join(chr(c) for c in range(0x1F1E6, 0x1F200))  # regional indicators


def _unit_ends(text: str, pos: int, endpos: int, unit: str) -> Iterator[int]:
    """End offsets of the units of ``text[pos:endpos]``, where ``pos`` starts a unit (the
    last one may be cut short by ``endpos``). ``unit`` is not ``token``."""
    if unit == "grapheme":
        for m in _CLUSTER.finditer(text, pos, endpos):
            yield m.end()
        return
    ascii_ = text.isascii()  # O(1): str knows its widest character
    pattern = _ASCII_WORD if ascii_ else _AUTO if unit == "auto" else _WORD
    cut_long = unit == "auto"
    for m in pattern.finditer(text, pos, endpos):
        start, end = m.span(1)
        if cut_long and end - start > LONG_WORD:
            if ascii_:
                yield from range(start + 1, end)
            else:
                clusters = [c.end() for c in _CLUSTER.finditer(text, start, end)]
                if len(clusters) > LONG_WORD:
                    yield from clusters[:-1]  # the last keeps the trailing whitespace
        yield m.end()


def segment(text: str, unit: str) -> list[str]:
    """Cut ``text`` into pacing units of kind ``unit``; the parts join to ``text``."""
    if unit == "token":
        return [text]
    units, start = [], 0
    for end in _unit_ends(text, 0, len(text), unit):
        units.append(text[start:end])
        start = end
    return units


def _last_cluster(text: str, start: int, end: int, lead: int = 0) -> str:
    """The last grapheme cluster of ``text[start:end]``, where ``start`` is a cluster
    boundary, or follows ``lead`` (0 or 1) lone regional indicator. Only the last few
    characters are read (all of a run of regional indicators): a cluster longer than that
    (no stream-safe text has one) comes back cut short, which only weakens a later join."""
    if end <= start:
        return ""
    last = text[end - 1]
    if last in _RI:  # regional indicators pair from the start of their run
        lo = max(start, end - _LOOK)
        run = text[lo:end]
        count = len(run) - len(run.rstrip(_RI))
        if count == end - lo and lo > start and text[lo - 1] in _RI:
            run = text[start:end]  # a longer run: read it all (C speed, the run only)
            count = len(run) - len(run.rstrip(_RI))
        if count == end - start:
            count += lead
        return text[end - 1 if count % 2 else end - 2:end]
    if last.isascii() and last != "\n" and (end - 1 == start or text[end - 2].isascii()):
        return last
    cluster = ""
    for m in _CLUSTER.finditer(text, max(start, end - _CONTEXT), end):
        cluster = m.group()
    return cluster


def _continuation(cluster: str, text: str) -> int:
    """How many leading characters of ``text`` extend ``cluster``, the grapheme cluster
    just before it (a ZWJ sequence, combining marks, a flag's second half, ...)."""
    if not cluster or not text:
        return 0
    text = text[:_CONTEXT]
    if cluster.isascii() and text[0].isascii():  # in ASCII only CR LF is one cluster
        return 1 if cluster[-1] == "\r" and text[0] == "\n" else 0
    end: int = _CLUSTER.match(cluster + text).end()
    return end - len(cluster)


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
    """A run of queued text that arrived at the same time, up to ``end`` (a position in
    all text ever queued)."""

    __slots__ = ("arrived", "end")

    def __init__(self, arrived: float, end: int) -> None:
        self.arrived = arrived
        self.end = end


class _Queue(Generic[_T]):
    """A FIFO queue that gives its memory back when it empties: a list and the index of
    its head. An idle stream's pacer holds three of these; as ``deque`` objects they cost
    760 bytes each even when empty, as lists next to nothing."""

    __slots__ = ("_items", "_head")

    def __init__(self) -> None:
        self._items: list[_T] = []
        self._head = 0

    def __bool__(self) -> bool:
        return self._head < len(self._items)

    def __len__(self) -> int:
        return len(self._items) - self._head

    def __iter__(self) -> Iterator[_T]:
        return itertools.islice(self._items, self._head, None)

    def __getitem__(self, index: int) -> _T:
        """Only the first (0) and the last (-1) item."""
        return self._items[self._head if index == 0 else index]

    def __setitem__(self, index: int, value: _T) -> None:
        self._items[self._head if index == 0 else index] = value

    def append(self, item: _T) -> None:
        self._items.append(item)

    def popleft(self) -> _T:
        items, head = self._items, self._head
        item = items[head]  # IndexError when empty, as deque's
        head += 1
        if head == len(items):
            self._items, self._head = [], 0
        elif head > 64 and 2 * head > len(items):
            del items[:head]
            self._head = 0
        else:
            self._head = head
        return item


class Pacer:
    """The pacing state of one stream; see the module docstring for the rules.

    The stream loop: ``push(delta, now)`` then ``pull(now)`` on every delta; ``finish(now)``
    then ``pull(now)`` when the upstream ends or fails; and between those, sleep until
    ``next_due()`` and ``pull`` there. Send each returned piece as one event, then the
    done or error event once ``pending`` is False.
    """

    __slots__ = (
        "_off", "_unit", "_token", "_tick", "_target", "_max_lag", "_threshold", "_drain",
        "_hold_cap", "_ready", "_buf", "_buf_start", "_chunks", "_head",
        "_end", "_groups", "_last_event", "_tat", "_last_arrival", "_sent_cluster",
        "_tail", "_ri_run", "_open", "_owed", "_window", "_batches", "_sum_e", "_sum_ea",
        "_base", "_finished_at", "_due", "_due_stale", "_smoothed",
    )

    def __init__(self, settings: PacingSettings) -> None:
        self._off = settings.mode == "off"
        self._unit = settings.unit
        self._token = settings.unit == "token"
        self._tick = settings.tick_s
        self._target = settings.target_lag_s
        self._max_lag = settings.max_lag_s
        self._threshold = settings.burst_threshold
        self._drain = settings.drain_s
        self._hold_cap = max(self._target, self._tick)
        #: Pieces decided on arrival (pass-through, mode off), waiting for pull().
        self._ready: list[Piece] = []
        # The queue is the text at positions [head, end) of all text ever queued: buf
        # from head (buf[0] is position buf_start), then the chunks not joined to it yet.
        # Each character is copied into buf once, when a cut needs it.
        self._buf = ""
        self._buf_start = 0
        self._chunks: _Queue[str] = _Queue()
        self._head = 0
        self._end = 0
        #: Arrival times of the queue, oldest first, run-length encoded by position.
        self._groups: _Queue[_Group] = _Queue()
        self._last_event: float | None = None
        self._tat = -math.inf  # the rate limit's theoretical time of the next event
        self._last_arrival = -math.inf  # the last push: when the queue's end last grew
        #: The last grapheme cluster of all text decided so far (context for what follows).
        self._sent_cluster = ""
        self._tail = ""  # the last characters pushed
        self._ri_run = 0  # regional indicators at the end of all text pushed
        self._open = 0  # length of the queue's last cluster when it is still incomplete
        # The plan, in characters counted since the stream began: R(t) = owed + the part
        # of each active batch's excess that has matured by t (linear over target_lag_s).
        self._owed = 0
        self._window = 0  # units owed at the next tick since the last event
        self._batches: _Queue[tuple[float, int]] = _Queue()  # (arrived - base, excess)
        self._sum_e = 0
        self._sum_ea = 0.0
        self._base: float | None = None
        self._finished_at: float | None = None
        #: _queue_due() cached until the queue, the plan or the clock of events changes.
        self._due: float | None = None
        self._due_stale = True
        self._smoothed = 0  # characters spread over target_lag_s (see smoothed_chars)

    # -- public API ---------------------------------------------------------------------

    @property
    def pending(self) -> bool:
        """Text is queued or due and not yet pulled."""
        return bool(self._ready) or self._head < self._end

    @property
    def smoothed_chars(self) -> int:
        """Characters spread over ``target_lag_s`` so far because they came as a burst."""
        return self._smoothed

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
        rest = self._pass(text, now) if self._head == self._end else text
        if rest:
            self._enqueue(rest, now)
        self._note_end(text)

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

    # -- arrival ------------------------------------------------------------------------

    def _rate_allows(self, now: float) -> bool:
        """The rate limit: a bucket of two events refilled one per tick (GCRA)."""
        return now >= self._tat - self._tick - _EPS

    def _event(self, now: float) -> None:
        self._last_event = now
        self._tat = max(self._tat, now) + self._tick
        self._window = 0

    def _pass(self, text: str, now: float) -> str:
        """Send what of ``text`` may leave at once (nothing is queued); return the rest."""
        if not self._rate_allows(now):
            return text
        budget = self._threshold
        if len(text) <= budget:  # cheap: a unit is at least one character
            ends = [len(text)]
        else:
            ends = self._count(text, budget + 1, self._sent_cluster)
        if len(ends) <= budget and ends and ends[-1] == len(text):
            self._ready.append(Piece(text, now, now))
            self._event(now)
            self._sent_cluster = self._cluster_after(text, 0, len(text), text)
            return ""
        first = self._last_event is None
        if not first and self._target <= 0:  # nothing to spread: all of it, now
            self._ready.append(Piece(text, now, now))
            self._event(now)
            self._sent_cluster = self._cluster_after(text, 0, len(text), text)
            return ""
        # A burst to an idle stream: the stream's first unit, or the threshold's budget,
        # leaves at once; the rest is queued.
        take = 1 if first else budget
        if take <= 0 or not ends:
            return text
        cut = ends[min(take, len(ends)) - 1]
        self._ready.append(Piece(text[:cut], now, now))
        self._event(now)
        if not first:
            self._window = self._threshold  # this tick's budget is spent
        self._sent_cluster = self._cluster_after(text[:cut], 0, cut, text[:cut])
        return text[cut:]

    def _count(self, text: str, limit: int, before: str) -> list[int]:
        """End offsets of the first ``limit`` units of ``text`` (fewer when it has fewer,
        or when they reach past the first few thousand characters)."""
        if self._token:
            return [len(text)]
        endpos = min(len(text), _SEGMENT_MAX)
        ends: list[int] = []
        for end in self._ends_from(text, 0, endpos, before):
            if end >= endpos and endpos < len(text):
                break  # may be cut short
            ends.append(end)
            if len(ends) >= limit:
                break
        return ends

    def _ends_from(self, text: str, pos: int, endpos: int, before: str) -> Iterator[int]:
        """Unit ends in ``text[pos:endpos]``, ``pos`` following the cluster ``before``:
        a continuation of that cluster at ``pos`` stays in the first unit."""
        if before and _continuation(before, text[pos:pos + _CONTEXT]):
            joined = before + text[pos:endpos]
            shift = pos - len(before)
            for end in _unit_ends(joined, 0, len(joined), self._unit):
                if end > len(before):
                    yield end + shift
            return
        if pos == 0:
            yield from _unit_ends(text, 0, endpos, self._unit)
            return
        # A slice: the regex engine would read the text before pos (regional indicators
        # pair from the start of their run), and the buffer may start inside a pair.
        for end in _unit_ends(text[pos:endpos], 0, endpos - pos, self._unit):
            yield end + pos

    def _enqueue(self, text: str, now: float) -> None:
        start = self._end
        if self._head == start:
            self._buf, self._buf_start = text, start
        else:
            self._chunks.append(text)
        self._end = start + len(text)
        groups = self._groups
        if self._token:
            # A delta is a unit; one that continues the queue's last cluster gives that
            # continuation to the unit before it.
            joins = 0
            if groups:
                joins = _continuation(_last_cluster(self._tail, 0, len(self._tail)), text)
            if joins:
                groups[-1].end = start + joins
            if joins < len(text):
                groups.append(_Group(now, self._end))
            else:
                groups[-1].end = self._end
        elif groups and groups[-1].arrived == now:
            groups[-1].end = self._end
        else:
            groups.append(_Group(now, self._end))
        budget = max(0, self._threshold - self._window)
        immediate = 0
        if budget:
            # A delta that goes on with the queue's last word adds no unit by its start.
            joins = int(start > self._head and self._continues_word(text[0]))
            ends = self._count(text, budget + joins, "")
            self._window += max(0, len(ends) - joins)
            immediate = ends[-1] if ends else 0
        self._plan(immediate, len(text) - immediate, now)

    def _continues_word(self, first: str) -> bool:
        if self._unit not in ("auto", "word") or not self._tail:
            return False
        last = self._tail[-1]
        if last.isspace() or first.isspace():
            return False
        return self._unit == "word" or not (_UNSPACED_CHAR.match(last)
                                            or _UNSPACED_CHAR.match(first))

    def _note_end(self, text: str) -> None:
        """Track the end of all text pushed: whether it is inside an incomplete cluster
        (held back a tick when queued)."""
        self._tail = tail = (self._tail + text[-_CONTEXT:])[-_CONTEXT:]
        last = text[-1]
        if last in _RI:
            count = len(text) - len(text.rstrip(_RI))  # reads the run only
            self._ri_run = self._ri_run + count if count == len(text) else count
            self._open = self._ri_run % 2
        else:
            self._ri_run = 0
            self._open = 0
            if _JOINER.match(last):
                self._open = len(_last_cluster(tail, 0, len(tail)))
                if self._open >= len(tail):  # it may reach further back: hold it all
                    self._open = sys.maxsize

    def _plan(self, immediate: int, excess: int, now: float) -> None:
        """Owe ``immediate`` characters at the next tick and spread ``excess`` linearly
        over target_lag_s from ``now``."""
        self._owed += immediate
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
        self._smoothed += excess

    # -- the plan -----------------------------------------------------------------------

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
        """Characters the plan wants released by ``now`` and not released yet (after
        _expire)."""
        assert self._base is not None
        owed = self._owed - self._head
        if self._sum_e:
            spread = ((now - self._base) * self._sum_e - self._sum_ea) / self._target
            owed += math.ceil(min(max(spread, 0.0), float(self._sum_e)) - _EPS)
        return owed

    def _plan_due(self) -> float:
        """The first time the plan owes at least one character (loop time)."""
        assert self._base is not None
        gap = self._head - self._owed  # the batches must mature more than this
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
        queued = self._end - self._head
        if queued == 0:
            return None
        earliest = -math.inf if self._last_event is None else self._last_event + self._tick
        if self._finished_at is not None:
            deadline = self._finished_at + self._drain
            return max(self._finished_at, min(earliest, deadline))
        groups = self._groups
        forced = groups[0].arrived + self._max_lag
        planned = self._plan_due()
        if queued <= self._open:  # only an incomplete cluster is queued
            planned = max(planned, self._hold_end())
        # Never before the oldest queued text arrived (the plan may owe text "since ever").
        return max(earliest, min(planned, forced), groups[0].arrived)

    def _hold_end(self) -> float:
        """When an incomplete last cluster may leave even if more text could still
        complete it: a tick after it last grew, at most max(target_lag_s, tick) after it
        arrived."""
        return min(self._last_arrival + self._tick, self._groups[-1].arrived + self._hold_cap)

    # -- release ------------------------------------------------------------------------

    def _release(self, now: float, due: float) -> Piece:
        """Cut the piece sent at ``now``: what the plan owes, what max_lag_s or the drain
        forces, at least one unit, ending at a unit boundary; an incomplete last cluster
        stays unless it must go."""
        self._expire(now)
        head, end = self._head, self._end
        target = head + max(self._owed_at(now), 1)
        horizon = now + self._tick - self._max_lag  # arrived before this: too late later
        forced = head
        for group in self._groups:
            if group.arrived >= horizon:
                break
            forced = group.end
        target = max(target, forced)
        finished_at = self._finished_at
        if finished_at is not None:
            deadline = finished_at + self._drain
            if now + self._tick > deadline + _EPS:
                target = end
            else:
                slots = math.floor((deadline - now) / self._tick + _EPS) + 1
                target = max(target, head - (-(end - head) // slots))
        cut = self._find_cut(min(target, end))
        if (cut == end and self._open and finished_at is None and forced < end
                and now < self._hold_end() and end - self._open > head):
            cut = end - self._open

        self._cover(cut)
        off = self._buf_start
        text = self._buf[head - off:cut - off]
        self._sent_cluster = self._cluster_after(self._buf, head - off, cut - off, text)
        arrived = self._groups[0].arrived
        self._head = cut
        groups = self._groups
        while groups and groups[0].end <= cut:
            groups.popleft()
        if cut == end:
            self._buf, self._buf_start = "", cut
        elif cut - off > 65536 and 2 * (cut - off) > len(self._buf):
            self._buf, self._buf_start = self._buf[cut - off:], cut
        self._event(now)
        self._due_stale = True
        return Piece(text, due, arrived)

    def _cluster_after(self, text: str, start: int, end: int, piece: str) -> str:
        """The last cluster of all text decided, once ``text[start:end]`` (= ``piece``,
        starting at a cluster boundary) has been."""
        if len(piece) < _CONTEXT:
            joined = self._sent_cluster + piece
            return _last_cluster(joined, 0, len(joined))
        # A run of regional indicators may start with the lone half sent before.
        lone = len(self._sent_cluster) == 1 and self._sent_cluster in _RI
        return _last_cluster(text, start, end, int(lone))

    def _cover(self, limit: int) -> None:
        """Make buf hold the queue up to position ``limit``."""
        have = self._buf_start + len(self._buf)
        if have >= limit:
            return
        parts = [self._buf[self._head - self._buf_start:]]
        while have < limit:
            chunk = self._chunks.popleft()
            parts.append(chunk)
            have += len(chunk)
        self._buf, self._buf_start = "".join(parts), self._head

    def _find_cut(self, target: int) -> int:
        """The first unit boundary at or after ``target`` (the queue's end at most)."""
        head, end = self._head, self._end
        if target >= end:
            return end
        if self._token:
            for group in self._groups:
                if group.end >= target:
                    return group.end
            return end  # pragma: no cover - the groups cover the queue
        if target - head <= _SEGMENT_MAX:
            limit = min(end, target + _LOOK)
            self._cover(limit)
            off = self._buf_start
            for unit_end in self._ends_from(self._buf, head - off, limit - off,
                                            self._sent_cluster):
                if unit_end + off >= limit and limit < end:
                    break  # may be cut short: a unit longer than _LOOK
                if unit_end + off >= target:
                    return unit_end + off
        return self._safe_cut(target)

    def _safe_cut(self, target: int) -> int:
        """A safe cluster boundary near ``target``: the first within _LOOK after it, else
        the last within _LOOK before it, else the queue's end (a run with no safe
        boundary: regional indicators, combining marks)."""
        head, end = self._head, self._end
        limit = min(end, target + _LOOK)
        self._cover(limit)
        off = self._buf_start
        m = _SAFE.search(self._buf, target - 1 - off, limit - off)
        if m is None:
            lo = max(head, target - _LOOK) - off
            m = _SAFE_BACK.search(self._buf, lo, target - off)
        if m is not None and m.end() + off > head:
            cut: int = m.end() + off
            return cut
        return end


class Unpaced:
    """``pacing.mode = "off"``: the pacer's interface holding nothing (text goes straight
    to the log, never through :meth:`push`). It has no state, so one instance
    (:data:`UNPACED`) serves every stream: a real :class:`Pacer` costs a few KB a stream."""

    __slots__ = ()

    pending = False
    smoothed_chars = 0

    def push(self, text: str, now: float) -> None:
        raise RuntimeError("pacing is off: text is not pushed")

    def finish(self, now: float) -> None:
        pass

    def next_due(self) -> float | None:
        return None

    def pull(self, now: float) -> list[Piece]:
        return []


UNPACED = Unpaced()
