"""The Tornado application and the process around it.

``make_app(settings, deps)`` wires the routes to their handlers (dependencies
go in through ``initialize``); :func:`serve` runs one sseproxy process: it
builds the dependencies once, starts the built-in simulator when the upstream
is ``mock`` without a URL, listens, and stops cleanly on SIGINT/SIGTERM.
"""

from __future__ import annotations

import asyncio
import gc
import os
import signal
import socket
from collections.abc import Mapping
from typing import Any

import structlog
import tornado.httpserver
import tornado.httputil
import tornado.netutil
import tornado.web

from . import access, config, handlers, httpserver, localmodel, mockupstream
from . import responses_handlers, session_handlers
from .config import Settings
from .errors import ConfigError, ServerShutdown
from .handlers import Deps
from .limiter import Limiter, RedisCounters
from .looplag import LoopLagMonitor
from .metrics import Metrics
from .models import ModelCatalog
from .record import Outcome
from .registry import StreamRegistry
from .store import Store
from .store.memory import MemoryStore
from .upstream import UpstreamClient, make_transport

log = structlog.get_logger("sseproxy.app")

STATIC_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "static")


def access_log(handler: tornado.web.RequestHandler, logger: str = "tornado.access") -> None:
    """Tornado's access log as one structured line; the query string is never logged
    (an EventSource prompt travels in it)."""
    status = handler.get_status()
    request = handler.request
    level = "info" if status < 400 else "warning" if status < 500 else "error"
    getattr(structlog.get_logger(logger), level)(
        "request",
        method=request.method,
        path=request.path,
        status=status,
        duration_ms=round(1000.0 * request.request_time(), 2),
        remote_ip=request.remote_ip,
    )


#: The largest body gzipped (``server.compress_response``): compressing it is one step.
GZIP_MAX_BYTES = 65536


class StreamSafeGZip(tornado.web.GZipContentEncoding):
    """Tornado's gzip for ordinary responses, never for an event stream: gzip would hold
    frames back until its buffer fills (``server.compress_response``). A body over
    :data:`GZIP_MAX_BYTES` (a long ``stream: false`` reply) goes uncompressed too: it is
    compressed in one synchronous call, which held the event loop about 40 ms per MiB."""

    _event_stream = False

    def transform_first_chunk(
        self, status_code: int, headers: tornado.httputil.HTTPHeaders, chunk: bytes,
        finishing: bool,
    ) -> tuple[int, tornado.httputil.HTTPHeaders, bytes]:
        if headers.get("Content-Type", "").startswith("text/event-stream"):
            self._event_stream = True
            return status_code, headers, chunk
        if len(chunk) > GZIP_MAX_BYTES:
            self._gzipping = False
        return super().transform_first_chunk(status_code, headers, chunk, finishing)

    def transform_chunk(self, chunk: bytes, finishing: bool) -> bytes:
        if self._event_stream:
            return chunk
        return super().transform_chunk(chunk, finishing)


def make_app(settings: Settings, deps: Deps, **app_settings: Any) -> tornado.web.Application:
    route = {"deps": deps}
    stream_id = r"([0-9a-f]{32})"
    routes: list[Any] = [
        (r"/v1/chat/completions", handlers.ChatCompletionsHandler, route),
        (r"/v1/chat/stream", handlers.ChatStreamHandler, route),
        (r"/v1/models", handlers.ModelsHandler, route),
        (r"/v1/models/(.+)", handlers.ModelHandler, route),
        (r"/v1/personas", handlers.PersonasHandler, route),
        (r"/v1/streams", handlers.StreamsHandler, route),
        (rf"/v1/streams/{stream_id}", handlers.StreamHandler, route),
        (r"/healthz", handlers.HealthHandler, route),
        (r"/readyz", handlers.ReadyHandler, route),
        *responses_handlers.routes(route),
        *session_handlers.routes(route),
        # The chat page and its assets (deploy/nginx.conf serves the same paths itself).
        (r"/()", access.StaticHandler, {"path": STATIC_DIR, "default_filename": "index.html"}),
        (r"/static/(.*)", access.StaticHandler, {"path": STATIC_DIR}),
    ]
    if not settings.metrics.port:
        routes.append((r"/metrics", handlers.MetricsHandler, route))
    return tornado.web.Application(
        routes,
        default_handler_class=handlers.NotFoundHandler,
        default_handler_args=route,
        transforms=[StreamSafeGZip] if settings.server.compress_response else [],
        log_function=access_log,
        cookie_secret=settings.cookie_secret,
        **app_settings,
    )


class ListenerMetricsHandler(handlers.MetricsHandler):
    """``/metrics`` on ``metrics.port``: kept private by its address, so served without a
    key."""

    public = True


def make_metrics_app(deps: Deps) -> tornado.web.Application:
    """The separate ``/metrics`` listener (``metrics.port``)."""
    route = {"deps": deps}
    return tornado.web.Application(
        [(r"/metrics", ListenerMetricsHandler, route)],
        default_handler_class=handlers.NotFoundHandler,
        default_handler_args=route,
        log_function=lambda handler: access_log(handler, "sseproxy.metrics.access"),
    )


#: Tornado closes a connection whose body is late this long after ``limits.body_timeout_s``:
#: a backstop for URLs that take no body (the OpenAI endpoint answers 408 before it).
BODY_TIMEOUT_BACKSTOP_S = 1.0


def make_server(app: tornado.web.Application, settings: Settings) -> httpserver.HTTPServer:
    limits = settings.limits
    return httpserver.HTTPServer(
        app,
        head_limits=httpserver.HeadLimits(limits.max_url_bytes, limits.max_header_bytes),
        xheaders=True,
        # Bodies past limits.max_body_bytes get a 413 from the handler, which discards the
        # rest as it arrives (so the client can read the answer); this only cuts off a client
        # that keeps sending long after that.
        max_body_size=max(16 * limits.max_body_bytes, 64 << 20),
        idle_connection_timeout=limits.header_timeout_s,
        body_timeout=limits.body_timeout_s + BODY_TIMEOUT_BACKSTOP_S,
    )


async def build_deps(
    settings: Settings, upstream_url: str | None = None, metrics: Metrics | None = None
) -> Deps:
    upstream = UpstreamClient(settings, make_transport(settings), base_url=upstream_url,
                              api_key=config.api_key(settings))
    metrics = metrics if metrics is not None else Metrics()
    st = settings.store
    store: Store
    limiter = Limiter(metrics)
    if st.backend == "redis":
        from .store.redis import RedisStore  # redis-py only where it is used

        redis_store = store = RedisStore(
            url=st.redis_url, timeout_s=st.redis_timeout_s, max_events=st.max_events,
            max_bytes=st.max_bytes, ttl_s=st.ttl_s,
            running_ttl_s=settings.upstream.max_duration_s,
            on_error=lambda op: metrics.store_errors.labels(op).inc())
        # Per-key limits share the store's Redis (and fall back to this process's counters
        # while the store knows Redis is down).
        limiter = Limiter(metrics, RedisCounters(redis_store.redis, st.redis_timeout_s),
                          lambda: redis_store.problem)
    else:
        store = MemoryStore(max_events=st.max_events, max_bytes=st.max_bytes, ttl_s=st.ttl_s,
                            on_evict=metrics.log_evictions.inc)
    metrics.log_streams.set_function(lambda: store.streams)
    metrics.log_events.set_function(lambda: store.events)
    metrics.log_bytes.set_function(lambda: store.bytes)
    registry = StreamRegistry(settings.limits.max_streams, lambda: deps.settings)
    deps = Deps(settings=settings, upstream=upstream, registry=registry, store=store,
                metrics=metrics, models=ModelCatalog(upstream), limiter=limiter)
    registry.start()
    deps.loop_lag = LoopLagMonitor(deps.metrics.event_loop_lag.observe)
    deps.loop_lag.start()
    return deps


async def close_deps(deps: Deps) -> None:
    """Stop what :func:`build_deps` started (generations still running are cancelled)."""
    running = list(deps.registry.generations.values())
    for generation in running:
        generation.stop(Outcome.CANCELLED, ServerShutdown())
    await asyncio.gather(*(g.wait_closed() for g in running))
    if deps.limiter is not None:
        await deps.limiter.close()  # the permits' releases, before the store's Redis closes
    deps.registry.stop()
    if deps.loop_lag is not None:
        deps.loop_lag.stop()
    await deps.store.close()
    await deps.upstream.aclose()


def reload_settings(deps: Deps, overrides: Mapping[str, Any] | None = None) -> bool:
    """SIGHUP: re-read the config file; valid changes apply to streams that start afterwards.

    An invalid file is logged (naming the key) and counted, and the running settings stay.
    """
    try:
        settings, applied, need_restart = config.reload(deps.settings, overrides=overrides)
    except ConfigError as exc:
        deps.metrics.config_reloads.labels("error").inc()
        log.error("config_reload_failed", file=deps.settings.source, reason=exc.message)
        return False
    deps.settings = settings
    deps.metrics.config_reloads.labels("ok").inc()
    log.info("config_reloaded", file=settings.source, changed=applied)
    if need_restart:
        log.warning("config_reload_needs_restart", keys=need_restart,
                    hint="these keys keep their old values until the process restarts")
    return True


async def serve(
    settings: Settings,
    overrides: Mapping[str, Any] | None = None,
    *,
    sockets: list[socket.socket] | None = None,
    worker: int = 0,
    local_url: str | None = None,
) -> int:
    """Run one sseproxy process until SIGINT or SIGTERM; SIGHUP reloads the config file.

    ``overrides`` are the command-line flags, applied again on every reload. ``sockets``
    are the listening sockets a worker bound (``worker`` is its index, see
    :mod:`sseproxy.workers`); without them the process binds ``server.host:server.port``.

    SIGTERM (or SIGINT) shuts down gracefully: the listeners close at once (new
    connections are refused, so a proxy moves on to another instance), and connections
    are no longer kept alive: idle keep-alive connections close at once, a request that
    still arrives on an open connection is answered with ``Connection: close`` (``/readyz``
    fails) and the connection closes after it, and one busy with a response at the signal
    closes when that response has finished (:meth:`.httpserver.HTTPServer.drain`). So a
    proxy sends its next requests to another instance; one sent on an idle connection at
    the instant it closes fails (the race of every server that closes idle connections;
    nginx retries it unless it is a ``POST``). Running streams
    may finish for ``server.shutdown_grace_s``, then those still running get a
    ``server_shutdown`` error and end, upstream requests are cancelled, and the process
    exits 0. A second SIGTERM or SIGINT exits at once.

    ``local_url`` is where the model server of ``upstream.kind = "local"`` answers (see
    :mod:`sseproxy.localmodel`); ``/readyz`` is 503 ``loading_model`` until it does.
    """
    mock_server = None
    upstream_url = settings.upstream_url
    if settings.upstream.kind == "mock" and not upstream_url:
        mock_server, mock_port = await mockupstream.start(
            log_function=lambda handler: access_log(handler, "sseproxy.mock.access"))
        upstream_url = f"http://127.0.0.1:{mock_port}/v1"
        log.info("mock_upstream_started", url=upstream_url)
    if settings.upstream.kind == "openai" and not config.api_key(settings):
        log.warning("upstream_key_missing", env=settings.upstream.api_key_env,
                    hint="requests go out without an Authorization header")
    if settings.auth.mode == "keys" and not os.environ.get(config.COOKIE_SECRET_ENV):
        log.warning("cookie_secret_random", env=config.COOKIE_SECRET_ENV,
                    hint="chat page logins end when sseproxy restarts and do not carry over "
                         "to other instances; set the variable to keep them")
    probe = None
    if settings.upstream.kind == "local" and local_url:
        upstream_url = local_url
        probe = localmodel.ReadinessProbe(local_url)
        probe.start()
    deps = await build_deps(settings, upstream_url)
    deps.local_model = probe
    server = make_server(make_app(settings, deps), settings)
    if sockets is None:
        sockets = tornado.netutil.bind_sockets(settings.server.port, settings.server.host,
                                               backlog=4096)
    server.add_sockets(sockets)
    metrics_server = None
    if settings.metrics.port:
        metrics_server = tornado.httpserver.HTTPServer(make_metrics_app(deps))
        metrics_server.listen(settings.metrics.port + worker, settings.metrics.host)
        log.info("metrics_listening", host=settings.metrics.host,
                 port=settings.metrics.port + worker)
    # Everything allocated so far lives as long as the process: keep the collector from
    # walking it again and again (full collections showed up as latency spikes).
    gc.collect()
    gc.freeze()
    log.info("listening", host=settings.server.host, port=settings.server.port,
             upstream=upstream_url, upstream_kind=settings.upstream.kind, pid=os.getpid(),
             worker=worker)

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()

    def on_stop_signal(signum: int) -> None:
        if stop.is_set():
            log.warning("exiting_now", signal=signal.Signals(signum).name)
            os._exit(1)  # a second signal: no more waiting
        stop.set()

    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, on_stop_signal, sig)
    loop.add_signal_handler(signal.SIGHUP, reload_settings, deps, overrides)
    try:
        await stop.wait()
    finally:
        server.stop()  # close the listeners: new connections are refused from now on
        server.drain()  # no more keep-alive: idle connections close now
        if metrics_server is not None:
            metrics_server.stop()
        await drain(deps, deps.settings.server.shutdown_grace_s)
        try:
            await asyncio.wait_for(server.close_all_connections(), timeout=2.0)
        except TimeoutError:
            log.warning("connections_left_open")
        await close_deps(deps)
        if probe is not None:
            await probe.stop()
        if mock_server is not None:
            mock_server.stop()
            await mock_server.close_all_connections()
        log.info("stopped", pid=os.getpid(), worker=worker)
    return 0


async def drain(deps: Deps, grace_s: float) -> None:
    """Let running streams finish for ``grace_s``, then end the rest with a
    ``server_shutdown`` error (after what they already received, within ``pacing.drain_s``).
    With a shared store the EventSource subscribers are first sent to reconnect elsewhere."""
    store: Store = deps.store
    await deps.registry.drain(grace_s, deps.settings.pacing.drain_s, handoff=store.shared)
