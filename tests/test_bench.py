"""The benchmark harness (issue 6): the load generator's parser, and a smoke run of bench/run.py.

Speed is measured by ``make bench``, never asserted here: these tests only check that the
harness runs and reports what it should.
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parent.parent


def _load(name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(name, ROOT / "bench" / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


loadgen = _load("loadgen")


class FakeRun:
    """Collects what a stream reports, as loadgen.Run would."""

    def __init__(self) -> None:
        self.stamps: list[int] = []
        self.events = 0
        self.ended: list[Any] = []

    def record(self, now: int, stamps: list[bytes], events: int) -> None:
        self.stamps += [int(s) for s in stamps]
        self.events += events

    def stream_ended(self, stream: Any) -> None:
        self.ended.append(stream)


def chunked(*pieces: bytes) -> bytes:
    return b"".join(b"%x\r\n%s\r\n" % (len(p), p) for p in pieces) + b"0\r\n\r\n"


HEAD = (b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n"
        b"Transfer-Encoding: chunked\r\n\r\n")
OPENAI = HEAD + chunked(
    b'data: {"choices":[{"index":0,"delta":{"role":"assistant","content":""}}]}\n\n'
    b'data: {"choices":[{"index":0,"delta":{"content":"101 "}}]}\n\n',
    b'data: {"choices":[{"index":0,"delta":{"content":"102 103 "}}]}\n\ndata: {"ch',
    b'oices":[{"index":0,"delta":{"content":"104 "}}]}\n\n',
    b'data: {"choices":[{"index":0,"delta":{},"finish_reason":"stop"}]}\n\ndata: [DONE]\n\n',
)
EVENTSOURCE = HEAD + chunked(
    b"retry: 3000\n\n",
    b'id: s.1\ndata: {"content":"7 "}\n\nid: s.2\ndata: {"content":"8 9 "}\n\n',
    b'event: done\nid: s.3\ndata: {"finish_reason":"stop","usage":null}\n\n',
)


def feed(body: bytes, sizes: list[int]) -> tuple[FakeRun, Any]:
    run = FakeRun()
    stream = loadgen._Stream(run, b"")
    stream.sent_at = 1
    pos = i = 0
    while pos < len(body):
        size = sizes[i % len(sizes)]
        stream.data_received(body[pos:pos + size])
        pos += size
        i += 1
    return run, stream


@pytest.mark.parametrize("sizes", [[1], [2], [3, 7], [64], [1 << 20]])
@pytest.mark.parametrize(("body", "stamps", "events"), [
    (OPENAI, [101, 102, 103, 104], 3),
    (EVENTSOURCE, [7, 8, 9], 2),
])
def test_loadgen_finds_every_stamp_whatever_the_reads(
    body: bytes, stamps: list[int], events: int, sizes: list[int]
) -> None:
    run, stream = feed(body, sizes)
    assert run.stamps == stamps  # several stamps in one event (pacing) each count
    assert run.events == events
    assert run.ended == [stream] and stream.error == "" and stream.saw_done


@pytest.mark.parametrize(("body", "error"), [
    (b"HTTP/1.1 429 Too Many Requests\r\nContent-Length: 2\r\n\r\n{}", "status 429"),
    (HEAD + chunked(b'data: {"content":"5 "}\n\n', b'data: {"error": {"code": "x"}}\n\n'),
     "error event"),
    (HEAD + chunked(b'id: s.1\ndata: {"content":"5 "}\n\n'), "no end marker"),
])
def test_loadgen_reports_errors(body: bytes, error: str) -> None:
    _run, stream = feed(body, [5])
    assert stream.error == error


@pytest.mark.slow
def test_smoke_run_reports_latency_events_and_no_errors() -> None:
    done = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "run.py"), "--smoke", "--json"],
        capture_output=True, text=True, timeout=50, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(done.stdout)
    latency = {s["target"]: s for s in report["samples"] if s["phase"] == "latency"}
    # direct, sseproxy's OpenAI endpoint and its EventSource endpoint
    assert set(latency) == {"direct", "sseproxy-off", "sseproxy-es"}
    for sample in latency.values():
        assert sample["errors"] == {} and sample["completed"] == sample["streams"] > 0
        assert sample["tokens"] == sample["expected"] > 0
        assert sample["events_per_s"] > 0 and sample["latency_samples"] > 0
        assert 0 <= sample["latency_ms"]["p50"] <= sample["latency_ms"]["p99"]
        assert sample["ttfb_ms"]["p50"] > 0
    assert "| sseproxy, pacing off |" in "\n".join("| " + " | ".join(r) + " |"
                                                   for r in report["table"])
