"""A hostile upstream for end-to-end tests: raw bytes on a socket, in a process of its own.

``python tests/hostile.py`` listens on 127.0.0.1 (port 0 unless ``--port``), prints its
port, and answers every ``POST …/chat/completions`` with the behaviour the request names:
the path segment after ``/b/`` (``{url}/b/early-413/v1`` as ``upstream.base_url``), else
the request's ``model``. The behaviours are what an adversary or a broken server sends
(issue 13): gzip bombs, floods of blank lines, a line that never ends, a trickle of one
byte per tick, an endless reply, a long one, malformed heads, odd ``Retry-After`` values, and a 413
sent before the request body was read. ``GET /stats`` answers how many replies of each
behaviour were started and how many the client cut off before their end.

It runs in its own process so the load it makes is not on the test's event loop (nor its
GIL). Everything is bounded in time: each connection for ``CONNECTION_LIMIT_S``, the
process for ``--time-limit`` seconds, after which it exits by itself.
:func:`hostile` starts one for a test and stops it (by its PID) afterwards.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import email.utils
import json
import os
import random
import string
import subprocess
import sys
import time
import zlib
from collections import Counter
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass

CONNECTION_LIMIT_S = 60.0
#: The role chunk and one token, as an OpenAI upstream starts a reply.
ROLE = b'data: {"choices":[{"index":0,"delta":{"role":"assistant"},"finish_reason":null}]}\n\n'
STOP = (b'data: {"choices":[{"index":0,"delta":{},"finish_reason":"stop"}]}\n\n'
        b"data: [DONE]\n\n")
OPENAI_ERROR_413 = (b'{"error": {"message": "the request is too large", '
                    b'"type": "invalid_request_error", "code": "request_too_large"}}')


def token(text: str) -> bytes:
    chunk = {"choices": [{"index": 0, "delta": {"content": text}, "finish_reason": None}]}
    return b"data: " + json.dumps(chunk).encode() + b"\n\n"


def chunk(data: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(data), data)


def head(status: str = "200 OK", *extra: str) -> bytes:
    lines = [f"HTTP/1.1 {status}", *extra]
    if status.startswith("200"):
        lines += ["Content-Type: text/event-stream", "Transfer-Encoding: chunked"]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


def bomb(block: bytes, inflated: int) -> bytes:
    """A gzip body that inflates to ``inflated`` bytes of ``block`` repeated."""
    packer = zlib.compressobj(9, zlib.DEFLATED, zlib.MAX_WBITS | 16)
    unit = block * max(1, (1 << 20) // len(block))
    parts = [packer.compress(unit) for _ in range(inflated // len(unit))]
    return b"".join([*parts, packer.flush()])


@dataclass
class Conn:
    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter
    stats: Counter[str]
    name: str = ""

    async def send(self, data: bytes) -> None:
        self.writer.write(data)
        await self.writer.drain()

    async def tick(self, seconds: float) -> None:
        await asyncio.sleep(seconds)  # the upstream's own pace, not a synchronisation


Behaviour = Callable[[Conn], Awaitable[None]]
BEHAVIOURS: dict[str, Behaviour] = {}
_BOMBS: dict[str, bytes] = {}


def behaviour(name: str) -> Callable[[Behaviour], Behaviour]:
    def register(fn: Behaviour) -> Behaviour:
        BEHAVIOURS[name] = fn
        return fn
    return register


@behaviour("normal")
async def _normal(c: Conn) -> None:
    """40 tokens at 20 per second, then the end: the well-behaved neighbour."""
    await c.send(head() + chunk(ROLE))
    for i in range(40):
        await c.send(chunk(token(f"t{i} ")))
        await c.tick(0.05)
    await c.send(chunk(STOP) + b"0\r\n\r\n")


async def _gzip_bomb(c: Conn, block: bytes) -> None:
    if c.name not in _BOMBS:  # 256 MB inflated; zlib works outside the GIL
        _BOMBS[c.name] = await asyncio.to_thread(bomb, block, 256 << 20)
    body = _BOMBS[c.name]
    await c.send(head("200 OK", "Content-Encoding: gzip"))
    for i in range(0, len(body), 64 * 1024):
        await c.send(chunk(body[i:i + 64 * 1024]))
    await c.send(b"0\r\n\r\n")


@behaviour("gzip-bomb")
async def _gzip_events(c: Conn) -> None:
    """1 MB of gzip that inflates to 256 MB of token events."""
    await _gzip_bomb(c, token("boom "))


@behaviour("gzip-newlines")
async def _gzip_newlines(c: Conn) -> None:
    """A few hundred KB of gzip that inflates to 256 MB of blank lines."""
    await _gzip_bomb(c, b"\n")


@behaviour("newline-flood")
async def _newline_flood(c: Conn) -> None:
    """One token, then blank lines as fast as the socket takes them (no event ever)."""
    await c.send(head() + chunk(ROLE + token("hello")))
    lines = chunk(b"\n" * 65536)
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        await c.send(lines)


@behaviour("trickle-line")
async def _trickle_line(c: Conn) -> None:
    """One token, then one byte every 0.2 s of a line that never ends."""
    await c.send(head() + chunk(ROLE + token("hello") + b'data: {"choices": "'))
    while True:
        await c.send(chunk(b"a"))
        await c.tick(0.2)


@behaviour("trickle-comment")
async def _trickle_comment(c: Conn) -> None:
    """One token, then a ``:`` comment every 0.2 s."""
    await c.send(head() + chunk(ROLE + token("hello")))
    while True:
        await c.send(chunk(b": still thinking\n\n"))
        await c.tick(0.2)


@behaviour("slow-forever")
async def _slow_forever(c: Conn) -> None:
    """A token every 0.2 s, never ending: only a total deadline stops it."""
    await c.send(head() + chunk(ROLE))
    while True:
        await c.send(chunk(token("more ")))
        await c.tick(0.2)


@behaviour("endless")
async def _endless(c: Conn) -> None:
    """16 KB tokens as fast as they are read, up to 256 MB, then a close without [DONE]."""
    await c.send(head() + chunk(ROLE))
    piece = chunk(token("x" * 16384) * 4)
    for _ in range((256 << 20) // len(piece)):
        await c.send(piece)


@behaviour("huge-deltas")
async def _huge_deltas(c: Conn) -> None:
    """Deltas of 1 MB each."""
    await c.send(head() + chunk(ROLE))
    piece = token("y" * 1_000_000)
    for _ in range(64):
        await c.send(chunk(piece))
    await c.send(chunk(STOP) + b"0\r\n\r\n")


@behaviour("endless-line")
async def _endless_line(c: Conn) -> None:
    """One token, then a data line that never ends, 256 MB of it at socket speed."""
    await c.send(head() + chunk(ROLE + token("hello") + b"data: "))
    piece = chunk(b"z" * 65536)
    for _ in range(4096):
        await c.send(piece)


def long_text(size: int = 16 << 20) -> str:
    """``size`` characters of words that compress as prose does (the same on every call)."""
    rng = random.Random(13)
    words = ["".join(rng.choices(string.ascii_lowercase, k=rng.randint(1, 9)))
             for _ in range(5000)]
    return " ".join(rng.choices(words, k=size // 5))[:size]


@behaviour("long-reply")
async def _long_reply(c: Conn) -> None:
    """:func:`long_text` (16 MiB) in deltas of 16 KiB as fast as they are read, then the end:
    a long but well-formed reply."""
    if c.name not in _BOMBS:
        text = await asyncio.to_thread(long_text)
        _BOMBS[c.name] = b"".join(chunk(token(text[i:i + 16384]))
                                  for i in range(0, len(text), 16384))
    await c.send(head() + chunk(ROLE))
    body = _BOMBS[c.name]
    for i in range(0, len(body), 1 << 20):
        await c.send(body[i:i + (1 << 20)])
    await c.send(chunk(STOP) + b"0\r\n\r\n")


def _retry_after(value: bytes) -> Behaviour:
    async def answer(c: Conn) -> None:
        body = b'{"error": {"message": "slow down", "type": "requests", "code": null}}'
        await c.send(b"HTTP/1.1 429 Too Many Requests\r\nContent-Type: application/json\r\n"
                     b"Retry-After: " + value + b"\r\nContent-Length: %d\r\n\r\n" % len(body)
                     + body)
    return answer


BEHAVIOURS.update({
    "retry-after-cr": _retry_after(b"5\r7"),
    "retry-after-non-ascii": _retry_after(b"5\xff"),
    "retry-after-long": _retry_after(b"9" * 60_000),
    "retry-after-garbage": _retry_after(b"soon, maybe"),
    "retry-after-seconds": _retry_after(b"7"),
    "retry-after-huge": _retry_after(b"86400"),
})


@behaviour("retry-after-date")
async def _retry_after_date(c: Conn) -> None:
    await _retry_after(email.utils.formatdate(time.time() + 120, usegmt=True).encode())(c)


@behaviour("status-000")
async def _status_000(c: Conn) -> None:
    await c.send(b"HTTP/1.1 000 OK\r\nContent-Type: text/event-stream\r\n"
                 b"Content-Length: 0\r\n\r\n")


@behaviour("te-gzip-chunked")
async def _te_gzip_chunked(c: Conn) -> None:
    await c.send(b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n"
                 b"Transfer-Encoding: gzip, chunked\r\n\r\n" + chunk(ROLE))


@behaviour("early-413")
async def _early_413(c: Conn) -> None:
    """Answers 413 after the request head, never reads the body, and closes."""
    await c.send(b"HTTP/1.1 413 Payload Too Large\r\nContent-Type: application/json\r\n"
                 b"Connection: close\r\nContent-Length: %d\r\n\r\n" % len(OPENAI_ERROR_413)
                 + OPENAI_ERROR_413)


# --- the server -------------------------------------------------------------------------

EARLY = ("early-413",)  # behaviours that answer before the body is read


async def serve(port: int, time_limit: float) -> None:
    stats: Counter[str] = Counter()

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        name = ""
        try:
            async with asyncio.timeout(CONNECTION_LIMIT_S):
                request = await reader.readuntil(b"\r\n\r\n")
                target = request.split(b" ", 2)[1].decode()
                if target == "/stats":
                    data = json.dumps(stats).encode()
                    writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                                 b"Connection: close\r\nContent-Length: %d\r\n\r\n%s"
                                 % (len(data), data))
                    await writer.drain()
                    return
                if target.startswith("/b/"):
                    name = target.split("/")[2]
                length = 0
                for line in request.split(b"\r\n"):
                    if line.lower().startswith(b"content-length:"):
                        length = int(line.split(b":")[1])
                if name not in EARLY:
                    body = await reader.readexactly(length)
                    name = name or json.loads(body)["model"]
                stats[f"{name}.started"] += 1
                await BEHAVIOURS[name](Conn(reader, writer, stats, name))
                stats[f"{name}.ended"] += 1
        except (ConnectionError, asyncio.IncompleteReadError):
            stats[f"{name}.cut"] += 1  # the client (sseproxy) closed the connection
        except TimeoutError:
            stats[f"{name}.timed_out"] += 1
        finally:
            writer.transport.abort()

    server = await asyncio.start_server(handle, "127.0.0.1", port)
    print(server.sockets[0].getsockname()[1], flush=True)
    await asyncio.sleep(time_limit)  # the process's own bound: it exits after this


@dataclass
class Hostile:
    url: str
    process: subprocess.Popen[bytes]

    def base_url(self, behaviour: str | None = None) -> str:
        """``upstream.base_url`` answering with ``behaviour`` (else the request's model)."""
        return f"{self.url}/b/{behaviour}/v1" if behaviour else f"{self.url}/v1"

    def stats(self) -> Counter[str]:
        import httpx  # the test process only
        return Counter(httpx.get(self.url + "/stats", timeout=5).json())


@contextlib.contextmanager
def hostile(time_limit: float = 120.0) -> Iterator[Hostile]:
    """Start a hostile upstream process; stop it (by its PID) when the block ends."""
    proc = subprocess.Popen([sys.executable, __file__, "--time-limit", str(time_limit)],
                            stdout=subprocess.PIPE)
    try:
        assert proc.stdout is not None
        port = int(proc.stdout.readline())
        yield Hostile(f"http://127.0.0.1:{port}", proc)
    finally:
        proc.kill()
        proc.wait(timeout=10)
        if proc.stdout is not None:
            proc.stdout.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--time-limit", type=float, default=120.0)
    args = parser.parse_args()
    try:
        asyncio.run(serve(args.port, args.time_limit))
    except KeyboardInterrupt:
        pass
    os._exit(0)  # connections still open end with the process


if __name__ == "__main__":
    main()
