"""The chat page in a real browser (issue 15): Debian's Chromium driven by Playwright,
against a real sseproxy and the simulator on 127.0.0.1.

sseproxy runs in the test's event loop (``servers.running``); the browser runs in a worker
thread with Playwright's sync API while the test awaits it, so the servers keep serving.
Every test fails if the page sends a request anywhere but 127.0.0.1, opens a dialog or
throws. Screenshots at desktop and phone widths go to the test's ``tmp_path``.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import quote, urlsplit

import httpx
import pytest
from servers import running
from structlog.testing import capture_logs
from test_nginx import behind_nginx

from sseproxy import localmodel
from sseproxy.config import Persona
from sseproxy.mockupstream import Scenario, make_tokens

sync_api = pytest.importorskip("playwright.sync_api")

CHROMIUM = "/usr/bin/chromium"
ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync"]
DESKTOP = {"width": 1280, "height": 800}
PHONE = {"width": 390, "height": 844}
AXE = Path(__file__).parent / "vendor" / "axe.min.js"
STATIC = Path(__file__).resolve().parent.parent / "static"
WAIT_MS = 20_000
ANSWER = ".msg.assistant:last-child"

pytestmark = pytest.mark.skipif(not os.path.exists(CHROMIUM),
                                reason="needs Debian's chromium package")

T = TypeVar("T")


@dataclass
class Seen:
    """What the page did besides what a test asks it."""

    foreign: list[str] = field(default_factory=list)   # requests not to 127.0.0.1
    dialogs: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    posts: list[Any] = field(default_factory=list)     # bodies of POST /v1/streams
    deletes: list[str] = field(default_factory=list)   # paths of DELETE requests


@contextmanager
def browser_page(**context: Any) -> Iterator[tuple[Any, Seen]]:
    seen = Seen()
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=ARGS)
        try:
            ctx = browser.new_context(viewport=DESKTOP, **context)
            page = ctx.new_page()
            page.set_default_timeout(WAIT_MS)

            def on_request(request: Any) -> None:
                url = urlsplit(request.url)
                if url.scheme != "data" and url.hostname != "127.0.0.1":
                    seen.foreign.append(request.url)
                if request.method == "POST" and url.path == "/v1/streams":
                    seen.posts.append(json.loads(request.post_data or "null"))
                if request.method == "DELETE":
                    seen.deletes.append(url.path)

            def on_dialog(dialog: Any) -> None:
                seen.dialogs.append(dialog.message)
                dialog.dismiss()

            page.on("request", on_request)
            page.on("dialog", on_dialog)
            page.on("pageerror", lambda exc: seen.errors.append(str(exc)))
            yield page, seen
        finally:
            browser.close()
    assert seen.foreign == [], "requests left 127.0.0.1"
    assert seen.dialogs == [], "a dialog opened"
    assert seen.errors == [], "the page threw"


async def in_browser(fn: Callable[[], T]) -> T:
    """Run ``fn`` (which drives a browser) in a thread while this loop serves."""
    return await asyncio.to_thread(fn)


def send(page: Any, text: str) -> None:
    page.fill("#prompt", text)
    page.press("#prompt", "Enter")


def answer_state(page: Any) -> str:
    return str(page.get_attribute(ANSWER, "data-state"))


def wait_state(page: Any, state: str) -> None:
    page.wait_for_function(
        "s => document.querySelector('.msg.assistant:last-child')?.dataset.state === s", arg=state)


def answer_text(page: Any) -> str:
    return str(page.inner_text(f"{ANSWER} .body"))


def history(page: Any) -> list[dict[str, Any]]:
    return list(page.evaluate("JSON.parse(localStorage.getItem('sseproxy.chat.v1'))"))


def screenshots(page: Any, tmp_path: Path, name: str) -> None:
    for label, size in (("desktop", DESKTOP), ("phone", PHONE)):
        page.set_viewport_size(size)
        page.screenshot(path=str(tmp_path / f"{name}-{label}.png"), full_page=True)
    page.set_viewport_size(DESKTOP)


def mock_stats(mock_url: str) -> dict[str, int]:
    return dict(httpx.get(mock_url + "/mock/stats").json())


def one_line(text: str) -> str:
    return " ".join(text.split())


# Counts the page's EventSources and whether it closed each one itself (on `done` it must,
# or the browser would reconnect when the server ends the response).
TRACK_EVENTSOURCES = """(() => {
  const Native = window.EventSource;
  const all = window.eventSources = [];
  window.EventSource = class extends Native {
    constructor(...args) { super(...args); this.closedByPage = false; all.push(this); }
    close() { this.closedByPage = true; super.close(); }
  };
})();"""


async def test_answer_grows_while_streaming_and_ends_exact_then_a_second_turn_sends_history(
    io_loop: Any, tmp_path: Path,
) -> None:
    scenario = Scenario(tokens=80, rate=20)
    expected = "".join(make_tokens(scenario))
    # Paced, with fewer words than the burst threshold: a loaded machine that merges reads
    # still makes no burst of them, so the small print says there was none to smooth.
    async with running(scenario, pacing__mode="smooth", pacing__burst_threshold=100) as r:
        def drive() -> dict[str, Any]:
            with browser_page() as (page, seen):
                page.add_init_script(TRACK_EVENTSOURCES)
                page.goto(r.url + "/")
                # A function, not an expression string: the CSP header forbids the eval
                # that polling an expression needs.
                page.wait_for_function(
                    "() => document.querySelectorAll('#persona option').length > 1")
                page.select_option("#persona", "pirate")
                send(page, "Hello")
                # Each snapshot is taken in one evaluation with the check that the stream
                # is still running, so it cannot be the finished answer.
                snapshot = (
                    "n => { const a = document.querySelector('.msg.assistant:last-child');"
                    " const t = a && a.querySelector('.body').textContent.trim();"
                    " return a && a.dataset.state === 'streaming' && t.length > n && t }")
                first = str(page.wait_for_function(snapshot, arg=0).json_value())
                second = str(page.wait_for_function(snapshot, arg=len(first)).json_value())
                wait_state(page, "done")
                got: dict[str, Any] = {"first": first, "second": second}
                got["closed"] = page.evaluate(
                    "() => eventSources.map(e => [e.closedByPage, e.readyState])")
                assert one_line(answer_text(page)) == one_line(expected)
                assert history(page)[-1]["content"] == expected
                got["meta"] = page.inner_text(f"{ANSWER} .meta")
                screenshots(page, tmp_path, "chat")
                # Shift+Enter starts a new line and sends nothing; Enter sends both lines.
                page.fill("#prompt", "And")
                page.press("#prompt", "Shift+Enter")
                page.keyboard.type("again")
                got["typed"] = page.input_value("#prompt")
                got["posts_before_enter"] = len(seen.posts)
                page.press("#prompt", "Enter")
                wait_state(page, "done")
                # The conversation and the persona outlive a reload.
                page.reload()
                page.wait_for_function(
                    "() => document.querySelectorAll('#messages .msg').length === 4")
                got["reloaded"] = page.evaluate(
                    """() => [...document.querySelectorAll('#messages .msg')].map(m =>
                      [m.classList.contains('user') ? 'user' : 'assistant',
                       m.querySelector('.body').textContent.trim()])""")
                got["persona"] = page.input_value("#persona")
                got["posts"] = seen.posts
                return got
        got = await in_browser(drive)
    first, second, posts = got["first"], got["second"], got["posts"]
    assert 0 < len(first) < len(second) < len(expected)
    assert expected.startswith(first) and expected.startswith(second)
    assert got["closed"] == [[True, 2]]  # closed by the page on `done`: no reconnect loop
    # issue 15: what pacing did comes from the server (the done event)
    assert re.fullmatch(r"first token \d+\.\d\d s · \d+ tokens/s · no burst to smooth",
                        got["meta"]), got
    assert got["typed"] == "And\nagain" and got["posts_before_enter"] == 1
    assert [m["role"] for m in posts[1]["messages"]] == ["user", "assistant", "user"]
    assert posts[1]["messages"][1]["content"] == expected
    assert posts[1]["messages"][2]["content"] == "And\nagain"
    assert posts[0]["persona"] == posts[1]["persona"] == "pirate"
    assert [role for role, _text in got["reloaded"]] == ["user", "assistant"] * 2
    assert one_line(got["reloaded"][1][1]) == one_line(expected)
    assert got["reloaded"][2][1] == "And\nagain"
    assert got["persona"] == "pirate"
    assert (tmp_path / "chat-phone.png").stat().st_size > 0


async def test_loading_model_shows_until_the_local_model_answers(io_loop: Any) -> None:
    # issue 19: with upstream.kind = "local", /readyz says loading_model until it answers
    async with running(Scenario(tokens=3)) as r:
        probe = localmodel.ReadinessProbe("http://127.0.0.1:9/v1")  # never started
        r.deps.local_model = probe

        def drive() -> str:
            with browser_page() as (page, _seen):
                page.goto(r.url + "/")
                page.wait_for_selector("#loading", state="visible")
                shown = str(page.inner_text("#loading"))
                probe.ready = True
                page.wait_for_selector("#loading", state="hidden")
                return shown
        shown = await in_browser(drive)
    assert shown == "Loading model…"


async def test_stop_sends_delete_and_cancels_the_upstream_request(io_loop: Any) -> None:
    async with running(Scenario(tokens=400, rate=10)) as r:
        def drive() -> tuple[dict[str, int], list[str], list[str]]:
            with browser_page() as (page, seen):
                page.goto(r.url + "/")
                send(page, "Tell me everything")
                page.wait_for_function(
                    "() => document.querySelector('.msg.assistant .body')?.textContent.length > 0")
                page.click("#stop")
                wait_state(page, "stopped")
                assert page.is_visible("#send")
                # The default store.orphan_grace_s (30 s) is far beyond this deadline: only
                # the DELETE cancels the upstream request within it.
                for _ in range(250):
                    stats = mock_stats(r.mock_url)
                    if stats["cancelled"] == 1:
                        return stats, seen.deletes, [m["role"] for m in history(page)]
                    page.wait_for_timeout(20)  # polling the simulator with a deadline
                raise AssertionError(f"the upstream request was not cancelled: {stats}")
        stats, deletes, roles = await in_browser(drive)
    assert stats["open"] == 0 and stats["completed"] == 0
    assert len(deletes) == 1 and deletes[0].startswith("/v1/streams/")
    assert roles == ["user", "assistant"]  # the stopped answer's text is kept


async def test_an_upstream_error_shows_its_message_and_retry_asks_again(io_loop: Any) -> None:
    scenario = Scenario(tokens=20, rate=50, error_at=5,
                        error_message="the model is on a coffee break")
    async with running(scenario) as r:
        def drive() -> tuple[str, str, int, list[Any]]:
            with browser_page() as (page, seen):
                page.goto(r.url + "/")
                send(page, "Hi")
                wait_state(page, "error")
                state = str(page.inner_text(f"{ANSWER} .state"))
                page.click(f"{ANSWER} .retry")
                page.wait_for_function("() => document.querySelectorAll('.msg.assistant')"
                                       ".length === 1 && document.querySelector("
                                       "'.msg.assistant').dataset.state === 'error'")
                answers = int(page.evaluate(
                    "() => document.querySelectorAll('.msg.assistant').length"))
                return state, str(page.inner_text("#status")), answers, seen.posts
        state, status, answers, posts = await in_browser(drive)
    assert "the model is on a coffee break" in state
    assert "the model is on a coffee break" in status  # read out by screen readers too
    # Retry replaced the failed answer with a new request for the same conversation.
    assert answers == 1 and len(posts) == 2 and posts[0] == posts[1]


HOSTILE = ("Look <img src=x onerror=alert(1)> and <script>alert(2)</script> and "
           "[click](javascript:alert(3)) and <a href=\"javascript:alert(4)\">here</a> "
           "and ![a chart](https://example.com/chart.png) and [docs](https://example.com/docs) "
           "end")


async def test_a_hostile_answer_is_shown_inert(io_loop: Any) -> None:
    # The simulator echoes the prompt: the model "writes" HTML, scripts and javascript: links.
    scenario = Scenario(text="echo", tokens=len(HOSTILE.split()), rate=40)
    assert "".join(make_tokens(scenario, HOSTILE)) == HOSTILE
    async with running(scenario) as r:
        def drive() -> dict[str, Any]:
            with browser_page() as (page, _seen):
                page.goto(r.url + "/")
                send(page, HOSTILE)
                wait_state(page, "done")
                return dict(page.evaluate(
                    """() => { const b = document.querySelector('.msg.assistant .body');
                    return { imgs: document.querySelectorAll('img').length,
                      scripts: b.querySelectorAll('script').length,
                      hrefs: [...b.querySelectorAll('a[href]')].map(a =>
                        [a.getAttribute('href'), a.rel, a.target]),
                      handlers: [...b.querySelectorAll('*')].flatMap(e =>
                        [...e.attributes].map(x => x.name)).filter(n => n.startsWith('on')),
                      text: b.textContent }; }"""))
        got = await in_browser(drive)
    assert got["imgs"] == 0 and got["scripts"] == 0 and got["handlers"] == []
    assert got["hrefs"] == [["https://example.com/docs", "noopener noreferrer", "_blank"]]
    assert "<img src=x onerror=alert(1)>" in got["text"]  # shown as text, not run
    # A markdown image becomes its alt text: no request for it leaves 127.0.0.1.
    assert "[image: a chart]" in got["text"]


MARKDOWN = ("Intro with **bold**, *emphasis* and [a link](https://example.com/a).\n\n"
            "Steps:\n- apples\n- pears\n\n"
            "```python\nx = 1\ny = 2\n```\n\n"
            "1. first\n2. second\n")


def echo_of(text: str, **knobs: Any) -> Scenario:
    """The simulator echoing ``text`` once, exactly."""
    words = make_tokens(Scenario(text="echo", tokens=1000), text)
    count = next(i for i in range(len(words)) if "".join(words[:i]) == text)
    return Scenario(text="echo", tokens=count, **knobs)


ECHO = echo_of(MARKDOWN, rate=100)


def stalled_after(prefix: str) -> Persona:
    """A persona whose simulated model echoes MARKDOWN and stalls (a minute) after
    ``prefix``, so the page can be looked at mid-answer."""
    tokens = make_tokens(ECHO, MARKDOWN)
    cut = next(i for i in range(len(tokens)) if "".join(tokens[:i]) == prefix)
    stalled = echo_of(MARKDOWN, rate=100, stall_at=cut, stall_s=60)
    return Persona(system="Echo.", title=f"stalls after {prefix[-8:]!r}",
                   model=stalled.to_model())


BEFORE_FENCE_CLOSES = MARKDOWN[:MARKDOWN.index("y = 2")]     # ends "```python\nx = 1\n"
BEFORE_LIST_ITEM = MARKDOWN[:MARKDOWN.index("apples")]       # ends "Steps:\n- "

# The rendered structure of an answer, and the font of its code.
STRUCTURE = """() => {
  const b = document.querySelector('.msg.assistant:last-child .body');
  const code = b.querySelector('pre code');
  return { html: [...b.querySelectorAll('*')].filter(e => e.tagName !== 'BUTTON')
             .map(e => e.tagName.toLowerCase()),
           text: b.textContent,
           code: code && code.textContent,
           font: code && getComputedStyle(code).fontFamily,
           items: [...b.querySelectorAll('li')].map(li => li.textContent.trim()),
           links: [...b.querySelectorAll('a')].map(a => a.getAttribute('href')) }; }"""


def structure_mid_answer(page: Any, prefix: str) -> dict[str, Any]:
    """The answer's structure once the page has drawn exactly ``prefix`` (the stream is
    stalled there), and then Stop."""
    page.wait_for_function(
        "p => { const a = document.querySelector('.msg.assistant:last-child');"
        " return a && a.dataset.state === 'streaming' && a.dataset.raw === p }", arg=prefix)
    # the text is drawn in the next animation frame: wait two
    page.evaluate("() => new Promise(r => requestAnimationFrame(() => requestAnimationFrame(r)))")
    got = dict(page.evaluate(STRUCTURE))
    page.click("#stop")
    wait_state(page, "stopped")
    return got


async def test_markdown_renders_when_done_and_sensibly_mid_stream(io_loop: Any) -> None:
    personas = {"fence": stalled_after(BEFORE_FENCE_CLOSES),
                "list": stalled_after(BEFORE_LIST_ITEM)}
    async with running(ECHO, personas=personas) as r:
        def drive() -> dict[str, Any]:
            with browser_page() as (page, _seen):
                page.goto(r.url + "/")
                page.wait_for_function(
                    "() => document.querySelectorAll('#persona option').length === 3")
                send(page, MARKDOWN)
                wait_state(page, "done")
                got = {"done": page.evaluate(STRUCTURE)}
                page.select_option("#persona", "fence")
                send(page, MARKDOWN)
                got["fence"] = structure_mid_answer(page, BEFORE_FENCE_CLOSES)
                page.select_option("#persona", "list")
                send(page, MARKDOWN)
                got["list"] = structure_mid_answer(page, BEFORE_LIST_ITEM)
                return got
        got = await in_browser(drive)
    done = got["done"]
    assert done["html"] == ["p", "strong", "em", "a", "p", "ul", "li", "li", "pre", "code",
                            "ol", "li", "li"], done
    assert done["items"] == ["apples", "pears", "first", "second"]
    assert done["code"] == "x = 1\ny = 2\n" and "monospace" in done["font"]
    assert done["links"] == ["https://example.com/a"]
    assert "**" not in done["text"] and "```" not in done["text"]
    # An unclosed fence is a code block already, holding what has come so far.
    fence = got["fence"]
    assert fence["html"] == ["p", "strong", "em", "a", "p", "ul", "li", "li", "pre", "code"]
    assert fence["code"] == "x = 1\n" and "```" not in fence["text"]
    # A list that has just begun under a paragraph: no heading, no empty bullet (a bare
    # "Steps:\n-" is a setext heading in markdown).
    assert got["list"]["html"] == ["p", "strong", "em", "a", "p"], got["list"]
    assert got["list"]["text"].rstrip().endswith("Steps:")


async def test_copy_buttons_copy_the_answer_and_the_code_and_new_chat_starts_afresh(
    io_loop: Any,
) -> None:
    async with running(ECHO) as r:
        def drive() -> dict[str, Any]:
            clipboard = ["clipboard-read", "clipboard-write"]
            with browser_page(permissions=clipboard) as (page, seen):
                page.goto(r.url + "/")
                send(page, MARKDOWN)
                wait_state(page, "done")
                read = "() => navigator.clipboard.readText()"
                page.click(f"{ANSWER} pre .copy-code")
                got = {"code": page.evaluate(read)}
                page.click(f"{ANSWER} .foot .copy")
                got["answer"] = page.evaluate(read)
                page.click("#new-chat")
                got["after_new_chat"] = [
                    page.evaluate("() => document.querySelectorAll('#messages li').length"),
                    history(page), page.is_visible("#empty"),
                    page.evaluate("() => document.activeElement.id")]
                send(page, "Again")
                wait_state(page, "done")
                got["posts"] = seen.posts
                return got
        got = await in_browser(drive)
    assert got["code"] == "x = 1\ny = 2\n"
    assert got["answer"] == MARKDOWN.strip()  # the answer's markdown, as written
    assert got["after_new_chat"] == [0, [], True, "prompt"]
    assert [m["content"] for m in got["posts"][1]["messages"]] == ["Again"]


async def test_the_page_served_by_nginx_loads_and_chats_through_it(io_loop: Any) -> None:
    # deploy/nginx.conf serves the page and its files itself, with its own CSP header, and
    # relays the API and the EventSource to sseproxy.
    scenario = Scenario(tokens=40, rate=50)
    expected = "".join(make_tokens(scenario))
    async with behind_nginx(scenario) as (r, ngx):
        shutil.copytree(STATIC, ngx.workdir / "static", dirs_exist_ok=True)
        with capture_logs() as logs:
            def drive() -> tuple[str, dict[str, str]]:
                with browser_page() as (page, _seen):
                    types: dict[str, str] = {}
                    page.on("response", lambda res: types.setdefault(
                        urlsplit(res.url).path, res.headers.get("content-type", "")))
                    page.goto(ngx.url + "/")
                    page.wait_for_function(
                        "() => document.querySelectorAll('#persona option').length > 1")
                    send(page, "Hello")
                    wait_state(page, "done")
                    return answer_text(page), types
            text, types = await in_browser(drive)
    assert one_line(text) == one_line(expected)
    assert types["/static/app.js"].startswith("application/javascript")
    assert types["/static/vendor/marked.umd.js"].startswith("application/javascript")
    assert types["/static/app.css"].startswith("text/css")
    paths = {log["path"] for log in logs if log["event"] == "request"}
    assert "/v1/streams" in paths and "/v1/personas" in paths  # relayed to sseproxy
    assert not {p for p in paths if p == "/" or p.startswith("/static/")}  # nginx's own


class CuttableProxy:
    """A TCP proxy between the browser and sseproxy whose connections can all be cut."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.writers: set[asyncio.StreamWriter] = set()
        self.server: asyncio.Server | None = None
        self.port = 0

    async def start(self) -> None:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self.server.sockets[0].getsockname()[1]

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.target_port)
        self.writers |= {writer, up_writer}

        async def pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
            try:
                while data := await src.read(65536):
                    dst.write(data)
                    await dst.drain()
            except (ConnectionError, OSError):
                pass
            finally:
                dst.close()

        await asyncio.gather(pipe(reader, up_writer), pipe(up_reader, writer))
        self.writers -= {writer, up_writer}

    def cut(self) -> None:
        for writer in list(self.writers):
            writer.transport.abort()

    async def close(self) -> None:
        self.cut()
        if self.server is not None:
            self.server.close()
            await self.server.wait_closed()


async def test_a_cut_connection_shows_reconnecting_then_the_rest_exactly_once(
    io_loop: Any,
) -> None:
    scenario = Scenario(tokens=80, rate=20)
    expected = "".join(make_tokens(scenario))
    async with running(scenario, server__retry_ms=1500) as r:
        proxy = CuttableProxy(int(r.url.rsplit(":", 1)[1]))
        await proxy.start()
        loop = asyncio.get_running_loop()
        try:
            def drive() -> tuple[str, str]:
                with browser_page() as (page, _seen):
                    page.goto(f"http://127.0.0.1:{proxy.port}/")
                    send(page, "Hello")
                    page.wait_for_function(
                        "() => document.querySelector('.msg.assistant .body')"
                        "?.textContent.length > 20")
                    loop.call_soon_threadsafe(proxy.cut)
                    wait_state(page, "reconnecting")
                    shown = str(page.inner_text(f"{ANSWER} .state"))
                    wait_state(page, "done")
                    return shown, answer_text(page)
            shown, text = await in_browser(drive)
        finally:
            await proxy.close()
    assert "Reconnecting" in shown
    assert one_line(text) == one_line(expected)
    assert [m.samples[0].value for m in r.deps.metrics.resumes.collect()] == [1]


async def test_comparison_view_shows_the_burst_unpaced_and_smoothed_paced(
    io_loop: Any, tmp_path: Path,
) -> None:
    scenario = Scenario(tokens=150, rate=100, burst=600)
    expected = "".join(make_tokens(scenario))
    # Unpaced, 600 characters come in one write: more than the page's 512 within 50 ms.
    # Paced over 2 s (and drained over 2 s at the end) they come at ~15 characters per
    # 50 ms, so even a browser that stalls a second on a loaded machine sees no burst.
    async with running(pacing__mode="smooth", pacing__target_lag_s=2.0,
                       pacing__max_lag_s=4.0, pacing__drain_s=2.0) as r:
        def drive() -> dict[str, str]:
            with browser_page() as (page, _seen):
                page.goto(r.url + "/?compare&model=" + quote(scenario.to_model()))
                send(page, "Tell me a story")
                for pacing in ("off", "on"):
                    page.wait_for_function(
                        "p => document.querySelector(`.pane[data-pacing=${p}]`)"
                        "?.dataset.state === 'done'", arg=pacing)
                screenshots(page, tmp_path, "compare")
                return {p: page.inner_text(f".pane[data-pacing={p}] .meta")
                        + "\n" + page.inner_text(f".pane[data-pacing={p}] .body")
                        for p in ("off", "on")}
        got = await in_browser(drive)
    for pacing in ("off", "on"):
        assert one_line(got[pacing].split("\n", 1)[1]) == one_line(expected)
    # What reached the page, and (issue 15) what the server says its pacing did.
    off, on = got["off"].split("\n")[0], got["on"].split("\n")[0]
    assert "burst:" in off and off.endswith(" · unpaced"), off
    smoothed = re.search(r" · pacing smoothed ([\d,]+) burst characters "
                         r"\(up to (\d+\.\d\d) s later\)$", on)
    assert "smooth:" in on and smoothed, on
    assert 0 < int(smoothed[1].replace(",", "")) < len(expected) and float(smoothed[2]) > 0


def axe_violations(page: Any) -> list[dict[str, Any]]:
    page.add_script_tag(path=str(AXE))
    result = page.evaluate("axe.run(document, {resultTypes: ['violations']})")
    return [{"id": v["id"], "impact": v["impact"], "nodes": [n["html"] for n in v["nodes"]]}
            for v in result["violations"] if v["impact"] in ("serious", "critical")]


LAYOUT = """() => ({ overflow: document.documentElement.scrollWidth - innerWidth,
  background: getComputedStyle(document.body).backgroundColor })"""


def tab_order(page: Any, presses: int) -> list[str]:
    """What Tab focuses, from the top of the page: ids, or the text of links without one."""
    page.evaluate("() => document.activeElement.blur()")
    order = []
    for _ in range(presses):
        page.keyboard.press("Tab")
        order.append(str(page.evaluate(
            "() => document.activeElement.id || document.activeElement.textContent.trim()")))
    return order


@pytest.mark.parametrize("scheme", ["light", "dark"])
async def test_accessibility_has_no_serious_or_critical_violations(
    io_loop: Any, scheme: str,
) -> None:
    # Also: the colours follow prefers-color-scheme, nothing scrolls sideways at phone
    # width, and Tab reaches every control in reading order.
    scenario = Scenario(tokens=30, rate=100)
    async with running(scenario) as r:
        def drive() -> dict[str, Any]:
            # axe is injected as an inline script, which the page's CSP would refuse.
            with browser_page(bypass_csp=True, color_scheme=scheme) as (page, _seen):
                page.goto(r.url + "/")
                page.wait_for_function(
                    "() => document.querySelectorAll('#persona option').length > 1")
                found: dict[str, Any] = {"tabs": tab_order(page, 6)}
                send(page, "Hi")
                wait_state(page, "done")
                found["chat"] = axe_violations(page)
                page.set_viewport_size(PHONE)
                found["phone"] = page.evaluate(LAYOUT)
                found["phone_axe"] = axe_violations(page)
                page.set_viewport_size(DESKTOP)
                page.goto(r.url + "/?compare&model=" + quote(scenario.to_model()))
                send(page, "Hi")
                page.wait_for_function(
                    "[...document.querySelectorAll('.pane')]"
                    ".every(p => p.dataset.state === 'done')")
                found["compare"] = axe_violations(page)
                page.set_viewport_size(PHONE)
                found["compare_phone"] = page.evaluate(LAYOUT)
                return found
        found = await in_browser(drive)
    assert found["tabs"] == ["Skip to the prompt", "sseproxy", "persona", "new-chat",
                             "view-link", "prompt"]
    assert found["chat"] == found["phone_axe"] == found["compare"] == []
    background = "rgb(255, 255, 255)" if scheme == "light" else "rgb(22, 24, 28)"
    for layout in (found["phone"], found["compare_phone"]):
        assert layout == {"overflow": 0, "background": background}
