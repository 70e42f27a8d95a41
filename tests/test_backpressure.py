"""Clients that never read cost bounded memory and are dropped on time (issue 13, points 2
and 5), through a real ``sseproxy serve`` process whose RSS is read from /proc.

The upstreams run in threads of the test process (the simulator, or a raw server of big
deltas), the clients are raw sockets with a small receive buffer that never read. Bounds
and deadlines have generous margins; the figures they guard are in the README ("Limits").
"""

from __future__ import annotations

import asyncio
import json
import socket
import threading
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from pathlib import Path
from typing import Any
from urllib.parse import quote

import httpx
import pytest
import servers
from servers import simulator
from test_cli import free_port, process

from sseproxy.mockupstream import Scenario

# The relay suites run on both upstream transports (issue 18; see conftest.py).
pytestmark = pytest.mark.usefixtures("upstream_transport")

CHAT = [{"role": "user", "content": "hi"}]
MIB = 1 << 20


def rss_bytes(pid: int) -> int:
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


def toml_value(value: Any) -> str:
    return json.dumps(value) if isinstance(value, str) else str(value).lower()


@asynccontextmanager
async def sseproxy(tmp_path: Path, keys: dict[str, Any]) -> AsyncIterator[tuple[str, int]]:
    """``sseproxy serve`` with ``keys`` (``"section.key": value``); yields its URL and PID."""
    sections: dict[str, list[str]] = {}
    defaults = {"pacing.mode": "off", "upstream.transport": servers.UPSTREAM_TRANSPORT}
    for key, value in {**defaults, **keys}.items():
        section, name = key.split(".", 1)
        sections.setdefault(section, []).append(f"{name} = {toml_value(value)}")
    conf = tmp_path / "sseproxy.toml"
    conf.write_text("".join(f"[{s}]\n" + "\n".join(lines) + "\n" for s, lines in sections.items()))
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    with process("serve", "--config", str(conf), "--port", str(port), url=base + "/healthz",
                 log=tmp_path / "serve.log") as proc:
        yield base, proc.pid


async def silent(base: str, request: bytes) -> socket.socket:
    """A client with a 4 KiB receive buffer that sends ``request`` and never reads."""
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.setblocking(False)
    loop = asyncio.get_running_loop()
    await loop.sock_connect(sock, ("127.0.0.1", int(base.rsplit(":", 1)[1])))
    await loop.sock_sendall(sock, request)
    return sock


def post(body: dict[str, Any]) -> bytes:
    data = json.dumps(body).encode()
    return (b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json"
            b"\r\nContent-Length: %d\r\n\r\n%b" % (len(data), data))


async def until(check: Any, within: float, what: str) -> float:
    """Poll the async ``check()`` until it is true; return how long it took."""
    start = time.monotonic()
    while not await check():
        if time.monotonic() - start > within:
            raise AssertionError(f"{what} did not happen within {within} s")
        await asyncio.sleep(0.05)
    return time.monotonic() - start


async def mock_stats(mock: str) -> dict[str, int]:
    async with httpx.AsyncClient() as c:
        return dict((await c.get(mock + "/mock/stats")).json())


async def test_clients_that_never_read_are_dropped_within_the_client_timeout(
    io_loop: Any, tmp_path: Path
) -> None:
    # Issue 13, point 5: 100 clients of a 20 deltas/s stream that never read. The kernel
    # used to autotune each send buffer to megabytes, so a flush kept completing for
    # minutes; with the send buffer capped (limits.client_sndbuf_bytes) it stalls within
    # about a second of these 1 KB deltas, and the subscriber is dropped client_timeout_s
    # later; with nobody following, the generation is abandoned after store.orphan_grace_s.
    timeout, clients = 1.0, 100
    word = "x" * 1000  # the simulator echoes the prompt: a 1 KB delta 20 times a second
    scenario = Scenario(text="echo", rate=20, tokens=2000)
    async with simulator() as mock, sseproxy(tmp_path, {
        "upstream.base_url": mock + "/v1", "upstream.model": scenario.to_model(),
        "stall.client_timeout_s": timeout, "stall.threshold_s": timeout,
        "store.orphan_grace_s": 0.5,
    }) as (base, pid):
        before = rss_bytes(pid)
        request = f"GET /v1/chat/stream?prompt={quote(word)} HTTP/1.1\r\nHost: x\r\n\r\n"
        socks = [await silent(base, request.encode()) for _ in range(clients)]
        try:
            async def all_open() -> bool:
                return (await mock_stats(mock))["requests"] == clients

            await until(all_open, 30, "all streams opening")
            peak, slowest_health = before, 0.0
            async with httpx.AsyncClient(timeout=5) as client:
                async def all_dropped() -> bool:
                    nonlocal peak, slowest_health
                    asked = time.monotonic()
                    assert (await client.get(base + "/healthz")).status_code == 200
                    slowest_health = max(slowest_health, time.monotonic() - asked)
                    peak = max(peak, rss_bytes(pid))
                    return (await mock_stats(mock))["open"] == 0

                took = await until(all_dropped, timeout + 14, "dropping every client")
                metrics = (await client.get(base + "/metrics")).text
        finally:
            for sock in socks:
                sock.close()
        stats = await mock_stats(mock)
    assert stats["cancelled"] == clients and stats["completed"] == 0
    assert f'sseproxy_streams_total{{outcome="abandoned"}} {clients}.0' in metrics
    assert f'sseproxy_stalls_total{{side="client"}} {clients}.0' in metrics
    assert took < timeout + 14
    assert slowest_health < 2.0
    assert peak - before < 64 * MIB, f"RSS grew by {(peak - before) / MIB:.0f} MiB"


class BigDeltas:
    """An OpenAI-compatible upstream, served from threads, that answers every request with
    deltas of ``size`` characters for as long as the reader takes them."""

    def __init__(self, size: int) -> None:
        chunk = {"id": "c", "object": "chat.completion.chunk", "model": "big",
                 "choices": [{"index": 0, "delta": {"content": "x" * size},
                              "finish_reason": None}]}
        frame = b"data: " + json.dumps(chunk).encode() + b"\n\n"
        self.chunk = b"%x\r\n%b\r\n" % (len(frame), frame)
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.listener.settimeout(0.2)
        self.url = f"http://127.0.0.1:{self.listener.getsockname()[1]}/v1"
        self.sent = 0  # deltas written whole, over every connection
        self.connections = 0
        self.ended = 0  # connections the reader closed
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._accept, daemon=True)]

    def _accept(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self.listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            self.connections += 1
            thread = threading.Thread(target=self._serve, args=(conn,), daemon=True)
            self._threads.append(thread)
            thread.start()

    def _serve(self, conn: socket.socket) -> None:
        conn.settimeout(0.2)
        with conn:
            try:
                if not self._read_request(conn):
                    return
                conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n"
                             b"Transfer-Encoding: chunked\r\n\r\n")
                while not self._stop.is_set():
                    view = memoryview(self.chunk)
                    while view and not self._stop.is_set():
                        try:
                            view = view[conn.send(view):]
                        except TimeoutError:
                            continue
                    self.sent += 1
            except OSError:
                self.ended += 1  # the reader hung up

    def _read_request(self, conn: socket.socket) -> bool:
        data = b""
        while b"\r\n\r\n" not in data:
            try:
                more = conn.recv(65536)
            except TimeoutError:
                if self._stop.is_set():
                    return False
                continue
            if not more:
                return False
            data += more
        head, _, body = data.partition(b"\r\n\r\n")
        length = next((int(line.split(b":")[1]) for line in head.split(b"\r\n")
                       if line.lower().startswith(b"content-length:")), 0)
        while len(body) < length:
            try:
                body += conn.recv(65536)
            except TimeoutError:
                if self._stop.is_set():
                    return False
        return True

    @contextmanager
    def serving(self) -> Iterator[BigDeltas]:
        self._threads[0].start()
        try:
            yield self
        finally:
            self._stop.set()
            self.listener.close()
            for thread in list(self._threads):
                thread.join(timeout=5)
            assert not any(t.is_alive() for t in self._threads), "upstream threads left"


async def test_1_mb_deltas_to_clients_that_never_read_cost_bounded_memory(
    io_loop: Any, tmp_path: Path
) -> None:
    # Issue 13, point 2: the upstream is paused once the queued text passes a bound in
    # bytes. It used to be 256 deltas, whatever their size: 1 MB deltas queued ~256 MB
    # per stream before the upstream was paused.
    timeout, clients = 3.0, 2
    with BigDeltas(MIB).serving() as upstream:
        async with sseproxy(tmp_path, {
            "upstream.base_url": upstream.url,
            "limits.max_event_bytes": 4 * MIB, "stall.client_timeout_s": timeout,
        }) as (base, pid):
            before = rss_bytes(pid)
            body = {"model": "big", "messages": CHAT, "stream": True}
            socks = [await silent(base, post(body)) for _ in range(clients)]
            try:
                async def opened() -> bool:
                    return upstream.connections == clients and upstream.sent >= clients

                await until(opened, 20, "the upstream answering every stream")
                peak = before

                async def dropped() -> bool:
                    nonlocal peak
                    peak = max(peak, rss_bytes(pid))
                    return upstream.ended == clients

                took = await until(dropped, timeout + 15, "dropping the clients")
            finally:
                for sock in socks:
                    sock.close()
            sent = upstream.sent
    assert took < timeout + 15
    # each stream: a bounded queue, one delta on its way out, the upstream's read, and what
    # the kernel buffers on both ends of the upstream connection (up to tens of MB)
    assert sent < clients * 64, f"the upstream wrote {sent} deltas of 1 MB"
    assert peak - before < clients * 16 * MIB, f"RSS grew by {(peak - before) / MIB:.0f} MiB"
