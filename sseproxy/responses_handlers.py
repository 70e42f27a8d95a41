"""Tornado handlers of the Responses API: ``/v1/responses`` and its background responses.

* ``POST /v1/responses`` validates the body (text only, see
  :func:`~sseproxy.validate.responses_create`), starts a generation whose log opens with
  the response object as created (a ``meta`` event, see :mod:`sseproxy.responses`), and
  answers as OpenAI does: the Responses event stream (``stream: true``), the finished
  response (``stream: false``), or, with ``background: true``, the queued response (or its
  event stream). A foreground response runs on a live log and is stopped when its client
  leaves; a background response runs on a retained log, to its end, followed or not.
* ``GET /v1/responses/{id}`` returns a background response as it is now;
  ``?stream=true&starting_after=N`` replays its events after sequence number ``N`` and
  follows it live.
* ``POST /v1/responses/{id}/cancel`` stops it (idempotent) and returns it.

With ``upstream.api = "responses"`` the generation relays the upstream's own events (the
log opens with ``relay_meta`` instead, see :mod:`sseproxy.responses`); the rest is the same.

The error rules are the chat endpoint's: before the headers an HTTP status with a JSON body
(an upstream refusal keeps its status), after them a ``response.failed`` event.
"""

from __future__ import annotations

import asyncio
import json
import sys
import time
from typing import Any

import structlog

from . import errors, validate
from .frames import dumps, dumps_in_slices
from .generation import Generation
from .handlers import BaseHandler, ChatCompletionsHandler, StreamingHandler, new_stream_id
from .record import Outcome, StreamRecord
from .responses import META, RELAY_META, ResponsesFrames, response_object
from .store import DONE, TEXT, Event, EventLog, FollowerClosed

log = structlog.get_logger("sseproxy.http")

#: Reading a log's present events for a snapshot gives up after this long.
SNAPSHOT_TIMEOUT_S = 5.0


def created_object(response_id: str, req: validate.ResponsesRequest) -> dict[str, Any]:
    """The response object as created: what ``response.created`` and the log's ``meta``
    event carry."""
    params = req.params
    return {
        "id": response_id,
        "object": "response",
        "created_at": int(time.time()),
        "status": "queued" if req.background else "in_progress",
        "background": req.background,
        "error": None,
        "incomplete_details": None,
        "instructions": req.instructions,
        "max_output_tokens": params.get("max_output_tokens"),
        "metadata": params.get("metadata") or {},
        "model": req.chat.model,
        "output": [],
        "parallel_tool_calls": False,
        "store": req.store,
        "temperature": params.get("temperature", 1.0),
        "text": {"format": {"type": "text"}},
        "tool_choice": "none",
        "tools": [],
        "top_p": params.get("top_p", 1.0),
        "truncation": "disabled",
        "usage": None,
        "user": params.get("user"),
    }


async def read_present(log_: EventLog) -> list[Event]:
    """Every event of a retained log that is there now."""
    loop = asyncio.get_running_loop()
    follower = log_.follow(0)
    last = log_.last
    events: list[Event] = []
    deadline = loop.time() + SNAPSHOT_TIMEOUT_S
    try:
        while follower.position < last and loop.time() < deadline:
            events += await follower.next(deadline)
    finally:
        follower.close()
    return events


def snapshot(events: list[Event]) -> dict[str, Any]:
    """The response object a log's events describe (its first event is ``meta``)."""
    if not events or events[0].kind not in (META, RELAY_META):
        raise errors.StreamNotFound("this stream is not a response")
    if events[0].kind == RELAY_META:
        frames = ResponsesFrames(sys.maxsize)  # builds no bytes: every event is "before"
        frames.events(events)
        return frames.snapshot(events[-1] if events[-1].final else None)
    meta: dict[str, Any] = json.loads(events[0].data)
    text = "".join(e.data for e in events if e.kind == TEXT)
    final = events[-1] if events and events[-1].final else None
    return response_object(meta, text, final)


def not_found(response_id: str) -> errors.StreamNotFound:
    return errors.StreamNotFound(
        f"no background response with id '{response_id}' (unknown, expired, or not run "
        "with background: true)")


class ResponsesHandler(ChatCompletionsHandler):
    """``POST /v1/responses``."""

    endpoint = "responses"

    async def post(self) -> None:
        self._stop_body_timer()
        if self._finished:  # answered while the body arrived (408)
            return
        req = self.accept(lambda: validate.responses_create(bytes(self._body), self.cfg),
                          too_large=self._too_large,
                          resumable=lambda req: req.background)
        if req is None or await self.over_limit(req.chat):
            return
        response_id = "resp_" + new_stream_id()
        # A foreground response ends with its client; a background one runs on regardless.
        self.cancel_on_leave = not req.background
        generation = await self.new_generation(req.chat, response_id, retained=req.background)
        generation.detached = req.background
        generation.relay = self.cfg.upstream.api == "responses"
        created = created_object(response_id, req)
        generation.log.append(RELAY_META if generation.relay else META, dumps(created))
        frames = ResponsesFrames(obfuscate=req.include_obfuscation)
        if req.background:
            if req.stream:
                self._start_response_stream(response_id)
                await self.follow(generation.log, 0, frames, generation.record)
            else:
                self._send_json(created)
            return
        if not await self.upstream_accepted(generation):
            return
        if not req.stream:
            await self._collect_response(generation)
            return
        self._start_response_stream(response_id)
        await self.follow(generation.log, 0, frames, generation.record)

    def _start_response_stream(self, response_id: str) -> None:
        self.start_stream()
        self.set_header("X-Stream-ID", response_id)

    def _send_json(self, obj: dict[str, Any]) -> None:
        self.set_header("Content-Type", "application/json; charset=utf-8")
        self.finish(dumps(obj))

    async def _collect_response(self, generation: Generation) -> None:
        """``stream: false``: read the whole reply from the live log, then answer once."""
        follower = generation.log.follow(0)
        loop = asyncio.get_running_loop()
        record = generation.record
        events: list[Event] = []
        size, limit = 0, self.cfg.limits.max_reply_bytes
        try:
            while not (events and events[-1].final):
                for event in await follower.next(loop.time() + 3600.0):
                    if event.kind == TEXT:
                        record.first_text()
                        size += len(event.data.encode("utf-8", "surrogatepass"))
                        if size > limit:
                            too_large = errors.ReplyTooLarge(limit)
                            generation.stop(Outcome.UPSTREAM_ERROR, too_large)
                            if not self._left:
                                self.send_error_object(too_large)
                            return
                    events.append(event)
        except FollowerClosed:
            return
        finally:
            follower.close()
            self.deps.registry.reader_done(generation)
        if self._left:
            return
        if events[-1].kind != DONE:
            assert record.error is not None
            self.send_error_object(record.error)
            return
        body = await dumps_in_slices(snapshot(events))
        if self.client_left():  # it went while the body was being encoded
            return
        record.sent(1, len(body))
        self.set_header("Content-Type", "application/json; charset=utf-8")
        self.finish(body)


class ResponseHandler(StreamingHandler):
    """``GET /v1/responses/{id}``: the response now, or (``stream=true``) its events."""

    endpoint = "responses"

    async def get(self, response_id: str) -> None:
        log_ = await self.deps.store.get(response_id)
        if log_ is None or not log_.retained:
            self.send_error_object(not_found(response_id))
            return
        structlog.contextvars.bind_contextvars(stream_id=response_id)
        if self.get_query_argument("stream", "false").lower() not in ("true", "1"):
            await self._send(snapshot(await read_present(log_)))
            return
        try:
            after = int(self.get_query_argument("starting_after", "-1"))
            obfuscate = self.get_query_argument("include_obfuscation", "true").lower() \
                not in ("false", "0")
        except ValueError:
            error = errors.RequestError("'starting_after' must be an integer")
            self.send_error_object(error)
            return
        self.start_stream()
        self.set_header("X-Stream-ID", response_id)
        if log_.ended:
            probe = ResponsesFrames(sys.maxsize)  # the last sequence number, no bytes
            probe.events(await read_present(log_))
            if after >= probe.last_sequence:
                self.finish_quietly()  # nothing after that event: an empty stream
                return
        metrics = self.deps.metrics
        record = self.deps.registry.record_of(response_id)
        if record is None:
            record = StreamRecord(metrics, response_id, self.endpoint, late=True)
        if after >= 0:
            metrics.resumes.inc()
            record.resumes += 1
            log.info("resume", stream_id=response_id, starting_after=after)
        frames = ResponsesFrames(after, obfuscate=obfuscate)
        await self.follow(log_, 0, frames, record)

    async def _send(self, obj: dict[str, Any]) -> None:
        body = await dumps_in_slices(obj)
        self.set_header("Content-Type", "application/json; charset=utf-8")
        self.finish(body)


class CancelResponseHandler(BaseHandler):
    """``POST /v1/responses/{id}/cancel``: stop a background response; idempotent."""

    async def post(self, response_id: str) -> None:
        log_ = await self.deps.store.get(response_id)
        if log_ is None or not log_.retained:
            self.send_error_object(not_found(response_id))
            return
        generation = self.deps.registry.get(response_id)
        if generation is not None:
            generation.stop(Outcome.CANCELLED, errors.StreamCancelled())
            await generation.wait_closed()
        elif not log_.ended:  # running on another instance (a shared store)
            try:
                await self.deps.store.cancel(response_id)
            except errors.StoreUnavailable as exc:
                self.send_error_object(exc)
                return
        body = await dumps_in_slices(snapshot(await read_present(log_)))
        self.set_header("Content-Type", "application/json; charset=utf-8")
        self.finish(body)


def routes(route: dict[str, Any]) -> list[Any]:
    """The routes of this module, for :func:`sseproxy.app.make_app`."""
    response_id = r"(resp_[0-9a-f]{32})"
    return [
        (r"/v1/responses", ResponsesHandler, route),
        (rf"/v1/responses/{response_id}", ResponseHandler, route),
        (rf"/v1/responses/{response_id}/cancel", CancelResponseHandler, route),
    ]
