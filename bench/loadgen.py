"""A load generator for event streams: N concurrent streams, one-way latency of every token.

It opens ``streams`` connections to one URL (one stream per connection), ramped over
``ramp_s`` so connects do not stampede, writes each HTTP/1.1 request by hand (``POST`` with
an OpenAI body, or ``GET`` for an EventSource URL), decodes the chunked body and splits SSE
frames on blank lines. It measures:

* one-way latency of every token: the receive time minus the stamp the simulator wrote into
  the token's content (``sseproxy mock-upstream`` with ``stamp``: each content is
  ``"<time.monotonic_ns()> "`` taken when the simulator wrote it; CLOCK_MONOTONIC is shared
  by the processes of one machine). When a relay merges tokens (pacing), one event carries
  several stamps: each counts;
* time to first byte (request written -> first response byte) and to first token;
* events/s and tokens/s in the steady window (every stream open), errors by reason, and the
  delivered fraction (tokens received / tokens expected);
* how many writes of the simulator the tokens came in (tokens of one write share a stamp),
  so a report can show the load's shape (one token per upstream write, or bursts);
* its own CPU time, so a report can say how far it is from being the bottleneck.

With ``create``, each connection first posts the body to the URL, expects ``201`` with a
JSON ``{"events_url": ...}`` and then gets that URL on the same connection (the
``POST /v1/streams`` API: a stream is created, then followed as an EventSource).

Fast path, deliberately narrower than a general client: ``asyncio.Protocol`` callbacks (no
task per read), one receive time per read, chunked decoding per HTTP chunk and frame
splitting with ``bytes.find``/``rfind``, stamps found by one regular expression over all
frames of a read -- no Python loop per byte or per line. It assumes what every server in
this benchmark sends: frames end with ``\\n\\n`` (not ``\\r\\n``), and a stream ends with the
chunked terminator after ``data: [DONE]`` (OpenAI) or ``event: done`` (EventSource).

Used by ``bench/run.py``; also a command line of its own::

    python bench/loadgen.py http://127.0.0.1:8081/v1/chat/completions --streams 100 \\
        --rate 20 --tokens 100
    python bench/loadgen.py 'http://127.0.0.1:8080/v1/chat/stream?prompt=hi' --get \\
        --streams 100 --tokens 100   # the stamped scenario is then sseproxy's upstream.model
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import math
import re
import resource
import socket
import sys
import time
from array import array
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

__all__ = ["Load", "Result", "Run", "measure", "openai_body", "percentile", "raise_nofile"]

# The stamps of every content in a read: `"content":"123 456 "` (EventSource deltas and
# OpenAI chunks alike; the empty content of the role chunk does not match).
_STAMPS = re.compile(rb'"content":"([0-9 ]+)"')
_NS = 1_000_000_000

# Protocol states
_HEAD, _CHUNKED, _LENGTH, _UNTIL_CLOSE, _DONE, _CREATED = range(6)


def raise_nofile() -> int:
    """Raise this process's open-file limit to the hard limit (thousands of sockets)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return hard


def openai_body(model: str, prompt: str = "Say something.") -> bytes:
    """A streaming chat-completions request body for ``model`` (e.g. ``mock?...&stamp``)."""
    return json.dumps({
        "model": model,
        "messages": [{"role": "user", "content": prompt}],
        "stream": True,
    }).encode()


@dataclass(frozen=True)
class Load:
    """One load: ``streams`` streams to ``url``.

    ``body`` given: ``POST`` it as JSON; ``None``: ``GET``. ``tokens`` is how many stamps
    each stream should deliver (for the delivered fraction). The steady window, in seconds
    after the first connect, is ``window`` when given, else from the end of the ramp to
    ``stream_s`` (when the first stream ends). A stream still open ``stream_s + ramp_s +
    grace_s`` after the first connect is aborted and counted as an error (``timeout``).
    """

    url: str
    streams: int
    tokens: int
    stream_s: float
    body: bytes | None = None
    ramp_s: float = 1.0
    grace_s: float = 5.0
    window: tuple[float, float] | None = None
    headers: tuple[tuple[str, str], ...] = ()
    create: bool = False

    def steady_window(self) -> tuple[float, float]:
        if self.window is not None:
            return self.window
        start = self.ramp_s + min(0.25, self.stream_s / 10)
        end = self.stream_s - 0.05
        return (start, end) if end - start > 0.2 else (0.0, self.stream_s)

    def request(self) -> tuple[str, int, bytes]:
        """(host, port, the request's bytes)."""
        parts = urlsplit(self.url)
        if parts.scheme != "http" or not parts.hostname:
            raise ValueError(f"only http:// URLs: {self.url!r}")
        port = parts.port or 80
        return parts.hostname, port, self.request_to(self.url, self.body)

    def request_to(self, url: str, body: bytes | None = None) -> bytes:
        """The bytes of a request for ``url`` (a path or a full URL): ``POST body``, or
        ``GET`` when ``body`` is ``None``."""
        parts = urlsplit(url)
        target = parts.path or "/"
        if parts.query:
            target += "?" + parts.query
        method = "GET" if body is None else "POST"
        lines = [f"{method} {target} HTTP/1.1", f"Host: {urlsplit(self.url).netloc}",
                 "Accept: text/event-stream", "User-Agent: sseproxy-bench-loadgen"]
        if body is not None:
            lines += ["Content-Type: application/json", f"Content-Length: {len(body)}"]
        lines += [f"{name}: {value}" for name, value in self.headers]
        head = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")
        return head + (body or b"")


# One receive buffer for every connection: a read is parsed before the next one starts, and
# recv_into a buffer that exists already saves asyncio's allocation of 256 KiB per read.
_BUFFER = bytearray(1 << 16)
_VIEW = memoryview(_BUFFER)


class _Stream(asyncio.BufferedProtocol):
    """One connection, one stream; reports to its :class:`Run`."""

    __slots__ = ("run", "request", "transport", "state", "head", "raw", "left", "pending",
                 "sent_at", "first_byte_at", "first_token_at", "stamps", "events",
                 "status", "saw_done", "error", "ended", "skip", "follow", "last_stamp",
                 "writes")

    def __init__(self, run: Run, request: bytes,
                 follow: Callable[[str], bytes] | None = None) -> None:
        self.run = run
        self.request = request
        #: ``create``: the request that follows the created stream's ``events_url``
        self.follow = follow
        self.last_stamp = b""
        self.writes = 0  # distinct stamps: writes of the simulator
        self.transport: asyncio.Transport | None = None
        self.state = _HEAD
        self.head = b""
        self.raw = b""  # chunked body not decoded yet
        self.left = 0  # bytes left in the current chunk (or of a Content-Length body)
        self.skip = 0  # bytes of a chunk's closing CRLF still to skip
        self.pending = b""  # decoded body after the last complete frame
        self.sent_at = 0
        self.first_byte_at = 0
        self.first_token_at = 0
        self.stamps = 0
        self.events = 0
        self.status = 0
        self.saw_done = False
        self.error = ""
        self.ended = False

    # --- asyncio.Protocol

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        sock = transport.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.sent_at = time.monotonic_ns()
        transport.write(self.request)

    def get_buffer(self, sizehint: int) -> memoryview:
        return _VIEW

    def buffer_updated(self, nbytes: int) -> None:
        self.data_received(bytes(_VIEW[:nbytes]))

    def data_received(self, data: bytes) -> None:
        now = time.monotonic_ns()
        if not self.first_byte_at:
            self.first_byte_at = now
        state = self.state
        if state == _CHUNKED:
            self._chunked(now, data)
        elif state == _HEAD:
            self._head(now, data)
        elif state == _LENGTH:
            body = data[:self.left]
            self.left -= len(body)
            self._body(now, body)
            if not self.left:
                self._end("")
        elif state == _UNTIL_CLOSE:
            self._body(now, data)
        elif state == _CREATED:
            self._created(data)

    def eof_received(self) -> bool | None:
        if self.state == _UNTIL_CLOSE:
            self._end("")
        elif self.state != _DONE:
            self._end("closed early")
        return None

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.ended:
            self._end(f"connection lost: {type(exc).__name__}" if exc else "closed early")

    # --- parsing

    def _head(self, now: int, data: bytes) -> None:
        buf = self.head + data
        end = buf.find(b"\r\n\r\n")
        if end < 0:
            self.head = buf
            return
        self.head = b""
        lines = buf[:end].decode("latin-1").split("\r\n")
        try:
            self.status = int(lines[0].split(" ", 2)[1])
        except (IndexError, ValueError):
            self._end(f"bad status line {lines[0][:40]!r}")
            return
        headers = {}
        for line in lines[1:]:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip().lower()
        rest = buf[end + 4:]
        if self.follow is not None:
            if self.status != 201 or "content-length" not in headers:
                self._end(f"create: status {self.status}")
                return
            self.state = _CREATED
            self.left = int(headers["content-length"])
            self._created(rest)
            return
        if self.status != 200:
            self._end(f"status {self.status}")
            return
        if "chunked" in headers.get("transfer-encoding", ""):
            self.state = _CHUNKED
            if rest:
                self._chunked(now, rest)
        elif "content-length" in headers:
            self.state = _LENGTH
            self.left = int(headers["content-length"])
            if rest:
                self.data_received(rest)
            if not self.left:
                self._end("")
        else:
            self.state = _UNTIL_CLOSE
            if rest:
                self._body(now, rest)

    def _created(self, data: bytes) -> None:
        """The ``201`` answer of a create: once whole, follow its ``events_url``."""
        buf = self.raw + data
        if len(buf) < self.left:
            self.raw = buf
            return
        self.raw = b""
        assert self.follow is not None
        try:
            events_url = json.loads(buf[:self.left])["events_url"]
        except (ValueError, KeyError, TypeError):
            self._end("create: no events_url")
            return
        request = self.follow(str(events_url))
        self.follow = None
        self.state = _HEAD
        self.left = 0
        self.first_byte_at = 0
        self.sent_at = time.monotonic_ns()
        if self.transport is not None:
            self.transport.write(request)

    def _chunked(self, now: int, data: bytes) -> None:
        buf = self.raw + data if self.raw else data
        pos, size, out = 0, len(buf), []
        while pos < size:
            if self.left:  # inside a chunk's data
                take = min(self.left, size - pos)
                out.append(buf[pos:pos + take])
                pos += take
                self.left -= take
                if not self.left:
                    self.skip = 2  # the CRLF after the data
                continue
            if self.skip:
                step = min(self.skip, size - pos)
                pos += step
                self.skip -= step
                continue
            eol = buf.find(b"\r\n", pos)
            if eol < 0:
                break
            length = int(buf[pos:eol].split(b";", 1)[0], 16)
            pos = eol + 2
            if length == 0:  # the last chunk (trailers, if any, are ignored)
                self.raw = b""
                if out:
                    self._body(now, b"".join(out))
                self._end("")
                return
            self.left = length
        self.raw = buf[pos:]
        if out:
            self._body(now, b"".join(out))

    def _body(self, now: int, data: bytes) -> None:
        buf = self.pending + data if self.pending else data
        end = buf.rfind(b"\n\n")
        if end < 0:
            self.pending = buf
            return
        frames = buf[:end + 2]
        self.pending = buf[end + 2:]
        found = _STAMPS.findall(frames)
        if found:
            stamps = b"".join(found).split()
            if not self.first_token_at:
                self.first_token_at = now
            self.stamps += len(stamps)
            # tokens of one simulator write share its stamp, and stamps only grow
            distinct = set(stamps)
            self.writes += len(distinct) - (self.last_stamp in distinct)
            self.last_stamp = stamps[-1]
            self.events += len(found)
            self.run.record(now, stamps, len(found))
        if b"data: [DONE]" in frames or b"event: done" in frames:
            self.saw_done = True
        if b"event: error" in frames or b'data: {"error"' in frames:
            self.error = self.error or "error event"

    def _end(self, error: str) -> None:
        if self.ended:
            return
        self.ended = True
        self.state = _DONE
        if not error and not self.error and not self.saw_done:
            error = "no end marker"
        self.error = self.error or error
        if self.transport is not None:
            self.transport.close()
        self.run.stream_ended(self)

    def abort(self, reason: str) -> None:
        if not self.ended:
            self.error = reason
            if self.transport is not None:
                self.transport.abort()
            self._end(reason)


@dataclass
class Result:
    """What one load measured. Times in nanoseconds unless the name says otherwise."""

    streams: int
    completed: int
    errors: Counter[str]
    tokens: int  # stamps received in all
    expected: int
    writes: int  # distinct stamps received in all: the simulator's writes
    window_s: float
    window_tokens: int
    window_events: int
    latencies: array  # type: ignore[type-arg]  # array('q') of ns, tokens in the window
    ttfb: list[int]
    ttft: list[int]
    cpu_s: float  # this process, while the load ran
    wall_s: float

    @property
    def error_count(self) -> int:
        return sum(self.errors.values())

    def summary(self) -> dict[str, Any]:
        lat = sorted(self.latencies)
        ttfb = sorted(self.ttfb)
        ttft = sorted(self.ttft)
        ms = 1e-6
        return {
            "streams": self.streams,
            "completed": self.completed,
            "errors": dict(self.errors),
            "error_rate": self.error_count / self.streams if self.streams else 0.0,
            "delivered": self.tokens / self.expected if self.expected else 1.0,
            "tokens": self.tokens,
            "expected": self.expected,
            "tokens_per_write": self.tokens / self.writes if self.writes else 0.0,
            "events_per_s": self.window_events / self.window_s if self.window_s else 0.0,
            "tokens_per_s": self.window_tokens / self.window_s if self.window_s else 0.0,
            "latency_ms": {q: percentile(lat, p) * ms for q, p in
                           (("p50", 0.5), ("p90", 0.9), ("p99", 0.99), ("p999", 0.999),
                            ("max", 1.0))},
            "latency_samples": len(lat),
            "ttfb_ms": {"p50": percentile(ttfb, 0.5) * ms, "p99": percentile(ttfb, 0.99) * ms},
            "ttft_ms": {"p50": percentile(ttft, 0.5) * ms, "p99": percentile(ttft, 0.99) * ms},
            "loadgen_cpu_s": self.cpu_s,
            "loadgen_us_per_token": self.cpu_s * 1e6 / self.tokens if self.tokens else 0.0,
            "wall_s": self.wall_s,
        }


def percentile(ordered: Sequence[int] | Sequence[float], q: float) -> float:
    """Nearest-rank percentile of sorted values (``nan`` when there are none)."""
    if not ordered:
        return math.nan
    rank = max(1, math.ceil(q * len(ordered)))
    return float(ordered[min(rank, len(ordered)) - 1])


class Run:
    """One :class:`Load` in flight. ``await run.start()`` ramps the connections in;
    ``await run.wait()`` waits for every stream to end (or aborts them at the deadline);
    ``run.stop()`` hangs up on whatever is still open; ``run.result()`` sums up."""

    def __init__(self, load: Load) -> None:
        self.load = load
        self.host, self.port, self.request = load.request()
        self.streams: list[_Stream] = []
        self.open = 0
        self.all_ended = asyncio.Event()
        self.tasks: set[asyncio.Task[None]] = set()
        self.connect_errors: Counter[str] = Counter()
        self.t0 = 0
        self.win_start = self.win_end = 0
        self.latencies = array("q")
        self.tokens = 0
        self.window_tokens = 0
        self.window_events = 0
        self.started_streams_with_token = 0
        self._cpu0 = 0.0
        self._wall0 = 0.0
        self._cpu_s = 0.0
        self._wall_s = 0.0
        self._gc_was_enabled = False
        self.ramped = False

    # called by _Stream, once per read that carried stamps
    def record(self, now: int, stamps: list[bytes], events: int) -> None:
        self.tokens += len(stamps)
        if self.win_start <= now < self.win_end:
            self.window_tokens += len(stamps)
            self.window_events += events
            self.latencies.extend([now - int(s) for s in stamps])

    def stream_ended(self, stream: _Stream) -> None:
        self.open -= 1
        if self.open == 0 and self.ramped:
            self.all_ended.set()

    @property
    def with_first_token(self) -> int:
        return sum(1 for s in self.streams if s.first_token_at)

    async def start(self) -> None:
        """Open every stream, spread over ``ramp_s``; return when all were attempted."""
        loop = asyncio.get_running_loop()
        self.ramped = False
        self._gc_was_enabled = gc.isenabled()
        gc.disable()  # a collection would pause every stream at once, and show as latency
        self._cpu0, self._wall0 = time.process_time(), time.monotonic()
        self.t0 = time.monotonic_ns()
        start, end = self.load.steady_window()
        self.win_start = self.t0 + int(start * _NS)
        self.win_end = self.t0 + int(end * _NS)
        n, ramp = self.load.streams, self.load.ramp_s
        begin = loop.time()
        for i in range(n):
            delay = begin + i * ramp / n - loop.time()
            if delay > 0.001:
                await asyncio.sleep(delay)
            stream = _Stream(self, self.request, self.load.request_to if self.load.create
                             else None)
            self.streams.append(stream)
            self.open += 1
            task = loop.create_task(self._connect(stream))
            self.tasks.add(task)
            task.add_done_callback(self.tasks.discard)
        self.ramped = True
        if self.open == 0:
            self.all_ended.set()

    async def _connect(self, stream: _Stream) -> None:
        loop = asyncio.get_running_loop()
        try:
            await loop.create_connection(lambda: stream, self.host, self.port)
        except OSError as exc:
            stream.abort(f"connect: {exc.strerror or type(exc).__name__}")

    async def wait(self, timeout: float | None = None) -> None:
        """Wait for every stream to end; abort those open at the deadline (``timeout``)."""
        if timeout is None:
            timeout = self.load.stream_s + self.load.ramp_s + self.load.grace_s
            timeout -= (time.monotonic_ns() - self.t0) / _NS
        try:
            await asyncio.wait_for(self.all_ended.wait(), max(timeout, 0.01))
        except TimeoutError:
            self.stop("timeout")
        self._finish()

    def stop(self, reason: str = "") -> None:
        """Hang up on every stream still open (``reason`` empty: not an error)."""
        for stream in self.streams:
            if not stream.ended:
                if reason:
                    stream.abort(reason)
                else:
                    stream.saw_done = True  # ended on purpose
                    stream.abort("")
        self._finish()

    def _finish(self) -> None:
        if not self._wall_s:
            self._cpu_s = time.process_time() - self._cpu0
            self._wall_s = time.monotonic() - self._wall0
            if self._gc_was_enabled:
                gc.enable()

    def result(self) -> Result:
        errors: Counter[str] = Counter(s.error for s in self.streams if s.error)
        window = (self.win_end - self.win_start) / _NS
        return Result(
            streams=len(self.streams),
            completed=sum(1 for s in self.streams if s.ended and not s.error),
            errors=errors,
            tokens=self.tokens,
            expected=len(self.streams) * self.load.tokens,
            writes=sum(s.writes for s in self.streams),
            window_s=window,
            window_tokens=self.window_tokens,
            window_events=self.window_events,
            latencies=self.latencies,
            ttfb=[s.first_byte_at - s.sent_at for s in self.streams if s.first_byte_at],
            ttft=[s.first_token_at - s.sent_at for s in self.streams if s.first_token_at],
            cpu_s=self._cpu_s,
            wall_s=self._wall_s,
        )


async def measure(load: Load) -> Result:
    """Run ``load`` to its end and return what it measured."""
    run = Run(load)
    await run.start()
    await run.wait()
    return run.result()


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python bench/loadgen.py",
        description="Open N concurrent event streams and measure one-way latency per token.")
    parser.add_argument("url", help="http://host:port/path (POST OpenAI, or GET with --get)")
    parser.add_argument("--streams", type=int, default=100)
    parser.add_argument("--rate", type=float, default=20.0, help="tokens/s of each stream")
    parser.add_argument("--tokens", type=int, default=100, help="tokens per stream")
    parser.add_argument("--ramp", type=float, default=1.0, help="seconds to open all streams")
    parser.add_argument("--get", action="store_true",
                        help="GET an EventSource URL (the server's model must stamp)")
    parser.add_argument("--json", action="store_true", help="print the summary as JSON")
    args = parser.parse_args(argv)
    raise_nofile()
    model = f"mock?tokens={args.tokens}&rate={args.rate:g}&stamp"
    stream_s = (args.tokens - 1) / args.rate if args.rate else 0.0
    load = Load(url=args.url, streams=args.streams, tokens=args.tokens, stream_s=stream_s,
                body=None if args.get else openai_body(model), ramp_s=args.ramp)
    summary = asyncio.run(measure(load)).summary()
    if args.json:
        print(json.dumps(summary, indent=2))
    else:
        lat = summary["latency_ms"]
        print(f"{summary['completed']}/{summary['streams']} streams completed, errors "
              f"{summary['errors'] or 0}, delivered {summary['delivered']:.1%}")
        print(f"one-way latency ms: p50 {lat['p50']:.2f}  p99 {lat['p99']:.2f}  "
              f"max {lat['max']:.2f}  ({summary['latency_samples']} tokens in the window)")
        print(f"{summary['events_per_s']:.0f} events/s, {summary['tokens_per_s']:.0f} tokens/s;"
              f" TTFB p50 {summary['ttfb_ms']['p50']:.2f} ms; loadgen CPU "
              f"{summary['loadgen_us_per_token']:.1f} µs per token")
    return 0


if __name__ == "__main__":
    sys.exit(main())
