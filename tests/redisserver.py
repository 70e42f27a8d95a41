"""A real ``redis-server`` on a free loopback port, started and stopped by the tests.

:class:`RedisServer` runs Debian's ``redis-server`` with no persistence (``--save ""
--appendonly no``) in a temporary directory; ``stop()`` ends it by its PID and ``start()``
brings it back on the same port (a Redis outage and its end); ``pause()`` and ``resume()``
freeze and thaw it (a Redis that hangs). ``redis_server()`` is the
context manager the tests use.
"""

from __future__ import annotations

import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from typing import Any

import pytest
from servers import Running, instance, simulator

from sseproxy.mockupstream import Scenario

#: How long redis-server may take to answer after it was started.
START_TIMEOUT_S = 10.0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _answers(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5) as conn:
            conn.sendall(b"PING\r\n")
            return conn.recv(16).startswith(b"+PONG")
    except OSError:
        return False


class RedisServer:
    """One redis-server process on 127.0.0.1 (see the module docstring)."""

    def __init__(self) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            pytest.skip("redis-server is not installed (Debian package redis-server)")
        self.binary = binary
        self.port = _free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.dir = tempfile.TemporaryDirectory(prefix="sseproxy-redis-")
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        self.proc = subprocess.Popen(
            [self.binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
             "--appendonly", "no", "--dir", self.dir.name, "--daemonize", "no",
             "--loglevel", "warning"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + START_TIMEOUT_S
        while not _answers(self.port):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(f"redis-server did not start on port {self.port}")
            time.sleep(0.02)

    def stop(self) -> None:
        proc, self.proc = self.proc, None
        if proc is not None and proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()

    def pause(self) -> None:
        """Freeze redis-server (SIGSTOP): connections stay open, nothing answers, so every
        call waits for its timeout (a Redis that hangs, not one that is down)."""
        assert self.proc is not None
        self.proc.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        """Let a paused redis-server run again (SIGCONT)."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGCONT)

    def close(self) -> None:
        self.resume()  # a stopped process would not act on the SIGTERM
        self.stop()
        self.dir.cleanup()


@contextmanager
def redis_server() -> Iterator[RedisServer]:
    server = RedisServer()
    try:
        server.start()
        yield server
    finally:
        server.close()


@asynccontextmanager
async def pair(redis: RedisServer, scenario: Scenario,
               **overrides: Any) -> AsyncIterator[tuple[Running, Running]]:
    """Instances A and B in front of one simulator, sharing ``redis``."""
    keys = {"store__backend": "redis", "store__redis_url": redis.url,
            "store__redis_timeout_s": 0.5, **overrides}
    async with simulator() as mock_url:
        async with instance(mock_url, scenario, **keys) as a:
            async with instance(mock_url, scenario, **keys) as b:
                yield a, b
