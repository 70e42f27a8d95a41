"""``make bench``: sseproxy against the baselines of issue 6, measured in one run.

It starts every process itself on free 127.0.0.1 ports -- the simulator (with ``stamp``),
an nginx pass-through (``proxy_buffering off``), the naive Tornado + httpx relay
(``bench/naive_relay.py``), sseproxy with pacing off, sseproxy with default pacing, nginx
with ``deploy/nginx.conf`` in front of the latter, sseproxy ``--workers 2``, and the two
sseproxy processes again running the *previous* code -- and stops them all by PID at the
end, also after an error or Ctrl-C. The previous code is a git ref (``--previous``, by
default the last commit before the EventLog rebuild) checked out into a temporary ``git
worktree`` that is removed at the end; its processes are this interpreter with the same
flags, importing that tree. Then, with the load generator (``bench/loadgen.py``) in this
process:

1. **idle memory**: 1,000 open streams receiving a token every 10 s per relay;
   (VmRSS with them - VmRSS before) / 1,000;
2. **latency**: 100 streams x 20 tokens/s, 200 streams x 50 tokens/s (the realistic shape:
   one token per upstream write) and 1,000 streams x 20 tokens/s through every scenario
   (direct, nginx, naive, sseproxy pacing off, sseproxy default pacing, the previous
   code's two, nginx + sseproxy; at the realistic shape also ``GET /v1/chat/stream``, and
   ``POST /v1/streams`` where the server has it), repeated, the scenarios interleaved so
   that drift hits all alike; added latency is a scenario's percentile minus direct's over
   the same loads; CPU per 100k tokens comes from /proc/<pid>/stat (utime + stime, children
   excluded) over these same loads;
3. **reconnects** (servers that answer ``POST /v1/streams`` with ``201``): 100 concurrent
   clients each read 20 events, drop the connection, stay away 0.2 s and reconnect with
   ``Last-Event-ID``; the time from the reconnect to the first missed event, and a check
   that every stream then goes on to ``event: done`` with no gap and no duplicate;
4. **sustained throughput**: 200 streams, the rate per stream stepped up (scenarios again
   interleaved at each step) until a step fails: p99 added > 50 ms, > 1 % errors or < 90 %
   delivered (a failed step is tried once more, whatever the margin: the machine is shared);
   the last passing step's tokens/s is the figure. Direct shows the harness's own ceiling.

It prints a markdown table with ratios against the baselines of the same run, and the
performance guard (each figure of the previous code beside the current one), and writes
them, with the machine and the command, between the markers of ``docs/benchmarks.md``; the
raw numbers go to ``bench/results/``. ``--quick`` is a short run (a rough table in about
three minutes), ``--smoke`` a few streams through direct and sseproxy (both endpoints) for
the test suite, without the previous code unless ``--previous`` names it.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import http.client
import json
import math
import os
import platform
import re
import resource
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any
from urllib.parse import urlsplit

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))

import loadgen  # noqa: E402  # bench/ is not a package

CLK_TCK = os.sysconf("SC_CLK_TCK")
DOCS = ROOT / "docs" / "benchmarks.md"
BEGIN, END = "<!-- bench:begin -->", "<!-- bench:end -->"
NGINX = shutil.which("nginx") or "/usr/sbin/nginx"

#: The previous code's default (``--previous``): the last commit before the EventLog rebuild
#: (issue 14), whose speed the rebuild must keep.
PREVIOUS_DEFAULT = "a385011df61868bf2c09ccdd6f72f29689ac35d3"

# Limits of a sustained-throughput step
MAX_ADDED_P99_MS = 50.0
MAX_ERROR_RATE = 0.01
MIN_DELIVERED = 0.90


# ---------------------------------------------------------------------------------------------
# Processes


def _child_setup() -> None:
    """In each child before exec: as many open files as the hard limit allows."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def free_port(consecutive: int = 1) -> int:
    """A port free on 127.0.0.1 now (and the ``consecutive - 1`` after it)."""
    for _ in range(100):
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = int(sock.getsockname()[1])
        if port + consecutive > 65535:
            continue
        try:
            for extra in range(1, consecutive):
                with socket.socket() as sock:
                    sock.bind(("127.0.0.1", port + extra))
        except OSError:
            continue
        return port
    raise RuntimeError("no free ports")


def children(pid: int) -> list[int]:
    out: list[int] = []
    for task in Path(f"/proc/{pid}/task").glob("*/children"):
        out += [int(p) for p in task.read_text().split()]
    return out


def cpu_ticks(pid: int) -> int:
    """utime + stime of ``pid`` (all its threads, not its children), in clock ticks."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return 0
    fields = stat[stat.rindex(")") + 2:].split()
    return int(fields[11]) + int(fields[12])  # fields 14 and 15 of proc(5)


def start_time(pid: int) -> int:
    """When ``pid`` started (clock ticks since boot; 0 if it is gone): a PID's identity."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return 0
    return int(stat[stat.rindex(")") + 2:].split()[19])  # field 22 of proc(5)


def rss_kb(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


@dataclass
class Proc:
    name: str
    popen: subprocess.Popen[bytes]
    log: Path
    #: ``self``: the process does the work; ``children``: its children do (nginx's
    #: workers, sseproxy --workers N) and the parent only supervises.
    work: str = "self"

    @property
    def pid(self) -> int:
        return self.popen.pid

    def pids(self) -> list[int]:
        return children(self.pid) if self.work == "children" else [self.pid]

    def cpu_s(self) -> float:
        return sum(cpu_ticks(p) for p in self.pids()) / CLK_TCK

    def rss_kb(self) -> int:
        return sum(rss_kb(p) for p in self.pids())

    def check_alive(self) -> None:
        if self.popen.poll() is not None:
            tail = self.log.read_text(errors="replace")[-2000:] if self.log.exists() else ""
            raise RuntimeError(f"{self.name} exited with {self.popen.returncode}:\n{tail}")


class Fleet:
    """Every process the benchmark started; :meth:`stop` ends them by PID."""

    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.procs: dict[str, Proc] = {}

    def start(self, name: str, argv: Sequence[str], work: str = "self",
              tree: Path = ROOT) -> Proc:
        """Start ``argv`` in ``tree`` (the code it imports: this checkout, or the previous
        code's worktree)."""
        log = self.tmp / f"{name}.log"
        with open(log, "wb") as out:
            popen = subprocess.Popen(
                list(argv), cwd=tree, env=tree_env(tree), stdin=subprocess.DEVNULL,
                stdout=out, stderr=subprocess.STDOUT, preexec_fn=_child_setup,
                start_new_session=True)
        proc = self.procs[name] = Proc(name, popen, log, work)
        return proc

    def stop(self) -> None:
        # Workers (nginx's, sseproxy --workers) are noted first: a master that has to be
        # killed leaves them to init, where children() no longer finds them.
        workers = [(pid, start_time(pid)) for proc in self.procs.values()
                   for pid in children(proc.pid)]
        for proc in reversed(list(self.procs.values())):
            if proc.popen.poll() is None:
                proc.popen.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + 8
        for proc in reversed(list(self.procs.values())):
            try:
                proc.popen.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                proc.popen.kill()
                proc.popen.wait()
        for pid, started in workers:
            if started and start_time(pid) == started:  # still that same process
                os.kill(pid, signal.SIGKILL)


# ---------------------------------------------------------------------------------------------
# The previous code, in a worktree of its own


def tree_env(tree: Path) -> dict[str, str]:
    """The environment of a process that must import ``tree``'s sseproxy (``python -m`` puts
    the working directory first on ``sys.path``; ``PYTHONPATH`` comes before the installed
    copy)."""
    env = dict(os.environ)
    if tree != ROOT:
        env["PYTHONPATH"] = os.pathsep.join(
            [str(tree), *filter(None, env.get("PYTHONPATH", "").split(os.pathsep))])
    return env


def git(*args: str) -> str:
    done = subprocess.run(["git", "-C", str(ROOT), *args], capture_output=True, text=True)
    if done.returncode:
        raise RuntimeError(f"git {' '.join(args)}: {done.stderr.strip()}")
    return done.stdout.strip()


@dataclass
class Previous:
    """The previous code: ``ref`` resolved to ``commit``, checked out at ``tree``."""

    ref: str
    commit: str
    tree: Path
    same_code: bool  # its sseproxy/ is this checkout's (the ratios then show the noise)

    def to_json(self) -> dict[str, Any]:
        return {"ref": self.ref, "commit": self.commit, "worktree": str(self.tree),
                "same_code": self.same_code}


@contextmanager
def previous_tree(ref: str, where: Path) -> Iterator[Previous]:
    """``ref`` checked out (detached) at ``where`` as a temporary ``git worktree``; removed
    at the end, also after an error or Ctrl-C."""
    try:
        commit = git("rev-parse", "--verify", "--quiet", f"{ref}^{{commit}}")
    except RuntimeError:
        raise RuntimeError(f"{ref!r} names no commit in this repository") from None
    same = git("rev-parse", f"{commit}:sseproxy") == git("rev-parse", "HEAD:sseproxy") \
        and not git("status", "--porcelain", "--", "sseproxy")
    git("worktree", "add", "--detach", "--quiet", str(where), commit)
    try:
        imported = subprocess.run(
            [sys.executable, "-c", "import sseproxy; print(sseproxy.__file__)"], cwd=where,
            env=tree_env(where), capture_output=True, text=True, check=True).stdout.strip()
        if not Path(imported).resolve().is_relative_to(where.resolve()):
            raise RuntimeError(f"the previous code's processes would import {imported}")
        yield Previous(ref, commit, where, same)
    finally:
        subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(where)],
                       capture_output=True)


def wait_ready(proc: Proc, port: int, path: str, timeout: float = 20.0) -> None:
    """Until ``GET path`` on ``port`` answers 200 (or the process dies)."""
    deadline = time.monotonic() + timeout
    last = ""
    while time.monotonic() < deadline:
        proc.check_alive()
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
        try:
            conn.request("GET", path)
            response = conn.getresponse()
            response.read()
            if response.status == 200:
                return
            last = f"status {response.status}"
        except OSError as exc:
            last = str(exc)
        finally:
            conn.close()
        time.sleep(0.1)
    raise RuntimeError(f"{proc.name} not ready on port {port} after {timeout} s: {last}")


# ---------------------------------------------------------------------------------------------
# nginx configurations

NGINX_MAIN = """\
# Generated by bench/run.py: one worker, so it is one relay process like the others.
worker_processes 1;
worker_rlimit_nofile {nofile};
pid {prefix}/nginx.pid;
error_log {prefix}/error.log warn;
events {{
    worker_connections {connections};
}}
http {{
    access_log off;
    client_body_temp_path {prefix}/client_body;
    proxy_temp_path {prefix}/proxy;
    fastcgi_temp_path {prefix}/fastcgi;
    uwsgi_temp_path {prefix}/uwsgi;
    scgi_temp_path {prefix}/scgi;
{site}
}}
"""

PASS_THROUGH_SITE = """\
upstream simulator {{
    server 127.0.0.1:{upstream_port};
    keepalive 256;
}}
server {{
    listen 127.0.0.1:{port} backlog=4096;
    location / {{
        proxy_pass http://simulator;
        proxy_http_version 1.1;
        proxy_set_header Connection "";
        proxy_buffering off;
        proxy_read_timeout 3600s;
    }}
}}
"""


def render_deploy_site(port: int, upstream_port: int, prefix: Path) -> str:
    """``deploy/nginx.conf`` with its listen port, upstream address, static root and log
    path replaced (the four strings that file promises to keep recognisable)."""
    text = (ROOT / "deploy" / "nginx.conf").read_text()
    text = re.sub(r"(?m)^(\s*)listen\s+\[::\]:80\b[^;]*;", r"\1# (bench: no IPv6)", text)
    substitutions = [
        (r"(?m)^(\s*)listen\s+80\b[^;]*;", rf"\g<1>listen 127.0.0.1:{port} backlog=4096;"),
        (r"127\.0\.0\.1:8080\b", f"127.0.0.1:{upstream_port}"),
        (r"/srv/sseproxy/static", str(ROOT / "static")),
        (r"/var/log/nginx/sseproxy\.access\.log", str(prefix / "access.log")),
    ]
    for pattern, replacement in substitutions:
        text, count = re.subn(pattern, replacement, text)
        if not count:
            raise RuntimeError(f"deploy/nginx.conf: nothing matches {pattern!r}; "
                               "bench/run.py needs it to run the file on its own ports")
    return text


def start_nginx(fleet: Fleet, name: str, site: str, prefix: Path, nofile: int) -> Proc:
    prefix.mkdir(parents=True, exist_ok=True)
    for sub in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi"):
        (prefix / sub).mkdir(exist_ok=True)
    conf = prefix / "nginx.conf"
    conf.write_text(NGINX_MAIN.format(prefix=prefix, nofile=nofile,
                                      connections=min(nofile, 16384),
                                      site="    " + site.replace("\n", "\n    ")))
    argv = [NGINX, "-p", str(prefix), "-c", str(conf), "-e", str(prefix / "error.log")]
    check = subprocess.run(argv + ["-t", "-q"], capture_output=True, text=True)
    if check.returncode:
        raise RuntimeError(f"nginx -t failed for {name}:\n{check.stderr}")
    return fleet.start(name, argv + ["-g", "daemon off;"], work="children")


# ---------------------------------------------------------------------------------------------
# Scenarios


@dataclass
class Target:
    """Where a scenario's streams go, and which processes relay them."""

    name: str
    label: str
    url: str
    relays: list[Proc]
    get: bool = False  # the EventSource endpoint (its model is the process's upstream.model)
    create: bool = False  # POST /v1/streams, then GET its events_url

    def cpu_s(self) -> float:
        return sum(p.cpu_s() for p in self.relays)

    def rss_kb(self) -> int:
        return sum(p.rss_kb() for p in self.relays)


@dataclass
class Sample:
    """One load through one target."""

    target: str
    phase: str
    streams: int
    rate: float
    summary: dict[str, Any]
    latencies: list[int]  # ns, the steady window
    ttfb: list[int]
    relay_cpu_s: float
    simulator_cpu_s: float

    def to_json(self) -> dict[str, Any]:
        return {"target": self.target, "phase": self.phase, "streams": self.streams,
                "rate": self.rate, "relay_cpu_s": self.relay_cpu_s,
                "simulator_cpu_s": self.simulator_cpu_s, **self.summary}


Shape = tuple[int, float, float, float]  # streams, tokens/s per stream, ramp_s, window_s


@dataclass
class Plan:
    """How much of each phase a mode runs."""

    reps: int
    latency_loads: list[Shape]  # the number of streams tells them apart
    #: the realistic shape (one token per upstream write): the EventSource endpoints run it
    shape: Shape
    #: the loads of the performance guard (CPU per token, current / previous)
    guard_streams: list[int]
    idle_streams: int
    step_streams: int
    step_rates: list[float]
    step_window_s: float
    retry_failed_step: bool
    reconnect_streams: int  # concurrent streams of the reconnect probe
    reconnect_after: int  # events read before a client drops its connection


REALISTIC = (200, 50.0, 0.5, 3.0)
PLANS = {
    "full": Plan(reps=2, latency_loads=[(100, 20.0, 0.5, 3.0), REALISTIC,
                                        (1000, 20.0, 2.0, 4.0)],
                 shape=REALISTIC, guard_streams=[200, 1000], idle_streams=1000,
                 step_streams=200,
                 step_rates=[12.5, 25, 37.5, 50, 75, 100, 150, 200, 300, 400, 600],
                 step_window_s=3.0, retry_failed_step=True, reconnect_streams=100,
                 reconnect_after=20),
    "quick": Plan(reps=1, latency_loads=[(100, 20.0, 0.5, 2.0), (200, 50.0, 0.5, 2.0),
                                         (1000, 20.0, 2.0, 2.0)],
                  shape=(200, 50.0, 0.5, 2.0), guard_streams=[200, 1000], idle_streams=1000,
                  step_streams=200, step_rates=[25, 50, 100, 200, 400], step_window_s=1.5,
                  retry_failed_step=False, reconnect_streams=100, reconnect_after=20),
    "smoke": Plan(reps=1, latency_loads=[(5, 50.0, 0.1, 0.3)], shape=(5, 50.0, 0.1, 0.3),
                  guard_streams=[5], idle_streams=0, step_streams=0, step_rates=[],
                  step_window_s=0, retry_failed_step=False, reconnect_streams=5,
                  reconnect_after=3),
}


def load_tokens(load: Shape) -> int:
    """Tokens per stream of a latency load: the ramp, the window and half a second more."""
    _streams, rate, ramp, window = load
    return int((ramp + window + 0.5) * rate) + 1


def stamped_model(tokens: int, rate: float) -> str:
    return f"mock?tokens={tokens}&rate={rate:g}&stamp"


LABELS = {
    "direct": "direct to the simulator (baseline)",
    "nginx": "nginx pass-through (`proxy_buffering off`)",
    "naive": "naive Tornado + httpx relay",
    "sseproxy-off": "sseproxy, pacing off",
    "sseproxy": "sseproxy, default pacing",
    "nginx+sseproxy": "nginx (`deploy/nginx.conf`) + sseproxy",
    "sseproxy-2w": "sseproxy `--workers 2`, pacing off",
    "sseproxy-es": "sseproxy, pacing off, EventSource endpoint",
    "sseproxy-streams": "sseproxy, pacing off, `POST /v1/streams` + EventSource",
    "sseproxy-streams-redis": "sseproxy + redis-server (`store.backend = \"redis\"`), pacing "
                              "off, `POST /v1/streams` + EventSource",
}
#: a scenario of the previous code is its current scenario's name with this suffix
PREV = "@prev"


def label(name: str) -> str:
    if name.endswith(PREV):
        return LABELS[name.removesuffix(PREV)] + " (previous)"
    return LABELS[name]


def streams_body(model: str, prompt: str = "Say something.") -> bytes:
    """A ``POST /v1/streams`` body."""
    return json.dumps({"messages": [{"role": "user", "content": prompt}],
                       "model": model}).encode()


class Bench:
    def __init__(self, fleet: Fleet, targets: dict[str, Target], simulator: Proc,
                 plan: Plan, log: Callable[[str], None]) -> None:
        self.simulator_port = urlsplit(targets["direct"].url).port or 80
        self.fleet = fleet
        self.targets = targets
        self.simulator = simulator
        self.plan = plan
        self.log = log
        self.samples: list[Sample] = []

    async def settle(self, timeout: float = 15.0) -> None:
        """Wait until the simulator has no stream open: a relay that was overloaded (or
        whose clients were hung up on) may still be working off the last load, and must
        not do it during the next scenario's."""
        deadline = time.monotonic() + timeout
        while True:
            conn = http.client.HTTPConnection("127.0.0.1", self.simulator_port, timeout=2)
            try:
                conn.request("GET", "/mock/stats")
                still_open = json.loads(conn.getresponse().read())["open"]
            finally:
                conn.close()
            if not still_open:
                break
            if time.monotonic() > deadline:
                self.log(f"  (the simulator still has {still_open} streams open after "
                         f"{timeout:g} s)")
                break
            await asyncio.sleep(0.1)
        await asyncio.sleep(0.3)  # and closed connections settle

    async def load(self, target: Target, phase: str, streams: int, rate: float, tokens: int,
                   ramp_s: float, grace_s: float = 5.0) -> Sample:
        for proc in [*target.relays, self.simulator]:
            proc.check_alive()
        model = stamped_model(tokens, rate)
        body = (None if target.get else streams_body(model) if target.create
                else loadgen.openai_body(model))
        load = loadgen.Load(
            url=target.url, streams=streams, tokens=tokens,
            stream_s=(tokens - 1) / rate, ramp_s=ramp_s, grace_s=grace_s, body=body,
            create=target.create)
        relay0, sim0 = target.cpu_s(), self.simulator.cpu_s()
        result = await loadgen.measure(load)
        sample = Sample(
            target=target.name, phase=phase, streams=streams, rate=rate,
            summary=result.summary(), latencies=list(result.latencies), ttfb=result.ttfb,
            relay_cpu_s=target.cpu_s() - relay0,
            simulator_cpu_s=self.simulator.cpu_s() - sim0)
        self.samples.append(sample)
        s = sample.summary
        self.log(f"  {phase:8} {target.name:20} {streams:5} x {rate:5g}/s: "
                 f"{s['tokens_per_s']:8.0f} tok/s  p50 {s['latency_ms']['p50']:7.2f} ms  "
                 f"p99 {s['latency_ms']['p99']:8.2f} ms  delivered {s['delivered']:6.1%}  "
                 f"errors {s['errors'] or 0}  relay CPU {sample.relay_cpu_s:5.2f} s")
        await self.settle()
        return sample

    async def warm_up(self) -> None:
        self.log("warm-up (every scenario must answer)")
        for target in self.targets.values():
            if target.get:
                continue
            sample = await self.load(target, "warmup", 20, 100.0, 20, 0.1)
            if sample.summary["error_rate"] or sample.summary["delivered"] < 1:
                raise RuntimeError(f"{target.name} does not relay: {sample.summary['errors']}")

    async def idle_memory(self, names: Sequence[str]) -> dict[str, float]:
        """KB of RSS per open idle stream (a token every 10 s), per relay."""
        n = self.plan.idle_streams
        out: dict[str, float] = {}
        if not n:
            return out
        self.log(f"idle memory: {n} streams receiving a token every 10 s")
        for name in names:
            target = self.targets[name]
            before = target.rss_kb()
            load = loadgen.Load(url=target.url, streams=n, tokens=3, stream_s=20.0,
                                ramp_s=2.0, body=loadgen.openai_body("mock?tokens=3&rate=0.1"
                                                                     "&stamp"))
            run = loadgen.Run(load)
            await run.start()
            deadline = time.monotonic() + 10
            while run.with_first_token < n and time.monotonic() < deadline:
                await asyncio.sleep(0.1)
            await asyncio.sleep(0.5)
            opened = run.with_first_token
            after = target.rss_kb()
            run.stop()
            out[name] = (after - before) / n
            self.log(f"  {name:20} RSS {before} KB -> {after} KB with {opened}/{n} streams "
                     f"open: {out[name]:.1f} KB per stream")
            if opened < n:
                self.log(f"  ({n - opened} streams never got their first token)")
            await self.settle()  # the relays cancel 1,000 upstream requests
            await self.collect_closed(target)
        return out

    async def collect_closed(self, target: Target) -> None:
        """An unmeasured load after the idle phase. A closed stream leaves its objects in
        reference cycles, so the 1,000 idle streams are freed by one full garbage
        collection of the relay (about 250 ms), which Python starts after enough new
        allocations: during the relay's next load. Measured there, it lands somewhere in the
        first latency load's ramp, and that load's TTFB p50 showed where (+2 ms or +100 ms
        from one run or one commit to the next, as the allocations per request shifted).
        This load, shaped like the first latency load, takes the collection instead."""
        streams, rate, ramp, _window = self.plan.latency_loads[0]
        load = loadgen.Load(url=target.url, streams=streams, tokens=int(rate) + 1,
                            stream_s=1.0, ramp_s=ramp, grace_s=5.0,
                            body=loadgen.openai_body(stamped_model(int(rate) + 1, rate)))
        await loadgen.measure(load)
        await self.settle()

    async def latency(self, names: Sequence[str]) -> None:
        for rep in range(self.plan.reps):
            for streams, rate, ramp, window in self.plan.latency_loads:
                self.log(f"latency, round {rep + 1}/{self.plan.reps}: {streams} streams x "
                         f"{rate:g} tokens/s")
                tokens = load_tokens((streams, rate, ramp, window))
                # the EventSource endpoint's scenario is its process's upstream.model,
                # which matches the realistic shape
                extra = [n for n in self.targets if n.startswith(("sseproxy-es",
                                                                  "sseproxy-streams"))]
                shape = (streams, rate, ramp, window) == self.plan.shape
                for name in [*names, *(extra if shape else [])]:
                    await self.load(self.targets[name], "latency", streams, rate, tokens, ramp)

    async def reconnects(self) -> dict[str, Reconnects]:
        """Reconnect latency of the pacing-off processes (current and previous), through
        ``GET /v1/streams/{id}`` and ``GET /v1/chat/stream``: ``{"<target>/<via>": ...}``."""
        out: dict[str, Reconnects] = {}
        n, after = self.plan.reconnect_streams, self.plan.reconnect_after
        model = stamped_model(load_tokens(self.plan.shape), self.plan.shape[1])
        for name in ("sseproxy-off", "sseproxy-off" + PREV):
            if name not in self.targets:
                continue
            port = urlsplit(self.targets[name].url).port or 80
            status = streams_api(port)
            for via in VIAS:
                if status != 201:
                    out[f"{name}/{via}"] = Reconnects(
                        supported=False, streams=0,
                        note=f"not supported (`POST /v1/streams`: {status})")
                    continue
                self.log(f"reconnects: {n} streams through {name}, {VIAS[via]}, each cut "
                         f"after {after} events")
                found = out[f"{name}/{via}"] = await reconnect_probe(port, via, n, after, model)
                summary = found.summary()
                self.log(f"  resumed {summary['resumed']}/{n}, first missed event p50 "
                         f"{summary['p50_ms']:.2f} ms, p99 {summary['p99_ms']:.2f} ms, "
                         f"errors {summary['errors'] or 0}")
                await self.settle()
        return out

    async def steps(self, names: Sequence[str], baseline_p99_ms: float) -> dict[str, Sample]:
        """The best passing step of each target."""
        alive = list(names)
        best: dict[str, Sample] = {}
        n, window = self.plan.step_streams, self.plan.step_window_s
        for rate in self.plan.step_rates:
            if not alive:
                break
            self.log(f"throughput step: {n} streams x {rate:g} tokens/s = {n * rate:,.0f} "
                     f"offered (p99 limit {baseline_p99_ms + MAX_ADDED_P99_MS:.1f} ms)")
            tokens = int((0.5 + 0.3 + window) * rate) + 1
            for name in list(alive):
                tries = 2 if self.plan.retry_failed_step else 1
                for attempt in range(tries):
                    sample = await self.load(self.targets[name], "step", n, rate, tokens, 0.5,
                                             grace_s=2.0)
                    why = step_failure(sample, baseline_p99_ms)
                    if not why:
                        best[name] = sample
                        break
                    # One stall of the shared machine (a hypervisor pause, another
                    # process's burst) fails a few-second step outright: a relay drops out
                    # only when the step fails twice.
                    again = attempt + 1 < tries
                    self.log(f"    {name} failed ({why})" + (", once more" if again else ""))
                    if not again:
                        alive.remove(name)
                        break
        return best


def step_failure(sample: Sample, baseline_p99_ms: float) -> str:
    s = sample.summary
    p99 = s["latency_ms"]["p99"]
    if math.isnan(p99) or p99 - baseline_p99_ms > MAX_ADDED_P99_MS:
        return f"p99 {p99:.1f} ms"
    if s["error_rate"] > MAX_ERROR_RATE:
        return f"errors {s['errors']}"
    if s["delivered"] < MIN_DELIVERED:
        return f"delivered {s['delivered']:.1%}"
    return ""


# ---------------------------------------------------------------------------------------------
# Reconnect latency


VIAS = {"streams": "`GET /v1/streams/{id}`", "chat": "`GET /v1/chat/stream`"}


class ResumeFailed(Exception):
    """A probed stream did not resume as the EventSource contract says."""


class EventConnection:
    """One HTTP/1.1 request on a connection of its own, its answer read as SSE events: the
    reconnect probe's client (a few thousand events in all, so plain asyncio streams)."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer
        self.status = 0
        self.headers: dict[str, str] = {}
        self.buffer = b""
        self.ended = False

    @classmethod
    async def open(cls, port: int, method: str, target: str, body: bytes | None = None,
                   headers: Sequence[tuple[str, str]] = ()) -> EventConnection:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        lines = [f"{method} {target} HTTP/1.1", f"Host: 127.0.0.1:{port}",
                 "Accept: text/event-stream", *(f"{k}: {v}" for k, v in headers)]
        if body is not None:
            lines += ["Content-Type: application/json", f"Content-Length: {len(body)}"]
        writer.write(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + (body or b""))
        conn = cls(reader, writer)
        try:
            head = (await reader.readuntil(b"\r\n\r\n")).decode("latin-1").split("\r\n")
            conn.status = int(head[0].split(" ", 2)[1])
        except BaseException:
            conn.close()
            raise
        for line in head[1:]:
            name, _, value = line.partition(":")
            conn.headers[name.strip().lower()] = value.strip()
        return conn

    async def body(self) -> bytes:
        """A whole body of known length (a 201's JSON)."""
        self.ended = True
        return await self.reader.readexactly(int(self.headers.get("content-length", "0")))

    async def _more(self) -> bytes:
        """The next piece of the body (b"" at its end)."""
        if self.ended:
            return b""
        if "chunked" in self.headers.get("transfer-encoding", "").lower():
            size = int((await self.reader.readuntil(b"\r\n")).split(b";")[0], 16)
            if not size:
                self.ended = True
                return b""
            return (await self.reader.readexactly(size + 2))[:-2]
        if "content-length" in self.headers:
            return await self.body()
        data = await self.reader.read(65536)  # until the server closes
        self.ended = not data
        return data

    async def event(self) -> dict[str, str] | None:
        """The next event with data (fields ``id``, ``event``, ``data``), ``None`` at the
        end of the body."""
        while True:
            end = self.buffer.find(b"\n\n")
            if end < 0:
                more = await self._more()
                if not more:
                    return None
                self.buffer += more.replace(b"\r\n", b"\n")
                continue
            frame, self.buffer = self.buffer[:end].decode(), self.buffer[end + 2:]
            fields: dict[str, str] = {}
            for line in frame.split("\n"):
                if not line or line.startswith(":"):
                    continue
                name, _, value = line.partition(":")
                fields[name] = value[1:] if value.startswith(" ") else value
            if "data" in fields:
                return fields

    def close(self) -> None:
        self.writer.close()


async def reconnect_once(port: int, via: str, after: int, model: str, away_s: float) -> int:
    """One client: read ``after`` deltas, drop the connection, stay away ``away_s``,
    reconnect with ``Last-Event-ID`` and read to ``event: done``, checking that the ids go
    on where they stopped, with no gap and no duplicate. Returns the ns from starting the
    reconnect to the first missed event."""
    if via == "streams":
        conn = await EventConnection.open(port, "POST", "/v1/streams", streams_body(model))
        try:
            if conn.status != 201:
                raise ResumeFailed(f"create: status {conn.status}")
            events_url = urlsplit(str(json.loads(await conn.body())["events_url"]))
        finally:
            conn.close()
        target = events_url.path + (f"?{events_url.query}" if events_url.query else "")
    else:
        target = "/v1/chat/stream?prompt=hi"  # the process's upstream.model is ``model``
    conn = await EventConnection.open(port, "GET", target)
    last, seen = "", 0
    try:
        if conn.status != 200:
            raise ResumeFailed(f"status {conn.status}")
        while seen < after:
            event = await conn.event()
            if event is None or "event" in event:
                raise ResumeFailed("the stream ended before the cut")
            last, seen = event.get("id", ""), seen + 1
    finally:
        conn.close()
    stream_id, _, position = last.rpartition(".")
    if not stream_id or not position.isdigit():
        raise ResumeFailed(f"event id {last[:40]!r} is not <stream_id>.<n>")
    await asyncio.sleep(away_s)  # the client is away: events go on without it
    sent = time.monotonic_ns()
    conn = await EventConnection.open(port, "GET", target, headers=[("Last-Event-ID", last)])
    try:
        if conn.status != 200:
            raise ResumeFailed(f"reconnect: status {conn.status}")
        latency, expected = 0, int(position) + 1
        while True:
            event = await conn.event()
            if event is None:
                raise ResumeFailed("reconnect: no event: done")
            latency = latency or time.monotonic_ns() - sent
            if event.get("id") != f"{stream_id}.{expected}":
                raise ResumeFailed("reconnect: ids not consecutive")
            if event.get("event") == "error":
                raise ResumeFailed("reconnect: event: error")
            if event.get("event") == "done":
                return latency
            expected += 1
    finally:
        conn.close()


@dataclass
class Reconnects:
    """What the reconnect probe found on one server, through one endpoint."""

    supported: bool
    streams: int
    note: str = ""
    latencies: list[int] = field(default_factory=list)  # ns
    errors: dict[str, int] = field(default_factory=dict)

    def summary(self) -> dict[str, Any]:
        ordered = sorted(self.latencies)
        return {"supported": self.supported, "note": self.note, "streams": self.streams,
                "resumed": len(ordered), "errors": self.errors,
                "p50_ms": pct_ms(ordered, 0.5), "p99_ms": pct_ms(ordered, 0.99)}


async def reconnect_probe(port: int, via: str, streams: int, after: int, model: str,
                          ramp_s: float = 0.5, away_s: float = 0.2,
                          timeout_s: float = 30.0) -> Reconnects:
    """``streams`` concurrent clients (connects spread over ``ramp_s``), each cut once."""
    found = Reconnects(supported=True, streams=streams)

    async def client(i: int) -> None:
        await asyncio.sleep(i * ramp_s / streams)
        try:
            found.latencies.append(await asyncio.wait_for(
                reconnect_once(port, via, after, model, away_s), timeout_s))
        except ResumeFailed as exc:
            why = str(exc)
        except TimeoutError:
            why = "timeout"
        except (OSError, asyncio.IncompleteReadError, ValueError, KeyError) as exc:
            why = type(exc).__name__
        else:
            return
        found.errors[why] = found.errors.get(why, 0) + 1

    await asyncio.gather(*(client(i) for i in range(streams)))
    return found


# ---------------------------------------------------------------------------------------------
# Figures


def pooled(samples: Sequence[Sample], attr: str) -> list[int]:
    out: list[int] = []
    for s in samples:
        out += getattr(s, attr)
    out.sort()
    return out


def pct_ms(values: Sequence[int], q: float) -> float:
    return loadgen.percentile(values, q) / 1e6


def fmt(value: float | None, digits: int = 1, suffix: str = "") -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "—"
    return f"{value:,.{digits}f}{suffix}"


@dataclass
class Figures:
    rows: list[list[str]] = field(default_factory=list)
    guard: list[list[str]] = field(default_factory=list)  # previous code beside current
    ratios: list[str] = field(default_factory=list)
    data: dict[str, Any] = field(default_factory=dict)


def figures(bench: Bench, idle: dict[str, float], best: dict[str, Sample],
            names: Sequence[str], reconnects: dict[str, Reconnects]) -> Figures:
    out = Figures()
    lat = [s for s in bench.samples if s.phase == "latency"]
    stepped = {s.target for s in bench.samples if s.phase == "step"}
    loads = sorted({s.streams for s in lat})
    rate = {s.streams: s.rate for s in lat}

    def of(name: str, streams: int | None = None) -> list[Sample]:
        return [s for s in lat if s.target == name and (streams is None or s.streams == streams)]

    base = {n: pooled(of("direct", n), "latencies") for n in loads}
    base_ttfb = pct_ms(pooled(of("direct", loads[0] if loads else None), "ttfb"), 0.5)
    cpu_per_100k: dict[tuple[str, int], float] = {}
    added_p99: dict[tuple[str, int], float] = {}
    header = ["scenario"]
    for n in loads:
        header.append(f"added p50 / p99 ms, {n:,} streams × {rate[n]:g} tok/s")
    header += ["unfinished / delivered, " + (f"{loads[-1]:,}" if loads else "") + " streams",
               "TTFB overhead ms", "sustained events/s",
               "CPU s / 100k events, " + " / ".join(f"{n:,}" for n in loads) + " streams",
               "RSS KB / idle stream"]
    out.rows.append(header)
    shown = [*names, *sorted({s.target for s in lat} - set(names)),
             *sorted(stepped - set(names))]
    for name in shown:
        row = [label(name)]
        for n in loads:
            pool = pooled(of(name, n), "latencies")
            if not pool:
                row.append("—")
            elif name == "direct":
                row.append(f"one-way {pct_ms(pool, .5):.2f} / {pct_ms(pool, .99):.2f}")
            else:
                p50 = pct_ms(pool, .5) - pct_ms(base[n], .5)
                p99 = pct_ms(pool, .99) - pct_ms(base[n], .99)
                added_p99[name, n] = p99
                row.append(f"{p50:+.2f} / {p99:+.2f}")
        last = of(name, loads[-1]) if loads else []
        if last:
            errors = sum(s.summary["streams"] - s.summary["completed"] for s in last)
            streams = sum(s.summary["streams"] for s in last)
            delivered = (sum(s.summary["tokens"] for s in last)
                         / sum(s.summary["expected"] for s in last))
            row.append(f"{errors}/{streams} / {delivered:.1%}")
        else:
            row.append("—")
        first = of(name, loads[0]) if loads else []
        ttfb = pct_ms(pooled(first, "ttfb"), 0.5) if first else math.nan
        row.append("—" if not first else
                   f"{ttfb:.2f} (p50)" if name == "direct" else f"{ttfb - base_ttfb:+.2f}")
        step = best.get(name)
        if step is not None:
            top = step.rate == bench.plan.step_rates[-1]
            row.append(("≥ " if top else "") + fmt(step.summary["tokens_per_s"], 0))
        elif name in stepped:
            row.append("< lowest step")
        else:
            row.append("—")
        cells = []
        for n in loads:
            samples = of(name, n)
            tokens = sum(s.summary["tokens"] for s in samples)
            if not tokens:
                cells.append("—")
                continue
            attr = "simulator_cpu_s" if name == "direct" else "relay_cpu_s"
            cpu = sum(getattr(s, attr) for s in samples) / tokens * 1e5
            cpu_per_100k[name, n] = cpu
            cells.append(f"{cpu:.2f}")
        row.append(("simulator: " if name == "direct" else "") + " / ".join(cells))
        row.append(fmt(idle.get(name), 1))
        out.rows.append(row)

    def tput(name: str) -> float | None:
        return best[name].summary["tokens_per_s"] if name in best else None

    def ratio(a: float | None, b: float | None) -> str:
        return f"{a / b:.2f}×" if a and b else "—"

    big = loads[-1] if loads else 0
    small = loads[0] if loads else 0

    def cpu_of(name: str, n: int = small) -> float | None:
        return cpu_per_100k.get((name, n))

    out.ratios = [
        f"sseproxy (pacing off) / naive relay sustained events/s: "
        f"**{ratio(tput('sseproxy-off'), tput('naive'))}** (target ≥ 2×); "
        f"sseproxy: {fmt(tput('sseproxy-off'), 0)} events/s (target ≥ 25,000)",
        f"CPU per event at {small:,} streams (the lighter load), sseproxy (pacing off) "
        f"/ nginx: **{ratio(cpu_of('sseproxy-off'), cpu_of('nginx'))}** (target ≤ 4×); naive "
        f"relay / nginx: {ratio(cpu_of('naive'), cpu_of('nginx'))}; sseproxy / naive: "
        f"{ratio(cpu_of('sseproxy-off'), cpu_of('naive'))} (at {big:,} streams: "
        f"{ratio(cpu_of('sseproxy-off', big), cpu_of('nginx', big))}, "
        f"{ratio(cpu_of('naive', big), cpu_of('nginx', big))}, "
        f"{ratio(cpu_of('sseproxy-off', big), cpu_of('naive', big))})",
        f"sseproxy default pacing CPU / pacing off, same load: "
        f"**{ratio(cpu_of('sseproxy'), cpu_of('sseproxy-off'))}** at {small:,} streams "
        f"(target ≤ 1.5×), {ratio(cpu_of('sseproxy', big), cpu_of('sseproxy-off', big))} at "
        f"{big:,}",
        f"sseproxy (pacing off) added p99 at {big:,} streams × {rate.get(big, 0):g} tok/s: "
        f"**{fmt(added_p99.get(('sseproxy-off', big)), 2, ' ms')}**, default pacing "
        f"{fmt(added_p99.get(('sseproxy', big)), 2, ' ms')} (target ≤ 5 ms)",
        f"sseproxy RSS per idle stream: **{fmt(idle.get('sseproxy'), 1, ' KB')}** "
        f"(target ≤ 40 KB); naive {fmt(idle.get('naive'), 1, ' KB')}, "
        f"nginx {fmt(idle.get('nginx'), 1, ' KB')}",
        f"`--workers 2` / 1 worker sustained events/s: "
        f"**{ratio(tput('sseproxy-2w'), tput('sseproxy-off'))}**",
    ]

    def budget(name: str) -> str | None:
        """CPU of every process per token of ``name`` at the big load, and the cores used."""
        samples = of(name, big)
        tokens = sum(s.summary["tokens"] for s in samples)
        if not tokens:
            return None
        sim = sum(s.simulator_cpu_s for s in samples) / tokens * 1e6
        gen = sum(s.summary["loadgen_cpu_s"] for s in samples) / tokens * 1e6
        relay = sum(s.relay_cpu_s for s in samples) / tokens * 1e6
        cores = (sim + gen + relay) * 1e-6 * big * rate[big]
        return (f"{name} {sim:.1f} + {gen:.1f} + {relay:.1f} µs = **{cores:.2f} cores**")

    budgets = [b for b in map(budget, ("nginx", "naive", "sseproxy-off")) if b]
    if budgets:
        out.ratios.append(
            f"CPU per token at {big:,} streams × {rate[big]:g} tok/s, simulator + load generator "
            f"+ relay, and the cores that takes at {big * rate[big]:,.0f} tokens/s "
            f"(this machine has {os.cpu_count()}): " + "; ".join(budgets))
    direct = [s for s in bench.samples if s.target == "direct" and s.phase != "warmup"]
    tokens = sum(s.summary["tokens"] for s in direct)
    cpu = sum(s.summary["loadgen_cpu_s"] for s in direct)
    all_tokens = sum(s.summary["tokens"] for s in bench.samples)
    all_cpu = sum(s.summary["loadgen_cpu_s"] for s in bench.samples)
    per_token = all_cpu / all_tokens * 1e6 if all_tokens else math.nan
    out.ratios.append(
        f"harness ceiling: direct to the simulator sustained {fmt(tput('direct'), 0)} "
        "events/s with the load generator and the simulator sharing the machine; the load "
        f"generator spent {per_token:.1f} µs of CPU per token over the run "
        f"({cpu / tokens * 1e6 if tokens else math.nan:.1f} µs on direct loads), "
        f"a ceiling of about {1e6 / per_token:,.0f} tokens/s on one core of its own")
    out.guard = guard_rows(bench, cpu_per_100k, idle, best, reconnects)
    shape = bench.plan.shape
    per_write = [s.summary["tokens_per_write"] for s in of("direct", shape[0])]
    if per_write:
        out.ratios.append(
            f"load shape: at {shape[0]:,} streams × {shape[1]:g} tok/s the simulator wrote "
            f"{sum(per_write) / len(per_write):.2f} tokens per write (direct; 1.00 is one "
            "token per upstream write)")
    out.data = {"cpu_per_100k": {f"{k[0]}@{k[1]}": v for k, v in cpu_per_100k.items()},
                "added_p99_ms": {f"{k[0]}@{k[1]}": v for k, v in added_p99.items()},
                "reconnects": {k: v.summary() for k, v in reconnects.items()},
                "idle_kb": idle,
                "sustained": {k: v.summary["tokens_per_s"] for k, v in best.items()},
                "loadgen_us_per_token": per_token}
    return out


def guard_rows(bench: Bench, cpu_per_100k: dict[tuple[str, int], float],
               idle: dict[str, float], best: dict[str, Sample],
               reconnects: dict[str, Reconnects]) -> list[list[str]]:
    """The performance guard: each figure of the previous code beside the current one."""
    plan = bench.plan
    rate = {n: r for n, r, _ramp, _window in plan.latency_loads}
    shape = plan.shape[0]

    def us(name: str, n: int) -> float | None:
        per_100k = cpu_per_100k.get((name, n))
        return None if per_100k is None else per_100k * 10  # s / 100k tokens -> µs / token

    def div(a: float | None, b: float | None) -> float | None:
        return a / b if a and b else None

    def times(value: float | None) -> str:
        return "—" if value is None else f"{value:.2f}×"

    def absent(name: str) -> str:
        """Why a scenario has no figure: the previous code was not run, or lacks the API."""
        if name.endswith(PREV) and "sseproxy-off" + PREV not in bench.targets:
            return "not run"
        return "not supported" if "streams" in name else "—"

    rows = [["figure", "previous", "current", "current / previous", "target"]]

    def pair(what: str, name: str, value: Callable[[str], float | None], digits: int,
             target: str, unit: str = "") -> None:
        prev, cur = value(name + PREV), value(name)
        rows.append([what, fmt(prev, digits, unit) if prev is not None else absent(name + PREV),
                     fmt(cur, digits, unit) if cur is not None else absent(name),
                     "—" if unit else times(div(cur, prev)), target])

    for n in plan.guard_streams:
        for name, pacing in (("sseproxy-off", "pacing off"), ("sseproxy", "default pacing")):
            if name in bench.targets:
                pair(f"CPU µs / token, `POST /v1/chat/completions`, {pacing}, {n:,} × "
                     f"{rate[n]:g} tok/s", name, lambda t: us(t, n), 1, "≤ 1.1×")
    at = f"{shape:,} × {plan.shape[1]:g} tok/s"
    pair(f"CPU µs / token, `GET /v1/chat/stream` (pacing off), {at}", "sseproxy-es",
         lambda t: us(t, shape), 1, "—")
    pair(f"CPU µs / token, `POST /v1/streams` + its EventSource (pacing off), {at}",
         "sseproxy-streams", lambda t: us(t, shape), 1, "—")
    redis = us("sseproxy-streams-redis", shape)
    rows.append([f"CPU µs / token, `POST /v1/streams` + EventSource on Redis (sseproxy + "
                 f"redis-server) / memory, {at}", "—",
                 "not run" if redis is None else f"{fmt(redis, 1)} / "
                 f"{fmt(us('sseproxy-streams', shape), 1)}",
                 times(div(redis, us("sseproxy-streams", shape))), "≤ 2×"])
    for es in ("sseproxy-es", "sseproxy-streams"):
        endpoint = "`GET /v1/chat/stream`" if es == "sseproxy-es" else "`/v1/streams`"
        pair(f"CPU per token, {endpoint} / OpenAI endpoint (pacing off), {at}", es,
             lambda t: div(us(t, shape), us(t.replace(es, "sseproxy-off"), shape)), 2,
             "≤ 1.3× (current)", unit="×")
    for key, via in VIAS.items():
        cells = []
        for name in ("sseproxy-off" + PREV, "sseproxy-off"):
            found = reconnects.get(f"{name}/{key}")
            if found is None:
                cells.append("not run")
            elif not found.supported:
                cells.append(found.note)
            else:
                summary = found.summary()
                failed = summary["streams"] - summary["resumed"]
                cells.append(f"{summary['p50_ms']:.1f} / {summary['p99_ms']:.1f}"
                             + (f" ({failed} of {summary['streams']} did not resume)"
                                if failed else ""))
        rows.append([f"reconnect → first missed event, p50 / p99 ms, "
                     f"{plan.reconnect_streams} streams, {via}", *cells, "—", "p99 ≤ 50 ms"])
    for name, pacing in (("sseproxy-off", "pacing off"), ("sseproxy", "default pacing")):
        if idle.get(name) is not None:
            pair(f"RSS KB / idle stream, {pacing}", name, idle.get, 1, "≤ 1.0×")
    stepped = {s.target for s in bench.samples if s.phase == "step"}
    if {"sseproxy-off", "sseproxy-off" + PREV} & stepped:
        pair("sustained events/s, pacing off", "sseproxy-off",
             lambda t: best[t].summary["tokens_per_s"] if t in best else None, 0, "—")
        for cell, name in ((1, "sseproxy-off" + PREV), (2, "sseproxy-off")):
            if name in stepped and name not in best:
                rows[-1][cell] = "< lowest step"
    return rows


def markdown_table(rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(rows[0]) + " |", "|" + "---|" * len(rows[0])]
    lines += ["| " + " | ".join(row) + " |" for row in rows[1:]]
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# The machine


def cpu_model() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


def machine_cpu_s() -> tuple[float, float]:
    """(busy, steal) CPU seconds of the whole machine since boot, from /proc/stat."""
    values = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    user, nice, system, _idle, _iowait, irq, softirq, steal = values[:8]
    return (user + nice + system + irq + softirq) / CLK_TCK, steal / CLK_TCK


def own_cpu_s() -> float:
    """This process and every child it reaped (so: all of the benchmark, after stop())."""
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system


def nginx_version() -> str:
    try:
        out = subprocess.run([NGINX, "-v"], capture_output=True, text=True).stderr
    except OSError:
        return "not found"
    return out.strip().replace("nginx version: ", "")


def describe_machine() -> dict[str, str]:
    return {
        "CPU": cpu_model(),
        "cores": str(os.cpu_count()),
        "kernel": f"{platform.system()} {platform.release()}",
        "Python": platform.python_version(),
        "nginx": nginx_version(),
        "load average at start": " ".join(Path("/proc/loadavg").read_text().split()[:3]),
    }


# ---------------------------------------------------------------------------------------------
# Main


@contextmanager
def interrupts_as_keyboard() -> Iterator[None]:
    """SIGTERM ends the run like Ctrl-C: through the finally that stops the processes."""
    def on_term(signum: int, frame: FrameType | None) -> None:
        raise KeyboardInterrupt

    old = signal.signal(signal.SIGTERM, on_term)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, old)


def streams_api(port: int) -> int:
    """The status ``POST /v1/streams`` answers (``201`` where the server has resumable
    streams; a one-token stream is created and ends at once)."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    try:
        conn.request("POST", "/v1/streams", streams_body("mock?tokens=1&rate=0"),
                     {"Content-Type": "application/json"})
        response = conn.getresponse()
        response.read()
        return response.status
    finally:
        conn.close()


def start_fleet(fleet: Fleet, mode: str, nofile: int, log: Callable[[str], None],
                es_model: str, previous: Previous | None) -> tuple[dict[str, Target], Proc]:
    py = sys.executable
    sim_port = free_port()
    simulator = fleet.start("simulator", [py, "-m", "sseproxy", "mock-upstream", "--port",
                                          str(sim_port), "--rate", "20", "--stamp"])
    upstream = f"http://127.0.0.1:{sim_port}/v1"
    common = ["--set", "logging.level=warning", "--set", "limits.max_streams=100000",
              "--set", "upstream.max_connections=20000", "--set", "server.shutdown_grace_s=1"]

    def sseproxy(name: str, *extra: str, workers: int = 1, tree: Path = ROOT) -> None:
        port = free_port()
        argv = [py, "-m", "sseproxy", "serve", "--port", str(port), "--upstream-url",
                upstream, *common, *extra]
        if workers > 1:
            argv += ["--workers", str(workers), "--set",
                     f"metrics.port={free_port(consecutive=workers)}"]
        ports[name] = (fleet.start(name, argv, work="children" if workers > 1 else "self",
                                   tree=tree), port)

    ports: dict[str, tuple[Proc, int]] = {}
    # the current code and the previous one, with the same flags
    for tree, suffix in [(ROOT, ""), *([(previous.tree, PREV)] if previous else [])]:
        sseproxy("sseproxy-off" + suffix, "--set", "pacing.mode=off", "--set",
                 f"upstream.model={es_model}", tree=tree)
        if mode != "smoke":
            sseproxy("sseproxy" + suffix, tree=tree)
    if mode != "smoke":
        naive_port = free_port()
        ports["naive"] = (fleet.start("naive", [py, str(ROOT / "bench" / "naive_relay.py"),
                                                "--port", str(naive_port), "--upstream-url",
                                                upstream]), naive_port)
        sseproxy("sseproxy-2w", "--set", "pacing.mode=off", workers=2)
    wait_ready(simulator, sim_port, "/v1/models")
    targets = {"direct": Target("direct", label("direct"),
                                f"{upstream}/chat/completions", [])}
    if mode != "smoke":
        prefix = fleet.tmp / "nginx-pass"
        nginx_port = free_port()
        proc = start_nginx(fleet, "nginx", PASS_THROUGH_SITE.format(
            upstream_port=sim_port, port=nginx_port), prefix, nofile)
        wait_ready(proc, nginx_port, "/v1/models")
        targets["nginx"] = Target("nginx", label("nginx"),
                                  f"http://127.0.0.1:{nginx_port}/v1/chat/completions", [proc])
        proc, port = ports["naive"]
        wait_ready(proc, port, "/healthz")
        targets["naive"] = Target("naive", label("naive"),
                                  f"http://127.0.0.1:{port}/v1/chat/completions", [proc])
    for name in ("sseproxy-off", "sseproxy-off" + PREV, "sseproxy", "sseproxy" + PREV,
                 "sseproxy-2w"):
        if name in ports:
            proc, port = ports[name]
            wait_ready(proc, port, "/healthz")
            targets[name] = Target(name, label(name),
                                   f"http://127.0.0.1:{port}/v1/chat/completions", [proc])
    if mode != "smoke":
        deploy_port = free_port()
        sse_proc, sse_port = ports["sseproxy"]
        prefix = fleet.tmp / "nginx-deploy"
        proc = start_nginx(fleet, "nginx-deploy",
                           render_deploy_site(deploy_port, sse_port, prefix), prefix, nofile)
        wait_ready(proc, deploy_port, "/healthz")
        targets["nginx+sseproxy"] = Target(
            "nginx+sseproxy", label("nginx+sseproxy"),
            f"http://127.0.0.1:{deploy_port}/v1/chat/completions", [proc, sse_proc])
        # the 2-worker master only supervises: wait until both workers are there
        deadline = time.monotonic() + 10
        while len(ports["sseproxy-2w"][0].pids()) < 2 and time.monotonic() < deadline:
            time.sleep(0.1)
    for suffix in ("", PREV):
        if "sseproxy-off" + suffix not in ports:
            continue
        proc, port = ports["sseproxy-off" + suffix]
        base = f"http://127.0.0.1:{port}"
        name = "sseproxy-es" + suffix
        targets[name] = Target(name, label(name), f"{base}/v1/chat/stream?prompt=hi", [proc],
                               get=True)
        status = streams_api(port)
        log(f"{proc.name}: POST /v1/streams answers {status}")
        if status == 201:
            name = "sseproxy-streams" + suffix
            targets[name] = Target(name, label(name), f"{base}/v1/streams", [proc],
                                   create=True)
    if mode != "smoke" and shutil.which("redis-server"):
        # The Redis backend: sseproxy and redis-server both counted (the same flags as
        # sseproxy-off, logs in Redis instead of this process).
        redis_port, port = free_port(), free_port()
        redis = fleet.start("redis-server", ["redis-server", "--port", str(redis_port),
                                             "--bind", "127.0.0.1", "--save", "",
                                             "--appendonly", "no"])
        proc = fleet.start("sseproxy-redis", [
            py, "-m", "sseproxy", "serve", "--port", str(port), "--upstream-url", upstream,
            *common, "--set", "pacing.mode=off", "--set", f"upstream.model={es_model}",
            "--set", "store.backend=redis",
            "--set", f"store.redis_url=redis://127.0.0.1:{redis_port}/0"])
        wait_ready(proc, port, "/readyz")
        name = "sseproxy-streams-redis"
        targets[name] = Target(name, label(name), f"http://127.0.0.1:{port}/v1/streams",
                               [proc, redis], create=True)
    log("started: " + ", ".join(f"{p.name} (pid {p.pid})" for p in fleet.procs.values()))
    return targets, simulator


async def run_bench(bench: Bench, mode: str) -> dict[str, Any]:
    names = [n for n in ("direct", "nginx", "naive", "sseproxy-off", "sseproxy-off" + PREV,
                         "sseproxy", "sseproxy" + PREV, "nginx+sseproxy")
             if n in bench.targets]
    await bench.warm_up()
    idle = await bench.idle_memory([n for n in ("nginx", "naive", "sseproxy-off",
                                                "sseproxy-off" + PREV, "sseproxy",
                                                "sseproxy" + PREV)
                                    if n in bench.targets])
    await bench.latency(names)
    reconnects = await bench.reconnects()
    best: dict[str, Sample] = {}
    if bench.plan.step_rates:
        first = bench.plan.step_rates[0]
        n = bench.plan.step_streams
        bench.log("baseline for the steps: direct at the first step")
        base = await bench.load(bench.targets["direct"], "baseline", n, first,
                                int((0.8 + bench.plan.step_window_s) * first) + 1, 0.5)
        baseline_p99 = base.summary["latency_ms"]["p99"]
        best = await bench.steps([n for n in ("direct", "nginx", "naive", "sseproxy-off",
                                              "sseproxy-off" + PREV, "sseproxy-2w")
                                  if n in bench.targets],
                                 baseline_p99)
    figs = figures(bench, idle, best, names, reconnects)
    return {"figures": figs, "idle": idle, "best": best, "reconnects": reconnects}


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python bench/run.py", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--quick", action="store_true", help="a short run (about 2 minutes)")
    group.add_argument("--smoke", action="store_true",
                       help="a few streams through direct and sseproxy (for the tests)")
    parser.add_argument("--docs", type=Path, default=None,
                        help=f"write the report here (default for a full run: {DOCS})")
    parser.add_argument("--no-docs", action="store_true", help="do not write the report")
    parser.add_argument("--json", action="store_true",
                        help="print the samples as JSON on stdout (progress goes to stderr)")
    parser.add_argument("--previous", metavar="REF", default=None,
                        help="the previous code, run beside the current one: a git ref "
                        f"(default {PREVIOUS_DEFAULT[:12]}, the last commit before the "
                        "EventLog rebuild; with --smoke: none), or 'none'")
    args = parser.parse_args(argv)
    mode = "smoke" if args.smoke else "quick" if args.quick else "full"
    plan = PLANS[mode]
    docs = None if args.no_docs else args.docs or (DOCS if mode == "full" else None)
    command = "python bench/run.py" + "".join(f" {shlex.quote(a)}" for a in (argv or
                                                                             sys.argv[1:]))
    out = sys.stderr if args.json else sys.stdout

    def log(line: str) -> None:
        print(f"[{time.monotonic() - started:3.0f} s] {line}", file=out, flush=True)

    started = time.monotonic()
    nofile = loadgen.raise_nofile()
    if mode != "smoke" and not os.path.exists(NGINX):
        log(f"nginx not found ({NGINX}): install it (Debian: apt-get install nginx-light)")
        return 2
    machine = describe_machine()
    (busy0, steal0), own0 = machine_cpu_s(), own_cpu_s()
    # the EventSource endpoint streams its process's upstream.model: the realistic shape
    es_model = stamped_model(load_tokens(plan.shape), plan.shape[1])
    ref = args.previous or ("none" if mode == "smoke" else PREVIOUS_DEFAULT)
    previous: Previous | None = None
    with tempfile.TemporaryDirectory(prefix="sseproxy-bench-") as tmp, \
            interrupts_as_keyboard(), ExitStack() as stack:
        fleet = Fleet(Path(tmp))
        try:
            if ref != "none":
                try:
                    previous = stack.enter_context(previous_tree(ref, Path(tmp) / "previous"))
                except RuntimeError as exc:
                    log(f"the previous code ({ref}) cannot be checked out: {exc} "
                        "(--previous none runs without it)")
                    return 2
                log(f"previous code: {ref} = {previous.commit[:12]}, checked out at "
                    f"{previous.tree}" + (" (the same sseproxy/ as this tree)"
                                          if previous.same_code else ""))
            targets, simulator = start_fleet(fleet, mode, nofile, log, es_model, previous)
            bench = Bench(fleet, targets, simulator, plan, log)
            outcome = asyncio.run(run_bench(bench, mode))
        except KeyboardInterrupt:
            log("interrupted: stopping every process")
            return 130
        finally:
            fleet.stop()  # before the worktree the previous code runs from goes
    elapsed = time.monotonic() - started
    (busy1, steal1), own1 = machine_cpu_s(), own_cpu_s()
    # the kernel's per-process and per-machine accounting differ a little: about
    others, steal = max(0.0, (busy1 - busy0) - (own1 - own0)), steal1 - steal0
    cores = os.cpu_count() or 1
    noise = (f"competing work: other processes on this machine used {others:.0f} CPU-seconds "
             f"during the {elapsed:.0f} s run ({others / elapsed / cores:.0%} of {cores} "
             f"cores), hypervisor steal {steal:.1f} s; load average at the end "
             + " ".join(Path("/proc/loadavg").read_text().split()[:3]))
    figs: Figures = outcome["figures"]
    table = markdown_table(figs.rows)
    if previous is None:
        against = "not run (`--previous none`)"
    else:
        against = (f"`{previous.ref}` = {previous.commit[:12]}"
                   + (" (the same `sseproxy/` as this tree: the ratios show the noise)"
                      if previous.same_code else ""))
    report = "\n".join([table, "", *[f"- {r}" for r in figs.ratios], f"- {noise}", "",
                        f"Performance guard: the previous code, {against}, beside the "
                        "current one, in the same run.", "", markdown_table(figs.guard)])
    log("\n" + report + "\n")
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    raw = {"mode": mode, "command": command, "machine": machine, "elapsed_s": elapsed,
           "noise": noise, "figures": figs.data, "table": figs.rows, "guard": figs.guard,
           "previous": previous.to_json() if previous else None,
           "samples": [s.to_json() for s in bench.samples]}
    if mode != "smoke":
        results = ROOT / "bench" / "results"
        results.mkdir(exist_ok=True)
        (results / f"{stamp}-{mode}.json").write_text(json.dumps(raw, indent=1))
    if docs is not None:
        write_docs(docs, report, machine, command, elapsed, mode)
        log(f"wrote {docs}")
    if args.json:
        print(json.dumps(raw))
    return 0


def write_docs(path: Path, report: str, machine: dict[str, str], command: str,
               elapsed: float, mode: str) -> None:
    when = datetime.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z")
    described = "\n".join(f"- {k}: {v}" for k, v in machine.items())
    block = (f"{BEGIN}\nMeasured {when} with `{command}` ({mode} run, {elapsed:.0f} s).\n\n"
             f"{described}\n\n{report}\n{END}")
    text = path.read_text() if path.exists() else f"# Benchmarks\n\n{BEGIN}\n{END}\n"
    if BEGIN in text and END in text:
        head, rest = text.split(BEGIN, 1)
        text = head + block + rest.split(END, 1)[1]
    else:
        text = text.rstrip("\n") + "\n\n" + block + "\n"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


if __name__ == "__main__":
    sys.exit(main())
