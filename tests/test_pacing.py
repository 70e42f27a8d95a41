"""Tests of sseproxy.pacing in virtual time (issue 3, points 1 and 4).

Table-driven cases pin each rule with exact pieces and times; hypothesis then drives the
pacer with a simulated stream loop (push and pull at every arrival, pull at every
``next_due``, finish at a random time) over random texts (Latin, CJK, Thai, emoji ZWJ
sequences, flags, combining marks, whitespace runs) cut at random points and arriving in
random patterns (same-read bursts, steady streams, long pauses), and checks the
guarantees: exact text, no cluster cut except at the end of what had arrived, the lag
bounds, the event rate, the drain deadline, and ``mode = "off"`` as the identity.
"""

from __future__ import annotations

import base64
import contextlib
import math
import random
from collections import deque
from dataclasses import dataclass, replace
from typing import Any
from unittest import mock

import pytest
import regex  # type: ignore[import-untyped]  # no type stubs; used for \X in the oracle
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from sseproxy import pacing
from sseproxy.pacing import UNPACED, Pacer, PacingSettings, Piece, segment

TICK = 0.025
S = PacingSettings(
    mode="smooth", unit="auto", target_lag_s=0.5, max_lag_s=1.5, burst_threshold=8,
    max_events_per_s=40.0, drain_s=0.25,
)
EPS = 1e-9


# --- helpers -------------------------------------------------------------------------


@dataclass(frozen=True)
class Sent:
    at: float  # when pull() returned it
    piece: Piece
    pushed: int  # characters pushed when it was pulled
    last_push: float  # arrival of the last delta pushed by then
    finished: bool  # finish() had been called


def drive(
    s: PacingSettings, arrivals: list[tuple[float, str]], finish_at: float | None = None
) -> tuple[list[Sent], Pacer]:
    """The stream loop in virtual time: push then pull at each arrival, pull at each
    next_due, finish at ``finish_at`` (default: the last arrival) then drain."""
    pacer = Pacer(s)
    if finish_at is None:
        finish_at = arrivals[-1][0] if arrivals else 0.0
    sent: list[Sent] = []
    pushed, last_push, finished, i = 0, -math.inf, False, 0
    while True:
        due = pacer.next_due()
        at = arrivals[i][0] if i < len(arrivals) else (None if finished else finish_at)
        if at is not None and (due is None or at <= due):
            if i < len(arrivals):
                pacer.push(arrivals[i][1], at)
                pushed += len(arrivals[i][1])
                last_push = at
                i += 1
            else:
                pacer.finish(at)
                finished = True
            now = at
        elif due is not None:
            now = due
        else:
            return sent, pacer
        pieces = pacer.pull(now)
        assert len(pieces) <= 1, "the simulated loop is never late: one piece per pull"
        if at is None or now != at:
            assert pieces, "pull() at next_due() must return a piece"
        sent.extend(Sent(now, p, pushed, last_push, finished) for p in pieces)


def texts(sent: list[Sent]) -> list[str]:
    return [s.piece.text for s in sent]


def times(sent: list[Sent]) -> list[float]:
    return [s.at for s in sent]


def words(n: int, start: int = 0) -> str:
    return "".join(f"w{i} " for i in range(start, start + n))


# --- settings ------------------------------------------------------------------------


def test_defaults_are_valid_and_documented() -> None:
    s = PacingSettings()
    assert (s.mode, s.unit) == ("smooth", "auto")
    assert s.target_lag_s <= s.max_lag_s and s.tick_s <= s.max_lag_s
    assert s == S


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"mode": "fast"}, "pacing.mode = 'fast': must be one of 'smooth', 'off'"),
        ({"unit": "char"}, "pacing.unit = 'char': must be one of 'auto', 'grapheme', 'word', "
                           "'token'"),
        ({"target_lag_s": -0.1}, "pacing.target_lag_s = -0.1: must be at least 0.0"),
        ({"target_lag_s": 61.0, "max_lag_s": 61.0}, "pacing.target_lag_s = 61.0: must be at "
                                                    "most 60.0"),
        ({"max_events_per_s": 0.5}, "pacing.max_events_per_s = 0.5: must be at least 1.0"),
        ({"burst_threshold": -1}, "pacing.burst_threshold = -1: must be at least 0"),
        ({"drain_s": math.nan}, "pacing.drain_s = nan: expected a finite number"),
        ({"drain_s": "1"}, "pacing.drain_s = '1': expected a number"),
        ({"max_lag_s": 0.2}, "pacing.max_lag_s = 0.2: must be at least pacing.target_lag_s "
                             "(0.5)"),
        ({"target_lag_s": 0.0, "max_lag_s": 0.01},
         "pacing.max_lag_s = 0.01: must be at least one tick, 1 / pacing.max_events_per_s "
         "(0.025)"),
    ],
)
def test_invalid_settings_name_the_key(change: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError) as info:
        replace(S, **change)
    assert str(info.value) == message


def test_drain_may_exceed_max_lag() -> None:
    s = replace(S, drain_s=5.0)
    assert s.drain_s > s.max_lag_s


def test_field_metadata_is_what_config_validates() -> None:
    from dataclasses import fields

    meta = {f.name: dict(f.metadata) for f in fields(PacingSettings)}
    assert meta["mode"] == {"choices": ("smooth", "off")}
    assert meta["unit"] == {"choices": ("auto", "grapheme", "word", "token")}
    for name in ("target_lag_s", "max_lag_s", "burst_threshold", "max_events_per_s",
                 "drain_s"):
        assert set(meta[name]) == {"min", "max"}, name


# --- units ---------------------------------------------------------------------------

FAMILY = "\U0001f468\u200d\U0001f469\u200d\U0001f467"  # man ZWJ woman ZWJ girl
RAINBOW = "\U0001f3f3\ufe0f\u200d\U0001f308"
THUMBS = "\U0001f44d\U0001f3fd"  # thumbs up, medium skin tone
US, FR = "\U0001f1fa\U0001f1f8", "\U0001f1eb\U0001f1f7"
E_ACUTE = "e\u0301"  # e + combining acute
KEYCAP = "1\ufe0f\u20e3"

UNIT_CASES: list[tuple[str, str, list[str]]] = [
    ("auto", "Hello  world,\n\nbye", ["Hello  ", "world,\n\n", "bye"]),
    ("auto", "  lead", ["  lead"]),
    ("auto", "   ", ["   "]),
    ("auto", "a\r\nb", ["a\r\n", "b"]),
    ("auto", "你好，世界。", ["你", "好", "，", "世", "界", "。"]),
    ("auto", "こんにちは、カタカナー", list("こんにちは、カタカナー")),
    ("auto", "ภาษาไทย ดี", ["ภ", "า", "ษ", "า", "ไ", "ท", "ย ", "ดี"]),
    ("auto", "GPU是好的", ["GPU", "是", "好", "的"]),
    ("auto", f"café {E_ACUTE}t\u00e9 {FAMILY} ok",
     ["café ", f"{E_ACUTE}t\u00e9 ", f"{FAMILY} ", "ok"]),
    ("auto", f"{US}{FR} {THUMBS}!", [f"{US}{FR} ", f"{THUMBS}!"]),
    ("word", "你好 world", ["你好 ", "world"]),
    ("word", f"a{FAMILY}b  c", [f"a{FAMILY}b  ", "c"]),
    ("word", "\u3000全角\u3000x", ["\u3000全角\u3000", "x"]),
    ("grapheme", f"a{E_ACUTE}{FAMILY}{US}{FR}{THUMBS}{KEYCAP}{RAINBOW}\r\n",
     ["a", E_ACUTE, FAMILY, US, FR, THUMBS, KEYCAP, RAINBOW, "\r\n"]),
    ("grapheme", "ดี", ["ดี"]),
    ("grapheme", "Z\u0351\u0352\u0353a", ["Z\u0351\u0352\u0353", "a"]),
    ("token", f"any {FAMILY} text", [f"any {FAMILY} text"]),
]


@pytest.mark.parametrize(("unit", "text", "expected"), UNIT_CASES)
def test_units(unit: str, text: str, expected: list[str]) -> None:
    assert segment(text, unit) == expected


@pytest.mark.parametrize("unit", ["auto", "word"])
def test_ascii_fast_path_cuts_like_the_unicode_path(unit: str) -> None:
    # ASCII text takes the stdlib path; one accented letter after a space sends it all
    # through the regex one, which must cut the ASCII part the same way.
    text = "".join(chr(c) for c in range(128)) * 2 + " a  b\t\tc\r\n\r\nd\x1c\x1f "
    assert segment(text + "\u00e9", unit) == segment(text, unit) + ["\u00e9"]


# --- rules, case by case -------------------------------------------------------------


def test_first_unit_of_a_small_first_delta_leaves_at_once_whole() -> None:
    sent, _ = drive(S, [(5.0, "Hello"), (5.001, " there")])
    assert (sent[0].at, sent[0].piece) == (5.0, Piece("Hello", 5.0, 5.0))


def test_first_unit_of_a_burst_leaves_at_once_and_the_rest_is_paced() -> None:
    sent, _ = drive(S, [(1.0, words(400))])
    assert sent[0].piece == Piece("w0 ", 1.0, 1.0) and sent[0].at == 1.0
    assert len(sent) > 10 and sent[1].at == pytest.approx(1.0 + TICK)


def test_first_unit_of_a_burst_leaves_at_once_even_with_a_zero_threshold() -> None:
    sent, _ = drive(replace(S, burst_threshold=0), [(0.0, "a b c")])
    assert (sent[0].at, sent[0].piece.text) == (0.0, "a ")


@pytest.mark.parametrize(
    ("delta", "unit"),
    [
        (words(8), "auto"),  # exactly the threshold
        ("x" * 16, "auto"),  # a word of LONG_WORD clusters is one unit
        ("你好世界你好世界", "auto"),  # 8 clusters
        (FAMILY[:3], "grapheme"),  # ends inside a cluster: sent as the upstream cut it
        (words(50), "token"),  # a token is one unit, however long
    ],
)
def test_small_delta_passes_whole_when_idle(delta: str, unit: str) -> None:
    s = replace(S, unit=unit)
    sent, _ = drive(s, [(0.0, "Hi"), (1.0, delta), (1.0 + TICK, "!")])
    assert (sent[1].at, sent[1].piece) == (1.0, Piece(delta, 1.0, 1.0))


def test_delta_over_the_threshold_is_not_passed_whole() -> None:
    sent, _ = drive(S, [(0.0, "Hi"), (1.0, words(9))])
    assert sent[1].piece.text == words(8) and sent[1].at == 1.0
    assert sent[2].piece.text == "w8 "


def test_deltas_within_a_tick_merge_into_the_next_piece() -> None:
    # The second delta borrows from the idle time before it (the rate limit is a bucket
    # of two events); the next ones wait for the tick after it and leave together, whole
    # (issue 12, point 8: the last word is not held back a tick).
    arrivals = [(0.0, "a"), (0.005, " b"), (0.010, " c"), (0.015, " d"), (0.030, " e")]
    sent, _ = drive(S, arrivals, finish_at=1.0)
    assert [(round(s.at, 6), s.piece.text) for s in sent] == [
        (0.0, "a"), (0.005, " b"), (0.03, " c d e"),
    ]


def test_last_queued_unit_waits_one_tick_for_the_rest_of_its_cluster() -> None:
    # The upstream splits a ZWJ sequence across deltas (tokenizers do); the queue ends
    # with ZWJ, so that cluster is incomplete and waits while the words before it go.
    arrivals = [(0.0, "a"), (0.004, " x"), (0.010, " y " + FAMILY[:2]),
                (0.034, FAMILY[2:] + " b")]
    sent, _ = drive(S, arrivals, finish_at=2.0)
    assert [(round(x.at, 6), x.piece.text) for x in sent] == [
        (0.0, "a"), (0.004, " x"), (0.029, " y "), (0.054, f"{FAMILY} b"),
    ]


def test_lone_incomplete_cluster_leaves_a_tick_after_arrival() -> None:
    # A divergence from "hold until max_lag": after one tick the pacer sends what it has.
    arrivals = [(0.0, "a"), (0.004, " x"), (0.010, FAMILY[:2]), (0.5, FAMILY[2:])]
    sent, _ = drive(S, arrivals, finish_at=2.0)
    assert texts(sent) == ["a", " x", FAMILY[:2], FAMILY[2:]]
    assert sent[2].at == pytest.approx(0.010 + TICK)


@pytest.mark.parametrize("unit", ["auto", "word", "grapheme", "token"])
def test_cluster_split_across_queued_deltas_is_never_cut(unit: str) -> None:
    s = replace(S, unit=unit)
    body = f"x {FAMILY} {US} {E_ACUTE} ดี {THUMBS} y "
    cuts = [(i, i + 1) for i in range(len(body))]  # one code point per delta
    arrivals = [(0.0, "go")] + [(0.001, body[a:b]) for a, b in cuts]
    sent, _ = drive(s, arrivals, finish_at=1.0)
    assert "".join(texts(sent)) == "go" + body
    bounds = cluster_bounds("go" + body)
    pos = 0
    for piece in texts(sent):
        pos += len(piece)
        assert pos in bounds


def test_word_split_across_queued_deltas_is_made_whole() -> None:
    arrivals = [(0.0, "a"), (0.001, " b"), (0.002, " incred"), (0.003, "ible"),
                (0.004, " story")]
    sent, _ = drive(replace(S, burst_threshold=1), arrivals, finish_at=1.0)
    assert texts(sent) == ["a", " b", " incredible ", "story"]


def test_token_units_keep_the_deltas_as_they_came() -> None:
    s = replace(S, unit="token")
    arrivals = [(0.0, "a")] + [(0.001 * i, f" t{i}") for i in range(1, 6)]
    sent, _ = drive(s, arrivals, finish_at=1.0)
    assert texts(sent) == ["a", " t1", " t2 t3 t4 t5"]


@pytest.mark.parametrize(("unit", "token"), [("auto", "ab"), ("word", "你好"), ("auto", "{\"k\":1,")])
def test_long_run_without_spaces_keeps_flowing(unit: str, token: str) -> None:
    # A word that keeps growing is not held back as one unit: it flows tick by tick.
    arrivals = [(i / 300, token) for i in range(300)]
    sent, _ = drive(replace(S, unit=unit), arrivals, finish_at=1.0)
    assert "".join(texts(sent)) == token * 300
    assert len(sent) >= 35
    assert max(x.at - x.piece.arrived for x in sent) <= 3 * TICK + EPS


def test_steady_fast_stream_becomes_one_event_per_tick() -> None:
    arrivals = [(i / 300, f" w{i}") for i in range(300)]  # 300 tok/s for 1 s
    sent, _ = drive(S, arrivals, finish_at=1.0)
    gaps = [b - a for a, b in zip(times(sent), times(sent)[1:])]
    assert min(gaps[1:]) >= TICK - EPS  # the first gap borrows from the idle start
    assert 38 <= len(sent) <= 42
    assert max(s.at - s.piece.arrived for s in sent) <= 2 * TICK + EPS


def test_burst_is_spread_over_target_lag_in_even_pieces() -> None:
    arrivals = [(0.0, "Hi"), (1.0, words(1000))]
    sent, _ = drive(S, arrivals, finish_at=10.0)
    burst = sent[1:]
    assert burst[0].at == 1.0 and burst[0].piece.text == words(8)  # the threshold's budget
    gaps = [b - a for a, b in zip(times(burst), times(burst)[1:])]
    assert all(g == pytest.approx(TICK) for g in gaps)
    assert burst[-1].at <= 1.0 + S.target_lag_s + TICK + EPS
    assert len(burst) >= S.target_lag_s / TICK
    # Even in characters (the plan counts characters; a piece ends at the next word end).
    sizes = [len(s.piece.text) for s in burst[1:-1]]
    assert max(sizes) - min(sizes) <= 2 * len("w999 ")


def test_text_arriving_during_a_burst_rides_along() -> None:
    later = [(1.0 + 0.01 * i, f" x{i}") for i in range(1, 40)]
    sent, _ = drive(S, [(0.0, "Hi"), (1.0, words(1000))] + later, finish_at=10.0)
    assert max(s.at for s in sent) <= 1.0 + S.target_lag_s + 2 * TICK + EPS
    assert all(s.at - s.piece.arrived <= S.target_lag_s + TICK + EPS for s in sent)


def test_later_burst_overlapping_an_earlier_one() -> None:
    arrivals = [(0.0, "Hi"), (1.0, words(500)), (1.2, words(500, 500))]
    sent, _ = drive(S, arrivals, finish_at=10.0)
    assert all(s.at - s.piece.arrived <= S.target_lag_s + TICK + EPS for s in sent)
    assert sent[-1].at <= 1.2 + S.target_lag_s + TICK + EPS


def test_max_lag_bounds_the_wait_when_the_plan_would_exceed_it() -> None:
    s = replace(S, target_lag_s=0.2, max_lag_s=0.2)
    # The burst lands between ticks, so the plan's last unit would wait 0.2 s + part of a tick.
    sent, _ = drive(s, [(0.0, "Hi"), (0.01, words(300))], finish_at=10.0)
    lags = [x.at - x.piece.arrived for x in sent]
    assert max(lags) <= 0.2 + EPS
    assert max(lags) >= 0.2 - TICK


def test_target_zero_sends_each_tick_what_arrived() -> None:
    s = replace(S, target_lag_s=0.0, max_lag_s=0.1)
    sent, _ = drive(s, [(0.0, "Hi"), (1.0, words(300))], finish_at=10.0)
    # No spreading: all at once (the last word is not held: it is complete).
    assert [(x.at, x.piece.text) for x in sent] == [(0.0, "Hi"), (1.0, words(300))]


def test_finish_drains_the_queue_within_drain_s() -> None:
    sent, pacer = drive(S, [(0.0, "Hi"), (1.0, words(1000))], finish_at=1.05)
    after = [x for x in sent if x.finished]
    assert after and after[-1].at <= 1.05 + S.drain_s + EPS
    assert len(after) >= S.drain_s / TICK  # spread over the ticks left, not one jump
    assert not pacer.pending and pacer.next_due() is None
    assert "".join(texts(sent)) == "Hi" + words(1000)


def test_drain_zero_sends_everything_at_finish() -> None:
    s = replace(S, drain_s=0.0)
    sent, pacer = drive(s, [(0.0, "Hi"), (1.0, words(1000))], finish_at=1.1)
    after = [x for x in sent if x.finished]
    assert [x.at for x in after] == [1.1]
    assert not pacer.pending


def test_finish_with_nothing_queued_ends_at_once() -> None:
    pacer = Pacer(S)
    pacer.push("Hi", 0.0)
    assert pacer.pull(0.0) == [Piece("Hi", 0.0, 0.0)]
    pacer.finish(3.0)
    assert not pacer.pending and pacer.next_due() is None and pacer.pull(3.0) == []


def test_finish_releases_the_held_incomplete_cluster() -> None:
    pacer = Pacer(S)
    pacer.push("a", 0.0)
    pacer.pull(0.0)
    pacer.push(" b", 0.005)
    pacer.pull(0.005)
    pacer.push(FAMILY[:2], 0.01)  # ends with ZWJ: held a tick for the rest of the cluster
    assert pacer.next_due() == pytest.approx(0.035)
    pacer.finish(0.012)
    due = pacer.next_due()
    assert due is not None and due == pytest.approx(0.030)
    [piece] = pacer.pull(due)
    assert (piece.text, piece.arrived) == (FAMILY[:2], 0.01)
    assert not pacer.pending


def test_push_after_finish_is_an_error() -> None:
    pacer = Pacer(S)
    pacer.finish(0.0)
    with pytest.raises(RuntimeError):
        pacer.push("late", 1.0)


def test_empty_delta_is_ignored() -> None:
    pacer = Pacer(S)
    pacer.push("", 0.0)
    assert not pacer.pending and pacer.next_due() is None
    pacer.push("a", 1.0)
    assert pacer.pull(1.0) == [Piece("a", 1.0, 1.0)]


def test_late_pull_sends_one_piece_with_all_that_is_owed() -> None:
    pacer = Pacer(S)
    pacer.push("Hi", 0.0)
    pacer.pull(0.0)
    pacer.push(" there", 0.001)
    pacer.pull(0.001)
    pacer.push(words(1000), 0.002)
    pieces = pacer.pull(5.0)  # the loop overslept: one event, not one per missed tick
    assert len(pieces) == 1 and pieces[0].text == words(1000)
    assert pieces[0].due == pytest.approx(0.001 + TICK) and pieces[0].arrived == 0.002
    assert not pacer.pending


def test_pending_and_next_due() -> None:
    pacer = Pacer(S)
    states = [(pacer.pending, pacer.next_due())]
    pacer.push("a", 0.0)
    states.append((pacer.pending, pacer.next_due()))
    pacer.pull(0.0)
    states.append((pacer.pending, pacer.next_due()))
    pacer.push(" b", 0.005)  # within a tick of "a": sent, borrowing from the idle time
    states.append((pacer.pending, pacer.next_due()))
    pacer.pull(0.005)
    pacer.push(" c d", 0.01)  # the bucket is empty: queued for a tick after " b"
    states.append((pacer.pending, pacer.next_due()))
    assert pacer.pull(0.02) == []
    assert states == [(False, None), (True, 0.0), (False, None), (True, 0.005),
                      (True, pytest.approx(0.005 + TICK))]


@pytest.mark.parametrize("unit", ["auto", "token"])
def test_mode_off_relays_each_delta_as_it_came(unit: str) -> None:
    s = replace(S, mode="off", unit=unit)
    arrivals = [(0.0, "a"), (0.0, words(3000)), (0.001, FAMILY[:2]), (0.002, FAMILY[2:])]
    sent, pacer = drive(s, arrivals)
    assert [(x.at, x.piece) for x in sent] == [(t, Piece(d, t, t)) for t, d in arrivals]
    assert not pacer.pending


# --- properties ----------------------------------------------------------------------


def assert_rate(at: list[float], s: PacingSettings) -> None:
    """The rate limit: a bucket of two events refilled one per tick (GCRA with a
    tolerance of one tick), so at most one event more than max_events_per_s in any 1 s
    window, and max_events_per_s a second on average."""
    tick = s.tick_s
    tat = -math.inf
    for t in at:
        assert t >= tat - tick - EPS
        tat = max(tat, t) + tick
    for i, start in enumerate(at):
        in_window = sum(1 for t in at[i:] if t < start + 1.0 - 1e-6)
        assert in_window <= math.ceil(s.max_events_per_s - EPS) + 1


RI = "".join(chr(c) for c in range(0x1F1E6, 0x1F200))
JOINER = regex.compile(r"[\r\u200d\p{GCB=Prepend}\p{InCB=Linker}]")


def incomplete_end(text: str) -> bool:
    """The text ends inside a cluster that needs more: after ZWJ, CR, a virama, a Prepend
    character, or a lone regional indicator."""
    if text and text[-1] in RI:
        return (len(text) - len(text.rstrip(RI))) % 2 == 1
    return bool(text) and JOINER.match(text[-1]) is not None


def cluster_bounds(text: str) -> set[int]:
    bounds = {0}
    pos = 0
    for cluster in regex.findall(r"\X", text):
        pos += len(cluster)
        bounds.add(pos)
    return bounds


FRAGMENTS = st.one_of(
    st.sampled_from(["the", "quick", "brown", "fox", "Über", "naïve", "a", "I", ",", "."]),
    st.text(alphabet="abcdefghijklmnopqrstuvwxyz", min_size=1, max_size=12),
    st.text(alphabet="你好世界中文字こんにちはカタカナー。、", min_size=1, max_size=8),
    st.text(alphabet="ภาษาไทยดีมาก่้", min_size=1, max_size=8),
    st.sampled_from([FAMILY, RAINBOW, THUMBS, US, FR, E_ACUTE, KEYCAP, "\u200d", "\u0301",
                     "\U0001f1fa", "\ufe0f", "\U0001f3fd", "Z\u0351\u0352"]),
    st.sampled_from([" ", "  ", "\n", "\n\n", "\t", "\r\n", " \u3000 ", "\u00a0"]),
)
TEXTS = st.lists(FRAGMENTS, min_size=1, max_size=60).map("".join)
GAPS = st.one_of(
    st.just(0.0),  # same read
    st.floats(min_value=0.0, max_value=0.03),  # a fast stream
    st.floats(min_value=0.03, max_value=0.3),  # a slow one
    st.floats(min_value=0.3, max_value=3.0),  # a pause
)


@st.composite
def streams(draw: st.DrawFn) -> tuple[list[tuple[float, str]], float]:
    text = draw(TEXTS)
    cuts = sorted(draw(st.sets(st.integers(1, max(1, len(text) - 1)), max_size=40)))
    bounds = [0, *[c for c in cuts if 0 < c < len(text)], len(text)]
    deltas = [text[a:b] for a, b in zip(bounds, bounds[1:])]
    t = draw(st.floats(min_value=0.0, max_value=100.0))
    arrivals = []
    for delta in deltas:
        t += draw(GAPS)
        arrivals.append((t, delta))
    finish_at = t + draw(GAPS)
    return arrivals, finish_at


@st.composite
def pacing_settings(draw: st.DrawFn) -> PacingSettings:
    rate = draw(st.sampled_from([5.0, 10.0, 30.0, 40.0, 60.0, 100.0, 33.3]))
    tick = 1.0 / rate
    target = draw(st.sampled_from([0.0, 0.05, 0.25, 0.5, 1.0]))
    max_lag = max(target, tick) + draw(st.sampled_from([0.0, 0.01, 0.5, 2.0]))
    return PacingSettings(
        mode="smooth",
        unit=draw(st.sampled_from(["auto", "grapheme", "word", "token"])),
        target_lag_s=target,
        max_lag_s=max_lag,
        burst_threshold=draw(st.sampled_from([0, 1, 3, 8, 20])),
        max_events_per_s=rate,
        drain_s=tick + draw(st.sampled_from([0.0, 0.1, 0.5, 2.0])),
    )


PROPERTY = settings(max_examples=500, deadline=None,
                    suppress_health_check=[HealthCheck.too_slow])


@PROPERTY
@given(s=pacing_settings(), stream=streams())
def test_property_guarantees(s: PacingSettings, stream: tuple[list[tuple[float, str]], float]
                             ) -> None:
    arrivals, finish_at = stream
    sent, pacer = drive(s, arrivals, finish_at)
    text = "".join(d for _, d in arrivals)
    tick = s.tick_s

    # Exact text, in order, nothing left behind.
    assert "".join(texts(sent)) == text
    assert not pacer.pending and pacer.next_due() is None
    assert all(x.piece.text for x in sent)

    # Each piece's arrival is its first character's; lag bounds: the hard one and the plan.
    starts, pos = [], 0
    for t, d in arrivals:
        starts.append((pos, t))
        pos += len(d)
    pos = 0
    for x in sent:
        first = max(t for p, t in starts if p <= pos and t <= x.at)
        assert x.piece.arrived == first
        assert x.piece.due <= x.at + EPS
        lag = x.at - x.piece.arrived
        assert lag <= s.max_lag_s + EPS
        assert lag <= max(s.target_lag_s, tick) + tick + EPS
        pos += len(x.piece.text)

    assert_rate(times(sent), s)

    # The drain ends within drain_s of finish.
    assert all(x.at <= finish_at + s.drain_s + EPS for x in sent)

    # The first unit goes out at once.
    assert sent[0].at == arrivals[0][0]
    assert text.startswith(sent[0].piece.text)

    # A piece ends inside a grapheme cluster only at the end of all that had arrived,
    # and only when that text was sent whole as it came (pass-through), or did not end
    # with an incomplete cluster (issue 12, point 8), or was a tick old, or the upstream
    # had finished.
    bounds = cluster_bounds(text)
    deltas_at = {t_d for t_d in arrivals}
    end = 0
    for x in sent:
        end += len(x.piece.text)
        if end in bounds:
            continue
        assert end == x.pushed
        passed_whole = (x.at, x.piece.text) in deltas_at and x.piece.arrived == x.at
        forced = x.piece.arrived + s.max_lag_s < x.at + tick + EPS
        waited = x.at >= min(x.last_push + tick, x.piece.arrived + max(s.target_lag_s, tick)
                             ) - EPS
        assert (passed_whole or x.finished or forced or waited
                or not incomplete_end(text[:end]))


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(s=pacing_settings(), text=st.lists(FRAGMENTS, min_size=10, max_size=60).map("".join),
       copies=st.integers(20, 100), parts=st.integers(1, 4), gap=GAPS)
def test_property_large_bursts(s: PacingSettings, text: str, copies: int, parts: int,
                               gap: float) -> None:
    body = text * copies
    step = -(-len(body) // parts)
    arrivals = [(0.0, "Hi")] + [(1.0 + gap * i, body[i * step:(i + 1) * step])
                                for i in range(parts) if body[i * step:(i + 1) * step]]
    sent, pacer = drive(s, arrivals, finish_at=arrivals[-1][0] + 5.0)
    assert "".join(texts(sent)) == "Hi" + body and not pacer.pending
    tick = s.tick_s
    assert all(x.at - x.piece.arrived <= min(s.max_lag_s, max(s.target_lag_s, tick) + tick)
               + EPS for x in sent)
    assert_rate(times(sent), s)
    bounds = cluster_bounds("Hi" + body)
    end = 0
    for x in sent[:-1]:
        end += len(x.piece.text)
        assert end in bounds or end == x.pushed


@PROPERTY
@given(stream=streams(), unit=st.sampled_from(["auto", "grapheme", "word", "token"]))
def test_property_mode_off_is_the_identity(stream: tuple[list[tuple[float, str]], float],
                                           unit: str) -> None:
    arrivals, finish_at = stream
    sent, _ = drive(replace(S, mode="off", unit=unit), arrivals, finish_at)
    assert [(x.at, x.piece.text) for x in sent] == arrivals


@settings(max_examples=300, deadline=None)
@given(text=TEXTS, unit=st.sampled_from(["auto", "grapheme", "word", "token"]))
def test_property_units_join_to_the_text_and_never_cut_a_cluster(text: str, unit: str) -> None:
    units = segment(text, unit)
    assert "".join(units) == text and all(units)
    bounds = cluster_bounds(text)
    pos = 0
    for u in units:
        pos += len(u)
        assert pos in bounds


# --- long runs without spaces (issue 12, point 7) -------------------------------------

EMOJI_RUN = (FAMILY + THUMBS + US + RAINBOW + KEYCAP + "\U0001f600" + FR) * 40
URL = "https://example.com/" + "a1b2c3d4/" * 250
BASE64 = base64.b64encode(random.Random(7).randbytes(1500)).decode()


@pytest.mark.parametrize("run", [EMOJI_RUN, URL, BASE64], ids=["emoji", "url", "base64"])
def test_long_run_without_spaces_is_paced_in_whole_clusters(run: str) -> None:
    assert len(run.encode()) >= 2000
    text = "Hi " + run + " end"
    sent, _ = drive(S, [(0.0, "Hi"), (1.0, " " + run), (5.0, " end")], finish_at=5.0)
    assert "".join(texts(sent)) == text
    burst = [x for x in sent if 1.0 <= x.at < 5.0]
    assert len(burst) >= 10  # spread over target_lag_s, not one 2 KB jump
    assert max(len(x.piece.text.encode()) for x in sent) <= 1024
    bounds = cluster_bounds(text)
    end = 0
    for x in sent:
        end += len(x.piece.text)
        assert end in bounds


def test_word_of_long_word_clusters_is_one_unit_and_a_longer_one_is_cut() -> None:
    assert segment("x" * 16 + " y", "auto") == ["x" * 16 + " ", "y"]
    assert segment("x" * 17 + " y", "auto") == ["x"] * 16 + ["x ", "y"]
    assert segment(FAMILY * 17, "auto") == [FAMILY] * 17
    assert segment(FAMILY * 17, "word") == [FAMILY * 17]


# --- a real model's steady stream (issue 12, point 8) ---------------------------------


def steady_model_stream(seed: int, n: int = 600) -> list[tuple[float, str]]:
    """Like a small model served by llama.cpp: ~28 tokens/s, gaps jittered around 35 ms
    (some under a tick), tokens that split words."""
    rng = random.Random(seed)
    vocabulary = ("the model streams tokens one after another while the server relays "
                  "every piece as it comes understanding particularly approximately").split()
    tokens: list[str] = []
    while len(tokens) < n:
        word = " " + rng.choice(vocabulary)
        while word:
            cut = rng.randint(2, 6)
            tokens.append(word[:cut])
            word = word[cut:]
    arrivals, t = [], 0.0
    for token in tokens[:n]:
        arrivals.append((t, token))
        t += rng.triangular(0.020, 0.055, 0.032)
    return arrivals


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_steady_model_stream_leaves_as_it_arrives(seed: int) -> None:
    arrivals = steady_model_stream(seed)
    gaps = [b[0] - a[0] for a, b in zip(arrivals, arrivals[1:])]
    assert sum(g < TICK for g in gaps) >= 20  # the pattern does come under a tick
    sent, _ = drive(S, arrivals)
    assert "".join(texts(sent)) == "".join(d for _, d in arrivals)
    late = sorted(x.at - x.piece.arrived for x in sent)
    assert late[int(0.99 * len(late))] < 0.005
    assert late[-1] <= TICK + EPS


KB8 = "abcdefg " * 1024  # 8,192 characters, 1,024 words of 8


# The characters spread over target_lag_s because they came as a burst (issue 15: the
# done event reports them).
@pytest.mark.parametrize(("s", "arrivals", "smoothed"), [
    (S, [(i / 300, f" w{i}") for i in range(300)], 0),  # 300 tok/s: merged, never a burst
    (S, steady_model_stream(1), 0),
    # An 8 KB burst to an idle stream: the threshold's 8 words leave at once.
    (S, [(0.0, "Hi"), (1.0, KB8)], 8192 - 8 * 8),
    # As the first delta: its first word leaves at once, then the threshold's 8 words.
    (S, [(0.0, KB8)], 8192 - 9 * 8),
    (S, [(0.0, "Hi"), (1.0, KB8), (3.0, KB8)], 2 * (8192 - 8 * 8)),
    (replace(S, target_lag_s=0.0, max_lag_s=0.1), [(0.0, "Hi"), (1.0, KB8)], 0),  # at once
    (replace(S, mode="off"), [(0.0, "Hi"), (1.0, KB8)], 0),
], ids=["steady-300-tok-s", "steady-model", "8kb-burst", "8kb-first-delta", "two-bursts",
        "target-zero", "mode-off"])
def test_smoothed_chars_counts_what_a_burst_spread(
    s: PacingSettings, arrivals: list[tuple[float, str]], smoothed: int,
) -> None:
    sent, pacer = drive(s, arrivals, finish_at=arrivals[-1][0] + 1.0)
    assert "".join(texts(sent)) == "".join(d for _, d in arrivals)
    assert pacer.smoothed_chars == smoothed
    assert UNPACED.smoothed_chars == 0


# --- cost (issue 13, point 1) ----------------------------------------------------------


class CountingPattern:
    """A compiled pattern that adds to ``tally[0]`` every character it reads."""

    def __init__(self, pattern: Any, tally: list[int]) -> None:
        self.pattern, self.tally = pattern, tally

    def _span(self, text: str, pos: int, endpos: int | None) -> int:
        return (len(text) if endpos is None else min(endpos, len(text))) - pos

    def findall(self, text: str, pos: int = 0, endpos: int | None = None) -> Any:
        self.tally[0] += self._span(text, pos, endpos)
        return self.pattern.findall(text, pos, len(text) if endpos is None else endpos)

    def finditer(self, text: str, pos: int = 0, endpos: int | None = None) -> Any:
        read = pos
        for m in self.pattern.finditer(text, pos, len(text) if endpos is None else endpos):
            self.tally[0] += m.end() - read
            read = m.end()
            yield m

    def match(self, text: str, pos: int = 0, endpos: int | None = None) -> Any:
        m = self.pattern.match(text, pos, len(text) if endpos is None else endpos)
        self.tally[0] += (m.end() if m else pos + 1) - pos
        return m

    def search(self, text: str, pos: int = 0, endpos: int | None = None) -> Any:
        self.tally[0] += self._span(text, pos, endpos)
        return self.pattern.search(text, pos, len(text) if endpos is None else endpos)


@pytest.fixture
def work(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Characters the pacer's patterns read (segmentation and boundary searches)."""
    tally = [0]
    for name in ("_CLUSTER", "_WORD", "_AUTO", "_ASCII_WORD", "_SAFE", "_SAFE_BACK"):
        if hasattr(pacing, name):
            monkeypatch.setattr(pacing, name, CountingPattern(getattr(pacing, name), tally))
    return tally


def drain_counting(pacer: Pacer, tally: list[int], now: float) -> int:
    """Pull until nothing is pending; the most characters read by one call."""
    pacer.finish(now)
    most = 0
    while pacer.pending:
        due = pacer.next_due()
        assert due is not None
        before = tally[0]
        pacer.pull(due)
        most = max(most, tally[0] - before)
    return most


@pytest.mark.parametrize("piece", ["abcdefgh", "\U0001f600" * 4 + FAMILY, "x y z "])
def test_work_is_linear_in_the_text_of_a_growing_unspaced_run(
        work: list[int], piece: str) -> None:
    # Deltas of one run without spaces arriving in one read once re-segmented the whole
    # growing run on each delta: 4x the text cost 16x the work.
    def cost(n: int) -> int:
        work[0] = 0
        pacer = Pacer(S)
        pacer.push("Hi", 0.0)
        pacer.pull(0.0)
        for _ in range(n):
            pacer.push(piece, 1.0)
        drain_counting(pacer, work, 1.0)
        return work[0]

    small, large = cost(250), cost(1000)
    assert large <= 6 * small
    assert large <= 3 * 1000 * len(piece) + 20_000


@pytest.mark.parametrize("unit", ["auto", "word", "grapheme", "token"])
@pytest.mark.parametrize("body", ["x" * 16_000_000, "ab " * 5_000_000,
                                  (FAMILY + "\u4f60\u597d") * 100_000])
def test_a_huge_delta_costs_a_bounded_amount_of_work_per_call(
        work: list[int], unit: str, body: str) -> None:
    pacer = Pacer(replace(S, unit=unit))
    pacer.push("Hi", 0.0)
    pacer.pull(0.0)
    work[0] = 0
    pacer.push(body, 1.0)
    most = work[0]
    sent: list[str] = []
    while pacer.pending:
        due = pacer.next_due()
        assert due is not None
        before = work[0]
        sent.extend(p.text for p in pacer.pull(due))
        most = max(most, work[0] - before)
        if due > 1.2:
            pacer.finish(due)
    assert "".join(sent) == body
    assert most <= 20_000
    assert len(sent) >= 10 or unit == "token"  # a token stays whole, however long


# Runs of many clusters; not one cluster of more than 64 code points (a run of ZWJs),
# which the pacer reads only in part and no stream-safe text (UAX #15) contains.
LONG_RUNS = st.one_of(
    FRAGMENTS,
    st.builds(lambda f, n: f * n,
              st.sampled_from([FAMILY, US, THUMBS, "ab", "\u4f60", E_ACUTE, "Z\u0351\u0352",
                               KEYCAP, "x", "\u0915\u094d\u0937", "\r\n"]),
              st.integers(5, 400)),
)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(s=pacing_settings(), runs=st.lists(LONG_RUNS, min_size=1, max_size=12),
       cuts=st.lists(st.integers(1, 3000), max_size=20), gap=GAPS, small=st.booleans())
@example(s=PacingSettings(mode="smooth", unit="token", target_lag_s=0.5, max_lag_s=0.5,
                          burst_threshold=0, max_events_per_s=5.0, drain_s=0.2),
         runs=["the", "the", "\U0001f1fa\U0001f1f8" * 33], cuts=[1, 71], gap=0.0, small=False)
def test_property_long_runs_concatenate_exactly_in_whole_clusters(
        s: PacingSettings, runs: list[str], cuts: list[int], gap: float, small: bool) -> None:
    text = "".join(runs)
    bounds_at = sorted({c for c in cuts if c < len(text)})
    bounds = [0, *bounds_at, len(text)]
    arrivals = [(1.0 + gap * i, text[a:b]) for i, (a, b) in enumerate(zip(bounds, bounds[1:]))]
    limits = {"_LOOK": 64, "_SEGMENT_MAX": 128} if small else {}
    small_limits: Any = (mock.patch.multiple(pacing, **limits)  # type: ignore[call-overload]
                         if limits else contextlib.nullcontext())  # (typeshed: str values)
    with small_limits:  # small limits: the local cut searches
        sent, pacer = drive(s, arrivals, finish_at=arrivals[-1][0] + 1.0)
    assert "".join(texts(sent)) == text and not pacer.pending
    clusters = cluster_bounds(text)
    end = 0
    for x in sent:
        end += len(x.piece.text)
        # unit = token sends the upstream's own tokens: a piece may end where a delta ended,
        # even inside a cluster the upstream itself split across two deltas.
        assert end in clusters or end == x.pushed or (s.unit == "token" and end in bounds)


def test_pacing_off_holds_nothing_and_refuses_text() -> None:
    # pacing.mode = "off": one stateless stand-in serves every stream.
    assert not UNPACED.pending and UNPACED.next_due() is None
    UNPACED.finish(1.0)
    assert UNPACED.pull(2.0) == [] and not UNPACED.pending
    with pytest.raises(RuntimeError):
        UNPACED.push("text", 1.0)


@settings(max_examples=300)
@given(st.lists(st.one_of(st.integers(0, 9), st.none()), max_size=400))
def test_the_pacers_queue_behaves_as_a_deque(ops: list[int | None]) -> None:
    # None pops from the left, a number appends; the queue lets its memory go when empty.
    queue: pacing._Queue[int] = pacing._Queue()
    model: deque[int] = deque()
    for op in ops:
        if op is None:
            if model:
                assert queue.popleft() == model.popleft()
            else:
                with pytest.raises(IndexError):
                    queue.popleft()
        else:
            queue.append(op)
            model.append(op)
        assert bool(queue) == bool(model) and len(queue) == len(model)
        assert list(queue) == list(model)
        if model:
            assert (queue[0], queue[-1]) == (model[0], model[-1])
            queue[-1] = model[-1] = op or 0
    if not model:
        assert queue._items == []
