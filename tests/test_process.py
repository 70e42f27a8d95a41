"""The process model as it runs in production: graceful SIGTERM, a second signal, and
several workers (issue 5); keep-alive connections during the drain (issue 16). Real
`sseproxy` processes and a separate simulator process."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
from test_cli import clean_env, free_port, process, wait_for_log

from sseproxy import sse
from sseproxy.mockupstream import Scenario, make_tokens

CHAT = [{"role": "user", "content": "hi"}]


@contextmanager
def simulator(tmp_path: Path) -> Iterator[str]:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    with process("mock-upstream", "--port", str(port), url=url + "/v1/models",
                 log=tmp_path / "mock.log"):
        yield url


class Reader(threading.Thread):
    """Reads one event stream in the background, keeping every event and how it ended."""

    def __init__(self, method: str, url: str, **kwargs: Any) -> None:
        super().__init__(daemon=True)
        self.method, self.url, self.kwargs = method, url, kwargs
        self.events: list[sse.Event] = []
        self.raw = b""
        self.status = 0
        self.error: Exception | None = None
        self.opened = threading.Event()

    def run(self) -> None:
        decoder = sse.Decoder()
        try:
            with httpx.stream(self.method, self.url, timeout=30, **self.kwargs) as r:
                self.status = r.status_code
                for chunk in r.iter_raw():
                    self.raw += chunk
                    self.events += decoder.feed(chunk)
                    self.opened.set()
        except Exception as exc:  # recorded for the test to assert on
            self.error = exc
        finally:
            self.opened.set()


def start_streams(base: str) -> dict[str, Reader]:
    """Two short and two long streams, one of each on each endpoint."""
    short = Scenario(rate=10, tokens=8).to_model()
    long = Scenario(rate=4, tokens=1000).to_model()
    return {
        "short_es": Reader("GET", f"{base}/v1/chat/stream?prompt=short&persona=short"),
        "long_es": Reader("GET", f"{base}/v1/chat/stream?prompt=long"),
        "short_api": Reader("POST", f"{base}/v1/chat/completions",
                            json={"model": short, "messages": CHAT, "stream": True}),
        "long_api": Reader("POST", f"{base}/v1/chat/completions",
                           json={"model": long, "messages": CHAT, "stream": True}),
    }


def wait_open(mock: str, count: int, within: float = 10.0) -> None:
    deadline = time.monotonic() + within
    while httpx.get(mock + "/mock/stats").json()["open"] < count:
        assert time.monotonic() < deadline, "streams did not open"
        time.sleep(0.05)


def wait_refused(url: str, within: float = 5.0) -> None:
    """Poll until a new connection to ``url`` is refused."""
    deadline = time.monotonic() + within
    while True:
        try:
            httpx.get(url, timeout=2)
        except httpx.ConnectError:
            return
        assert time.monotonic() < deadline, f"{url} still accepts connections"
        time.sleep(0.02)


def test_sigterm_lets_short_streams_finish_and_ends_long_ones(tmp_path: Path) -> None:
    grace = 2.0
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    conf = tmp_path / "sseproxy.toml"
    with simulator(tmp_path) as mock:
        # the EventSource endpoint takes its model from the config; the short one from a
        # persona, so that one process serves both lengths
        conf.write_text(
            f'[server]\nshutdown_grace_s = {grace}\nretry_ms = 1500\n'
            f'[upstream]\nbase_url = "{mock}/v1"\n'
            f'model = "{Scenario(rate=4, tokens=1000).to_model()}"\n'
            '[pacing]\nmode = "off"\n'
            f'[personas.short]\nsystem = "s"\nmodel = "{Scenario(rate=10, tokens=8).to_model()}"\n')
        with process("serve", "--config", str(conf), "--port", str(port),
                     url=base + "/healthz", log=tmp_path / "serve.log") as proc:
            readers = start_streams(base)
            for reader in readers.values():
                reader.start()
            wait_open(mock, 4)
            sent = time.monotonic()
            proc.send_signal(signal.SIGTERM)
            wait_refused(base + "/healthz")  # the listener is closed at once
            code = proc.wait(timeout=grace + 10)
            took = time.monotonic() - sent
        for reader in readers.values():
            reader.join(timeout=5)
        stats = httpx.get(mock + "/mock/stats").json()

    assert code == 0
    assert took < grace + 2.0
    short_es, long_es = readers["short_es"], readers["long_es"]
    assert short_es.error is None and short_es.events[-1].event == "done"
    assert long_es.error is None and long_es.events[-1].event == "error"
    assert json.loads(long_es.events[-1].data)["error"]["code"] == "server_shutdown"
    assert b"retry: 1500\n" in long_es.raw.rsplit(b"\n\n", 2)[-2]  # reconnect elsewhere
    short_api, long_api = readers["short_api"], readers["long_api"]
    assert short_api.error is None and short_api.raw.endswith(b"data: [DONE]\n\n")
    assert long_api.error is None
    last = long_api.events[-1].data
    assert json.loads(last)["error"]["code"] == "server_shutdown"
    assert stats["completed"] == 2 and stats["cancelled"] == 2 and stats["open"] == 0
    log = (tmp_path / "serve.log").read_text()
    lines = [json.loads(x) for x in log.splitlines() if x.startswith("{")]
    ended = sorted(x["outcome"] for x in lines if x["event"] == "stream")
    assert ended == ["cancelled", "cancelled", "completed", "completed"]


def test_a_second_sigterm_exits_at_once(tmp_path: Path) -> None:
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    with simulator(tmp_path) as mock:
        with process("serve", "--port", str(port), "--upstream-url", mock + "/v1",
                     "--set", "server.shutdown_grace_s=60",
                     "--set", f"upstream.model={Scenario(rate=2, tokens=1000).to_model()}",
                     url=base + "/healthz", log=tmp_path / "serve.log") as proc:
            reader = Reader("GET", base + "/v1/chat/stream?prompt=x")
            reader.start()
            wait_open(mock, 1)
            proc.send_signal(signal.SIGTERM)
            wait_for_log(tmp_path / "serve.log", "draining")
            assert proc.poll() is None  # draining, within its 60 s grace
            sent = time.monotonic()
            proc.send_signal(signal.SIGTERM)
            code = proc.wait(timeout=10)
            took = time.monotonic() - sent
        reader.join(timeout=5)
    assert code != 0
    assert took < 2.0


def test_two_workers_both_serve_and_their_metrics_add_up(tmp_path: Path) -> None:
    port, metrics_port = free_port(), free_port(consecutive=2)  # worker i: metrics_port + i
    while port in (metrics_port, metrics_port + 1):
        port = free_port()
    base = f"http://127.0.0.1:{port}"
    log = tmp_path / "serve.log"
    count = 40
    with simulator(tmp_path) as mock:
        model = Scenario(rate=20, tokens=10).to_model()
        with process("serve", "--port", str(port), "--workers", "2", "--upstream-url",
                     mock + "/v1", "--set", f"metrics.port={metrics_port}",
                     "--set", f"upstream.model={model}",
                     url=base + "/healthz", log=log) as proc:
            # both workers must be up before the load starts
            for i in range(2):
                deadline = time.monotonic() + 20
                while True:
                    try:
                        httpx.get(f"http://127.0.0.1:{metrics_port + i}/metrics", timeout=1)
                        break
                    except httpx.TransportError:
                        assert time.monotonic() < deadline, f"worker {i} never listened"
                        time.sleep(0.1)
            readers = [Reader("GET", f"{base}/v1/chat/stream?prompt=n{i}")
                       for i in range(count)]
            for reader in readers:
                reader.start()
            for reader in readers:
                reader.join(timeout=30)
            scrapes = [httpx.get(f"http://127.0.0.1:{metrics_port + i}/metrics").text
                       for i in range(2)]
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(timeout=15) == 0
    assert all(r.error is None and r.events[-1].event == "done" for r in readers)
    completed = [completed_count(text) for text in scrapes]
    assert sum(completed) == count
    assert all(c > 0 for c in completed), completed  # the kernel spread the connections
    lines = [json.loads(x) for x in log.read_text().splitlines() if x.startswith("{")]
    pids = {x["pid"] for x in lines if x["event"] == "stream"}
    assert len(pids) == 2
    assert sum(1 for x in lines if x["event"] == "stream") == count


def test_workers_stop_when_the_master_is_killed(tmp_path: Path) -> None:
    # issue 19: SIGKILL of sseproxy leaves no process behind, workers included
    port, metrics_port = free_port(), free_port(consecutive=2)
    log = tmp_path / "serve.log"
    with simulator(tmp_path) as mock:
        with process("serve", "--port", str(port), "--workers", "2", "--upstream-url",
                     mock + "/v1", "--set", f"metrics.port={metrics_port}",
                     url=f"http://127.0.0.1:{port}/healthz", log=log) as proc:
            deadline = time.monotonic() + 20
            while len(pids := listening_pids(log)) < 2:
                assert time.monotonic() < deadline, log.read_text()
                time.sleep(0.1)
            proc.kill()
            proc.wait()
            deadline = time.monotonic() + 30
            while alive := [pid for pid in pids if running(pid)]:
                if time.monotonic() > deadline:
                    for pid in alive:
                        os.kill(pid, signal.SIGKILL)
                    raise AssertionError(f"workers {alive} outlived their master")
                time.sleep(0.1)


def json_lines(log: Path) -> list[dict[str, Any]]:
    """The complete JSON lines of a log that running processes still write to (its last
    line may be cut short: it is read again on the next call)."""
    text = log.read_text()
    return [json.loads(x) for x in text[:text.rfind("\n") + 1].splitlines()
            if x.startswith("{")]


def listening_pids(log: Path) -> list[int]:
    lines = json_lines(log)
    return [x["pid"] for x in lines if x["event"] == "listening"]


def running(pid: int) -> bool:
    """Whether ``pid`` is a process that has not exited (a zombie has)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] not in ("Z", "X")


def completed_count(exposition: str) -> int:
    for line in exposition.splitlines():
        if line.startswith('sseproxy_streams_total{outcome="completed"}'):
            return int(float(line.split()[-1]))
    raise AssertionError("no completed counter in the scrape")


def test_several_workers_need_metrics_port() -> None:
    out = subprocess.run([sys.executable, "-m", "sseproxy", "serve", "--workers", "2"],
                         env=clean_env(), capture_output=True, text=True, timeout=30)
    assert out.returncode == 2
    assert "metrics.port" in out.stderr


# --- keep-alive connections during the drain (issue 16: rolling restarts lose no reply) ---
# nginx keeps idle connections to each instance and sends new requests on them; a draining
# instance must close them, or a new POST lands there and fails with 503 (nginx does not
# retry a POST on the other instance). Raw sockets: the tests watch the connections.

MEDIUM = Scenario(rate=5, tokens=25)  # about 5 s: still running when the drain starts


class Draining:
    """One sseproxy process (grace 60 s) with a long stream that keeps its drain going."""

    def __init__(self, proc: subprocess.Popen[bytes], base: str, mock: str, log: Path,
                 long: Reader) -> None:
        self.proc, self.base, self.mock, self.log, self.long = proc, base, mock, log, long
        self.sockets: list[socket.socket] = []

    def connect(self) -> socket.socket:
        port = int(self.base.rsplit(":", 1)[1])
        self.sockets.append(socket.create_connection(("127.0.0.1", port), timeout=20))
        return self.sockets[-1]

    def sigterm(self) -> dict[str, Any]:
        """SIGTERM, and wait until the drain has begun; its log line."""
        self.proc.send_signal(signal.SIGTERM)
        wait_refused(self.base + "/healthz")  # the listener closes and the drain begins
        wait_for_log(self.log, '"draining"')
        return next(x for x in json_lines(self.log) if x["event"] == "draining")

    def still_draining(self) -> bool:
        return (self.proc.poll() is None and self.long.is_alive()
                and self.long.error is None and self.long.status == 200)


@contextmanager
def draining_instance(tmp_path: Path) -> Iterator[Draining]:
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    log = tmp_path / "serve.log"
    with simulator(tmp_path) as mock:
        with process("serve", "--port", str(port), "--upstream-url", mock + "/v1",
                     "--set", "server.shutdown_grace_s=60", "--set", "pacing.mode=off",
                     url=base + "/healthz", log=log) as proc:
            long = Reader("POST", f"{base}/v1/chat/completions",
                          json={"model": Scenario(rate=2, tokens=1000).to_model(),
                                "messages": CHAT, "stream": True})
            long.start()
            wait_open(mock, 1)
            assert long.opened.wait(timeout=20) and long.status == 200
            instance = Draining(proc, base, mock, log, long)
            try:
                yield instance
            finally:
                for sock in instance.sockets:
                    sock.close()
            # leaving: process() sends SIGINT, a second signal, which exits at once


def http_get(path: str) -> bytes:
    return f"GET {path} HTTP/1.1\r\nHost: x\r\n\r\n".encode()


def chat_post(model: str) -> bytes:
    body = json.dumps({"model": model, "messages": CHAT, "stream": True}).encode()
    return (b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n"
            b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n" % len(body)) + body


def until_eof(sock: socket.socket, within: float = 20.0) -> bytes:
    """All the server sends until it closes the connection (a failure if it does not)."""
    sock.settimeout(within)
    data = b""
    try:
        while chunk := sock.recv(65536):
            data += chunk
    except TimeoutError:
        raise AssertionError(f"the connection stayed open; received {data[:300]!r}") from None
    return data


def responses(raw: bytes) -> list[tuple[int, dict[str, str], bytes]]:
    """The responses in ``raw`` (status, lower-case headers, body; chunked bodies joined)."""
    out = []
    while raw:
        head, sep, raw = raw.partition(b"\r\n\r\n")
        assert sep, f"an incomplete head: {head!r}"
        status_line, *lines = head.decode("latin-1").split("\r\n")
        headers = {k.strip().lower(): v.strip()
                   for k, _, v in (line.partition(":") for line in lines)}
        body = b""
        if headers.get("transfer-encoding") == "chunked":
            while True:
                size_line, _, raw = raw.partition(b"\r\n")
                size = int(size_line, 16)
                body, raw = body + raw[:size], raw[size + 2:]
                if size == 0:
                    break
        else:
            size = int(headers.get("content-length", "0"))
            body, raw = raw[:size], raw[size:]
        out.append((int(status_line.split(" ")[1]), headers, body))
    return out


def chat_text(body: bytes) -> str:
    """The joined content of an OpenAI stream that ended with ``[DONE]`` and no error."""
    events = sse.Decoder().feed(body)
    assert events[-1].data == "[DONE]"
    chunks = [json.loads(e.data) for e in events[:-1]]
    assert all("error" not in c for c in chunks), chunks[-1]
    return "".join(c["choices"][0]["delta"].get("content") or ""
                   for c in chunks if c.get("choices"))


def one_response(sock: socket.socket) -> bytes:
    """One whole response with a Content-Length, read from ``sock``."""
    data = b""
    while True:
        head, sep, body = data.partition(b"\r\n\r\n")
        if sep:
            [length] = [int(x.split(b":")[1]) for x in head.lower().split(b"\r\n")
                        if x.startswith(b"content-length:")]
            if len(body) >= length:
                return data
        chunk = sock.recv(65536)
        assert chunk, f"closed before a whole response: {data!r}"
        data += chunk


def test_sigterm_closes_an_idle_keepalive_connection_at_once(tmp_path: Path) -> None:
    with draining_instance(tmp_path) as instance:
        idle = instance.connect()
        idle.sendall(http_get("/healthz"))
        [(status, headers, _)] = responses(one_response(idle))
        assert status == 200 and "connection" not in headers  # kept alive

        instance.sigterm()
        assert until_eof(idle) == b""  # closed by the server, without a word
        assert instance.still_draining()  # at once: not at the end of the drain


def test_a_request_arriving_during_the_drain_is_answered_with_connection_close(
    tmp_path: Path,
) -> None:
    with draining_instance(tmp_path) as instance:
        late = instance.connect()
        request = chat_post(MEDIUM.to_model())
        late.sendall(request[:20])  # on its way when the drain begins
        instance.sigterm()
        late.sendall(request[20:])
        [(status, headers, body)] = responses(until_eof(late))
        assert status == 503 and json.loads(body)["error"]["code"] == "server_shutdown"
        assert headers["connection"] == "close"
        assert instance.still_draining()


def test_a_stream_running_at_sigterm_finishes_then_its_connection_closes(
    tmp_path: Path,
) -> None:
    expected = "".join(make_tokens(MEDIUM))
    with draining_instance(tmp_path) as instance:
        alone, pipelined = instance.connect(), instance.connect()
        alone.sendall(chat_post(MEDIUM.to_model()))
        # a request pipelined behind the stream is read when the stream ends, in the drain
        pipelined.sendall(chat_post(MEDIUM.to_model()) + http_get("/readyz"))
        wait_open(instance.mock, 3)
        assert instance.sigterm()["streams"] == 3  # both were running when the drain began

        [(status, headers, body)] = responses(until_eof(alone))
        assert status == 200 and "connection" not in headers  # read before the drain
        assert chat_text(body) == expected  # unaffected by the drain
        [(status, _, body), (ready, ready_headers, ready_body)] = responses(
            until_eof(pipelined))
        assert status == 200 and chat_text(body) == expected
        assert ready == 503 and json.loads(ready_body)["status"] == "draining"
        assert ready_headers["connection"] == "close"
        assert instance.still_draining()  # closed when idle, not at the end of the drain
