"""The benchmark harness (issues 6 and 14): the load generator's parser, the previous code's
worktree, the reconnect probe against a small resumable server, and a smoke run of
bench/run.py.

Speed is measured by ``make bench``, never asserted here: these tests only check that the
harness runs and reports what it should.
"""

from __future__ import annotations

import asyncio
import importlib.util
import json
import subprocess
import sys
import uuid
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import tornado.httpserver
import tornado.web
from tornado.iostream import StreamClosedError
from tornado.testing import bind_unused_port

ROOT = Path(__file__).resolve().parent.parent


def _load(name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(name, ROOT / "bench" / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


loadgen = _load("loadgen")
run = _load("run")
IS_GIT = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "HEAD"],
                        capture_output=True).returncode == 0


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


class FakeTransport:
    def __init__(self) -> None:
        self.written: list[bytes] = []

    def write(self, data: bytes) -> None:
        self.written.append(data)

    def close(self) -> None:
        pass


def feed(body: bytes, sizes: list[int], stream: Any = None) -> tuple[FakeRun, Any]:
    fake = FakeRun()
    stream = stream or loadgen._Stream(fake, b"")
    stream.run = fake
    stream.sent_at = 1
    pos = i = 0
    while pos < len(body):
        size = sizes[i % len(sizes)]
        stream.data_received(body[pos:pos + size])
        pos += size
        i += 1
    return fake, stream


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


@pytest.mark.parametrize("sizes", [[1], [7], [1 << 20]])
def test_loadgen_counts_tokens_of_one_simulator_write_once(sizes: list[int]) -> None:
    # Tokens the simulator wrote at once share a stamp (issue 14: one token per write?)
    body = HEAD + chunked(
        b'data: {"choices":[{"index":0,"delta":{"content":"101 "}}]}\n\n'
        b'data: {"choices":[{"index":0,"delta":{"content":"101 "}}]}\n\n',
        b'data: {"choices":[{"index":0,"delta":{"content":"101 102 "}}]}\n\n',
        b'data: {"choices":[{"index":0,"delta":{"content":"103 "}}]}\n\ndata: [DONE]\n\n')
    _run, stream = feed(body, sizes)
    assert stream.stamps == 5 and stream.writes == 3


CREATED_BODY = b'{"id": "s", "events_url": "/v1/streams/s?x=1"}'
CREATED = (b"HTTP/1.1 201 Created\r\nContent-Type: application/json\r\n"
           b"Content-Length: %d\r\n\r\n%s" % (len(CREATED_BODY), CREATED_BODY))


@pytest.mark.parametrize("sizes", [[1], [5, 11], [1 << 20]])
def test_loadgen_creates_a_stream_then_follows_its_events_url(sizes: list[int]) -> None:
    load = loadgen.Load(url="http://127.0.0.1:9/v1/streams", streams=1, tokens=3,
                        stream_s=1.0, body=b"{}", create=True)
    stream = loadgen._Stream(None, b"", load.request_to)
    transport = stream.transport = FakeTransport()
    # the GET goes out once the 201's body is whole, before the events arrive
    fake, stream = feed(CREATED, sizes, stream)
    assert transport.written == [load.request_to("/v1/streams/s?x=1")]
    assert transport.written[0].startswith(b"GET /v1/streams/s?x=1 HTTP/1.1\r\n")
    feed(EVENTSOURCE, sizes, stream)
    assert stream.error == "" and stream.saw_done and stream.stamps == 3


def test_loadgen_reports_a_failed_create() -> None:
    stream = loadgen._Stream(None, b"", lambda url: b"")
    _run, stream = feed(b"HTTP/1.1 404 Not Found\r\nContent-Length: 2\r\n\r\n{}", [9],
                        stream)
    assert stream.error == "create: status 404"


# ---------------------------------------------------------------------------------------------
# The previous code (issue 14)


@pytest.mark.skipif(not IS_GIT, reason="needs a git checkout")
def test_previous_code_worktree_is_removed_also_after_an_error(tmp_path: Path) -> None:
    where = tmp_path / "previous"
    with pytest.raises(RuntimeError, match="boom"):
        with run.previous_tree("HEAD", where) as previous:
            assert (where / "sseproxy" / "__init__.py").is_file()
            assert previous.commit == run.git("rev-parse", "HEAD")
            assert str(where) in run.git("worktree", "list", "--porcelain")
            raise RuntimeError("boom")
    assert not where.exists()
    assert str(where) not in run.git("worktree", "list", "--porcelain")


@pytest.mark.skipif(not IS_GIT, reason="needs a git checkout")
def test_previous_code_processes_import_the_worktree_not_this_checkout(
    tmp_path: Path
) -> None:
    with run.previous_tree("HEAD", tmp_path / "previous") as previous:
        imported = subprocess.run(
            [sys.executable, "-m", "sseproxy", "--help"], cwd=previous.tree,
            env=run.tree_env(previous.tree), capture_output=True, text=True)
        assert imported.returncode == 0, imported.stderr
        where = subprocess.run(
            [sys.executable, "-c", "import sseproxy; print(sseproxy.__file__)"],
            cwd=tmp_path, env=run.tree_env(previous.tree), capture_output=True,
            text=True, check=True).stdout.strip()
        assert Path(where).is_relative_to(previous.tree)


@pytest.mark.skipif(not IS_GIT, reason="needs a git checkout")
def test_an_unknown_previous_ref_is_refused_before_anything_starts(tmp_path: Path) -> None:
    with pytest.raises(RuntimeError, match="names no commit"):
        with run.previous_tree("no-such-ref-" + uuid.uuid4().hex, tmp_path / "p"):
            pass
    assert not (tmp_path / "p").exists()


# ---------------------------------------------------------------------------------------------
# The reconnect probe (issue 14), against a small server with the resumable-stream API


class FakeStream:
    """``count`` deltas, one every ``period`` s, then ``event: done``; every frame kept."""

    def __init__(self, count: int, period: float) -> None:
        self.id = uuid.uuid4().hex
        self.frames: list[bytes] = []
        self.grew = asyncio.Event()
        self.task = asyncio.get_running_loop().create_task(self.generate(count, period))

    async def generate(self, count: int, period: float) -> None:
        for n in range(1, count + 1):
            await asyncio.sleep(period)  # the upstream's pace, not a synchronisation
            self.append(b'id: %s.%d\ndata: {"content": "%d "}\n\n' % (self.id.encode(), n, n))
        self.append(b'event: done\nid: %s.%d\ndata: {"finish_reason": "stop"}\n\n'
                    % (self.id.encode(), count + 1))

    def append(self, frame: bytes) -> None:
        self.frames.append(frame)
        self.grew.set()
        self.grew = asyncio.Event()


class FakeResumable:
    """``POST /v1/streams``, ``GET /v1/streams/{id}`` and ``GET /v1/chat/stream`` with
    ``Last-Event-ID`` as issue 14 describes them (``resume=False``: a reconnect replays the
    stream from its start, which the probe must catch)."""

    def __init__(self, resume: bool = True, count: int = 12, period: float = 0.005) -> None:
        self.resume, self.count, self.period = resume, count, period
        self.streams: dict[str, FakeStream] = {}
        fake = self

        class Create(tornado.web.RequestHandler):
            def post(self) -> None:
                stream = fake.new()
                self.set_status(201)
                self.finish({"id": stream.id, "events_url": f"/v1/streams/{stream.id}"})

        class Follow(tornado.web.RequestHandler):
            async def get(self, stream_id: str = "") -> None:
                last = self.request.headers.get("Last-Event-ID", "")
                if last:
                    stream = fake.streams[last.rpartition(".")[0]]
                else:
                    stream = fake.streams[stream_id] if stream_id else fake.new()
                position = int(last.rpartition(".")[2]) if last and fake.resume else 0
                self.set_header("Content-Type", "text/event-stream")
                self.write(b"retry: 1000\n\n")
                while True:
                    grew = stream.grew
                    while position < len(stream.frames):
                        self.write(stream.frames[position])
                        position += 1
                    try:
                        await self.flush()
                    except StreamClosedError:
                        return  # the probe dropped this connection
                    if stream.frames and stream.frames[-1].startswith(b"event: done"):
                        return
                    await grew.wait()

        self.app = tornado.web.Application([
            (r"/v1/streams", Create), (r"/v1/streams/(\w+)", Follow),
            (r"/v1/chat/stream", Follow)])

    def new(self) -> FakeStream:
        stream = FakeStream(self.count, self.period)
        self.streams[stream.id] = stream
        return stream

    async def finished(self) -> None:
        await asyncio.gather(*(stream.task for stream in self.streams.values()))


async def serve(app: tornado.web.Application) -> tuple[Any, int]:
    sock, port = bind_unused_port()
    server = tornado.httpserver.HTTPServer(app)
    server.add_sockets([sock])
    return server, port


@pytest.mark.parametrize("via", ["streams", "chat"])
async def test_reconnect_probe_measures_each_resume_to_its_first_missed_event(
    io_loop: Any, via: str
) -> None:
    fake = FakeResumable()
    server, port = await serve(fake.app)
    try:
        found = await run.reconnect_probe(port, via, streams=4, after=3, model="m",
                                          ramp_s=0.02, away_s=0.02, timeout_s=20)
    finally:
        server.stop()
        await fake.finished()
    summary = found.summary()
    assert summary["errors"] == {} and summary["resumed"] == 4
    assert 0 < summary["p50_ms"] <= summary["p99_ms"]
    assert len(fake.streams) == 4  # a reconnect never started a new stream


async def test_reconnect_probe_reports_a_replay_from_the_start(io_loop: Any) -> None:
    fake = FakeResumable(resume=False)
    server, port = await serve(fake.app)
    try:
        found = await run.reconnect_probe(port, "streams", streams=2, after=3, model="m",
                                          ramp_s=0.02, away_s=0.02, timeout_s=20)
    finally:
        server.stop()
        await fake.finished()
    assert found.summary()["errors"] == {"reconnect: ids not consecutive": 2}
    assert found.latencies == []


# ---------------------------------------------------------------------------------------------
# The whole harness


@pytest.mark.slow
def test_smoke_run_reports_latency_events_and_no_errors() -> None:
    # with the previous code (HEAD in a temporary worktree) beside the current one (issue 14)
    previous = ["--previous", "HEAD"] if IS_GIT else []
    done = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "run.py"), "--smoke", "--json", *previous],
        capture_output=True, text=True, timeout=50, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(done.stdout)
    latency = {s["target"]: s for s in report["samples"] if s["phase"] == "latency"}
    # direct, sseproxy's OpenAI endpoint and its EventSource endpoint (and the same two of
    # the previous code); POST /v1/streams where the server has it
    expected = {"direct", "sseproxy-off", "sseproxy-es"}
    if IS_GIT:
        expected |= {"sseproxy-off@prev", "sseproxy-es@prev"}
        tree = report["previous"]["worktree"]
        assert not Path(tree).exists()
        assert tree not in run.git("worktree", "list", "--porcelain")
    reconnects = report["figures"]["reconnects"]
    for name, found in reconnects.items():
        if found["supported"]:
            expected.add(name.split("/")[0].replace("-off", "-streams"))
            assert found["errors"] == {} and found["resumed"] == found["streams"] > 0
        else:
            assert found["note"].startswith("not supported")
    assert set(latency) == expected
    assert any(r[0].startswith("reconnect") for r in report["guard"])
    assert report["guard"][1][0].startswith("CPU µs / token, `POST /v1/chat/completions`")
    for sample in latency.values():
        assert sample["errors"] == {} and sample["completed"] == sample["streams"] > 0
        assert sample["tokens"] == sample["expected"] > 0
        assert sample["events_per_s"] > 0 and sample["latency_samples"] > 0
        assert 0 <= sample["latency_ms"]["p50"] <= sample["latency_ms"]["p99"]
        assert sample["ttfb_ms"]["p50"] > 0
    assert "| sseproxy, pacing off |" in "\n".join("| " + " | ".join(r) + " |"
                                                   for r in report["table"])
    if IS_GIT:
        assert report["guard"][1][1] != "not run"  # the previous code's CPU per token
