"""The command line as a user runs it: `sseproxy serve` (what `make run` starts) and
`sseproxy mock-upstream`, as real processes on 127.0.0.1 (issue 2)."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import openai
import pytest
from test_config import UNUSABLE, make_unusable

from sseproxy import sse
from sseproxy.mockupstream import Scenario, make_tokens


def free_port(consecutive: int = 1) -> int:
    """A port that is free now, with the ``consecutive - 1`` ports after it free too."""
    for _ in range(200):  # bounded: a busy machine may hold the neighbours
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = int(s.getsockname()[1])
        if port + consecutive - 1 > 65535:
            continue
        if all(_bindable(port + i) for i in range(1, consecutive)):
            return port
    raise AssertionError(f"no {consecutive} consecutive free ports")


def _bindable(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def clean_env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items()
            if not k.startswith("SSEPROXY_") and k != "OPENAI_API_KEY"}


@contextmanager
def process(*args: str, url: str, log: Path) -> Iterator[subprocess.Popen[bytes]]:
    """Start ``python -m sseproxy ARGS`` logging to ``log``; wait until ``url`` answers;
    stop it after."""
    with open(log, "wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "sseproxy", *args], env=clean_env(),
                                stdout=out, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 20
        while True:
            try:
                httpx.get(url, timeout=1)
                break
            except httpx.TransportError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise AssertionError(f"{args} did not start: {log.read_text()}") from None
                time.sleep(0.1)
        yield proc
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def read_events(url: str) -> list[sse.Event]:
    decoder = sse.Decoder()
    events: list[sse.Event] = []
    with httpx.stream("GET", url, timeout=20) as r:
        assert r.status_code == 200
        for chunk in r.iter_raw():
            events += decoder.feed(chunk)
    return events


def test_serve_with_no_configuration_streams_from_the_built_in_simulator(tmp_path: Path) -> None:
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    log = tmp_path / "serve.log"
    with process("serve", "--port", str(port), url=base + "/healthz", log=log) as proc:
        events = read_events(base + "/v1/chat/stream?prompt=hello")
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=10) == 0
    stderr = log.read_text()
    kinds = [e.event for e in events]
    assert kinds[-1] == "done" and kinds.count("message") == len(kinds) - 1 > 1
    text = "".join(json.loads(e.data)["content"] for e in events[:-1])
    assert text == "".join(make_tokens(Scenario(), "hello"))
    # JSON log lines on a non-terminal: the canonical stream line and the access line
    lines = [json.loads(line) for line in stderr.splitlines() if line.startswith("{")]
    stream_line = next(x for x in lines if x["event"] == "stream")
    assert stream_line["outcome"] == "completed" and stream_line["request_id"]
    assert stream_line["stream_id"] == events[0].id.split(".")[0]
    access = [x for x in lines if x.get("logger") == "tornado.access"]
    assert access and all("hello" not in json.dumps(x) for x in access)


def test_serve_with_no_configuration_answers_the_readme_persona_examples(tmp_path: Path) -> None:
    # issue 12: `make run` (`sseproxy serve` without a config file) has example personas
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    with process("serve", "--port", str(port), url=base + "/healthz", log=tmp_path / "s.log"):
        client = openai.OpenAI(base_url=base + "/v1", api_key="unused", max_retries=0)
        with client.chat.completions.with_streaming_response.create(
            model="gpt-4o-mini",
            messages=[{"role": "user", "content": "Hello"}],
            stream=True,
            extra_body={"persona": "pirate"},
        ) as response:
            status = response.status_code
            chunks = list(response.parse())
        events = read_events(base + "/v1/chat/stream?prompt=hello&persona=fortune-teller")
    assert status == 200
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert chunks[-1].choices[0].finish_reason == "stop"
    assert events[-1].event == "done" and len(events) > 1


def test_serve_in_front_of_a_separate_mock_upstream_process(tmp_path: Path) -> None:
    mock_port, port = free_port(), free_port()
    mock = f"http://127.0.0.1:{mock_port}"
    with process("mock-upstream", "--port", str(mock_port), "--rate", "0", "--tokens", "7",
                 url=mock + "/v1/models", log=tmp_path / "mock.log"):
        with process("serve", "--port", str(port), "--upstream-url", mock + "/v1",
                     url=f"http://127.0.0.1:{port}/healthz", log=tmp_path / "serve.log"):
            events = read_events(f"http://127.0.0.1:{port}/v1/chat/stream?prompt=x")
            stats = httpx.get(mock + "/mock/stats").json()
    # default pacing may merge the simulator's fast tokens into fewer events
    assert [e.event for e in events][-1] == "done"
    text = "".join(json.loads(e.data)["content"] for e in events[:-1])
    assert text == "".join(make_tokens(Scenario(rate=0, tokens=7), "x"))
    assert stats["completed"] == 1


@pytest.mark.parametrize("args, needle", [
    (["serve", "--port", "99999"], "server.port = 99999"),
    (["serve", "--workers", "0"], "server.workers = 0"),
])
def test_serve_refuses_bad_settings_with_exit_2(args: list[str], needle: str) -> None:
    out = subprocess.run([sys.executable, "-m", "sseproxy", *args], env=clean_env(),
                         capture_output=True, text=True, timeout=30)
    assert out.returncode == 2
    assert needle in out.stderr


def wait_for_log(log: Path, needle: str, within: float = 10.0) -> str:
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        text = log.read_text()
        if needle in text:
            return text
        time.sleep(0.05)
    raise AssertionError(f"{needle!r} never appeared in the log:\n{log.read_text()}")


def test_sighup_reloads_pacing_and_a_bad_file_keeps_the_running_settings(
    tmp_path: Path,
) -> None:
    # issue 3: `kill -HUP` changes the pacing of the next stream; a bad file changes nothing
    burst = Scenario(rate=0, tokens=1400, burst=8192)
    conf = tmp_path / "sseproxy.toml"
    conf.write_text(f'[upstream]\nmodel = "{burst.to_model()}"\n[pacing]\nmode = "off"\n')
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    url = base + "/v1/chat/stream?prompt=x"
    log = tmp_path / "serve.log"
    with process("serve", "--config", str(conf), "--port", str(port), url=base + "/healthz",
                 log=log) as proc:
        unpaced = read_events(url)
        conf.write_text(f'[upstream]\nmodel = "{burst.to_model()}"\n[pacing]\nmode = "smooth"\n')
        proc.send_signal(signal.SIGHUP)
        wait_for_log(log, "config_reloaded")
        paced = read_events(url)
        conf.write_text('[pacing]\ntarget_lag_s = "soon"\n')
        proc.send_signal(signal.SIGHUP)
        text = wait_for_log(log, "config_reload_failed")
        still_paced = read_events(url)
        metrics = httpx.get(base + "/metrics").text
    assert len(unpaced) == 1401
    assert 10 < len(paced) < 200 and 10 < len(still_paced) < 200
    failure = next(json.loads(line) for line in text.splitlines()
                   if "config_reload_failed" in line)
    assert "pacing.target_lag_s = 'soon'" in failure["reason"]
    assert 'sseproxy_config_reloads_total{result="ok"} 1.0' in metrics
    assert 'sseproxy_config_reloads_total{result="error"} 1.0' in metrics


@pytest.mark.parametrize("command", ["check-config", "serve"])
def test_an_unusable_config_file_exits_2_naming_the_file(tmp_path: Path, command: str) -> None:
    # issue 12 point 4: a file that is not UTF-8 crashed both commands with a traceback (rc 1)
    path = tmp_path / "sseproxy.toml"
    for kind, needle in sorted(UNUSABLE.items()):
        make_unusable(path, kind)
        args = [str(path)] if command == "check-config" else ["--config", str(path)]
        out = subprocess.run([sys.executable, "-m", "sseproxy", command, *args],
                             env=clean_env(), capture_output=True, text=True, timeout=30)
        assert out.returncode == 2, (kind, out.stderr)
        assert out.stderr.startswith("sseproxy: configuration error: "), (kind, out.stderr)
        assert repr(str(path)) in out.stderr and needle in out.stderr, (kind, out.stderr)
        assert "Traceback" not in out.stderr


def wait_for_count(log: Path, needle: str, count: int, within: float = 10.0) -> list[str]:
    """Wait until ``count`` log lines hold ``needle``; return those lines."""
    deadline = time.monotonic() + within
    while True:
        lines = [line for line in log.read_text().splitlines() if needle in line]
        if len(lines) >= count:
            return lines
        if time.monotonic() > deadline:
            raise AssertionError(f"{needle!r} not {count} times in the log:\n{log.read_text()}")
        time.sleep(0.05)


def test_sighup_with_an_unusable_config_file_logs_the_failure_and_keeps_serving(
    tmp_path: Path,
) -> None:
    # issue 12 point 4: a file that is not UTF-8 escaped the SIGHUP handler as "Exception in
    # callback", uncounted; issue 13 point 7: a FIFO blocked the event loop
    conf = tmp_path / "sseproxy.toml"
    conf.write_text("[pacing]\nmode = \"off\"\n")
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    log = tmp_path / "serve.log"
    kinds = sorted(UNUSABLE)
    with process("serve", "--config", str(conf), "--port", str(port), url=base + "/healthz",
                 log=log) as proc:
        for n, kind in enumerate(kinds, 1):
            make_unusable(conf, kind)
            proc.send_signal(signal.SIGHUP)
            wait_for_count(log, "config_reload_failed", n)
            assert httpx.get(base + "/healthz", timeout=5).status_code == 200
        events = read_events(base + "/v1/chat/stream?prompt=x")
        metrics = httpx.get(base + "/metrics").text
    failures = [json.loads(line) for line in log.read_text().splitlines()
                if "config_reload_failed" in line]
    assert [f["file"] for f in failures] == [str(conf)] * len(kinds)
    for failure, kind in zip(failures, kinds, strict=True):
        assert UNUSABLE[kind] in failure["reason"] and repr(str(conf)) in failure["reason"]
    assert "Exception in callback" not in log.read_text()
    assert f'sseproxy_config_reloads_total{{result="error"}} {float(len(kinds))}' in metrics
    assert events[-1].event == "done"


def test_metrics_on_a_separate_listener(tmp_path: Path) -> None:
    port, metrics_port = free_port(), free_port()
    base = f"http://127.0.0.1:{port}"
    with process("serve", "--port", str(port), "--set", f"metrics.port={metrics_port}",
                 url=base + "/healthz", log=tmp_path / "serve.log"):
        read_events(base + "/v1/chat/stream?prompt=hi")
        public = httpx.get(base + "/metrics")
        private = httpx.get(f"http://127.0.0.1:{metrics_port}/metrics")
    assert public.status_code == 404
    assert private.status_code == 200
    assert 'sseproxy_streams_total{outcome="completed"} 1.0' in private.text


@pytest.mark.parametrize("loop", ["uvloop", "asyncio"])
def test_serve_on_either_event_loop(tmp_path: Path, loop: str) -> None:
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    log = tmp_path / "serve.log"
    with process("serve", "--port", str(port), "--set", f"server.event_loop={loop}",
                 url=base + "/healthz", log=log):
        events = read_events(base + "/v1/chat/stream?prompt=hi")
    assert events[-1].event == "done"
    lines = [json.loads(x) for x in log.read_text().splitlines() if x.startswith("{")]
    assert [x["loop"] for x in lines if x["event"] == "event_loop"] == [loop]
