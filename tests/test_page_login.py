"""The chat page's login in a real browser (issue 18, point 2): Chromium against sseproxy
with ``auth.mode = keys``. The page logs in with a key, streams over EventSource on its
HttpOnly cookie alone, logs out; a form on another origin of the same site cannot use the
cookie to start a stream."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import httpx
import pytest
import tornado.httpserver
import tornado.web
from servers import running
from test_page import ANSWER, CHROMIUM, browser_page, in_browser, send, wait_state
from tornado.testing import bind_unused_port

from sseproxy import keys
from sseproxy.mockupstream import Scenario, make_tokens

pytestmark = pytest.mark.skipif(not CHROMIUM or not Path(CHROMIUM).exists(),
                                reason="needs Debian's chromium package")


def keyring(tmp_path: Path) -> tuple[str, Path]:
    key = keys.new_key()
    path = tmp_path / "keys"
    path.write_text(keys.key_line("alice", key) + "\n")
    return key, path


def visible(page: Any, selector: str) -> bool:
    return bool(page.is_visible(selector))


async def test_login_then_a_stream_on_the_cookie_then_logout(
    io_loop: Any, tmp_path: Path,
) -> None:
    scenario = Scenario(tokens=30, rate=100)
    expected = "".join(make_tokens(scenario))
    key, path = keyring(tmp_path)
    async with running(scenario, auth__mode="keys", auth__keys_file=str(path)) as r:
        def drive() -> dict[str, Any]:
            with browser_page() as (page, _seen):
                page.goto(r.url + "/")
                page.wait_for_selector("#login-key", state="visible")
                got: dict[str, Any] = {"chat_hidden": not visible(page, "#prompt")}
                page.fill("#login-key", "sxp_wrong")
                page.press("#login-key", "Enter")
                # (a selector, not a JavaScript string: the page's CSP forbids eval)
                page.wait_for_selector("#login-error:not(:empty)")
                got["wrong"] = page.inner_text("#login-error")
                page.fill("#login-key", key)
                page.click("#login button[type=submit]")
                page.wait_for_selector("#prompt", state="visible")
                got["logout_shown"] = visible(page, "#logout")
                send(page, "Hello")
                wait_state(page, "done")
                got["answer"] = page.inner_text(f"{ANSWER} .body")
                got["document_cookie"] = page.evaluate("document.cookie")
                got["cookies"] = page.context.cookies()
                page.click("#logout")
                page.wait_for_selector("#login-key", state="visible")
                got["after"] = page.evaluate(
                    "fetch('/v1/session').then(r => r.json())")
                got["cookies_after"] = page.context.cookies()
                return got
        got = await in_browser(drive)
        stats = await r.mock_stats()
    assert got["chat_hidden"] and "not valid" in got["wrong"]
    assert got["logout_shown"]
    assert " ".join(got["answer"].split()) == " ".join(expected.split())
    # The key itself is nowhere in the browser's reach; the cookie is HttpOnly and Strict,
    # and it is what authenticated POST /v1/streams and the EventSource.
    assert got["document_cookie"] == ""
    [cookie] = got["cookies"]
    assert cookie["name"] == "sseproxy_session" and cookie["httpOnly"]
    assert cookie["sameSite"] == "Strict" and key not in cookie["value"]
    assert stats["requests"] == 1 and stats["completed"] == 1
    assert got["after"] == {"mode": "keys", "authenticated": False, "name": None}
    assert got["cookies_after"] == []


class Attacker(tornado.web.RequestHandler):
    """A page on another origin (same site: another port of 127.0.0.1) whose form posts a
    stream request to sseproxy as soon as it loads."""

    def initialize(self, target: str) -> None:
        self.target = target

    def get(self) -> None:
        name = json.dumps({"messages": [{"role": "user", "content": "x"}], "model": ""})[:-2]
        self.finish(
            f"<!doctype html><form method=post action='{self.target}/v1/streams' "
            f"enctype=text/plain><input name='{name}' value='\"}}'></form>"
            "<script>document.forms[0].submit()</script>")


async def test_a_form_on_another_origin_cannot_start_a_stream_with_the_cookie(
    io_loop: Any, tmp_path: Path,
) -> None:
    key, path = keyring(tmp_path)
    async with running(Scenario(tokens=5, rate=0), auth__mode="keys",
                       auth__keys_file=str(path)) as r:
        attacker = tornado.httpserver.HTTPServer(
            tornado.web.Application([(r"/", Attacker, {"target": r.url})]))
        sock, port = bind_unused_port()
        attacker.add_sockets([sock])
        try:
            def drive() -> str:
                with browser_page() as (page, _seen):
                    page.goto(r.url + "/")
                    page.fill("#login-key", key)
                    page.press("#login-key", "Enter")
                    page.wait_for_selector("#prompt", state="visible")
                    page.goto(f"http://127.0.0.1:{port}/")
                    page.wait_for_url(r.url + "/v1/streams")
                    return str(page.inner_text("body"))
            body = await in_browser(drive)
        finally:
            attacker.stop()
            await attacker.close_all_connections()
        stats = await r.mock_stats()
        async with httpx.AsyncClient() as c:
            direct = await c.get(r.url + "/v1/session")
    assert json.loads(body)["error"]["code"] == "cross_site_request"
    assert stats["requests"] == 0
    assert direct.json()["authenticated"] is False
