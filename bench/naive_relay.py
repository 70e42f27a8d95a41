"""The reference "naive" relay of issue 6: Tornado + httpx, one write + flush per upstream frame.

This is what a first streaming proxy usually looks like, and the baseline sseproxy's speed is
compared with (in the same benchmark run). It is kept in ``bench/`` only and is not part of
sseproxy. ``POST /v1/chat/completions`` sends the client's JSON body to
``{upstream}/chat/completions`` through one shared ``httpx.AsyncClient`` (with limits and
timeouts fit for long streams, as sseproxy's STYLE asks), answers with the upstream's status,
and relays the body frame by frame: every SSE frame (lines up to a blank line, as
``httpx.Response.aiter_lines`` yields them) is written and flushed on its own, unchanged.
A client that goes away ends the loop at the next flush, which closes the upstream response.
No pacing, heartbeats, metrics, validation or logs: that is the point of a baseline.

    python bench/naive_relay.py --port 8090 --upstream-url http://127.0.0.1:8081/v1
"""

from __future__ import annotations

import argparse
import asyncio
import resource
import signal
import sys

import httpx
import tornado.httpserver
import tornado.netutil
import tornado.web
from tornado.iostream import StreamClosedError


class RelayHandler(tornado.web.RequestHandler):
    def initialize(self, client: httpx.AsyncClient, upstream: str) -> None:
        self.client = client
        self.upstream = upstream

    async def post(self) -> None:
        request = self.client.build_request(
            "POST", self.upstream + "/chat/completions", content=self.request.body,
            headers={"Content-Type": "application/json"})
        response = await self.client.send(request, stream=True)
        try:
            self.set_status(response.status_code)
            self.set_header("Content-Type", response.headers.get("content-type", "text/plain"))
            self.set_header("Cache-Control", "no-cache")
            frame: list[str] = []
            async for line in response.aiter_lines():
                if line:
                    frame.append(line)
                    continue
                if frame:
                    self.write("\n".join(frame) + "\n\n")
                    await self.flush()
                    frame = []
            if frame:
                self.write("\n".join(frame) + "\n\n")
            self.finish()
        except StreamClosedError:
            pass  # the client left
        finally:
            await response.aclose()


class HealthHandler(tornado.web.RequestHandler):
    def get(self) -> None:
        self.finish({"status": "ok"})


def make_app(client: httpx.AsyncClient, upstream: str) -> tornado.web.Application:
    return tornado.web.Application([
        (r"/v1/chat/completions", RelayHandler, {"client": client, "upstream": upstream}),
        (r"/healthz", HealthHandler),
    ])


async def serve(host: str, port: int, upstream: str) -> None:
    client = httpx.AsyncClient(
        timeout=httpx.Timeout(10.0, read=60.0),
        limits=httpx.Limits(max_connections=20_000, max_keepalive_connections=1_000),
    )
    server = tornado.httpserver.HTTPServer(make_app(client, upstream.rstrip("/")))
    server.add_sockets(tornado.netutil.bind_sockets(port, host, backlog=4096))
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)
    print(f"naive relay listening on http://{host}:{port}", flush=True)
    await stop.wait()
    server.stop()
    await client.aclose()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="The naive Tornado + httpx relay (a baseline).")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8090)
    parser.add_argument("--upstream-url", default="http://127.0.0.1:8081/v1")
    args = parser.parse_args(argv)
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    asyncio.run(serve(args.host, args.port, args.upstream_url))
    return 0


if __name__ == "__main__":
    sys.exit(main())
