"""The EventLog on Redis: several sseproxy instances share one real redis-server (issue 16).

A stream started on one instance is read, resumed and stopped from another; the orphan
grace counts every instance's subscribers; a Redis outage is visible and bounded, and
sseproxy recovers by itself when Redis returns.
"""

from __future__ import annotations

import asyncio
import json
import signal
import time
from collections.abc import Iterator
from contextlib import AbstractAsyncContextManager
from pathlib import Path
from typing import Any

import httpx
import pytest
import redisserver
from redis import Redis as RedisClient
from redisserver import RedisServer, redis_server
from servers import Received, Running, eventually, stream
from test_cli import free_port, process
from test_process import Reader
from test_process import simulator as simulator_process

from sseproxy import app, sse
from sseproxy.mockupstream import Scenario, make_tokens
from sseproxy.store.redis import RedisStore

SLOW = Scenario(rate=40, tokens=60)
SHORT = Scenario(rate=0, tokens=5)
CHAT = [{"role": "user", "content": "hi"}]


@pytest.fixture(scope="module")
def redis() -> Iterator[RedisServer]:
    with redis_server() as server:
        yield server


def ids(got: Received) -> list[int]:
    return [int(e.id.rsplit(".", 1)[1]) for e in got.events]


def pair(redis: RedisServer, scenario: Scenario = SLOW,
         **overrides: Any) -> AbstractAsyncContextManager[tuple[Running, Running]]:
    """Instances A and B in front of one simulator, sharing ``redis``."""
    return redisserver.pair(redis, scenario, **overrides)


async def start(r: Running) -> str:
    async with httpx.AsyncClient() as c:
        created = await c.post(r.url + "/v1/streams", json={"messages": CHAT})
    assert created.status_code == 201, created.text
    return str(created.json()["id"])


async def test_a_stream_started_on_one_instance_resumes_on_another_exactly_once(
        io_loop: Any, redis: RedisServer) -> None:
    async with pair(redis) as (a, b):
        whole = await stream("GET", a.url + "/v1/chat/stream?prompt=hi")
        first = await stream("GET", a.url + "/v1/chat/stream?prompt=hi", stop_after=5)
        first.events = first.events[:5]  # one read may have carried more: this client saw 5
        sid = first.headers["X-Stream-ID"]
        rest = await stream("GET", b.url + f"/v1/streams/{sid}",
                            headers={"Last-Event-ID": first.events[-1].id})
        again = await stream("GET", b.url + f"/v1/streams/{sid}",
                             headers={"Last-Event-ID": rest.events[-1].id})
        stats = await a.mock_stats()
    assert rest.status == 200 and rest.complete
    assert ids(first) + ids(rest) == list(range(1, len(whole.events) + 1))
    assert [e.event for e in rest.events].count("done") == 1
    assert rest.events[-1].event == "done"
    # the done event as A wrote it, with what pacing did (issue 15), read from Redis on B
    assert json.loads(rest.events[-1].data)["pacing"] == {
        "mode": "off", "smoothed_chars": 0, "max_lag_s": 0}
    assert first.content() + rest.content() == whole.content() == "".join(make_tokens(SLOW))
    assert again.status == 204  # the end was delivered: EventSource stops for good
    assert stats["requests"] == 2  # the uninterrupted run and the resumed one, once each


async def test_any_instance_follows_a_stream_from_its_start(
        io_loop: Any, redis: RedisServer) -> None:
    async with pair(redis) as (a, b):
        sid = await start(a)
        on_b = await stream("GET", b.url + f"/v1/streams/{sid}")
        on_a = await stream("GET", a.url + f"/v1/streams/{sid}")
    assert ids(on_b) == list(range(1, len(on_b.events) + 1))
    assert on_b.content() == on_a.content() == "".join(make_tokens(SLOW))
    assert [e.event for e in on_b.events].count("done") == 1


async def test_a_delete_on_another_instance_stops_the_generation_within_a_second(
        io_loop: Any, redis: RedisServer) -> None:
    long = Scenario(rate=10, tokens=1000)
    async with pair(redis, long) as (a, b):
        sid = await start(a)
        reader = asyncio.ensure_future(stream("GET", a.url + f"/v1/streams/{sid}"))
        await a.wait_mock("open", 1, within=10)
        async with httpx.AsyncClient() as c:
            deleted = await c.delete(b.url + f"/v1/streams/{sid}")
            sent = time.monotonic()
            took = await a.wait_mock("cancelled", 1, within=5)
            unknown = await c.delete(b.url + "/v1/streams/" + "ab" * 16)
        got = await reader
    assert deleted.status_code == 204 and unknown.status_code == 404
    assert took < 1.0, f"the generation stopped {took:.2f} s after the DELETE"
    assert time.monotonic() - sent < 5
    assert got.events[-1].event == "error"
    assert json.loads(got.events[-1].data)["error"]["code"] == "cancelled"


async def test_the_orphan_grace_counts_subscribers_on_every_instance(
        io_loop: Any, redis: RedisServer) -> None:
    # A runs the generation with nobody following it there; a client on B follows it for
    # longer than A's grace: A must not call the stream abandoned.
    steady = Scenario(rate=20, tokens=50)
    async with pair(redis, steady, store__orphan_grace_s=0.5) as (a, b):
        sid = await start(a)
        on_b = await stream("GET", b.url + f"/v1/streams/{sid}")
        nobody = await start(a)
        await a.wait_mock("cancelled", 1, within=10)  # the control: nobody follows it
        late = await stream("GET", b.url + f"/v1/streams/{nobody}")
    assert on_b.events[-1].event == "done"
    assert on_b.content() == "".join(make_tokens(steady))
    assert late.events[-1].event == "error"
    assert json.loads(late.events[-1].data)["error"]["code"] == "abandoned"


async def test_a_stream_lives_in_hash_tagged_keys_written_in_batches_and_expiring_after_its_end(
        io_loop: Any, redis: RedisServer, monkeypatch: pytest.MonkeyPatch) -> None:
    # issue 16: one Redis Stream per stream (entry 0-n is event n), every key of a stream
    # tagged {id} (one Redis Cluster slot), the appends of a fast stream pipelined rather
    # than one round trip per event, and store.ttl_s from the end (not the running TTL).
    fast = Scenario(rate=0, tokens=400)
    writes: list[str] = []
    async with pair(redis, fast, store__ttl_s=300) as (a, b):
        assert isinstance(a.deps.store, RedisStore)
        call = RedisStore._call

        def counted(self: Any, op: str, *args: Any, **kwargs: Any) -> Any:
            writes.append(op)
            return call(self, op, *args, **kwargs)

        monkeypatch.setattr(RedisStore, "_call", counted)
        sid = await start(a)
        got = await stream("GET", b.url + f"/v1/streams/{sid}")
        monkeypatch.undo()
    client: Any = RedisClient.from_url(redis.url, decode_responses=True)
    try:
        keys: list[str] = sorted(client.keys(f"*{sid}*"))
        entries: list[tuple[str, dict[str, str]]] = client.xrange(f"sseproxy:{{{sid}}}:events")
        ttls = {k: client.pttl(k) for k in keys}
    finally:
        client.close()
    assert got.events[-1].event == "done" and got.content() == "".join(make_tokens(fast))
    assert keys and all(k.startswith(f"sseproxy:{{{sid}}}:") for k in keys), keys
    assert [e[0] for e in entries] == [f"0-{n}" for n in range(1, len(got.events) + 1)]
    assert [f["k"] for _, f in entries][-1] == "done"
    for k in (f"sseproxy:{{{sid}}}:events", f"sseproxy:{{{sid}}}:meta"):
        assert 0 < ttls[k] <= 300_000, ttls  # running TTL: ttl_s + max_duration_s = 900 s
    events = len(got.events)
    assert writes.count("write") < events / 4, (writes.count("write"), events)


async def test_a_redis_that_hangs_costs_no_more_than_its_timeouts_and_is_found_again(
        io_loop: Any) -> None:
    # issue 16: every Redis call has a timeout. A frozen redis-server (SIGSTOP) accepts
    # connections and never answers, so nothing fails fast on its own: the running stream,
    # its follower on another instance, new streams, cancels and /readyz all must answer
    # within the timeouts (0.5 s here), and everything works again once Redis thaws.
    long = Scenario(rate=20, tokens=1000)
    with redis_server() as redis:
        async with pair(redis, long) as (a, b):
            sid = await start(a)
            on_a = asyncio.ensure_future(stream("GET", a.url + f"/v1/streams/{sid}"))
            on_b = asyncio.ensure_future(stream("GET", b.url + f"/v1/streams/{sid}"))
            await a.wait_mock("open", 1, within=10)
            assert isinstance(b.deps.store, RedisStore)
            mirrors = b.deps.store._mirrors
            await eventually(lambda: sid in mirrors, within=10)
            redis.pause()
            try:
                ended_a = await asyncio.wait_for(on_a, 10)
                ended_b = await asyncio.wait_for(on_b, 10)
                async with httpx.AsyncClient(timeout=10) as c:
                    refused = await c.post(a.url + "/v1/streams", json={"messages": CHAT})
                    cancel = await c.delete(b.url + "/v1/streams/" + "cd" * 16)
                    ready_a, ready_b = await c.get(a.url + "/readyz"), await c.get(
                        b.url + "/readyz")
                stats = await a.mock_stats()
            finally:
                redis.resume()
            await eventually(lambda: a.deps.store.problem is b.deps.store.problem is None,
                             within=10, what="both instances saw Redis again")
            again = await start(b)
            after = await stream("GET", a.url + f"/v1/streams/{again}")
    assert ended_a.events[-1].event == "error"
    assert json.loads(ended_a.events[-1].data)["error"]["code"] == "store_unavailable"
    assert stats["open"] == 0  # the generation ended and its upstream request was closed
    # B's follower is sent away without a final event: EventSource reconnects and resumes
    assert ended_b.events and ended_b.events[-1].event == "message"
    assert refused.status_code == 503
    assert refused.json()["error"]["code"] == "store_unavailable"
    assert cancel.status_code == 503
    assert cancel.json()["error"]["code"] == "store_unavailable"
    for ready in (ready_a, ready_b):
        assert ready.status_code == 503 and ready.json()["status"] == "store_unavailable"
        assert "store.redis_timeout_s" in ready.json()["reason"]
    assert after.events[-1].event == "done"


async def test_a_draining_instance_hands_its_readers_on_and_ends_what_outlives_the_grace(
        io_loop: Any, redis: RedisServer) -> None:
    # issue 16, rolling restart: on shutdown A is not ready at once and takes no new
    # stream, closes its EventSource readers' connections without a final event (they
    # resume on B), keeps generating into Redis for the grace, and only then ends the reply
    # with server_shutdown, which B's readers receive; the upstream request is made once.
    long = Scenario(rate=20, tokens=1000)
    async with pair(redis, long) as (a, b):
        sid = await start(a)
        first = asyncio.ensure_future(stream("GET", a.url + f"/v1/streams/{sid}"))
        await eventually(lambda: bool(a.deps.registry.subscribers), within=10)
        async with httpx.AsyncClient() as c:
            draining = asyncio.ensure_future(app.drain(a.deps, 3.0))
            sent_away = await asyncio.wait_for(first, 5)
            ready = await c.get(a.url + "/readyz")
            refused = await c.post(a.url + "/v1/streams", json={"messages": CHAT})
            assert not draining.done()
            rest = await stream("GET", b.url + f"/v1/streams/{sid}",
                                headers={"Last-Event-ID": sent_away.events[-1].id})
            await asyncio.wait_for(draining, 10)
        stats = await a.mock_stats()
    assert sent_away.events and sent_away.events[-1].event == "message"
    assert ready.status_code == 503 and ready.json()["status"] == "draining"
    assert refused.status_code == 503
    assert refused.json()["error"]["code"] == "server_shutdown"
    events = sent_away.events + rest.events
    assert [int(e.id.rsplit(".", 1)[1]) for e in events] == list(range(1, len(events) + 1))
    assert sum(e.event == "message" for e in rest.events) > 0  # generated during the grace
    assert rest.events[-1].event == "error"
    assert json.loads(rest.events[-1].data)["error"]["code"] == "server_shutdown"
    assert stats["requests"] == 1


def store_errors(r: Running) -> float:
    return float(sum(r.deps.metrics.store_errors.labels(op)._value.get()
                     for op in ("create", "get", "cancel", "write", "read")))


async def test_a_redis_outage_fails_fast_and_sseproxy_recovers_by_itself(
        io_loop: Any) -> None:
    long = Scenario(rate=20, tokens=1000)
    with redis_server() as redis:
        async with pair(redis, long) as (a, b):
            sid = await start(a)
            running_ = asyncio.ensure_future(stream("GET", a.url + f"/v1/streams/{sid}"))
            await a.wait_mock("open", 1, within=10)
            redis.stop()
            stopped = time.monotonic()
            ended = await asyncio.wait_for(running_, 10)
            ended_after = time.monotonic() - stopped
            await eventually(lambda: a.deps.store.problem is not None, within=5)
            async with httpx.AsyncClient(timeout=10) as c:
                ready = await c.get(a.url + "/readyz")
                refused = await c.post(a.url + "/v1/streams", json={"messages": CHAT})
                api = await c.post(a.url + "/v1/chat/completions", json={
                    "model": Scenario(rate=0, tokens=3).to_model(), "messages": CHAT})
            es = await stream("GET", a.url + "/v1/chat/stream?prompt=hi", timeout=10)
            resume = await stream("GET", b.url + f"/v1/streams/{sid}", timeout=10,
                                  headers={"Last-Event-ID": f"{sid}.1"})
            errors_seen = store_errors(a)
            redis.start()
            await eventually(lambda: a.deps.store.problem is b.deps.store.problem is None,
                             within=10, what="both instances saw Redis again")
            async with httpx.AsyncClient() as c:
                ready_again = await c.get(a.url + "/readyz")
                created = await c.post(a.url + "/v1/streams", json={
                    "messages": CHAT, "model": SHORT.to_model()})
            after = await stream("GET", b.url + created.json()["events_url"])
    assert ended.events[-1].event == "error"
    assert json.loads(ended.events[-1].data)["error"]["code"] == "store_unavailable"
    assert ended_after < 5  # bounded by the timeouts (0.5 s), with a wide margin
    assert ready.status_code == 503
    assert ready.json()["status"] == "store_unavailable" and ready.json()["reason"]
    assert refused.status_code == 503
    assert refused.json()["error"]["code"] == "store_unavailable"
    assert refused.json()["error"]["type"]
    assert api.status_code == 200  # the OpenAI endpoint never needed the store
    assert es.status == 200 and es.events[-1].event == "error"
    assert json.loads(es.events[-1].data)["error"]["code"] == "store_unavailable"
    assert resume.status == 200 and resume.events[-1].event == "error"
    assert not resume.events[-1].id  # the client's Last-Event-ID stays as it was
    assert errors_seen > 0
    assert ready_again.status_code == 200
    assert after.events[-1].event == "done" and after.content() == "".join(make_tokens(SHORT))


# --- a rolling restart: real processes ------------------------------------------------------

def test_sigterm_sends_eventsource_clients_to_another_instance_and_loses_no_reply(
        tmp_path: Path, redis: RedisServer) -> None:
    # 20 EventSource clients mid-reply on A; A gets SIGTERM; each client reconnects, as a
    # browser does, to B with its Last-Event-ID and gets the exact full text and one done,
    # while A goes on generating into Redis (no upstream request is made twice).
    clients = 20
    reply = Scenario(rate=10, tokens=40)
    with simulator_process(tmp_path) as mock:
        ports = free_port(), free_port()
        bases = [f"http://127.0.0.1:{port}" for port in ports]
        conf = tmp_path / "sseproxy.toml"
        conf.write_text(
            '[server]\nshutdown_grace_s = 30\nretry_ms = 200\n'
            f'[upstream]\nbase_url = "{mock}/v1"\nmodel = "{reply.to_model()}"\n'
            '[pacing]\nmode = "off"\n'
            f'[store]\nbackend = "redis"\nredis_url = "{redis.url}"\n')
        with process("serve", "--config", str(conf), "--port", str(ports[0]),
                     url=bases[0] + "/healthz", log=tmp_path / "a.log") as a, \
                process("serve", "--config", str(conf), "--port", str(ports[1]),
                        url=bases[1] + "/healthz", log=tmp_path / "b.log"):
            readers = [Reader("GET", bases[0] + "/v1/chat/stream?prompt=hi")
                       for _ in range(clients)]
            for reader in readers:
                reader.start()
            deadline = time.monotonic() + 20
            while not all(len(r.events) >= 3 for r in readers):
                assert time.monotonic() < deadline, "the replies did not start"
                time.sleep(0.02)
            a.send_signal(signal.SIGTERM)
            for reader in readers:
                reader.join(timeout=20)
            rest = []
            for reader in readers:
                assert reader.events[-1].event != "done", "A ended a reply it should hand on"
                sid = reader.events[-1].id.split(".")[0]
                tail = Reader("GET", bases[1] + f"/v1/streams/{sid}",
                              headers={"Last-Event-ID": reader.events[-1].id})
                tail.start()
                rest.append(tail)
            for tail in rest:
                tail.join(timeout=30)
            code = a.wait(timeout=30)
        stats = httpx.get(mock + "/mock/stats").json()
    assert code == 0
    whole = "".join(make_tokens(reply))
    for first, tail in zip(readers, rest, strict=True):
        assert tail.error is None and tail.status == 200
        events = first.events + tail.events
        assert [int(e.id.rsplit(".", 1)[1]) for e in events] == list(range(1, len(events) + 1))
        text = "".join(json.loads(e.data)["content"] for e in events if e.event == "message")
        assert text == whole
        assert [e.event for e in events].count("done") == 1 and events[-1].event == "done"
    assert stats["requests"] == clients and stats["completed"] == clients


PAIR_SITE = Path(__file__).resolve().parent.parent / "deploy" / "nginx-redis-pair.conf"


def test_a_rolling_restart_behind_nginx_with_the_pair_config_loses_no_reply(
        tmp_path: Path, redis: RedisServer) -> None:
    # issue 16: deploy/nginx-redis-pair.conf in front of A and B sharing Redis. 20
    # EventSource clients (half of them land on A) are mid-reply when A gets SIGTERM; each
    # client does what a browser does: when its connection ends without a final event it
    # asks the same URL again with its Last-Event-ID, through nginx. Every client ends with
    # the exact full text and one done; no upstream request is made twice.
    clients = 20
    reply = Scenario(rate=10, tokens=40)
    with simulator_process(tmp_path) as mock:
        ports = free_port(), free_port()
        conf = tmp_path / "sseproxy.toml"
        conf.write_text(
            '[server]\nshutdown_grace_s = 30\nretry_ms = 200\n'
            f'[upstream]\nbase_url = "{mock}/v1"\nmodel = "{reply.to_model()}"\n'
            '[pacing]\nmode = "off"\n'
            f'[store]\nbackend = "redis"\nredis_url = "{redis.url}"\n')
        site = PAIR_SITE.read_text()
        for old, new in (("listen 8080;", "listen 127.0.0.1:{port};"),
                         ("server 127.0.0.1:8081 ", f"server 127.0.0.1:{ports[0]} "),
                         ("server 127.0.0.1:8082 ", f"server 127.0.0.1:{ports[1]} ")):
            assert site.count(old) == 1, f"deploy/nginx-redis-pair.conf has no {old!r}"
            site = site.replace(old, new)
        with process("serve", "--config", str(conf), "--port", str(ports[0]),
                     url=f"http://127.0.0.1:{ports[0]}/healthz", log=tmp_path / "a.log") as a, \
                process("serve", "--config", str(conf), "--port", str(ports[1]),
                        url=f"http://127.0.0.1:{ports[1]}/healthz", log=tmp_path / "b.log"):
            runs = asyncio.run(_through_nginx(site, clients, a))
            code = a.wait(timeout=30)
        stats = httpx.get(mock + "/mock/stats").json()
    assert code == 0
    whole = "".join(make_tokens(reply))
    handed_on = 0
    for connections in runs:
        events = [e for got in connections for e in got.events]
        assert [int(e.id.rsplit(".", 1)[1]) for e in events] == list(range(1, len(events) + 1))
        text = "".join(json.loads(e.data)["content"] for e in events if e.event == "message")
        assert text == whole
        assert [e.event for e in events].count("done") == 1 and events[-1].event == "done"
        handed_on += len(connections) > 1
    assert handed_on > 0  # some clients were on A and reconnected
    assert stats["requests"] == clients and stats["completed"] == clients


async def _through_nginx(site: str, clients: int, a: Any) -> list[list[Received]]:
    """Run the clients of the test above through nginx; send A its SIGTERM mid-reply."""
    from test_nginx import nginx, workspace

    async with workspace() as workdir:
        async with nginx(workdir, lambda port: site.replace("{port}", str(port))) as proxy:
            url = proxy.url + "/v1/chat/stream?prompt=hi"
            started = [asyncio.Event() for _ in range(clients)]
            sigterm = asyncio.Event()

            async def connect(headers: dict[str, str], started: asyncio.Event) -> Received:
                got, decoder = Received(), sse.Decoder()
                async with httpx.AsyncClient(timeout=30) as c:
                    async with c.stream("GET", url, headers=headers) as response:
                        got.status = response.status_code
                        try:
                            async for chunk in response.aiter_raw():
                                got.events += decoder.feed(chunk)
                                if len(got.events) >= 3:
                                    started.set()
                        except httpx.RemoteProtocolError:
                            pass  # cut by the instance that stops: a browser reconnects
                return got

            async def browser(i: int) -> list[Received]:
                got = [await connect({}, started[i])]
                while got[-1].events and got[-1].events[-1].event not in ("done", "error"):
                    assert sigterm.is_set() and len(got) < 4, "a connection ended early"
                    got.append(await connect({"Last-Event-ID": got[-1].events[-1].id},
                                             started[i]))
                return got

            tasks = [asyncio.ensure_future(browser(i)) for i in range(clients)]
            await asyncio.wait_for(asyncio.gather(*(e.wait() for e in started)), 30)
            sigterm.set()
            a.send_signal(signal.SIGTERM)
            return await asyncio.wait_for(asyncio.gather(*tasks), 60)
