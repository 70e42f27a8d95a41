"""What an upstream decoder hands the rest of sseproxy: :class:`Delta`, one step of a reply.

Each upstream API has its own small, pure decoder (:mod:`sseproxy.upstream_chat`,
:mod:`sseproxy.upstream_responses`) that turns one server-sent event into at most one
:class:`Delta`; :mod:`sseproxy.upstream` reads the bytes and the generation consumes the
deltas, whichever API the upstream speaks.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Protocol

from .errors import SSEProxyError


@dataclass(slots=True)
class Delta:
    """One step of the reply: text, the role, the finish reason or the token usage.

    ``event``, when set, is a log event ``(kind, data)`` that goes into the stream's log
    before this delta's text, in order with the paced text: an upstream Responses event
    relayed to a ``/v1/responses`` client (see :mod:`sseproxy.upstream_responses`).

    Read-only by convention, not ``frozen``: one is made per token (see ``sse.Event``).
    """

    content: str = ""
    role: str | None = None
    finish_reason: str | None = None
    usage: Mapping[str, Any] | None = None
    event: tuple[str, str] | None = None


class Decoder(Protocol):
    """One upstream reply's decoder: server-sent events in, deltas out; no I/O."""

    #: The model the upstream says it used, once it said so.
    model: str | None
    #: The reply is over (``[DONE]``, or a Responses stream's final event).
    done: bool
    #: A failure the upstream reported in an event that was still relayed (a Responses
    #: ``response.failed`` or ``error`` event): raised once that event's delta is passed on.
    failure: SSEProxyError | None

    def decode(self, name: str, data: str) -> Delta | None:
        """The delta of one event (``name`` is its ``event:`` field, ``data`` its data);
        None when it carries nothing. Raises the mapped :mod:`sseproxy.errors` error."""
