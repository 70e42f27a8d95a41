"""A closed stream leaves (almost) nothing for the cyclic garbage collector (issue 13).

Objects kept alive only by reference cycles wait for Python's full collection, which stops
the event loop for every open stream at once (about 250 ms for 1,000 closed streams when
each left ~195 objects in cycles). Through a real sseproxy, streams of each endpoint are run
to completion and left by their client half-way, with the collector off; then one collection
with ``DEBUG_SAVEALL`` shows what they left in cycles.

What may remain is not sseproxy's: an upstream connection that was closed leaves asyncio's
own cycle (a socket transport and the bound method it reads with: 7 objects).
"""

from __future__ import annotations

import asyncio
import collections
import gc
import json
import socket
from collections.abc import Iterator
from contextlib import contextmanager

import pytest
from servers import Running, eventually, running

from sseproxy import mockupstream
from sseproxy.config import Persona

pytestmark = pytest.mark.usefixtures("upstream_transport")

SHORT = mockupstream.Scenario(tokens=5, rate=0).to_model()
LONG = mockupstream.Scenario(tokens=2000, rate=50).to_model()
#: The one-turn EventSource endpoint takes its model from the persona.
PERSONAS = {"short": Persona(system="Be brief.", model=SHORT),
            "long": Persona(system="Go on.", model=LONG)}
#: Streams of each kind (completed, left) per endpoint.
N = 6
#: Objects in cycles a closed stream may leave (on average): asyncio's transport cycle of
#: a closed upstream connection, with room to spare. Before issue 13: 55 to 137.
MAX_PER_STREAM = 20


async def _exchange(port: int, request: bytes, leave_after: int | None = None) -> bytes:
    """Send ``request`` on a raw socket (a client that leaves no garbage of its own) and
    read the answer to its end, or until ``leave_after`` events, then hang up."""
    loop = asyncio.get_running_loop()
    sock = socket.socket()
    sock.setblocking(False)
    try:
        await loop.sock_connect(sock, ("127.0.0.1", port))
        await loop.sock_sendall(sock, request)
        got = b""
        while chunk := await loop.sock_recv(sock, 65536):
            got += chunk
            if leave_after is not None and got.count(b"\ndata:") >= leave_after:
                break
        return got
    finally:
        sock.close()


def _post(path: str, body: object) -> bytes:
    data = json.dumps(body).encode()
    return (f"POST {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(data)}\r\n\r\n"
            ).encode() + data


def _get(path: str) -> bytes:
    return f"GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode()


async def _one_stream(r: Running, endpoint: str, leave: bool) -> None:
    port = int(r.url.rsplit(":", 1)[1])
    model = LONG if leave else SHORT
    leave_after = 2 if leave else None
    messages = [{"role": "user", "content": "hi"}]
    if endpoint == "chat_completions":
        request = _post("/v1/chat/completions",
                        {"model": model, "stream": True, "messages": messages})
    elif endpoint == "chat_stream":
        request = _get(f"/v1/chat/stream?prompt=hi&persona={'long' if leave else 'short'}")
    else:
        created = await _exchange(port, _post("/v1/streams",
                                              {"model": model, "messages": messages}))
        assert b" 201 " in created.split(b"\r\n", 1)[0], created
        stream_id = json.loads(created.split(b"\r\n\r\n", 1)[1])["id"]
        request = _get(f"/v1/streams/{stream_id}")
    got = await _exchange(port, request, leave_after)
    assert b" 200 " in got.split(b"\r\n", 1)[0], got
    assert leave or b"event: done" in got or b"[DONE]" in got, got


async def _streams(r: Running, endpoint: str, n: int) -> None:
    """``n`` streams run to completion and ``n`` left half-way, all closed at the end."""
    await asyncio.gather(*(_one_stream(r, endpoint, leave) for leave in (False, True)
                           for _ in range(n)))
    registry = r.deps.registry
    await eventually(lambda: not (registry.generations or registry.records
                                  or registry.subscribers), 20, "every stream closed")


@contextmanager
def cyclic_garbage() -> Iterator[list[object]]:
    """The collector off inside; on leaving, the list is filled with what one collection
    found in cycles. The collector's state is restored whatever happens."""
    found: list[object] = []
    enabled, debug = gc.isenabled(), gc.get_debug()
    gc.collect()  # what came before is not counted
    gc.disable()
    try:
        yield found
        gc.set_debug(debug | gc.DEBUG_SAVEALL)
        gc.collect()
        found.extend(gc.garbage)
    finally:
        gc.garbage.clear()
        gc.set_debug(debug)
        if enabled:
            gc.enable()


@pytest.mark.parametrize("endpoint", ["chat_completions", "chat_stream", "streams"])
async def test_closed_streams_leave_no_sseproxy_objects_in_reference_cycles(
        endpoint: str) -> None:
    async with running(upstream__model=SHORT, store__orphan_grace_s=0.5,
                       personas=PERSONAS) as r:
        await _streams(r, endpoint, 1)  # warm-up: caches, pools, first-use objects
        with cyclic_garbage() as garbage:
            await _streams(r, endpoint, N)
        ours = collections.Counter(type(o).__qualname__ for o in garbage
                                   if type(o).__module__.startswith("sseproxy"))
        assert not ours, f"sseproxy objects left in reference cycles: {dict(ours)}"
        kinds = collections.Counter(type(o).__qualname__ for o in garbage)
        per_stream = len(garbage) / (2 * N)
        assert per_stream <= MAX_PER_STREAM, (per_stream, kinds.most_common(12))
