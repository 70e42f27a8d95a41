"""Worker processes: ``server.workers`` processes listening on one port.

The master forks the workers and then only supervises. Each worker runs
:func:`sseproxy.app.serve` with its own event loop, upstream client and metrics, and binds
its own listening socket with ``SO_REUSEPORT``: the kernel spreads new connections evenly
over the workers (a shared pre-forked socket lets one busy process grab whole bursts of
connections), and a worker that closes its socket on shutdown takes no new ones while the
others still do.

* a worker that dies unexpectedly is started again (after a short pause);
* SIGTERM or SIGINT is forwarded, so every worker shuts down gracefully (see
  :func:`sseproxy.app.serve`); a second one is forwarded too and the workers exit at
  once. The master exits 0 when every worker did;
* SIGHUP is forwarded: each worker re-reads the config file;
* a master that dies without stopping them (SIGKILL) takes the workers with it: Linux
  sends each a SIGTERM (``PR_SET_PDEATHSIG``), and they shut down as on SIGTERM.

Metrics are per worker: worker ``i`` serves ``/metrics`` on ``metrics.port + i`` and
Prometheus scrapes each as its own target (dashboards sum over ``instance``). This keeps
every metric type exact without shared files, and a dead worker's series go with it.
"""

from __future__ import annotations

import asyncio
import os
import signal
import time
from collections.abc import Coroutine, Mapping
from types import FrameType
from typing import Any

import structlog
import tornado.netutil

from . import localmodel
from .config import Settings

log = structlog.get_logger("sseproxy.workers")

#: Pause before a worker that died is started again (a crash loop must not spin).
RESPAWN_DELAY_S = 1.0


def run(settings: Settings, overrides: Mapping[str, Any] | None = None) -> int:
    """Serve with ``server.workers`` processes; return the exit status.

    With ``upstream.kind = "local"`` the model server is started first, once, and every
    worker relays to it; it is stopped when they all have.
    """
    from .app import serve

    local = localmodel.start(settings) if settings.upstream.kind == "local" else None
    local_url = local.url if local is not None else None
    try:
        if settings.server.workers == 1:
            return run_loop(settings, serve(settings, overrides, local_url=local_url))
        return Master(settings, overrides, local_url).run()
    finally:
        if local is not None:
            local.stop()


def run_loop(settings: Settings, main: Coroutine[Any, Any, int]) -> int:
    """Run ``main`` on the event loop ``server.event_loop`` names."""
    choice = settings.server.event_loop
    if choice != "asyncio":
        try:
            import uvloop
        except ImportError:
            if choice == "uvloop":  # pragma: no cover - refused by config validation
                raise
        else:
            log.info("event_loop", loop="uvloop")
            return int(uvloop.run(main))
    log.info("event_loop", loop="asyncio")
    return asyncio.run(main)


class Master:
    def __init__(self, settings: Settings, overrides: Mapping[str, Any] | None,
                 local_url: str | None = None) -> None:
        self.settings = settings
        self.overrides = overrides
        self.local_url = local_url
        self.children: dict[int, int] = {}  # pid -> worker index
        self.signals = 0
        self.failed = False

    def run(self) -> int:
        signal.signal(signal.SIGTERM, self._on_stop)
        signal.signal(signal.SIGINT, self._on_stop)
        signal.signal(signal.SIGHUP, self._on_hup)
        for index in range(self.settings.server.workers):
            self._spawn(index)
        log.info("master_started", pid=os.getpid(), workers=self.settings.server.workers)
        while self.children:
            try:
                pid, status = os.wait()
            except ChildProcessError:
                break
            if pid not in self.children:
                continue
            index = self.children.pop(pid)
            code = os.waitstatus_to_exitcode(status)
            if self.signals:
                self.failed |= code != 0
                log.info("worker_stopped", worker=index, pid=pid, code=code)
                continue
            log.error("worker_died", worker=index, pid=pid, code=code)
            time.sleep(RESPAWN_DELAY_S)
            if not self.signals:
                self._spawn(index)
        log.info("master_stopped", failed=self.failed)
        return 1 if self.failed else 0

    def _spawn(self, index: int) -> None:
        master = os.getpid()
        pid = os.fork()
        if pid == 0:  # the worker
            code = 1
            try:
                for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
                    signal.signal(sig, signal.SIG_DFL)
                # a master killed outright (SIGKILL) leaves no worker behind: each one
                # then shuts down as on SIGTERM
                localmodel.die_with_parent(signal.SIGTERM)
                if os.getppid() != master:
                    os.kill(os.getpid(), signal.SIGTERM)
                from .app import serve

                server = self.settings.server
                sockets = tornado.netutil.bind_sockets(
                    server.port, server.host, backlog=4096, reuse_port=True)
                code = run_loop(self.settings, serve(self.settings, self.overrides,
                                                     sockets=sockets, worker=index,
                                                     local_url=self.local_url))
            except BaseException:
                log.exception("worker_failed", worker=index)
            finally:
                os._exit(code)
        self.children[pid] = index

    def _forward(self, signum: int) -> None:
        for pid in list(self.children):
            try:
                os.kill(pid, signum)
            except ProcessLookupError:
                pass

    def _on_stop(self, signum: int, frame: FrameType | None) -> None:
        self.signals += 1
        if self.signals == 1:
            log.info("master_stopping", signal=signal.Signals(signum).name)
        self._forward(signum)

    def _on_hup(self, signum: int, frame: FrameType | None) -> None:
        self._forward(signum)
