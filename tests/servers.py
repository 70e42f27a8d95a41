"""Real servers for end-to-end tests: the simulator and sseproxy on 127.0.0.1.

``running()`` starts both, yields their URLs, and stops both, whatever the test did.
sseproxy runs in the test's event loop (tests look inside it); the simulator runs in a
thread of its own with its own event loop (:class:`SimulatorThread`), so the tokens it
produces cost the test's loop nothing: a busy machine slows both, but a flood from the
simulator cannot starve the test's clients and timers of their loop.
Also a small EventSource-like reader that timestamps what arrives.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import dataclasses
import json
import socket
import threading
import time
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Mapping, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any, cast

import httpx
from tornado.testing import bind_unused_port

from sseproxy import app, config, mockupstream, sse
from sseproxy.config import Persona, Settings
from sseproxy.handlers import Deps


#: ``upstream.transport`` unless a test sets it (the ``upstream_transport`` fixture of
#: conftest.py runs a suite on each).
UPSTREAM_TRANSPORT = "fast"
#: How long the simulator thread may take to start or to stop.
SIMULATOR_TIMEOUT_S = 10.0


def _settle(fut: concurrent.futures.Future[Any], outcome: Any) -> None:
    """Resolve ``fut`` unless a waiter gave up on it (a cancelled future takes nothing)."""
    if fut.done():
        return
    with contextlib.suppress(concurrent.futures.InvalidStateError):
        if isinstance(outcome, BaseException):
            fut.set_exception(outcome)
        else:
            fut.set_result(outcome)


class SimulatorThread:
    """The simulator served from a thread with its own event loop.

    ``await start()`` returns its port once it listens; ``await stop()`` closes its
    connections, ends the loop and joins the thread, each within ``SIMULATOR_TIMEOUT_S``.
    """

    def __init__(self, defaults: mockupstream.Scenario = mockupstream.Scenario(),
                 **app_settings: Any) -> None:
        self.defaults = defaults
        self.app_settings = app_settings
        self.port = 0
        self._ready: concurrent.futures.Future[int] = concurrent.futures.Future()
        self._done: concurrent.futures.Future[None] = concurrent.futures.Future()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._thread = threading.Thread(target=self._run, name="simulator", daemon=True)

    def _run(self) -> None:
        try:
            asyncio.run(self._serve())
        except BaseException as exc:  # reported to whoever waits on start() or stop()
            _settle(self._ready, exc)
            _settle(self._done, exc)
        else:
            _settle(self._done, None)

    async def _serve(self) -> None:
        self._loop, self._stop = asyncio.get_running_loop(), asyncio.Event()
        server, port = await mockupstream.start(self.defaults, **self.app_settings)
        _settle(self._ready, port)
        try:
            await self._stop.wait()
        finally:
            server.stop()
            await asyncio.wait_for(server.close_all_connections(), SIMULATOR_TIMEOUT_S / 2)

    async def start(self) -> int:
        self._thread.start()
        fut = asyncio.wrap_future(self._ready)
        self.port = await asyncio.wait_for(fut, SIMULATOR_TIMEOUT_S)
        return self.port

    async def stop(self) -> None:
        if self._loop is not None and self._stop is not None and not self._done.done():
            with contextlib.suppress(RuntimeError):  # the loop has already ended
                self._loop.call_soon_threadsafe(self._stop.set)
        if self._thread.is_alive():
            await asyncio.wait_for(asyncio.wrap_future(self._done), SIMULATOR_TIMEOUT_S)
        self._thread.join(timeout=SIMULATOR_TIMEOUT_S)
        assert not self._thread.is_alive(), "the simulator thread did not stop"


@asynccontextmanager
async def simulator(defaults: mockupstream.Scenario = mockupstream.Scenario(),
                    **app_settings: Any) -> AsyncIterator[str]:
    """The simulator in its own thread; yields its base URL (without ``/v1``)."""
    sim = SimulatorThread(defaults, **app_settings)
    try:
        port = await sim.start()
        yield f"http://127.0.0.1:{port}"
    finally:
        await sim.stop()


async def eventually(check: Callable[[], bool], within: float = 10.0, what: str = "") -> None:
    """Wait until ``check()`` is true, polling; fail after ``within`` seconds."""
    deadline = time.monotonic() + within
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what or check} did not happen within {within} s")
        await asyncio.sleep(0.01)


def stream_logged(logs: Sequence[Mapping[str, Any]]) -> Callable[[], bool]:
    """Whether the canonical ``stream`` log line is among ``logs`` (written as a stream ends)."""
    return lambda: any(e.get("event") == "stream" for e in logs)


@dataclass
class Running:
    url: str
    mock_url: str
    settings: Settings
    deps: Deps
    overrides: dict[str, Any]

    async def mock_stats(self) -> dict[str, int]:
        async with httpx.AsyncClient() as c:
            r = await c.get(self.mock_url + "/mock/stats")
            return dict(r.json())

    async def wait_mock(self, key: str, value: int, within: float) -> float:
        """Poll the simulator until ``stats[key] == value``; return how long it took."""
        start = time.monotonic()
        while True:
            stats = await self.mock_stats()
            if stats[key] == value:
                return time.monotonic() - start
            if time.monotonic() - start > within:
                raise AssertionError(f"mock stats {stats}: {key} never became {value}")
            await asyncio.sleep(0.02)


@asynccontextmanager
async def running(
    scenario: mockupstream.Scenario | None = None,
    *,
    personas: Mapping[str, Persona] | None = None,
    upstream_url: str | None = None,
    sndbuf: int | None = None,
    config_file: str | None = None,
    **overrides: Any,
) -> AsyncIterator[Running]:
    """sseproxy in front of the simulator; ``scenario`` becomes the default model string.

    ``sndbuf`` sets ``limits.client_sndbuf_bytes`` (a slow link: a client that stops reading
    blocks sseproxy's flush quickly).
    """
    async with simulator() as mock_url:
        async with _sseproxy(mock_url, scenario, personas, upstream_url, sndbuf, config_file,
                             overrides) as r:
            yield r


@asynccontextmanager
async def instance(mock_url: str, scenario: mockupstream.Scenario | None = None,
                   **overrides: Any) -> AsyncIterator[Running]:
    """One more sseproxy in front of the simulator at ``mock_url`` (several instances
    sharing one store)."""
    async with _sseproxy(mock_url, scenario, None, None, None, None, overrides) as r:
        yield r


@asynccontextmanager
async def _sseproxy(
    mock_url: str,
    scenario: mockupstream.Scenario | None,
    personas: Mapping[str, Persona] | None,
    upstream_url: str | None,
    sndbuf: int | None,
    config_file: str | None,
    overrides: dict[str, Any],
) -> AsyncIterator[Running]:
    keys: dict[str, Any] = {"upstream.kind": "mock", "upstream.transport": UPSTREAM_TRANSPORT,
                            "upstream.base_url": upstream_url or mock_url + "/v1"}
    if config_file is None:
        # Relay tests count one event per upstream delta, so pacing is off unless a test
        # sets it (pacing__mode="smooth") or reads a config file.
        keys["pacing.mode"] = "off"
    if scenario is not None:
        keys["upstream.model"] = scenario.to_model()
    if sndbuf is not None:
        keys["limits.client_sndbuf_bytes"] = sndbuf
    keys.update({k.replace("__", "."): v for k, v in overrides.items()})
    settings = config.load(config_file, environ={}, overrides=keys)
    if personas:
        settings = dataclasses.replace(settings, personas=dict(personas))
    deps = await app.build_deps(settings)
    server = app.make_server(app.make_app(settings, deps), settings)
    sock, port = bind_unused_port()
    server.add_sockets([sock])
    try:
        yield Running(f"http://127.0.0.1:{port}", mock_url, settings, deps, keys)
    finally:
        server.stop()
        await server.close_all_connections()
        await app.close_deps(deps)


@dataclass
class Received:
    """What a streaming client saw, with arrival times (seconds since the request)."""

    status: int = 0
    headers: httpx.Headers = field(default_factory=httpx.Headers)
    raw: bytes = b""
    events: list[sse.Event] = field(default_factory=list)
    times: list[float] = field(default_factory=list)
    headers_at: float = 0.0
    pings: list[float] = field(default_factory=list)
    complete: bool = False  # the body ended cleanly (chunked terminator seen)

    def data(self) -> list[Any]:
        return [json.loads(e.data) if e.data != "[DONE]" else "[DONE]" for e in self.events]

    def content(self) -> str:
        """The relayed text, from EventSource deltas or OpenAI chunks."""
        out = []
        for e, d in zip(self.events, self.data(), strict=True):
            if e.event == "message" and isinstance(d, dict):
                if "content" in d:
                    out.append(d["content"])
                for choice in d.get("choices") or ():
                    out.append(choice["delta"].get("content") or "")
        return "".join(out)


async def stream(
    method: str,
    url: str,
    *,
    stop_after: int | None = None,
    timeout: float = 20.0,
    **kwargs: Any,
) -> Received:
    """Read an event stream to its end (or until ``stop_after`` events, then hang up)."""
    got = Received()
    start = time.monotonic()
    decoder = sse.Decoder()
    async with httpx.AsyncClient(timeout=timeout) as client:
        async with client.stream(method, url, **kwargs) as response:
            got.status, got.headers = response.status_code, response.headers
            got.headers_at = time.monotonic() - start
            try:
                # an async generator, though typed as a plain iterator
                raw = cast(AsyncGenerator[bytes, None], response.aiter_raw())
                async with contextlib.aclosing(raw) as chunks:
                    async for chunk in chunks:
                        now = time.monotonic() - start
                        got.raw += chunk
                        if b": ping" in chunk:
                            got.pings.append(now)
                        for event in decoder.feed(chunk):
                            got.events.append(event)
                            got.times.append(now)
                        if stop_after is not None and len(got.events) >= stop_after:
                            return got
                got.complete = True
            except httpx.RemoteProtocolError:
                got.complete = False
    return got


@asynccontextmanager
async def silent_client(r: Running, path: str = "/v1/chat/stream?prompt=hi",
                        request: bytes | None = None) -> AsyncIterator[socket.socket]:
    """A raw client with a tiny receive buffer that sends a GET (or ``request``) and never
    reads."""
    sock = socket.socket()
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.setblocking(False)
        loop = asyncio.get_running_loop()
        await loop.sock_connect(sock, ("127.0.0.1", int(r.url.rsplit(":", 1)[1])))
        await loop.sock_sendall(
            sock, request or f"GET {path} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
        yield sock
    finally:
        sock.close()
