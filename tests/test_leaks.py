"""The upstream key never leaks (issue 18, point 4): not in a response, an error body, a log
line or a metric. An upstream that echoes the request's ``Authorization`` header back in
every error (as a misconfigured gateway or a debugging proxy does) is driven through every
endpoint, on success, error statuses, a mid-stream error and timeouts; then everything the
run produced is scanned for the key."""

from __future__ import annotations

import asyncio
import io
import json
import logging
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager

import httpx
import pytest
import structlog
import tornado.web
from servers import running
from tornado.testing import bind_unused_port

from sseproxy import config, logs
from sseproxy.config import Persona

KEY = "sk-leaktest-7f3c9a1be42d4c0f8e6b5a3d2c1e0f9a8b7c6d5e"
NEEDLES = (KEY, KEY[12:36])  # the whole key, and a distinctive part of it
KEY_ENV = "LEAKTEST_UPSTREAM_KEY"
MODELS = ("ok", "e400", "e401", "e403", "e404", "e429", "e500", "e502text", "midstream",
          "hang")


class EchoUpstream(tornado.web.RequestHandler):
    """An OpenAI-like upstream whose errors repeat the request's Authorization header."""

    def initialize(self, seen: list[str]) -> None:
        self.seen = seen
        self.closed = asyncio.Event()

    def on_connection_close(self) -> None:
        self.closed.set()

    def echo(self) -> str:
        return self.request.headers.get("Authorization", "")

    def fail(self, status: int, text: bool = False) -> None:
        self.set_status(status)
        self.set_header("X-Echo", self.echo())
        if status == 429:
            self.set_header("Retry-After", "2")
        if text:
            self.set_header("Content-Type", "text/plain")
            self.finish(f"upstream trouble, request had Authorization: {self.echo()}")
            return
        self.set_header("Content-Type", "application/json")
        self.finish(json.dumps({"error": {
            "message": f"Incorrect API key provided: {self.echo()} ({KEY})",
            "type": f"invalid_request_error {self.echo()}", "param": self.echo(),
            "code": self.echo()}}))

    async def get(self) -> None:  # /v1/models
        self.seen.append(self.echo())
        self.fail(500)

    async def post(self) -> None:  # /v1/chat/completions or /v1/responses
        self.seen.append(self.echo())
        model = json.loads(self.request.body)["model"]
        if self.request.path.endswith("/responses"):
            await self.responses(model)
            return
        if model.startswith("e"):
            status = int(model[1:4])
            self.fail(status, text=model.endswith("text"))
            return
        if model == "hang":
            await self.closed.wait()  # never answers: sseproxy's deadline ends it
            return
        self.set_header("Content-Type", "text/event-stream")
        self.set_header("X-Echo", self.echo())
        chunk = {"id": "c1", "object": "chat.completion.chunk", "model": "echo",
                 "choices": [{"index": 0, "delta": {"content": "hello "}}]}
        self.write(f"data: {json.dumps(chunk)}\n\n")
        if model == "midstream":
            error = {"error": {"message": f"upstream failed for {self.echo()}",
                               "code": self.echo()}}
            self.write(f"data: {json.dumps(error)}\n\n")
            self.finish()
            return
        chunk["choices"] = [{"index": 0, "delta": {}, "finish_reason": "stop"}]
        usage = {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2}
        self.write(f"data: {json.dumps(chunk)}\n\n"
                   f"data: {json.dumps({'choices': [], 'usage': usage})}\n\ndata: [DONE]\n\n")
        self.finish()

    async def responses(self, model: str) -> None:
        """The same answers from a Responses upstream: its failures are events that a
        relay passes on (``response.failed``, ``error``), each echoing the key."""
        if model.startswith("e"):
            self.fail(int(model[1:4]), text=model.endswith("text"))
            return
        if model == "hang":
            await self.closed.wait()
            return
        self.set_header("Content-Type", "text/event-stream")
        response = {"id": "resp_1", "object": "response", "model": "echo",
                    "status": "in_progress", "output": [], "echo": self.echo()}
        events: list[dict[str, object]] = [
            {"type": "response.created", "response": response},
            {"type": "response.output_text.delta", "item_id": "m1", "output_index": 0,
             "content_index": 0, "delta": "hello "},
        ]
        if model == "midstream":
            events.append({"type": "error", "code": self.echo(), "param": None,
                           "message": f"upstream failed for {self.echo()}"})
            events.append({"type": "response.failed", "response": dict(
                response, status="failed", error={"code": self.echo(),
                                                  "message": f"failed: {self.echo()}"})})
        else:
            events.append({"type": "response.completed", "response": dict(
                response, status="completed", usage={
                    "input_tokens": 1, "output_tokens": 1, "total_tokens": 2})})
        for number, event in enumerate(events):
            event["sequence_number"] = number
            self.write(f"event: {event['type']}\ndata: {json.dumps(event)}\n\n")
        self.finish()


@asynccontextmanager
async def echo_upstream(seen: list[str]) -> AsyncIterator[str]:
    application = tornado.web.Application([(r"/v1/.*", EchoUpstream, {"seen": seen})])
    server = tornado.httpserver.HTTPServer(application)
    sock, port = bind_unused_port()
    server.add_sockets([sock])
    try:
        yield f"http://127.0.0.1:{port}/v1"
    finally:
        server.stop()
        await server.close_all_connections()


@pytest.fixture
def captured_logs() -> Iterator[io.StringIO]:
    out = io.StringIO()
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    logs.configure(config.LoggingSettings(format="json", level="debug"), out)
    # sseproxy's module-level loggers would keep this configuration for good (and later
    # tests' capture_logs would see nothing) if they cached it on first use.
    structlog.configure(cache_logger_on_first_use=False)
    yield out
    root.handlers[:] = handlers
    root.setLevel(level)
    structlog.reset_defaults()
    structlog.contextvars.clear_contextvars()


def dump(response: httpx.Response) -> str:
    head = "\n".join(f"{k}: {v}" for k, v in response.headers.multi_items())
    return f"{response.status_code}\n{head}\n\n{response.text}"


@pytest.mark.parametrize("api", ["chat_completions", "responses"])
async def test_the_upstream_key_appears_in_no_response_log_line_or_metric(
    monkeypatch: pytest.MonkeyPatch, captured_logs: io.StringIO, api: str,
) -> None:
    monkeypatch.setenv(KEY_ENV, KEY)
    seen: list[str] = []
    personas = {f"p-{m}": Persona(system="s", model=m) for m in MODELS}
    texts: list[str] = []
    async with echo_upstream(seen) as upstream_url:
        async with running(upstream_url=upstream_url, personas=personas,
                           upstream__kind="openai", upstream__api_key_env=KEY_ENV,
                           upstream__api=api,
                           upstream__first_token_timeout_s=0.5,
                           upstream__idle_timeout_s=0.5) as r:
            async with httpx.AsyncClient(base_url=r.url, timeout=20) as c:
                for model in MODELS:
                    for stream in (True, False):
                        body = {"model": model, "messages": [{"role": "user", "content": "x"}],
                                "stream": stream}
                        texts.append(dump(await c.post("/v1/chat/completions", json=body)))
                        texts.append(dump(await c.post(
                            "/v1/responses", json={"model": model, "input": "x",
                                                   "stream": stream})))
                    texts.append(dump(await c.get(
                        "/v1/chat/stream", params={"prompt": "x", "persona": f"p-{model}"})))
                    started = await c.post("/v1/streams", json={
                        "model": model, "messages": [{"role": "user", "content": "x"}]})
                    texts.append(dump(started))
                    texts.append(dump(await c.get(started.json()["events_url"])))
                    background = await c.post("/v1/responses", json={
                        "model": model, "input": "x", "background": True})
                    texts.append(dump(background))
                    response_id = background.json()["id"]
                    texts.append(dump(await c.get(f"/v1/responses/{response_id}",
                                                  params={"stream": "true"})))
                    texts.append(dump(await c.get(f"/v1/responses/{response_id}")))
                texts.append(dump(await c.get("/v1/models")))
                texts.append(dump(await c.get("/metrics")))
    everything = "\n".join(texts)
    # The run did reach the upstream with the key, and met every kind of answer.
    assert seen and all(s == f"Bearer {KEY}" for s in seen)
    log_text = captured_logs.getvalue()
    for needle in NEEDLES:
        assert needle not in everything, "the key reached a client or a metric"
        assert needle not in log_text, "the key reached a log line"
    for needle in ("upstream_auth_failed", "upstream_timeout", "rate_limited",
                   "upstream_http_500", "[redacted]", "hello "):
        assert needle in everything, needle
    assert "upstream_timeout" in log_text and '"event": "stream"' in log_text
