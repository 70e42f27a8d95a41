"""The SSE decoder under generated input (issue 18, point 6): a stream split at every
offset gives the same events as the stream whole, and arbitrary bytes never crash it."""

from __future__ import annotations

from hypothesis import given, settings, strategies as st

from sseproxy import errors, sse

ENDS = st.sampled_from(["\n", "\r", "\r\n"])
VALUE = st.text(st.characters(blacklist_characters="\r\n", blacklist_categories=["Cs"]),
                max_size=12)
FIELD = st.sampled_from(["data", "event", "id", "retry", "", "dat", "data ", "x"])
line = st.one_of(
    st.tuples(FIELD, st.sampled_from([":", ": ", ":  "]), VALUE).map("".join),
    FIELD,  # a field without a colon
    VALUE.map(lambda v: ":" + v),  # a comment
    st.just(""),  # a blank line: dispatch
)
streams = st.tuples(st.booleans(), st.lists(st.tuples(line, ENDS), max_size=14)).map(
    lambda t: ("\ufeff" if t[0] else "") + "".join(a + b for a, b in t[1])).map(
    lambda text: text.encode("utf-8"))


def decode(*pieces: bytes) -> list[sse.Event]:
    decoder = sse.Decoder(max_event_bytes=1 << 16)
    events: list[sse.Event] = []
    for piece in pieces:
        events += decoder.feed(piece)
    return events


@settings(max_examples=1500)
@given(streams)
def test_a_stream_split_at_any_offset_gives_the_same_events(raw: bytes) -> None:
    whole = decode(raw)
    for i in range(len(raw) + 1):
        assert decode(raw[:i], raw[i:]) == whole, i
    assert decode(*(raw[i:i + 1] for i in range(len(raw)))) == whole


@settings(max_examples=2500)
@given(st.binary(max_size=300), st.integers(min_value=1, max_value=64),
       st.integers(min_value=1, max_value=300))
def test_arbitrary_bytes_never_crash_the_decoder(raw: bytes, step: int, limit: int) -> None:
    decoder = sse.Decoder(max_event_bytes=limit)
    try:
        for i in range(0, len(raw), step):
            for event in decoder.feed(raw[i:i + step]):
                assert isinstance(event.data, str) and len(event.data) <= limit
        decoder.close()
    except errors.EventTooLarge:
        pass  # the one refusal an upstream can cause
