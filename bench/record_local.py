"""Record the local model's token arrivals, for the pacing benchmark (issue 19).

Starts the model server of ``upstream.kind = "local"`` (the model file assembled into the
usual cache directory if needed), streams one reply from ``/v1/chat/completions`` and
writes each delta with the time it was read (seconds from the request) to
``bench/arrivals/local-gemma-3-270m.json``, which ``bench/pacing.py`` replays. Also prints
what the run cost: time to load, time to first token, tokens/s, the server's resident set.

Run: ``.venv/bin/python bench/record_local.py`` (needs ``pip install -e '.[local]'``).
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import httpx

if not __package__:  # run as a script: make the checkout importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

# The sys.path line above must run first when this file is run as a script.
from sseproxy import config, localmodel, sse  # noqa: E402

OUT = Path(__file__).resolve().parent / "arrivals" / "local-gemma-3-270m.json"
#: The opening of a story for the model to go on with (a base model continues prose; a
#: question gets a short answer). The longest of a few tries is kept.
PROMPT = ("Continue this story for a few pages: The lighthouse keeper climbed the stairs "
          "as the storm came in from the sea, and")
MAX_TOKENS = 600
TRIES = 4
READY_WITHIN_S = 600.0


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def record(url: str) -> list[tuple[float, str]]:
    body = {"model": localmodel.MODEL_ALIAS, "stream": True, "max_tokens": MAX_TOKENS,
            "messages": [{"role": "user", "content": PROMPT}]}
    arrivals: list[tuple[float, str]] = []
    decoder = sse.Decoder()
    start = time.monotonic()
    with httpx.stream("POST", url + "/chat/completions", json=body, timeout=120) as r:
        r.raise_for_status()
        for chunk in r.iter_raw():
            now = time.monotonic() - start
            for event in decoder.feed(chunk):
                if event.data == "[DONE]":
                    continue
                choices = json.loads(event.data).get("choices") or [{}]
                text = (choices[0].get("delta") or {}).get("content")
                if text:
                    arrivals.append((round(now, 6), text))
    return arrivals


def main() -> int:
    settings = config.load(environ={})
    model = localmodel.assemble(localmodel.cache_dir(settings))
    port = localmodel.free_port()
    url = f"http://127.0.0.1:{port}/v1"
    started = time.monotonic()
    server = subprocess.Popen(localmodel.server_command(model, port),
                              preexec_fn=localmodel.server_preexec,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        while True:
            try:
                if httpx.get(url + "/models", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if server.poll() is not None or time.monotonic() - started > READY_WITHIN_S:
                raise SystemExit("the model server did not start")
            time.sleep(0.2)  # polling the server until it answers, with a deadline
        loaded = time.monotonic() - started
        arrivals: list[tuple[float, str]] = []
        for _ in range(TRIES):
            arrivals = max(arrivals, record(url), key=len)
            if len(arrivals) >= MAX_TOKENS * 0.9:
                break
        rss = rss_mb(server.pid)
    finally:
        server.terminate()
        server.wait(10)
    span = arrivals[-1][0] - arrivals[0][0]
    OUT.parent.mkdir(exist_ok=True)
    OUT.write_text(json.dumps({
        "model": localmodel.MODEL_ALIAS,
        "prompt": PROMPT,
        "machine": f"{platform.platform()}, {os.cpu_count()} CPUs",
        "arrivals": arrivals,
    }, ensure_ascii=False, indent=0) + "\n")
    print(f"loaded in {loaded:.1f} s; first token after {arrivals[0][0]:.2f} s; "
          f"{len(arrivals)} deltas at {(len(arrivals) - 1) / span:.1f}/s; "
          f"server RSS {rss:.0f} MB; model file {model.stat().st_size / 1e6:.0f} MB")
    print(f"wrote {OUT}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
