"""CPU per token of the upstream transport's parse alone: this checkout's ``sseproxy.h1``
(llhttp) beside another git ref's (``--previous``, default ``main``), in the same run.

A streamed reply of N OpenAI chunks, in HTTP chunked framing, is cut into reads as a socket
would deliver them and fed to each transport's connection through a fake transport (its
protocol methods called directly: no sockets, no event loop turns), the body pushed to a
callback as sseproxy does. What is measured is process CPU time per token, alternating the
two transports over several rounds and keeping each one's best round, so that load from
other processes shows as noise rather than as a difference. ``--only`` runs one transport
once, for ``valgrind --tool=callgrind``, whose instruction count does not depend on load.

    python bench/h1_parser.py [--tokens 20000] [--read 0] [--previous main]
    valgrind --tool=callgrind python bench/h1_parser.py --only new --tokens N  # and old;
    # (total at N tokens - total at 0 tokens) / N is the instructions per token
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import ModuleType
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from sseproxy import h1  # noqa: E402  (after the path is set)


class FakeTransport:
    def write(self, data: bytes) -> None:
        pass

    def is_closing(self) -> bool:
        return False

    def abort(self) -> None:
        pass

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return default


def reply(tokens: int) -> list[bytes]:
    """The reply as the head, one piece per token, and the end."""
    head = (b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n"
            b"Transfer-Encoding: chunked\r\n\r\n")
    parts = []
    for i in range(tokens):
        obj = {"id": "chatcmpl-1", "object": "chat.completion.chunk", "created": 1,
               "model": "m", "choices": [{"index": 0, "delta": {"content": f" w{i % 97}"},
                                          "finish_reason": None}]}
        event = b"data: " + json.dumps(obj).encode() + b"\n\n"
        parts.append(b"%x\r\n%s\r\n" % (len(event), event))
    return [head, *parts, b"0\r\n\r\n"]


def load_previous(ref: str) -> ModuleType:
    source = subprocess.run(["git", "show", f"{ref}:sseproxy/h1.py"], cwd=ROOT, check=True,
                            capture_output=True).stdout
    path = Path(tempfile.mkdtemp()) / "h1_previous.py"
    path.write_bytes(source)
    spec = importlib.util.spec_from_file_location("h1_previous", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run_once(module: Any, reads: list[bytes], loop: asyncio.AbstractEventLoop) -> int:
    """Feed one reply; return the body bytes pushed (checked by the caller)."""
    conn = module._Connection(module.H1Transport(limits=httpx.Limits()), ("http", "u", 80))
    conn.connection_made(FakeTransport())
    loop.run_until_complete(conn.request(b"POST", b"POST / HTTP/1.1\r\n\r\n", b"", None))
    got = [0]

    def on_data(data: bytes) -> None:
        got[0] += len(data)

    pushed = False
    for read in reads:
        conn.data_received(read)
        if not pushed and conn.body is not None:
            conn.body.push(on_data, lambda error: None)
            pushed = True
    return got[0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokens", type=int, default=20_000)
    parser.add_argument("--read", type=int, default=0,
                        help="bytes per socket read (0: one token per read, as a model streams)")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--previous", default="main", help="the git ref of the old h1.py")
    parser.add_argument("--only", choices=["new", "old"], help="one transport, one round "
                        "(for callgrind)")
    args = parser.parse_args()
    pieces = reply(args.tokens)
    raw = b"".join(pieces)
    reads = pieces
    if args.read:
        reads = [raw[i:i + args.read] for i in range(0, len(raw), args.read)]
    modules = {"new": h1, "old": load_previous(args.previous)}
    loop = asyncio.new_event_loop()
    if args.only:  # nothing else: callgrind's total is this transport's (and start-up)
        run_once(modules[args.only], reads, loop)
        return
    expected = run_once(h1, reads, loop)
    assert expected > 0 and run_once(modules["old"], reads, loop) == expected
    best = {name: float("inf") for name in modules}
    for _ in range(args.rounds):
        for name, module in modules.items():
            start = time.process_time()
            assert run_once(module, reads, loop) == expected
            best[name] = min(best[name], time.process_time() - start)
    for name, seconds in best.items():
        print(f"{name}: {seconds / args.tokens * 1e6:.2f} µs CPU per token "
              f"({args.tokens} tokens, {len(reads)} reads)")
    print(f"new / old: {best['new'] / best['old']:.2f}")


if __name__ == "__main__":
    main()
