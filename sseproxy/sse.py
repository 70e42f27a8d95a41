"""The Server-Sent Events codec: frames out (:func:`encode`), events in (:class:`Decoder`).

Pure: no I/O, no clock. :func:`encode` turns fields into the bytes of one frame;
:func:`encode_message` is the same for the per-token ``id`` + ``data`` frame, made cheap.
:class:`Decoder` is a port of the WHATWG HTML algorithm "Interpreting an event stream"
(section 9.2.6): feed it the response body in chunks of any size and it returns the events
dispatched so far; any split of the same bytes gives the same events.

Deliberate divergences from the spec, or additions to it:

- Size bound (not in the spec): the characters (Unicode code points, not bytes) of the
  current event's data buffer plus the line being read (field name, colon and value,
  without its line end) may not exceed ``max_event_bytes``, else :class:`EventTooLarge`
  is raised, so memory stays bounded even when a line never ends. The check is made per
  line, so the outcome does not depend on how the input was split into chunks.
- ``retry`` values of more digits than Python converts to an ``int`` (4300) are ignored.
- :meth:`Decoder.close` ends one stream and readies the decoder for the next one (a
  reconnect): the incomplete event, including an ``id`` field inside it, is discarded, the
  next stream may start with its own BOM, and the last event ID and ``retry`` are kept, so
  events without an ``id`` field still carry the last dispatched ID.
- The encoder cannot write a field the spec would misread: CR and LF are removed from
  ``id`` and ``event``, NUL from ``id`` (a spec decoder ignores such an ID), data and
  comments are split into one line per line. Lone surrogates, which have no UTF-8 form,
  are written as U+FFFD, as a browser would show the bytes it could not decode.
"""

from __future__ import annotations

import codecs
import re
from dataclasses import dataclass
from typing import Final

from sseproxy.errors import EventTooLarge

__all__ = ["Decoder", "Event", "encode", "encode_message"]

_LINE_END: Final = re.compile(r"\r\n|\r|\n")
_BOM: Final = "\ufeff"


@dataclass(slots=True)
class Event:
    """One dispatched event, as an ``EventSource`` would hand it to a listener.

    Read-only by convention, not ``frozen``: one is made per upstream event, and a frozen
    dataclass's ``__init__`` costs about three times as much.
    """

    data: str
    #: The event type; ``"message"`` when no (or an empty) ``event`` field was given.
    event: str = "message"
    #: The last event ID buffer at dispatch time: it persists across events until an
    #: ``id`` field changes it (``MessageEvent.lastEventId`` in a browser).
    id: str = ""


# --- encoding ----------------------------------------------------------------


def _utf8(text: str) -> bytes:
    try:
        return text.encode("utf-8")
    except UnicodeEncodeError:
        # Lone surrogates (a JSON "\ud83d" decodes to one): pair what pairs up, U+FFFD the rest.
        fixed = text.encode("utf-16-le", "surrogatepass").decode("utf-16-le", "replace")
        return fixed.encode("utf-8")


def encode(
    data: str | None = None,
    *,
    event: str | None = None,
    id: str | None = None,
    retry: int | None = None,
    comment: str | None = None,
) -> bytes:
    """Encode one frame: comment lines, ``retry``, ``id``, ``event``, ``data``, blank line.

    ``data`` and ``comment`` are split on CRLF, CR and LF into one line each (``data=""``
    is one empty ``data:`` line, which a decoder dispatches as an event with empty data).
    CR and LF are removed from ``event`` and ``id``, and NUL from ``id``. ``retry`` is the
    reconnection time in milliseconds, a non-negative ``int``. A ValueError is raised for
    an invalid ``retry`` or when no field at all is given.
    """
    lines: list[str] = []
    if comment is not None:
        lines.extend(f": {line}\n" for line in _LINE_END.split(comment))
    if retry is not None:
        if isinstance(retry, bool) or not isinstance(retry, int) or retry < 0:
            raise ValueError(f"retry must be a non-negative int (milliseconds), not {retry!r}")
        lines.append(f"retry: {retry}\n")
    if id is not None:
        if "\n" in id or "\r" in id or "\0" in id:
            id = id.replace("\r", "").replace("\n", "").replace("\0", "")
        lines.append(f"id: {id}\n")
    if event is not None:
        if "\n" in event or "\r" in event:
            event = event.replace("\r", "").replace("\n", "")
        lines.append(f"event: {event}\n")
    if data is not None:
        if "\n" in data or "\r" in data:
            lines.extend(f"data: {line}\n" for line in _LINE_END.split(data))
        else:
            lines.append(f"data: {data}\n")
    if not lines:
        raise ValueError("encode() needs at least one field")
    lines.append("\n")
    return _utf8("".join(lines))


def encode_message(data: str, id: str) -> bytes:
    """The bytes of ``encode(data, id=id)``, made cheap for the one-frame-per-token path."""
    if "\n" in data or "\r" in data or "\n" in id or "\r" in id or "\0" in id:
        return encode(data, id=id)
    try:
        return f"id: {id}\ndata: {data}\n\n".encode("utf-8")
    except UnicodeEncodeError:
        return encode(data, id=id)


# --- decoding ----------------------------------------------------------------


class Decoder:
    """Incremental decoder of one ``text/event-stream`` body (WHATWG rules).

    ``feed()`` returns the events completed by each chunk; ``close()`` marks the end of
    the stream. ``retry`` is the last valid ``retry`` field seen (milliseconds), or None;
    ``last_event_id`` is the event source's last event ID string: the ID buffer as it was
    at the last blank line (what a browser would send as ``Last-Event-ID``).

    After :class:`EventTooLarge` the stream is broken: do not feed the decoder again.
    """

    __slots__ = (
        "retry",
        "last_event_id",
        "_max",
        "_utf8",
        "_started",
        "_after_cr",
        "_partial",
        "_partial_len",
        "_data",
        "_data_len",
        "_event_type",
        "_id",
    )

    retry: int | None
    last_event_id: str

    def __init__(self, max_event_bytes: int = 1 << 20) -> None:
        """``max_event_bytes`` bounds one event, counted in characters (see the module)."""
        if max_event_bytes < 1:
            raise ValueError(f"max_event_bytes must be positive, not {max_event_bytes!r}")
        self._max = max_event_bytes
        self.retry = None
        self.last_event_id = ""
        self._id = ""  # the last event ID buffer
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._started = False  # has the stream produced its first character (BOM check)?
        self._after_cr = False  # did the last text end in CR (so a leading LF is not a line)?
        # The incomplete last line, in a few pieces of decreasing length.
        self._partial: list[str] = []
        self._partial_len = 0
        self._data: list[str] = []  # the data buffer, one item per data field
        self._data_len = 0  # characters of the data buffer, each item's LF included
        self._event_type = ""

    def feed(self, chunk: bytes) -> list[Event]:
        """Decode the next chunk of the body; return the events it completed, in order."""
        text = self._utf8.decode(chunk)
        if not text:
            return []
        if not self._started:
            self._started = True
            if text[0] == _BOM:
                text = text[1:]
        if self._after_cr:
            self._after_cr = False
            if text[:1] == "\n":
                text = text[1:]
        if "\r" in text:
            self._after_cr = text[-1] == "\r"
            text = text.replace("\r\n", "\n").replace("\r", "\n")
        lines = text.split("\n")
        tail = lines.pop()
        events: list[Event] = []
        if lines:
            if self._partial:
                self._partial.append(lines[0])
                lines[0] = "".join(self._partial)
                self._partial = []
                self._partial_len = 0
            for line in lines:
                self._line(line, events)
        if tail:
            self._hold(tail)
        return events

    def close(self) -> None:
        """End of stream: discard an incomplete event; keep ``last_event_id`` and ``retry``.

        The decoder is then ready for the body of a reconnection.
        """
        self._utf8.reset()
        self._started = False
        self._after_cr = False
        self._partial = []
        self._partial_len = 0
        self._data = []
        self._data_len = 0
        self._event_type = ""
        self._id = self.last_event_id

    def _hold(self, piece: str) -> None:
        """Keep ``piece`` of a line that has not ended yet, within the size bound."""
        self._partial_len += len(piece)
        if self._data_len + self._partial_len > self._max:
            raise EventTooLarge(f"an event exceeded {self._max} characters")
        partial = self._partial
        partial.append(piece)
        # Merge the last piece into its left neighbour while that is not longer, so a line
        # fed one byte at a time is kept in O(log n) pieces, copied O(n log n) times in all.
        while len(partial) > 1 and len(partial[-1]) >= len(partial[-2]):
            last = partial.pop()
            partial[-1] += last

    def _line(self, line: str, events: list[Event]) -> None:
        """Process one complete line (without its line end), appending a dispatched event."""
        if not line:  # a blank line dispatches the event
            self.last_event_id = self._id
            if self._data:
                events.append(Event("\n".join(self._data), self._event_type or "message", self._id))
                self._data = []
                self._data_len = 0
            self._event_type = ""
            return
        if self._data_len + len(line) > self._max:
            raise EventTooLarge(f"an event exceeded {self._max} characters")
        colon = line.find(":")
        if colon == 0:  # a comment
            return
        if colon < 0:
            name, value = line, ""
        else:
            name = line[:colon]
            value = line[colon + 2 :] if line.startswith(" ", colon + 1) else line[colon + 1 :]
        if name == "data":
            self._data.append(value)
            self._data_len += len(value) + 1
        elif name == "event":
            self._event_type = value
        elif name == "id":
            if "\0" not in value:
                self._id = value
        elif name == "retry":
            if value.isascii() and value.isdigit():
                try:
                    self.retry = int(value)
                except ValueError:  # more digits than int() accepts (sys.int_info)
                    pass
