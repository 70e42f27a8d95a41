"""Tests of sseproxy.sse: the encoder's exact bytes, the decoder against the WHATWG spec.

Every decoder input is fed whole, one byte at a time and (hypothesis) split at random
points; all must give the same events. A small reference decoder written straight from
the spec text (whole input, no chunking) is the oracle for fuzzed streams.
"""

from __future__ import annotations

import codecs
import re
from dataclasses import dataclass

import pytest
from hypothesis import given
from hypothesis import strategies as st

from sseproxy.errors import EventTooLarge
from sseproxy.sse import Decoder, Event, encode, encode_message

# --- helpers -------------------------------------------------------------------


def feed_chunks(chunks: list[bytes], max_event_bytes: int = 1 << 20) -> list[Event]:
    decoder = Decoder(max_event_bytes)
    events: list[Event] = []
    for chunk in chunks:
        events.extend(decoder.feed(chunk))
    decoder.close()
    return events


def split_at(stream: bytes, cuts: list[int]) -> list[bytes]:
    bounds = [0, *sorted(cuts), len(stream)]
    return [stream[a:b] for a, b in zip(bounds, bounds[1:])]


def one_byte_at_a_time(stream: bytes) -> list[bytes]:
    return [stream[i : i + 1] for i in range(len(stream))]


def decode_every_way(stream: bytes, max_event_bytes: int = 1 << 20) -> list[Event]:
    """Decode ``stream`` whole and byte by byte; assert both agree and return the events."""
    whole = feed_chunks([stream], max_event_bytes)
    assert feed_chunks(one_byte_at_a_time(stream), max_event_bytes) == whole
    return whole


def outcome(chunks: list[bytes], max_event_bytes: int = 1 << 20) -> list[Event] | str:
    """The events, or the name of the error the decoder raised."""
    try:
        return feed_chunks(chunks, max_event_bytes)
    except EventTooLarge as exc:
        return type(exc).__name__


@dataclass
class Reference:
    """The spec's algorithm on a whole stream, written for clarity, not speed."""

    retry: int | None = None
    last_event_id: str = ""

    def decode(self, stream: bytes, max_chars: int) -> list[Event] | str:
        # Not a final decode: the stream has not ended, so a trailing incomplete UTF-8
        # sequence is not a character yet (it may be completed by the next chunk).
        text = codecs.getincrementaldecoder("utf-8")("replace").decode(stream)
        text = text.removeprefix("\ufeff")
        *lines, _incomplete = re.split(r"\r\n|\r|\n", text)
        events: list[Event] = []
        data, event_type, last_id = "", "", ""
        for line in lines:
            if line == "":
                self.last_event_id = last_id
                if data:
                    events.append(Event(data.removesuffix("\n"), event_type or "message", last_id))
                data, event_type = "", ""
                continue
            if len(data) + len(line) > max_chars:
                return "EventTooLarge"
            if line.startswith(":"):
                continue
            name, colon, value = line.partition(":")
            if colon and value.startswith(" "):
                value = value[1:]
            if name == "data":
                data += value + "\n"
            elif name == "event":
                event_type = value
            elif name == "id" and "\0" not in value:
                last_id = value
            elif name == "retry" and value and all(c in "0123456789" for c in value):
                self.retry = int(value)
        if len(data) + len(_incomplete) > max_chars:
            return "EventTooLarge"
        return events


# --- encoder -------------------------------------------------------------------

ENCODE_CASES: dict[str, tuple[dict[str, object], bytes]] = {
    "single line": ({"data": "hello"}, b"data: hello\n\n"),
    "multi-line LF": ({"data": "a\nb"}, b"data: a\ndata: b\n\n"),
    "multi-line CR": ({"data": "a\rb"}, b"data: a\ndata: b\n\n"),
    "multi-line CRLF": ({"data": "a\r\nb"}, b"data: a\ndata: b\n\n"),
    "mixed line ends": ({"data": "a\r\nb\rc\nd"}, b"data: a\ndata: b\ndata: c\ndata: d\n\n"),
    "LF CR is two line ends": ({"data": "a\n\rb"}, b"data: a\ndata: \ndata: b\n\n"),
    "CR CRLF is two line ends": ({"data": "a\r\r\nb"}, b"data: a\ndata: \ndata: b\n\n"),
    "trailing LF": ({"data": "a\n"}, b"data: a\ndata: \n\n"),
    "only LF": ({"data": "\n"}, b"data: \ndata: \n\n"),
    "empty data": ({"data": ""}, b"data: \n\n"),
    "leading space kept": ({"data": " x"}, b"data:  x\n\n"),
    "colon in data": ({"data": "a: b"}, b"data: a: b\n\n"),
    "unicode": ({"data": "h\u00e9llo \U0001f600"}, "data: h\u00e9llo \U0001f600\n\n".encode()),
    "lone surrogate": ({"data": "a\ud800b"}, "data: a\ufffdb\n\n".encode()),
    "split surrogate pair": ({"data": "\ud83d\ude00"}, "data: \U0001f600\n\n".encode()),
    "id": ({"data": "x", "id": "s.1"}, b"id: s.1\ndata: x\n\n"),
    "id only": ({"id": "7"}, b"id: 7\n\n"),
    "empty id": ({"id": ""}, b"id: \n\n"),
    "id newlines stripped": ({"id": "a\r\nb\rc\nd"}, b"id: abcd\n\n"),
    "id NUL stripped": ({"id": "a\x00b"}, b"id: ab\n\n"),
    "event": ({"data": "x", "event": "done"}, b"event: done\ndata: x\n\n"),
    "event newlines stripped": ({"event": "do\r\nne\n"}, b"event: done\n\n"),
    "event NUL kept": ({"event": "a\x00b"}, b"event: a\x00b\n\n"),
    "retry": ({"retry": 3000}, b"retry: 3000\n\n"),
    "retry zero": ({"retry": 0}, b"retry: 0\n\n"),
    "comment": ({"comment": "ping"}, b": ping\n\n"),
    "empty comment": ({"comment": ""}, b": \n\n"),
    "multi-line comment": ({"comment": "a\nb\r\nc"}, b": a\n: b\n: c\n\n"),
    "field order": (
        {"data": "d", "event": "e", "id": "i", "retry": 5, "comment": "c"},
        b": c\nretry: 5\nid: i\nevent: e\ndata: d\n\n",
    ),
    "field order, multi-line": (
        {"comment": "c1\nc2", "data": "d1\nd2", "id": "s.2", "event": "error"},
        b": c1\n: c2\nid: s.2\nevent: error\ndata: d1\ndata: d2\n\n",
    ),
    "retry then data": ({"data": "x", "retry": 10}, b"retry: 10\ndata: x\n\n"),
}


@pytest.mark.parametrize(("kwargs", "expected"), ENCODE_CASES.values(), ids=ENCODE_CASES.keys())
def test_encode_gives_exact_bytes(kwargs: dict[str, object], expected: bytes) -> None:
    assert encode(**kwargs) == expected  # type: ignore[arg-type]  # table of mixed kwargs


@pytest.mark.parametrize("retry", [-1, -3000, True, 1.5, "10"])
def test_encode_rejects_invalid_retry(retry: object) -> None:
    with pytest.raises(ValueError, match="retry"):
        encode("x", retry=retry)  # type: ignore[arg-type]  # invalid on purpose


def test_encode_needs_a_field() -> None:
    with pytest.raises(ValueError):
        encode()


MESSAGE_CASES = [
    ("hello", "s.1"),
    ("", "s.2"),
    ("", ""),
    ("a\nb", "s.3"),
    ("a\r\nb\r", "s.4"),
    ("x", "bad\nid"),
    ("x", "bad\rid\x00"),
    ("h\u00e9 \U0001f600", "\u00e9.5"),
    ("a\ud800", "s.6"),
    ("x", "\udc00"),
    (" lead", " id"),
]


@pytest.mark.parametrize(("data", "id"), MESSAGE_CASES)
def test_encode_message_equals_encode(data: str, id: str) -> None:
    assert encode_message(data, id) == encode(data, id=id)


awkward_text = st.text(
    alphabet=st.one_of(
        st.characters(codec=None, exclude_categories=()),  # surrogates included
        st.sampled_from(["\r", "\n", "\x00", "\ufeff", ":", " "]),
    )
)


@given(awkward_text, awkward_text)
def test_encode_message_equals_encode_for_any_text(data: str, id: str) -> None:
    assert encode_message(data, id) == encode(data, id=id)


def test_encode_message_fast_path_bytes() -> None:
    assert encode_message('{"content": "Hi"}', "abc.1") == b'id: abc.1\ndata: {"content": "Hi"}\n\n'


# --- decoder: the spec's own examples ----------------------------------------------

SPEC_EXAMPLES: dict[str, tuple[bytes, list[Event]]] = {
    # 9.2.1 Introduction: three messages, the second on two lines.
    "introduction messages": (
        b"data: This is the first message.\n\n"
        b"data: This is the second message, it\ndata: has two lines.\n\n"
        b"data: This is the third message.\n\n",
        [
            Event("This is the first message."),
            Event("This is the second message, it\nhas two lines."),
            Event("This is the third message."),
        ],
    ),
    # 9.2.1 Introduction: event types "add" and "remove".
    "introduction add and remove": (
        b"event: add\ndata: 73857293\n\nevent: remove\ndata: 2153\n\n"
        b"event: add\ndata: 113411\n\n",
        [Event("73857293", "add"), Event("2153", "remove"), Event("113411", "add")],
    ),
    # 9.2.6: the stock-ticker stream, one event with three data lines.
    "stock ticker YHOO": (
        b"data: YHOO\ndata: +2\ndata: 10\n\n",
        [Event("YHOO\n+2\n10")],
    ),
    # 9.2.6: four blocks; a comment fires nothing, "id" alone resets the ID, and only one
    # space after the colon is removed.
    "comment, first, second and third event": (
        b": test stream\n\ndata: first event\nid: 1\n\ndata:second event\nid\n\n"
        b"data:  third event\n\n",
        [Event("first event", id="1"), Event("second event"), Event(" third event")],
    ),
    # 9.2.6: two events, the first with empty data; the last block has no blank line
    # after it and is discarded at the end of the stream.
    "two events and an unfinished one": (
        b"data\n\ndata\ndata\n\ndata:",
        [Event(""), Event("\n")],
    ),
    # 9.2.6: the space after the colon is optional, so both events are the same.
    "data:test twice": (
        b"data:test\n\ndata: test\n\n",
        [Event("test"), Event("test")],
    ),
}


@pytest.mark.parametrize(("stream", "expected"), SPEC_EXAMPLES.values(), ids=SPEC_EXAMPLES.keys())
def test_spec_examples(stream: bytes, expected: list[Event]) -> None:
    assert decode_every_way(stream) == expected


# --- decoder: behaviour table ------------------------------------------------------

DECODE_CASES: dict[str, tuple[bytes, list[Event]]] = {
    "LF line ends": (b"data: a\ndata: b\n\n", [Event("a\nb")]),
    "CRLF line ends": (b"data: a\r\ndata: b\r\n\r\n", [Event("a\nb")]),
    "CR line ends": (b"data: a\rdata: b\r\r", [Event("a\nb")]),
    "mixed line ends": (b"data: a\rdata: b\r\ndata: c\n\r\n", [Event("a\nb\nc")]),
    "CR CRLF is two line ends": (b"data: a\r\r\ndata: b\n\n", [Event("a"), Event("b")]),
    "LF CR is two line ends": (b"data: a\n\rdata: b\n\n", [Event("a"), Event("b")]),
    "BOM stripped at start": (b"\xef\xbb\xbfdata: a\n\n", [Event("a")]),
    "second BOM is part of the field name": (b"\xef\xbb\xbf\xef\xbb\xbfdata: a\n\n", []),
    "BOM inside data kept": (b"data: \xef\xbb\xbfa\n\n", [Event("\ufeffa")]),
    "BOM after the start is not stripped": (
        b"data: a\n\n\xef\xbb\xbfdata: b\n\ndata: c\n\n",
        [Event("a"), Event("c")],
    ),
    "field without colon": (b"data\n\n", [Event("")]),
    "event without colon is message": (b"event\ndata: x\n\n", [Event("x")]),
    "empty event is message": (b"event:\ndata: x\n\n", [Event("x")]),
    "event type": (b"event: done\ndata: {}\n\n", [Event("{}", "done")]),
    "event type is per event": (
        b"event: a\ndata: 1\n\ndata: 2\n\n",
        [Event("1", "a"), Event("2")],
    ),
    "only one space removed": (b"data:  two\n\n", [Event(" two")]),
    "tab is not a space": (b"data:\tx\n\n", [Event("\tx")]),
    "no space after colon": (b"data:x\n\n", [Event("x")]),
    "colon inside value": (b"data: a: b:c\n\n", [Event("a: b:c")]),
    "empty value": (b"data: \n\n", [Event("")]),
    "space before colon makes another field": (b"data : x\ndata: y\n\n", [Event("y")]),
    "field names are case-sensitive": (b"Data: x\nDATA: y\ndata: z\n\n", [Event("z")]),
    "unknown field ignored": (b"foo: bar\ndata: x\nfoo\n\n", [Event("x")]),
    "comment ignored": (b": hi\ndata: a\n:\n: there\ndata: b\n\n", [Event("a\nb")]),
    "comment-only block fires nothing": (b": ping\n\n: ping\n\n", []),
    "blank lines alone fire nothing": (b"\n\n\r\n\r\r\n", []),
    "no dispatch on empty data buffer": (
        b"event: foo\n\ndata: x\n\n",
        [Event("x")],
    ),
    "id persists across events": (
        b"id: 1\ndata: a\n\ndata: b\n\nid: 2\ndata: c\n\ndata: d\n\n",
        [Event("a", id="1"), Event("b", id="1"), Event("c", id="2"), Event("d", id="2")],
    ),
    "id without event still sets the buffer": (
        b"id: 7\n\ndata: a\n\n",
        [Event("a", id="7")],
    ),
    "id after data in the same block": (b"data: a\nid: 3\n\n", [Event("a", id="3")]),
    "empty id resets": (b"id: 1\ndata: a\n\nid:\ndata: b\n\n", [Event("a", id="1"), Event("b")]),
    "id with NUL ignored": (
        b"id: 1\ndata: a\n\nid: x\x00y\ndata: b\n\n",
        [Event("a", id="1"), Event("b", id="1")],
    ),
    "NUL in data kept": (b"data: a\x00b\n\n", [Event("a\x00b")]),
    "incomplete last event discarded": (b"data: a\n\ndata: b\n", [Event("a")]),
    "incomplete last line discarded": (b"data: a\n\ndata: b", [Event("a")]),
    "last event ends with CR": (b"data: a\r\r", [Event("a")]),
    "invalid UTF-8 replaced": (b"data: a\xffb\n\n", [Event("a\ufffdb")]),
    "truncated UTF-8 replaced": (b"data: \xe2\x82\n\n", [Event("\ufffd")]),
    "surrogate bytes replaced": (b"data: \xed\xa0\x80\n\n", [Event("\ufffd\ufffd\ufffd")]),
    "multi-byte characters": (
        "data: h\u00e9 \u4f60\u597d \U0001f600\n\n".encode(),
        [Event("h\u00e9 \u4f60\u597d \U0001f600")],
    ),
    "retry lines are not events": (b"retry: 10\n\nretry: x\ndata: a\n\n", [Event("a")]),
    "OpenAI chunk": (
        b'data: {"choices":[{"delta":{"content":"Hi"}}]}\n\ndata: [DONE]\n\n',
        [Event('{"choices":[{"delta":{"content":"Hi"}}]}'), Event("[DONE]")],
    ),
}


@pytest.mark.parametrize(("stream", "expected"), DECODE_CASES.values(), ids=DECODE_CASES.keys())
def test_decode(stream: bytes, expected: list[Event]) -> None:
    assert decode_every_way(stream) == expected


ALL_STREAMS = [stream for stream, _ in [*SPEC_EXAMPLES.values(), *DECODE_CASES.values()]]


@given(st.sampled_from(ALL_STREAMS), st.data())
def test_any_split_gives_the_same_events(stream: bytes, data: st.DataObject) -> None:
    cuts = data.draw(st.lists(st.integers(0, len(stream)), max_size=len(stream)))
    assert feed_chunks(split_at(stream, cuts)) == feed_chunks([stream])


@pytest.mark.parametrize("stream", ALL_STREAMS)
def test_reference_decoder_agrees_with_tables(stream: bytes) -> None:
    assert Reference().decode(stream, 1 << 20) == feed_chunks([stream])


# --- decoder: chunk boundaries -------------------------------------------------------


def test_cr_and_lf_in_separate_chunks_are_one_line_end() -> None:
    decoder = Decoder()
    assert decoder.feed(b"data: a\r") == []
    assert decoder.feed(b"\ndata: b\r") == []
    assert decoder.feed(b"\n\r") == [Event("a\nb")]
    assert decoder.feed(b"\ndata: c\r") == []  # that LF ended nothing: no empty event
    assert decoder.feed(b"\n") == []
    assert decoder.feed(b"\n") == [Event("c")]


def test_cr_then_empty_chunk_then_lf() -> None:
    decoder = Decoder()
    assert decoder.feed(b"data: a\r") == []
    assert decoder.feed(b"") == []
    assert decoder.feed(b"\n") == []
    assert decoder.feed(b"\r") == [Event("a")]


def test_cr_then_partial_character_then_lf_is_not_skipped() -> None:
    decoder = Decoder()
    assert decoder.feed(b"data: a\r") == []
    assert decoder.feed(b"data: \xe2\x82") == []  # no character yet
    assert decoder.feed(b"\xac\n\n") == [Event("a\n\u20ac")]


def test_cr_at_end_of_chunk_dispatches_at_once() -> None:
    decoder = Decoder()
    assert decoder.feed(b"data: a\r\r") == [Event("a")]


def test_multibyte_character_split_across_chunks() -> None:
    stream = "data: \U0001f600\u00e9\n\n".encode()
    for cut in range(len(stream) + 1):
        assert feed_chunks([stream[:cut], stream[cut:]]) == [Event("\U0001f600\u00e9")]


def test_bom_split_across_chunks_is_stripped() -> None:
    assert feed_chunks([b"", b"\xef", b"\xbb", b"\xbfdata: a\n\n"]) == [Event("a")]


def test_feed_returns_events_as_soon_as_they_end() -> None:
    decoder = Decoder()
    assert decoder.feed(b"data: 1\n\ndata: 2\n") == [Event("1")]
    assert decoder.feed(b"\ndata: 3\n\n") == [Event("2"), Event("3")]


# --- decoder: state ---------------------------------------------------------------------

RETRY_CASES: dict[str, tuple[bytes, int | None]] = {
    "digits": (b"retry: 3000\n", 3000),
    "zero": (b"retry: 0\n", 0),
    "no space": (b"retry:15\n", 15),
    "leading zeros": (b"retry: 0010\n", 10),
    "none yet": (b"data: x\n\n", None),
    "non-digit ignored": (b"retry: 30x0\n", None),
    "negative ignored": (b"retry: -1\n", None),
    "decimal ignored": (b"retry: 1.5\n", None),
    "empty ignored": (b"retry:\n", None),
    "no colon ignored": (b"retry\n", None),
    "two spaces ignored": (b"retry:  10\n", None),
    "trailing space ignored": (b"retry: 10 \n", None),
    "non-ASCII digits ignored": ("retry: \u0663\u0660\n".encode(), None),
    "superscript ignored": ("retry: \u00b2\n".encode(), None),
    "invalid keeps the last valid": (b"retry: 10\nretry: x\n", 10),
    "last valid wins": (b"retry: 10\nretry: 20\n", 20),
    "too many digits ignored": (b"retry: 1\nretry: " + b"9" * 5000 + b"\n", 1),
}


@pytest.mark.parametrize(("stream", "expected"), RETRY_CASES.values(), ids=RETRY_CASES.keys())
def test_retry(stream: bytes, expected: int | None) -> None:
    whole, bytewise = Decoder(), Decoder()
    whole.feed(stream)
    for chunk in one_byte_at_a_time(stream):
        bytewise.feed(chunk)
    assert whole.retry == bytewise.retry == expected


def test_retry_applies_without_a_blank_line() -> None:
    decoder = Decoder()
    decoder.feed(b"retry: 500\n")
    assert decoder.retry == 500


def test_last_event_id_is_set_at_the_blank_line() -> None:
    decoder = Decoder()
    decoder.feed(b"id: 5\n")
    assert decoder.last_event_id == ""
    assert decoder.feed(b"\n") == []  # no data: nothing dispatched, but the ID is taken
    assert decoder.last_event_id == "5"
    assert decoder.feed(b"id: 6\ndata: x\n\n") == [Event("x", id="6")]
    assert decoder.last_event_id == "6"


def test_id_with_nul_leaves_last_event_id() -> None:
    decoder = Decoder()
    decoder.feed(b"id: 1\n\nid: 2\x00\n\n")
    assert decoder.last_event_id == "1"


def test_close_discards_the_incomplete_event_and_keeps_id_and_retry() -> None:
    decoder = Decoder()
    assert decoder.feed(b"retry: 100\nid: 1\ndata: a\n\nid: 2\nevent: x\ndata: b\n") == [
        Event("a", id="1")
    ]
    decoder.close()
    assert decoder.retry == 100
    assert decoder.last_event_id == "1"
    # A reconnection: the discarded block's id, event and data are gone.
    assert decoder.feed(b"data: c\n\n") == [Event("c", id="1")]


def test_close_drops_a_partial_character_and_line() -> None:
    decoder = Decoder()
    decoder.feed(b"data: a\n\ndata: \xe2\x82")
    decoder.close()
    assert decoder.feed(b"data: b\n\n") == [Event("b")]


def test_close_drops_a_pending_cr() -> None:
    decoder = Decoder()
    decoder.feed(b"data: a\r")
    decoder.close()
    assert decoder.feed(b"\ndata: b\n\n") == [Event("b")]


def test_next_stream_after_close_may_start_with_a_bom() -> None:
    decoder = Decoder()
    assert decoder.feed(b"\xef\xbb\xbfdata: a\n\n") == [Event("a")]
    decoder.close()
    assert decoder.feed(b"\xef\xbb\xbfdata: b\n\n") == [Event("b")]


# --- decoder: size bound --------------------------------------------------------------


def test_huge_data_line_that_never_ends_raises() -> None:
    decoder = Decoder(max_event_bytes=1000)
    decoder.feed(b"data: ")
    fed = 6
    with pytest.raises(EventTooLarge):
        for _ in range(100_000):
            fed += 7
            decoder.feed(b"x" * 7)
    assert 1000 < fed <= 1007  # raised by the chunk that took the line past the bound


def test_huge_comment_line_that_never_ends_raises() -> None:
    decoder = Decoder(max_event_bytes=100)
    with pytest.raises(EventTooLarge):
        for _ in range(200):
            decoder.feed(b":")


def test_many_data_lines_in_one_event_raise() -> None:
    stream = b"data: " + b"x" * 100 + b"\n"
    decoder = Decoder(max_event_bytes=1000)
    with pytest.raises(EventTooLarge):
        decoder.feed(stream * 20)
    decoder = Decoder(max_event_bytes=1000)
    with pytest.raises(EventTooLarge):
        for _ in range(20):
            decoder.feed(stream)


@pytest.mark.parametrize("chunks", ["whole", "bytes"])
def test_event_just_under_the_limit_is_fine(chunks: str) -> None:
    # The bound counts the data buffer plus the line being read: "data: " + 994 = 1000.
    stream = b"data: " + b"x" * 994 + b"\n\n"
    split = [stream] if chunks == "whole" else one_byte_at_a_time(stream)
    assert outcome(split, 1000) == [Event("x" * 994)]
    longer = b"data: " + b"x" * 995 + b"\n\n"
    split = [longer] if chunks == "whole" else one_byte_at_a_time(longer)
    assert outcome(split, 1000) == "EventTooLarge"


def test_limit_counts_the_data_buffer_and_the_current_line() -> None:
    # "data: a" leaves "a\n" (2) in the buffer; the next line may then be 998 characters.
    ok = b"data: a\n" + b"data: " + b"y" * 992 + b"\n\n"
    assert decode_every_way(ok, 1000) == [Event("a\n" + "y" * 992)]
    too_big = b"data: a\n" + b"data: " + b"y" * 993 + b"\n\n"
    assert outcome([too_big], 1000) == outcome(one_byte_at_a_time(too_big), 1000)
    assert outcome([too_big], 1000) == "EventTooLarge"


def test_limit_counts_characters_not_bytes() -> None:
    stream = ("data: " + "\u00e9" * 994 + "\n\n").encode()  # 1000 characters, 1994 bytes
    assert decode_every_way(stream, 1000) == [Event("\u00e9" * 994)]


def test_limit_is_per_event() -> None:
    stream = (b"data: " + b"x" * 900 + b"\n\n") * 10
    assert decode_every_way(stream, 1000) == [Event("x" * 900)] * 10


def test_a_trailing_incomplete_utf8_sequence_does_not_count_until_it_is_completed() -> None:
    # Found by the fuzz test: the stream has not ended, so b"\xe2\x82" is not a character
    # yet (the next chunk may complete it) and an 8-character limit still holds.
    assert outcome([b"event:::\xe2\x82"], 8) == []
    assert outcome([b"event:::\xe2\x82", b"\xac"], 8) == "EventTooLarge"


def test_limit_must_be_positive() -> None:
    with pytest.raises(ValueError):
        Decoder(max_event_bytes=0)


# --- properties -------------------------------------------------------------------------

FRAGMENTS = [
    b"data", b"id", b"event", b"retry", b":", b" ", b"\r", b"\n", b"\r\n", b"1", b"x",
    b"\xef\xbb\xbf", b"\xe2\x82", b"\xac", b"\xff", b"\x00", b"\xf0\x9f\x98\x80",
]
streams = st.lists(st.sampled_from(FRAGMENTS), max_size=60).map(b"".join)


@given(streams, st.data(), st.sampled_from([8, 40, 1 << 20]))
def test_fuzzed_stream_any_split_matches_reference(
    stream: bytes, data: st.DataObject, max_chars: int
) -> None:
    cuts = data.draw(st.lists(st.integers(0, len(stream)), max_size=20))
    expected = Reference().decode(stream, max_chars)
    assert outcome([stream], max_chars) == expected
    assert outcome(split_at(stream, cuts), max_chars) == expected
    assert outcome(one_byte_at_a_time(stream), max_chars) == expected


@given(streams)
def test_fuzzed_stream_state_matches_reference(stream: bytes) -> None:
    reference = Reference()
    reference.decode(stream, 1 << 20)
    decoder = Decoder()
    decoder.feed(stream)
    assert (decoder.retry, decoder.last_event_id) == (reference.retry, reference.last_event_id)


def normalise_line_ends(text: str) -> str:
    return re.sub(r"\r\n|\r", "\n", text)


no_line_ends = st.text().map(lambda s: s.replace("\r", "").replace("\n", ""))
frames = st.tuples(
    st.text(),  # data: any text, CR and LF included
    no_line_ends,  # event
    no_line_ends.map(lambda s: s.replace("\x00", "")),  # id
    st.none() | st.text(),  # comment
    st.none() | st.integers(0, 10**12),  # retry
)


@given(st.lists(frames, max_size=8), st.data())
def test_encode_then_decode_round_trips(
    frame_list: list[tuple[str, str, str, str | None, int | None]], data: st.DataObject
) -> None:
    stream = b"".join(
        encode(text, event=event, id=id, comment=comment, retry=retry)
        for text, event, id, comment, retry in frame_list
    )
    expected = [
        Event(normalise_line_ends(text), event or "message", id)
        for text, event, id, _comment, _retry in frame_list
    ]
    cuts = data.draw(st.lists(st.integers(0, len(stream)), max_size=30))
    decoder = Decoder()
    events: list[Event] = []
    for chunk in split_at(stream, cuts):
        events.extend(decoder.feed(chunk))
    assert events == expected
    retries = [retry for *_, retry in frame_list if retry is not None]
    assert decoder.retry == (retries[-1] if retries else None)
    assert decoder.last_event_id == (frame_list[-1][2] if frame_list else "")


@given(st.lists(st.tuples(st.text(), no_line_ends), max_size=8), st.data())
def test_encode_message_frames_round_trip(
    messages: list[tuple[str, str]], data: st.DataObject
) -> None:
    messages = [(text, id.replace("\x00", "")) for text, id in messages]
    stream = b"".join(encode_message(text, id) for text, id in messages)
    cuts = data.draw(st.lists(st.integers(0, len(stream)), max_size=30))
    assert feed_chunks(split_at(stream, cuts)) == [
        Event(normalise_line_ends(text), id=id) for text, id in messages
    ]
