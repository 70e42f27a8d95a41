"""Remakes the README's two screenshots of the chat page: ``make screenshots``.

It starts a real sseproxy (``python -m sseproxy serve``) with its default settings (the
built-in simulator, the example personas) on a free 127.0.0.1 port, opens the page in
Debian's Chromium (``/usr/bin/chromium``, driven by Playwright from the ``test`` extra) at
1280x800 in the light scheme, and writes:

- ``docs/page-chat.png``: a question to the Pirate persona and its finished answer, with
  its small print (one turn: with the default settings the simulator gives every
  question the same answer);
- ``docs/page-compare.png``: the comparison view (``/?compare``) once both sides have
  finished.

Every wait is bounded: a server that does not answer, or an answer that does not finish,
within ``STEP_TIMEOUT_S`` ends the script with a message saying which step it was. The
server is stopped by its PID whatever happens. The page throwing, or sending a request
anywhere but 127.0.0.1, fails the script too.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO
from urllib.parse import urlsplit

from playwright.sync_api import Error as PlaywrightError
from playwright.sync_api import Page, Request, ViewportSize, sync_playwright

DOCS = Path(__file__).resolve().parent
CHROMIUM = "/usr/bin/chromium"
ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync"]
VIEWPORT: ViewportSize = {"width": 1280, "height": 800}
STEP_TIMEOUT_S = 60.0
PERSONA = "pirate"
CHAT_PROMPT = "How does sseproxy keep a stream smooth?"
COMPARE_PROMPT = "Tell me a story"


class Failed(Exception):
    """A step did not finish in time, or the page or the server misbehaved."""


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_ready(url: str, proc: subprocess.Popen[bytes]) -> None:
    """Poll /readyz until it answers 200, with a deadline."""
    deadline = time.monotonic() + STEP_TIMEOUT_S
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise Failed(f"sseproxy exited with status {proc.returncode} before it was ready")
        try:
            with urllib.request.urlopen(url + "/readyz", timeout=2) as response:
                if response.status == 200:
                    return
        except (urllib.error.URLError, OSError):
            pass
        time.sleep(0.1)  # polling a starting server, bounded by the deadline
    raise Failed(f"sseproxy was not ready within {STEP_TIMEOUT_S:.0f} s")


@contextmanager
def sseproxy(log: IO[bytes]) -> Iterator[str]:
    """A real sseproxy with the default settings; yields its URL, stops it by its PID."""
    port = free_port()
    # No SSEPROXY_* variable (nor SSEPROXY_CONFIG) from the caller's environment: defaults.
    env = {k: v for k, v in os.environ.items() if not k.startswith("SSEPROXY_")}
    proc = subprocess.Popen(
        [sys.executable, "-m", "sseproxy", "serve", "--host", "127.0.0.1", "--port", str(port)],
        stdout=log, stderr=subprocess.STDOUT, env=env)
    try:
        url = f"http://127.0.0.1:{port}"
        wait_ready(url, proc)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def wait_for(page: Page, step: str, js: str, arg: object = None) -> None:
    try:
        page.wait_for_function(js, arg=arg, timeout=STEP_TIMEOUT_S * 1000)
    except PlaywrightError as exc:
        raise Failed(f"{step}: not done within {STEP_TIMEOUT_S:.0f} s") from exc


def send(page: Page, text: str) -> None:
    page.fill("#prompt", text)
    page.press("#prompt", "Enter")


def watch(request: Request, errors: list[str]) -> None:
    if urlsplit(request.url).hostname not in (None, "127.0.0.1"):  # None: data: URLs
        errors.append(f"a request left 127.0.0.1: {request.url}")


def shoot(page: Page, errors: list[str]) -> bytes:
    if errors:
        raise Failed("; ".join(errors))
    page.evaluate("() => document.activeElement.blur()")  # no focus ring in the picture
    return page.screenshot()


def chat(page: Page, url: str, errors: list[str]) -> bytes:
    page.goto(url + "/")
    # Functions, not expression strings: the page's CSP forbids the eval polling one needs.
    wait_for(page, "the persona list",
             "() => document.querySelectorAll('#persona option').length > 1")
    page.select_option("#persona", PERSONA)
    send(page, CHAT_PROMPT)
    wait_for(page, "the chat's answer",
             "() => document.querySelector('.msg.assistant:last-child')"
             "?.dataset.state === 'done'")
    return shoot(page, errors)


def compare(page: Page, url: str, errors: list[str]) -> bytes:
    page.goto(url + "/?compare")
    send(page, COMPARE_PROMPT)
    for pacing in ("off", "on"):
        wait_for(page, f"the {'unpaced' if pacing == 'off' else 'paced'} side of /?compare",
                 "p => document.querySelector(`.pane[data-pacing=${p}]`)"
                 "?.dataset.state === 'done'", pacing)
    return shoot(page, errors)


def main() -> int:
    if not os.path.exists(CHROMIUM):
        print(f"screenshots: needs Chromium at {CHROMIUM} (Debian's chromium package)",
              file=sys.stderr)
        return 1
    errors: list[str] = []
    with tempfile.TemporaryFile() as log:
        try:
            with sseproxy(log) as url, sync_playwright() as p:
                browser = p.chromium.launch(executable_path=CHROMIUM, headless=True,
                                            args=ARGS)
                try:
                    context = browser.new_context(viewport=VIEWPORT, color_scheme="light")
                    page = context.new_page()
                    page.set_default_timeout(STEP_TIMEOUT_S * 1000)
                    page.on("pageerror", lambda exc: errors.append(f"the page threw: {exc}"))
                    page.on("request", lambda request: watch(request, errors))
                    pictures = {"page-chat.png": chat(page, url, errors),
                                "page-compare.png": compare(page, url, errors)}
                finally:
                    browser.close()
        except (Failed, PlaywrightError) as exc:  # Playwright's: a step past its timeout
            log.seek(0)
            sys.stderr.write(log.read().decode(errors="replace")[-4000:])
            print(f"screenshots: {exc}", file=sys.stderr)
            return 1
    for name, png in pictures.items():  # both or neither
        (DOCS / name).write_bytes(png)
        print(f"wrote {DOCS / name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
