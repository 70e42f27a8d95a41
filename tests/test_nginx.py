"""sseproxy behind a real nginx running deploy/nginx.conf (issue 5).

Every test starts Debian's nginx as a foreground process it owns, with a generated main
config (``events {}`` + ``http {}`` with temp paths in a private directory) that includes
deploy/nginx.conf rendered for the test: listen port, upstream address, static root and
access log path are substituted in the real file (and the test fails loudly when the file
no longer contains them). sseproxy and the simulator run in the test's event loop
(tests/servers.py). nginx is never mocked; when it is missing the tests fail.

Timing assertions check order and overlap with generous margins, never speed.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
from servers import Running, running, stream
from structlog.testing import capture_logs

from sseproxy import access, config, sse
from sseproxy.mockupstream import Scenario, make_tokens

SITE = Path(__file__).resolve().parent.parent / "deploy" / "nginx.conf"
CHAT = [{"role": "user", "content": "hi"}]
PAUSED = Scenario(rate=0, tokens=6, stall_at=3, stall_s=2.0)  # 3 tokens, 2 s pause, 3 tokens
# What someone else's nginx might have in http {}: compress streams, buffer everything.
HOSTILE = "gzip on; gzip_types text/event-stream; gzip_proxied any; proxy_buffering on;"


def nginx_binary() -> str:
    binary = shutil.which("nginx") or "/usr/sbin/nginx"
    if not os.access(binary, os.X_OK):
        pytest.fail("nginx is not installed, and these tests run a real nginx in front of "
                    "sseproxy: install Debian's nginx (apt-get install nginx; CI installs it)")
    return binary


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def port_of(url: str) -> int:
    return int(url.rsplit(":", 1)[1])


# --- rendering deploy/nginx.conf for a test -----------------------------------------------


def replace(text: str, old: str, new: str, *, count: int | None = None) -> str:
    """Replace ``old`` in the active (not commented-out) lines of a config, failing when
    deploy/nginx.conf changed under the test."""
    lines = text.splitlines(keepends=True)
    found = 0
    for i, line in enumerate(lines):
        if not line.lstrip().startswith("#") and old in line:
            found += line.count(old)
            lines[i] = line.replace(old, new)
    if found == 0 or (count is not None and found != count):
        pytest.fail(f"deploy/nginx.conf contains {old!r} {found} times outside comments, "
                    f"tests/test_nginx.py expects {count or 'at least 1'}: update the test")
    return "".join(lines)


def drop_directive(text: str, directive: str) -> str:
    """Remove the active (not commented-out) lines that are exactly ``directive``."""
    pattern = re.compile(r"^[ \t]+" + re.escape(directive) + r"[ \t]*\n", re.MULTILINE)
    text, found = pattern.subn("", text)
    if not found:
        pytest.fail(f"deploy/nginx.conf has no active {directive!r} line any more")
    return text


def enable_tls(text: str, port: int, cert: Path, key: Path) -> str:
    """Uncomment the TLS server block the way its comment tells an operator to."""
    match = re.search(r"^# BEGIN TLS\n(.*?)^# END TLS$", text, re.MULTILINE | re.DOTALL)
    if match is None:
        pytest.fail("deploy/nginx.conf has no '# BEGIN TLS' ... '# END TLS' block any more")
    lines = match.group(1).splitlines()
    assert all(line.startswith("#") for line in lines), "every TLS line should be commented"
    block = "\n".join(line[1:] for line in lines) + "\n"
    block = replace(block, "listen 443 ssl http2;", f"listen 127.0.0.1:{port} ssl http2;",
                    count=1)
    block = replace(block, "/etc/letsencrypt/live/chat.example.com/fullchain.pem", str(cert))
    block = replace(block, "/etc/letsencrypt/live/chat.example.com/privkey.pem", str(key))
    return text[:match.start()] + block + text[match.end():]


def render_site(
    workdir: Path,
    port: int,
    upstream_port: int,
    *,
    read_timeout: str | None = None,
    drop: tuple[str, ...] = (),
    edit: Callable[[str], str] | None = None,
) -> str:
    text = SITE.read_text()
    if edit is not None:
        text = edit(text)
    text = replace(text, "listen 80;", f"listen 127.0.0.1:{port};", count=1)
    text = replace(text, "server 127.0.0.1:8080 ", f"server 127.0.0.1:{upstream_port} ",
                   count=1)
    text = replace(text, "/srv/sseproxy/static", str(workdir / "static"))
    text = replace(text, "/var/log/nginx/sseproxy.access.log", str(workdir / "access.log"))
    if read_timeout is not None:
        text = replace(text, "proxy_read_timeout 3600s;", f"proxy_read_timeout {read_timeout};")
    for directive in drop:
        text = drop_directive(text, directive)
    return text


def main_config(workdir: Path, http_extra: str = "") -> str:
    temp = workdir / "temp"
    return f"""
events {{
    worker_connections 256;
}}
http {{
    types {{
        text/html html;
        text/css css;
        text/plain txt;
        application/javascript js;
    }}
    default_type application/octet-stream;
    client_body_temp_path {temp}/body;
    proxy_temp_path {temp}/proxy;
    fastcgi_temp_path {temp}/fastcgi;
    uwsgi_temp_path {temp}/uwsgi;
    scgi_temp_path {temp}/scgi;
    access_log {workdir}/main-access.log;
    {http_extra}
    include {workdir}/site.conf;
}}
"""


# The static root nginx serves in the tests.
INDEX_HTML = "<!doctype html><title>sseproxy test page</title>\n"
APP_CSS = "body { font-family: sans-serif; }\n" * 40  # > gzip_min_length


@asynccontextmanager
async def workspace() -> AsyncIterator[Path]:
    """A private directory for nginx: config, temp paths, logs and the static root.

    World-readable (0755), so nginx's worker processes (user nobody when the tests run as
    root) can read the static files; nginx creates its temp directories for them itself.
    """
    workdir = Path(tempfile.mkdtemp(prefix="sseproxy-nginx-"))
    try:
        workdir.chmod(0o755)
        (workdir / "temp").mkdir(mode=0o755)
        static = workdir / "static"
        static.mkdir(mode=0o755)
        (static / "index.html").write_text(INDEX_HTML)
        (static / "app.css").write_text(APP_CSS)
        (static / "robots.txt").write_text("User-agent: *\n")
        yield workdir
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


def nginx_args(workdir: Path) -> list[str]:
    # `daemon`, `pid` and `error_log` are main-context directives: given with -g, they must
    # not appear in the file as well. -e sets the log nginx writes to before it has read
    # the configuration (Debian's default is already stderr).
    return [nginx_binary(), "-p", f"{workdir}/", "-c", str(workdir / "nginx.conf"),
            "-e", "stderr", "-g",
            f"daemon off; master_process on; pid {workdir}/nginx.pid; error_log stderr info;"]


def nginx_test(workdir: Path) -> subprocess.CompletedProcess[str]:
    """``nginx -t`` on what is in workdir."""
    return subprocess.run([*nginx_args(workdir)[:1], "-t", *nginx_args(workdir)[1:]],
                          capture_output=True, text=True, timeout=30)


@dataclass
class Nginx:
    url: str
    workdir: Path
    process: subprocess.Popen[bytes]
    extra: dict[str, Any] = field(default_factory=dict)

    def stderr(self) -> str:
        return (self.workdir / "nginx.stderr").read_text(errors="replace")

    def access_log(self) -> list[str]:
        """The site's access log (deploy/nginx.conf's `sseproxy` format)."""
        return (self.workdir / "access.log").read_text().splitlines()


async def wait_listening(port: int, process: subprocess.Popen[bytes], within: float) -> bool:
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        if process.poll() is not None:
            return False
        try:
            _, writer = await asyncio.open_connection("127.0.0.1", port)
        except OSError:
            await asyncio.sleep(0.02)
            continue
        writer.close()
        await writer.wait_closed()
        return True
    return False


async def stop(process: subprocess.Popen[bytes]) -> None:
    """Fast shutdown (SIGTERM: nginx closes every connection, workers exit, then the
    master); SIGKILL to the whole process group if that takes too long."""
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + 5.0
    while process.poll() is None and time.monotonic() < deadline:
        await asyncio.sleep(0.02)
    if process.poll() is None:
        os.killpg(process.pid, signal.SIGKILL)  # start_new_session: the group is nginx's
        process.wait()


@asynccontextmanager
async def nginx(
    workdir: Path, render: Callable[[int], str], http_extra: str = ""
) -> AsyncIterator[Nginx]:
    """Run nginx with ``render(port)`` as the site until the block ends."""
    (workdir / "nginx.conf").write_text(main_config(workdir, http_extra))
    for _attempt in range(3):
        port = free_port()
        (workdir / "site.conf").write_text(render(port))
        with open(workdir / "nginx.stderr", "wb") as err:
            process = subprocess.Popen(nginx_args(workdir), stdin=subprocess.DEVNULL,
                                       stdout=err, stderr=err, start_new_session=True)
        try:
            if await wait_listening(port, process, within=10.0):
                yield Nginx(f"http://127.0.0.1:{port}", workdir, process)
                return
            log = (workdir / "nginx.stderr").read_text(errors="replace")
            if "Address already in use" not in log:
                pytest.fail(f"nginx did not start:\n{log}")
        finally:
            await stop(process)
    pytest.fail("nginx found no free port in 3 attempts")


@asynccontextmanager
async def behind_nginx(
    scenario: Scenario | None = None,
    *,
    read_timeout: str | None = None,
    drop: tuple[str, ...] = (),
    http_extra: str = "",
    upstream_port: int | None = None,
    **overrides: Any,
) -> AsyncIterator[tuple[Running, Nginx]]:
    """The simulator, sseproxy, and nginx with deploy/nginx.conf in front of sseproxy."""
    async with running(scenario, **overrides) as r, workspace() as workdir:
        target = upstream_port or port_of(r.url)

        def render(port: int) -> str:
            return render_site(workdir, port, target, read_timeout=read_timeout, drop=drop)

        async with nginx(workdir, render, http_extra) as ngx:
            yield r, ngx


def es_path(prompt: str = "hi") -> str:
    return f"/v1/chat/stream?prompt={prompt}"


def chat_body(scenario: Scenario, stream_: bool = True) -> dict[str, Any]:
    return {"model": scenario.to_model(), "messages": CHAT, "stream": stream_}


def delta_times(got: Any) -> list[float]:
    """Arrival times of the text-carrying events (EventSource deltas or OpenAI chunks)."""
    times = []
    for event, data, at in zip(got.events, got.data(), got.times, strict=True):
        if event.event != "message" or not isinstance(data, dict):
            continue
        if data.get("content") or any(c["delta"].get("content")
                                      for c in data.get("choices") or ()):
            times.append(at)
    return times


def assert_one_by_one(times: list[float], pause: float) -> None:
    """The first three tokens came before the simulator's pause ended, the rest after."""
    assert len(times) == 6, times
    assert times[2] < pause - 0.7, times
    assert times[3] - times[2] > pause - 0.6, times


@dataclass
class Decoded:
    """Like servers.Received, read with content decoding (a gzip body is inflated as it
    arrives), for the tests where nginx may compress."""

    headers: httpx.Headers
    events: list[sse.Event] = field(default_factory=list)
    times: list[float] = field(default_factory=list)

    def data(self) -> list[Any]:
        return [json.loads(e.data) if e.data != "[DONE]" else e.data for e in self.events]


async def read_decoded(method: str, url: str, **kwargs: Any) -> Decoded:
    start = time.monotonic()
    decoder = sse.Decoder()
    async with httpx.AsyncClient(timeout=20.0) as client:
        async with client.stream(method, url, **kwargs) as response:
            assert response.status_code == 200
            got = Decoded(response.headers)
            async for chunk in response.aiter_bytes():
                now = time.monotonic() - start
                for event in decoder.feed(chunk):
                    got.events.append(event)
                    got.times.append(now)
    return got


# --- the file itself ----------------------------------------------------------------------


async def test_the_rendered_site_passes_nginx_t(io_loop: Any) -> None:
    async with workspace() as workdir:
        (workdir / "nginx.conf").write_text(main_config(workdir))
        (workdir / "site.conf").write_text(render_site(workdir, free_port(), 8080))
        result = nginx_test(workdir)
    assert result.returncode == 0, result.stderr
    assert "test is successful" in result.stderr


async def test_the_tls_block_is_ready_to_enable(io_loop: Any) -> None:
    openssl = shutil.which("openssl")
    if openssl is None:
        pytest.fail("openssl is not installed: apt-get install openssl (it makes the test "
                    "certificate for the TLS server block)")
    async with workspace() as workdir:
        cert, key = workdir / "cert.pem", workdir / "key.pem"
        subprocess.run([openssl, "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
                        "-subj", "/CN=localhost", "-keyout", str(key), "-out", str(cert)],
                       check=True, capture_output=True, timeout=60)
        tls_port = free_port()
        site = render_site(workdir, free_port(), 8080,
                           edit=lambda text: enable_tls(text, tls_port, cert, key))
        assert re.search(r"^server \{\n    listen 127\.0\.0\.1:\d+ ssl http2;", site, re.M)
        (workdir / "nginx.conf").write_text(main_config(workdir))
        (workdir / "site.conf").write_text(site)
        result = nginx_test(workdir)
    assert result.returncode == 0, result.stderr


def test_the_file_agrees_with_sseproxys_defaults() -> None:
    text = SITE.read_text()
    defaults = config.load(None, environ={}, overrides={})
    body = re.search(r"^\s*client_max_body_size (\d+)m;", text, re.M)
    assert body is not None and int(body.group(1)) << 20 == defaults.limits.max_body_bytes
    timeout = re.search(r"^\s*proxy_read_timeout (\d+)s;", text, re.M)
    assert timeout is not None
    assert int(timeout.group(1)) >= 10 * defaults.heartbeat.interval_s
    assert int(timeout.group(1)) > defaults.upstream.first_token_timeout_s
    assert int(timeout.group(1)) > defaults.upstream.idle_timeout_s


# --- (a) frames arrive one by one through nginx -------------------------------------------


@pytest.mark.parametrize("endpoint", ["eventsource", "openai"])
async def test_tokens_arrive_through_nginx_before_the_upstream_pause_ends(
    io_loop: Any, endpoint: str
) -> None:
    async with behind_nginx(PAUSED) as (r, ngx):
        if endpoint == "eventsource":
            got = await stream("GET", ngx.url + es_path())
        else:
            got = await stream("POST", ngx.url + "/v1/chat/completions", json=chat_body(PAUSED))
    assert got.status == 200 and got.complete
    assert got.headers["content-type"] == "text/event-stream; charset=utf-8"
    assert_one_by_one(delta_times(got), PAUSED.stall_s)
    assert got.content() == "".join(make_tokens(PAUSED))


# --- (b) ... even when the http {} block is hostile ---------------------------------------


async def test_hostile_http_settings_do_not_buffer_or_compress_the_stream(io_loop: Any) -> None:
    async with behind_nginx(PAUSED, http_extra=HOSTILE) as (r, ngx):
        got = await stream("POST", ngx.url + "/v1/chat/completions", json=chat_body(PAUSED),
                           headers={"Accept-Encoding": "gzip"})
    assert got.status == 200 and got.complete
    assert "content-encoding" not in got.headers
    assert_one_by_one(delta_times(got), PAUSED.stall_s)
    assert got.data()[-1] == "[DONE]"


@pytest.mark.parametrize("header_honoured", [True, False], ids=["header", "header-ignored"])
async def test_x_accel_buffering_alone_keeps_the_stream_unbuffered(
    io_loop: Any, header_honoured: bool
) -> None:
    # Defence in depth: the rendered site without its own `proxy_buffering off`, in an
    # http {} block with `proxy_buffering on`: sseproxy's X-Accel-Buffering: no header is
    # all that keeps the stream flowing. `proxy_http_version 1.1` goes too: with a chunked
    # HTTP/1.1 response, nginx (1.22) passes each complete chunk on even while buffering,
    # which would hide the trap; over HTTP/1.0 (nginx's default) a buffered response waits
    # for a full buffer or its end. The control, where nginx ignores the header, shows
    # the trap is real: the stream arrives as one blob after the pause.
    extra = HOSTILE + ("" if header_honoured else " proxy_ignore_headers X-Accel-Buffering;")
    drop = ("proxy_buffering off;", "proxy_http_version 1.1;")
    async with behind_nginx(PAUSED, http_extra=extra, drop=drop) as (r, ngx):
        got = await stream("GET", ngx.url + es_path(), headers={"Accept-Encoding": "gzip"})
    assert got.status == 200 and got.complete
    assert "content-encoding" not in got.headers
    times = delta_times(got)
    if header_honoured:
        assert_one_by_one(times, PAUSED.stall_s)
    else:
        assert len(times) == 6 and times[0] > PAUSED.stall_s - 0.5, times


async def test_someone_elses_gzipping_nginx_still_streams(io_loop: Any) -> None:
    # A naive site (a bare proxy_pass: HTTP/1.0, no proxy_buffering off, no gzip off) in a
    # hostile http {} block. X-Accel-Buffering: no makes nginx unbuffered; nginx still
    # gzips the stream (it ignores Cache-Control: no-transform), but it flushes the
    # compressor on every read when unbuffered, so each frame still arrives at once.
    async with running(PAUSED) as r, workspace() as workdir:
        def naive(port: int) -> str:
            return (f"server {{ listen 127.0.0.1:{port}; "
                    f"location / {{ proxy_pass {r.url}; }} }}\n")

        async with nginx(workdir, naive, HOSTILE) as ngx:
            got = await read_decoded("POST", ngx.url + "/v1/chat/completions",
                                     json=chat_body(PAUSED), headers={"Accept-Encoding": "gzip"})
    assert got.headers.get("content-encoding") == "gzip"
    assert_one_by_one(delta_times(got), PAUSED.stall_s)
    assert got.data()[-1] == "[DONE]"


# --- (c) heartbeats keep a stream alive through proxy_read_timeout -----------------------


async def test_heartbeats_keep_a_paused_stream_alive_past_proxy_read_timeout(
    io_loop: Any,
) -> None:
    pause = Scenario(rate=0, tokens=6, stall_at=3, stall_s=3.0)
    async with behind_nginx(pause, read_timeout="1s", heartbeat__interval_s=0.3) as (r, ngx):
        got = await stream("GET", ngx.url + es_path())
        stats = await r.mock_stats()
        errors = ngx.stderr()
    assert got.complete
    assert got.content() == "".join(make_tokens(pause))
    assert [e.event for e in got.events][-1] == "done"
    assert len(got.pings) >= 5
    assert stats["completed"] == 1
    assert "upstream timed out" not in errors


async def test_without_heartbeats_nginx_cuts_the_paused_stream(io_loop: Any) -> None:
    # The opposite, so the test above means something: heartbeats rarer than nginx's
    # proxy_read_timeout, and nginx drops the stream during the model's pause.
    pause = Scenario(rate=0, tokens=6, stall_at=3, stall_s=3.0)
    async with behind_nginx(pause, read_timeout="1s", heartbeat__interval_s=10,
                            store__orphan_grace_s=0.3) as (r, ngx):
        got = await stream("GET", ngx.url + es_path())
        await r.wait_mock("open", 0, within=3.0)
        stats = await r.mock_stats()
        errors = ngx.stderr()
    assert not got.complete
    assert len(delta_times(got)) == 3 and not got.pings
    assert got.times[-1] < 1.0
    assert "upstream timed out" in errors
    assert stats["cancelled"] == 1 and stats["completed"] == 0


# --- (d) a client leaving nginx cancels the upstream -------------------------------------


@pytest.mark.parametrize("endpoint", ["eventsource", "openai"])
async def test_client_leaving_nginx_mid_stream_cancels_the_upstream(
    io_loop: Any, endpoint: str
) -> None:
    # EventSource streams: after store.orphan_grace_s without a subscriber (issue 14).
    slow = Scenario(rate=20, tokens=200)
    async with behind_nginx(slow, store__orphan_grace_s=0.3) as (r, ngx):
        if endpoint == "eventsource":
            got = await stream("GET", ngx.url + es_path(), stop_after=3)
        else:
            got = await stream("POST", ngx.url + "/v1/chat/completions",
                               json=chat_body(slow), stop_after=3)
        took = await r.wait_mock("open", 0, within=5.0)
        stats = await r.mock_stats()
    assert got.status == 200 and len(got.events) == 3
    assert took < 3.5
    assert stats["cancelled"] == 1 and stats["completed"] == 0


async def test_client_leaving_nginx_while_the_model_thinks_cancels_the_upstream(
    io_loop: Any,
) -> None:
    # Nothing flows, so nginx must notice the closed client connection by itself.
    thinking = Scenario(rate=0, tokens=5, first_delay_s=30)
    async with behind_nginx(thinking, heartbeat__interval_s=60,
                            store__orphan_grace_s=0.3) as (r, ngx):
        async with httpx.AsyncClient() as client:
            async with client.stream("GET", ngx.url + es_path()) as response:
                assert response.status_code == 200
                await r.wait_mock("open", 1, within=3.0)
        took = await r.wait_mock("open", 0, within=5.0)
        stats = await r.mock_stats()
    assert took < 3.5
    assert stats["cancelled"] == 1


# --- (e) static files from nginx, /metrics hidden, health checks proxied ----------------


async def test_static_files_come_from_nginx_and_metrics_stay_private(io_loop: Any) -> None:
    async with behind_nginx() as (r, ngx):
        with capture_logs() as logs:
            async with httpx.AsyncClient(base_url=ngx.url) as client:
                page = await client.get("/")
                css = await client.get("/static/app.css", headers={"Accept-Encoding": "gzip"})
                robots = await client.get("/robots.txt")
                missing = await client.get("/static/missing.css")
                served_by_nginx = [log for log in logs if log["event"] == "request"]
                metrics = await client.get("/metrics")
                health = await client.get("/healthz")
                ready = await client.get("/readyz")
                unknown = await client.get("/no/such/page")
        async with httpx.AsyncClient() as client:
            direct_metrics = await client.get(r.url + "/metrics")
        stats = await r.mock_stats()
    assert page.status_code == 200 and page.text == INDEX_HTML
    assert page.headers["cache-control"] == "no-cache"
    assert css.status_code == 200 and css.text == APP_CSS
    assert css.headers["content-type"] == "text/css"
    assert css.headers["content-encoding"] == "gzip"
    assert "max-age=3600" in css.headers["cache-control"]
    assert "public" in css.headers["cache-control"] and "expires" in css.headers
    assert robots.status_code == 200 and "max-age=3600" in robots.headers["cache-control"]
    for response in (page, css, robots):  # issue 18: as sseproxy's own StaticHandler sends
        for name, value in access.PAGE_HEADERS.items():
            assert response.headers[name] == value, name
    assert missing.status_code == 404
    # sseproxy saw none of those: nginx answered them itself
    assert served_by_nginx == []
    assert stats["requests"] == 0
    # /metrics is not exposed through nginx, though sseproxy serves it on its own port
    assert metrics.status_code == 404 and "sseproxy_" not in metrics.text
    assert direct_metrics.status_code == 200 and "sseproxy_streams_active" in direct_metrics.text
    assert health.status_code == 200 and health.json()["status"] == "ok"
    assert ready.status_code == 200 and ready.json()["status"] == "ready"
    # anything else is sseproxy's (JSON) answer
    assert unknown.status_code == 404 and unknown.json()["error"]["code"] == "not_found"
    paths = [log["path"] for log in logs if log["event"] == "request"]
    assert paths == ["/healthz", "/readyz", "/no/such/page"]


async def test_a_body_over_the_limit_is_refused_by_nginx_as_json(io_loop: Any) -> None:
    async with behind_nginx() as (r, ngx):
        with capture_logs() as logs:
            async with httpx.AsyncClient() as client:
                big = {"messages": [{"role": "user", "content": "x" * (1 << 20)}]}
                response = await client.post(ngx.url + "/v1/chat/completions", json=big)
        stats = await r.mock_stats()
    assert response.status_code == 413
    assert response.headers["content-type"] == "application/json"
    assert response.json()["error"]["code"] == "body_too_large"
    assert [log for log in logs if log["event"] == "request"] == []
    assert stats["requests"] == 0


async def raw_exchange(url: str, request: bytes) -> bytes:
    """Send ``request`` on a new connection (while reading); all that comes back."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port_of(url))

    async def send() -> None:
        try:
            writer.write(request)
            await writer.drain()
        except ConnectionError:
            pass

    sending = asyncio.create_task(send())
    try:
        return await asyncio.wait_for(reader.read(-1), 20)
    finally:
        sending.cancel()
        writer.close()


@pytest.mark.parametrize("prompt_bytes, by", [(70_000, "sseproxy"), (200_000, "nginx")])
async def test_a_prompt_too_long_for_the_url_is_414_json_through_nginx(
    io_loop: Any, prompt_bytes: int, by: str
) -> None:
    # issue 12 point 3: nginx's 8k buffers refused long URLs with an HTML page; now sseproxy
    # answers up to nginx's 128k, and nginx above it, both in JSON
    request = (b"GET /v1/chat/stream?prompt=" + b"a" * prompt_bytes + b" HTTP/1.1\r\n"
               b"Host: x\r\nConnection: close\r\n\r\n")
    async with behind_nginx() as (r, ngx):
        with capture_logs() as logs:
            raw = await raw_exchange(ngx.url, request)
        stats = await r.mock_stats()
    head, _, body = raw.partition(b"\r\n\r\n")
    assert head.split(b" ", 2)[1] == b"414", raw[:300]
    assert b"application/json" in head.lower()
    error = json.loads(body)["error"]
    assert error["code"] == "uri_too_long" and "POST /v1/chat/completions" in error["message"]
    refused = [log for log in logs if log["event"] == "request_refused"]
    assert len(refused) == (by == "sseproxy")
    assert stats["requests"] == 0


async def test_a_header_line_too_large_for_nginx_is_431_json(io_loop: Any) -> None:
    request = (b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Big: " + b"b" * 200_000
               + b"\r\nConnection: close\r\n\r\n")
    async with behind_nginx() as (_r, ngx):
        raw = await raw_exchange(ngx.url, request)
    head, _, body = raw.partition(b"\r\n\r\n")
    assert head.split(b" ", 2)[1] == b"431", raw[:300]
    assert json.loads(body)["error"]["code"] == "headers_too_large"


# --- (f) request ids and client addresses reach sseproxy ---------------------------------


async def test_request_ids_and_client_addresses_pass_through(io_loop: Any) -> None:
    # The client connects from 127.0.0.2 (any 127/8 address is loopback on Linux), nginx
    # from 127.0.0.1: sseproxy's log shows 127.0.0.2 only if nginx passed it on.
    transport = httpx.AsyncHTTPTransport(local_address="127.0.0.2")
    body = chat_body(Scenario(rate=0, tokens=3), stream_=False)
    async with behind_nginx() as (r, ngx):
        with capture_logs() as logs:
            async with httpx.AsyncClient(transport=transport, base_url=ngx.url) as client:
                given = await client.post("/v1/chat/completions", json=body,
                                          headers={"X-Request-ID": "client-id.42"})
                generated = await client.post("/v1/chat/completions", json=body)
                invalid = await client.post("/v1/chat/completions", json=body,
                                            headers={"X-Request-ID": "no spaces!"})
                health = await client.get("/healthz", headers={"X-Request-ID": "health-7"})
        access = "\n".join(ngx.access_log())
    assert [x.status_code for x in (given, generated, invalid, health)] == [200] * 4
    # sseproxy echoes the client's id, and nginx logged the same
    assert given.headers["x-request-id"] == "client-id.42"
    assert health.headers["x-request-id"] == "health-7"
    # without a (valid) client id, nginx's $request_id is sent, and sseproxy adopts it
    # (had nginx not sent one, sseproxy would have made up its own, not in nginx's log)
    ids = [generated.headers["x-request-id"], invalid.headers["x-request-id"]]
    for rid in ids:
        assert re.fullmatch(r"[0-9a-f]{32}", rid)
    for rid in ["client-id.42", *ids]:
        assert f"request_id={rid} " in access, access
    requests = [log for log in logs if log["event"] == "request"]
    assert len(requests) == 4
    assert {log["remote_ip"] for log in requests} == {"127.0.0.2"}


# --- keepalive to sseproxy ----------------------------------------------------------------


@asynccontextmanager
async def counting_relay(target_port: int) -> AsyncIterator[tuple[int, list[int]]]:
    """A TCP relay in front of sseproxy that counts the connections nginx opens."""
    connections: list[int] = []
    writers: list[asyncio.StreamWriter] = []

    async def pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
        except OSError:
            pass
        finally:
            writer.close()

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        connections.append(1)
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", target_port)
        writers.extend([writer, up_writer])
        await asyncio.gather(pipe(reader, up_writer), pipe(up_reader, writer))

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    try:
        yield int(server.sockets[0].getsockname()[1]), connections
    finally:
        server.close()
        for writer in writers:
            writer.close()
        await asyncio.gather(*(w.wait_closed() for w in writers), return_exceptions=True)
        await server.wait_closed()


async def test_nginx_keeps_connections_to_sseproxy_alive(io_loop: Any) -> None:
    # keepalive in the upstream block works only with proxy_http_version 1.1 and an empty
    # Connection header: then sequential requests and streams share one connection.
    fast = Scenario(rate=0, tokens=3)
    async with running(fast) as r, counting_relay(port_of(r.url)) as (relay_port, connections):
        async with workspace() as workdir:
            def render(port: int) -> str:
                return render_site(workdir, port, relay_port)

            async with nginx(workdir, render) as ngx:
                for _ in range(3):
                    async with httpx.AsyncClient() as client:  # a new client connection each
                        assert (await client.get(ngx.url + "/healthz")).status_code == 200
                    got = await stream("GET", ngx.url + es_path())
                    assert got.complete and got.content() == "".join(make_tokens(fast))
    assert len(connections) == 1
