"""Client keys, the session cookie, the cross-site check, CORS and the security headers
(issue 18, points 1, 2 and 4), against a real sseproxy and the simulator on 127.0.0.1."""

from __future__ import annotations

import dataclasses
import signal
import subprocess
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
import tornado.httpserver
import openai
import pytest
from servers import Running, running, stream
from test_cli import clean_env, free_port, process, wait_for_count
from tornado.testing import bind_unused_port

from sseproxy import app, cli, config, keys
from sseproxy.errors import ConfigError
from sseproxy.handlers import BaseHandler
from sseproxy.mockupstream import Scenario

CHAT: list[Any] = [{"role": "user", "content": "hi"}]
SHORT = Scenario(tokens=5, rate=0)


@dataclasses.dataclass
class Keyring:
    path: Path
    alice: str
    bob: str


@pytest.fixture
def keyring(tmp_path: Path) -> Keyring:
    alice, bob = keys.new_key(), keys.new_key()
    path = tmp_path / "keys"
    path.write_text(f"# client keys\n\n{keys.key_line('alice', alice)}\n"
                    f"{keys.key_line('bob', bob)}\n")
    return Keyring(path, alice, bob)


def with_keys(ring: Keyring, **overrides: Any) -> dict[str, Any]:
    return {"auth__mode": "keys", "auth__keys_file": str(ring.path), **overrides}


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


async def requests_seen(r: Running) -> int:
    return (await r.mock_stats())["requests"]


def assert_401(response: httpx.Response) -> None:
    assert response.status_code == 401, response.text
    assert response.headers["WWW-Authenticate"].startswith("Bearer")
    assert response.json()["error"]["code"] == "invalid_api_key"
    assert response.json()["error"]["type"] == "invalid_request_error"


# --- keys: Bearer ------------------------------------------------------------------------

@pytest.mark.parametrize("headers", [{}, {"Authorization": "Bearer sxp_not-a-key"},
                                     {"Authorization": "Basic YWxpY2U6eA=="},
                                     {"Authorization": "Bearer"}],
                         ids=["no key", "unknown key", "not bearer", "empty bearer"])
async def test_a_request_without_a_valid_key_is_401_and_the_upstream_never_sees_it(
    keyring: Keyring, headers: dict[str, str],
) -> None:
    async with running(SHORT, **with_keys(keyring)) as r:
        async with httpx.AsyncClient(base_url=r.url, headers=headers) as c:
            answers = [
                await c.post("/v1/chat/completions",
                             json={"messages": CHAT, "stream": True}),
                await c.post("/v1/chat/completions", json={"messages": CHAT}),
                await c.get("/v1/chat/stream", params={"prompt": "hi"}),
                await c.post("/v1/streams", json={"messages": CHAT}),
                await c.get("/v1/streams/" + "0" * 32),
                await c.delete("/v1/streams/" + "0" * 32),
                await c.post("/v1/responses", json={"input": "hi", "stream": True}),
                await c.get("/v1/models"),
                await c.get("/v1/models/mock"),
                await c.get("/v1/personas"),
                await c.get("/metrics"),
            ]
            public = [await c.get(p) for p in ("/healthz", "/readyz", "/", "/static/app.js",
                                               "/v1/session")]
        assert await requests_seen(r) == 0
    for response in answers:
        assert_401(response)
    assert [p.status_code for p in public] == [200] * 5


async def test_the_openai_sdk_streams_with_a_bearer_key_and_is_refused_without_one(
    keyring: Keyring,
) -> None:
    async with running(SHORT, **with_keys(keyring)) as r:
        good = openai.AsyncOpenAI(base_url=r.url + "/v1", api_key=keyring.alice, max_retries=0)
        bad = openai.AsyncOpenAI(base_url=r.url + "/v1", api_key="sxp_wrong", max_retries=0)
        async with good, bad:
            chunks = await good.chat.completions.create(model="m", messages=CHAT,
                                                        stream=True)
            text = "".join([c.choices[0].delta.content or "" async for c in chunks
                            if c.choices])
            with pytest.raises(openai.AuthenticationError) as refused:
                await bad.chat.completions.create(model="m", messages=CHAT)
        assert await requests_seen(r) == 1
    assert text
    assert refused.value.code == "invalid_api_key"


@asynccontextmanager
async def _probe_server(handler: type[Any], overrides: dict[str, Any]) -> AsyncIterator[str]:
    """sseproxy with one more route, ``/probe``; yields its URL."""
    async with running(SHORT, **overrides) as r:
        application = app.make_app(r.settings, r.deps)
        application.wildcard_router.add_rules([(r"/probe", handler, {"deps": r.deps})])
        server = app.make_server(application, r.settings)
        sock, port = bind_unused_port()
        server.add_sockets([sock])
        try:
            yield f"http://127.0.0.1:{port}/probe"
        finally:
            server.stop()
            await server.close_all_connections()


async def test_the_current_user_is_the_key_name_and_none_without_auth(keyring: Keyring) -> None:
    # get_current_user() is what per-key limits count against (issue 18 point 3).
    seen: list[Any] = []

    class Probe(BaseHandler):
        async def get(self) -> None:
            seen.append(self.current_user)
            self.finish("ok")

    async with _probe_server(Probe, with_keys(keyring)) as url:
        async with httpx.AsyncClient() as c:
            assert (await c.get(url, headers=bearer(keyring.bob))).status_code == 200
            assert (await c.get(url)).status_code == 401
    async with _probe_server(Probe, {}) as url:
        async with httpx.AsyncClient() as c:
            assert (await c.get(url)).status_code == 200
    assert seen == ["bob", None]


# --- the session cookie --------------------------------------------------------------------

SAME_ORIGIN = {"Sec-Fetch-Site": "same-origin"}


async def login(c: httpx.AsyncClient, key: str) -> httpx.Response:
    return await c.post("/v1/login", json={"key": key}, headers=SAME_ORIGIN)


async def test_login_sets_a_signed_httponly_strict_cookie_that_authenticates_streams(
    keyring: Keyring,
) -> None:
    async with running(SHORT, **with_keys(keyring)) as r:
        async with httpx.AsyncClient(base_url=r.url) as c:
            before = (await c.get("/v1/session")).json()
            wrong = await login(c, "sxp_wrong")
            answer = await login(c, keyring.alice)
            after = (await c.get("/v1/session")).json()
            started = await c.post("/v1/streams", json={"messages": CHAT}, headers=SAME_ORIGIN)
            cookie = c.cookies.get("sseproxy_session")
        events = await stream("GET", r.url + started.json()["events_url"],
                              headers={"Cookie": f"sseproxy_session={cookie}"})
        forged = await stream("GET", r.url + "/v1/chat/stream?prompt=x",
                              headers={"Cookie": "sseproxy_session=alice:0123456789abcdef"})
    assert before == {"mode": "keys", "authenticated": False, "name": None}
    assert_401(wrong)
    assert answer.status_code == 200 and answer.json()["name"] == "alice"
    assert after == {"mode": "keys", "authenticated": True, "name": "alice"}
    set_cookie = answer.headers["Set-Cookie"]
    assert "HttpOnly" in set_cookie and "SameSite=Strict" in set_cookie
    assert "Path=/" in set_cookie and "Secure" not in set_cookie  # plain http here
    assert keyring.alice not in set_cookie
    assert started.status_code == 201
    assert events.status == 200 and events.events[-1].event == "done"
    assert forged.status == 401


async def test_the_cookie_is_secure_when_the_request_came_over_https(keyring: Keyring) -> None:
    async with running(SHORT, **with_keys(keyring)) as r:
        async with httpx.AsyncClient(base_url=r.url) as c:
            answer = await c.post("/v1/login", json={"key": keyring.alice},
                                  headers={**SAME_ORIGIN, "X-Forwarded-Proto": "https"})
    assert "Secure" in answer.headers["Set-Cookie"]


@pytest.mark.parametrize("headers", [
    {"Sec-Fetch-Site": "cross-site", "Origin": "https://evil.example"},
    {"Sec-Fetch-Site": "same-site", "Origin": "http://127.0.0.1:1"},
    {"Origin": "https://evil.example"},
    {"Origin": "null"},
], ids=["cross-site", "same-site other port", "foreign origin", "null origin"])
async def test_a_cross_site_post_with_the_cookie_is_refused_before_the_upstream(
    keyring: Keyring, headers: dict[str, str],
) -> None:
    async with running(SHORT, **with_keys(keyring)) as r:
        async with httpx.AsyncClient(base_url=r.url) as c:
            await login(c, keyring.alice)
            refused = [
                await c.post("/v1/streams", json={"messages": CHAT}, headers=headers),
                await c.post("/v1/chat/completions", json={"messages": CHAT}, headers=headers),
                await c.delete("/v1/streams/" + "0" * 32, headers=headers),
                await c.post("/v1/login", json={"key": keyring.bob}, headers=headers),
                await c.post("/v1/logout", headers=headers),
            ]
            # The same request with a Bearer key is an API client's: no origin check.
            api = await c.post("/v1/streams", json={"messages": CHAT},
                               headers={**headers, **bearer(keyring.bob)})
            # A same-origin one (Origin naming this very server) passes.
            own = await c.post("/v1/streams", json={"messages": CHAT},
                               headers={"Origin": r.url})
            still = (await c.get("/v1/session")).json()
        seen = await requests_seen(r)
    for response in refused:
        assert response.status_code == 403, response.text
        assert response.json()["error"]["code"] == "cross_site_request"
    assert api.status_code == 201 and own.status_code == 201
    assert seen == 2  # the two accepted streams, nothing else
    assert still["name"] == "alice"  # the refused logout changed nothing


async def test_logout_clears_the_cookie_and_the_next_request_is_401(keyring: Keyring) -> None:
    async with running(SHORT, **with_keys(keyring)) as r:
        async with httpx.AsyncClient(base_url=r.url) as c:
            await login(c, keyring.alice)
            cookie = c.cookies.get("sseproxy_session")
            assert (await c.get("/v1/personas")).status_code == 200
            out = await c.post("/v1/logout", headers=SAME_ORIGIN)
            after = await c.get("/v1/personas")
            session = (await c.get("/v1/session")).json()
    assert out.status_code == 204
    assert "sseproxy_session=;" in out.headers["Set-Cookie"].replace('""', "")
    assert cookie and "sseproxy_session" not in c.cookies
    assert_401(after)
    assert session["authenticated"] is False


async def test_a_key_removed_from_the_file_ends_its_sessions_after_a_reload(
    keyring: Keyring,
) -> None:
    async with running(SHORT, **with_keys(keyring)) as r:
        async with httpx.AsyncClient(base_url=r.url) as c:
            await login(c, keyring.alice)
            assert (await c.get("/v1/personas")).status_code == 200
            keyring.path.write_text(keys.key_line("bob", keyring.bob) + "\n")
            assert app.reload_settings(r.deps, r.overrides)
            gone = await c.get("/v1/personas")
            bob = await c.get("/v1/personas", headers=bearer(keyring.bob))
            alice = await c.get("/v1/personas", headers=bearer(keyring.alice))
    assert_401(gone)
    assert_401(alice)
    assert bob.status_code == 200


async def test_a_bad_keys_file_on_reload_keeps_the_old_keys(keyring: Keyring) -> None:
    async with running(SHORT, **with_keys(keyring)) as r:
        keyring.path.write_text("alice:not-hex\n")
        assert not app.reload_settings(r.deps, r.overrides)
        async with httpx.AsyncClient(base_url=r.url) as c:
            still = await c.get("/v1/personas", headers=bearer(keyring.alice))
    assert still.status_code == 200


# --- headers: page security, nosniff, CORS ---------------------------------------------------

async def test_the_page_and_static_files_carry_csp_nosniff_and_referrer_policy() -> None:
    async with running(SHORT) as r:
        async with httpx.AsyncClient(base_url=r.url) as c:
            files = [await c.get(p) for p in ("/", "/static/app.js", "/static/app.css",
                                              "/static/vendor/marked.umd.js")]
            api = [await c.get("/v1/personas"), await c.get("/v1/nothing"),
                   await c.post("/v1/streams", content=b"{")]
    for response in files:
        assert response.status_code == 200
        csp = response.headers["Content-Security-Policy"]
        assert csp.startswith("default-src 'self'") and "frame-ancestors 'none'" in csp
        assert response.headers["X-Content-Type-Options"] == "nosniff"
        assert response.headers["Referrer-Policy"] == "no-referrer"
    for response in api:
        assert response.headers["X-Content-Type-Options"] == "nosniff"
        assert "Access-Control-Allow-Origin" not in response.headers


async def test_cors_is_off_by_default_and_preflights_are_refused() -> None:
    async with running(SHORT) as r:
        async with httpx.AsyncClient(base_url=r.url) as c:
            pre = await c.options("/v1/chat/completions", headers={
                "Origin": "https://app.example", "Access-Control-Request-Method": "POST"})
            get = await c.get("/v1/personas", headers={"Origin": "https://app.example"})
    assert pre.status_code == 403 and pre.json()["error"]["code"] == "cors_origin_not_allowed"
    assert "Access-Control-Allow-Origin" not in pre.headers
    assert "Access-Control-Allow-Origin" not in get.headers


async def test_cors_answers_the_listed_origins_only(keyring: Keyring) -> None:
    allowed = "https://app.example"
    async with running(SHORT, server__cors_origins=f"{allowed}, http://127.0.0.1:9",
                       **with_keys(keyring)) as r:
        async with httpx.AsyncClient(base_url=r.url) as c:
            pre = await c.options("/v1/chat/completions", headers={
                "Origin": allowed, "Access-Control-Request-Method": "POST",
                "Access-Control-Request-Headers": "authorization, content-type"})
            other = await c.options("/v1/chat/completions", headers={
                "Origin": "https://evil.example", "Access-Control-Request-Method": "POST"})
            ok = await c.get("/v1/personas", headers={"Origin": allowed,
                                                      **bearer(keyring.alice)})
            refused = await c.get("/v1/personas", headers={"Origin": allowed})
            foreign = await c.get("/v1/personas", headers={"Origin": "https://evil.example",
                                                           **bearer(keyring.alice)})
        assert await requests_seen(r) == 0
    assert pre.status_code == 204
    assert pre.headers["Access-Control-Allow-Origin"] == allowed
    assert "POST" in pre.headers["Access-Control-Allow-Methods"]
    assert pre.headers["Access-Control-Allow-Headers"] == "authorization, content-type"
    assert "Origin" in pre.headers["Vary"]
    assert "Access-Control-Allow-Credentials" not in pre.headers
    assert other.status_code == 403 and "Access-Control-Allow-Origin" not in other.headers
    assert ok.status_code == 200 and ok.headers["Access-Control-Allow-Origin"] == allowed
    assert "X-Request-ID" in ok.headers["Access-Control-Expose-Headers"]
    # A refusal is readable by the allowed page too (it carries the CORS headers).
    assert refused.status_code == 401 and refused.headers["Access-Control-Allow-Origin"] == allowed
    assert foreign.status_code == 200 and "Access-Control-Allow-Origin" not in foreign.headers
    assert "Origin" in foreign.headers["Vary"]


# --- configuration ----------------------------------------------------------------------------

def test_keys_file_lines_parse_with_comments_and_blank_lines() -> None:
    a, b = keys.new_key(), keys.new_key()
    text = f"# team\n\n  {keys.key_line('alice', a)}  \n{keys.key_line('b.2-x_', b)}\n"
    parsed = keys.parse_keys(text, "k")
    assert set(parsed) == {"alice", "b.2-x_"}
    assert keys.verify(parsed, a) == "alice" and keys.verify(parsed, b) == "b.2-x_"
    assert keys.verify(parsed, a + "x") is None and keys.verify({}, a) is None


@pytest.mark.parametrize("line, needle", [
    ("alice", "expected NAME:SHA256"),
    ("alice:" + "ab" * 31, "expected NAME:SHA256"),
    ("alice:" + "zz" * 32, "expected NAME:SHA256"),
    ("al ice:" + "ab" * 32, "key name 'al ice'"),
    (":" + "ab" * 32, "key name ''"),
    ("bob:" + "ab" * 32, "already used"),
    ("carol:" + "cd" * 32, "the same key as 'dave'"),
])
def test_a_bad_keys_file_line_is_a_config_error_naming_file_and_line(
    tmp_path: Path, line: str, needle: str,
) -> None:
    path = tmp_path / "keys"
    path.write_text(f"# keys\nbob:{'ab' * 32}\ndave:{'cd' * 32}\n{line}\n")
    with pytest.raises(ConfigError) as err:
        config.load(environ={}, overrides={"auth.mode": "keys", "auth.keys_file": str(path)})
    assert f"keys file {str(path)!r}, line 4" in err.value.message and needle in err.value.message


@pytest.mark.parametrize("overrides, needle", [
    ({"auth.mode": "keys"}, "needs auth.keys_file"),
    ({"auth.mode": "keys", "auth.keys_file": "/nonexistent/keys"}, "not found"),
    ({"server.host": "0.0.0.0"}, "auth.allow_anonymous = true"),
    ({"server.host": "::"}, "auth.mode = 'keys'"),
    ({"server.host": ""}, "is not a loopback address"),
    ({"server.cors_origins": "https://a.example/path"}, "is not an origin"),
    ({"server.cors_origins": "*"}, "is not an origin"),
])
def test_settings_that_would_expose_sseproxy_are_refused(
    overrides: dict[str, Any], needle: str,
) -> None:
    with pytest.raises(ConfigError) as err:
        config.load(environ={}, overrides=overrides)
    assert needle in err.value.message


def test_anonymous_service_on_a_public_address_only_when_said_so() -> None:
    settings = config.load(environ={}, overrides={"server.host": "0.0.0.0",
                                                  "auth.allow_anonymous": True})
    assert settings.auth.mode == "none"
    for host in ("127.0.0.1", "::1", "localhost", "127.0.0.2"):
        assert config.load(environ={}, overrides={"server.host": host}).server.host == host


def test_the_cookie_secret_comes_from_the_environment_and_is_random_otherwise() -> None:
    secret = "s" * 40
    assert config.load(environ={"SSEPROXY_COOKIE_SECRET": secret}).cookie_secret == secret
    assert config.load(environ={}).cookie_secret != config.load(environ={}).cookie_secret
    with pytest.raises(ConfigError, match="at least 32 characters"):
        config.load(environ={"SSEPROXY_COOKIE_SECRET": "short"})
    assert secret not in repr(config.load(environ={"SSEPROXY_COOKIE_SECRET": secret}))


def test_cors_origins_from_the_environment_are_comma_separated() -> None:
    settings = config.load(environ={
        "SSEPROXY_SERVER_CORS_ORIGINS": "https://a.example, http://b.example:8080"})
    assert settings.server.cors_origins == ("https://a.example", "http://b.example:8080")


@pytest.mark.parametrize("sec_fetch_site, origin, host, same", [
    ("same-origin", None, "h", True),
    ("none", None, "h", True),
    ("same-site", "http://h:1", "h", False),
    ("cross-site", None, "h", False),
    (None, None, "h", True),
    (None, "http://h", "h", True),
    (None, "http://h:80", "h", True),
    (None, "http://H:8080", "h:8080", True),
    (None, "https://h", "h", False),
    (None, "http://h:8081", "h:8080", False),
    (None, "http://evil.example", "h", False),
    (None, "null", "h", False),
    (None, "http://h:bad", "h", False),
])
def test_same_origin(sec_fetch_site: str | None, origin: str | None, host: str,
                     same: bool) -> None:
    assert keys.same_origin(sec_fetch_site, origin, "http", host) is same


# --- the create-key command and start-up ----------------------------------------------------

def test_create_key_prints_the_key_once_and_its_line(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["create-key", "alice"]) == 0
    key, line = capsys.readouterr().out.splitlines()
    assert key.startswith(keys.PREFIX) and len(key) > 40
    assert keys.parse_keys(line, "-") == {"alice": keys.digest(key)}


def test_create_key_appends_to_the_keys_file_and_refuses_a_name_twice(
    tmp_path: Path, capsys: pytest.CaptureFixture[str],
) -> None:
    path = tmp_path / "keys"
    assert cli.main(["create-key", "alice", "--keys-file", str(path)]) == 0
    alice = capsys.readouterr().out.strip()
    assert cli.main(["create-key", "bob", "--keys-file", str(path)]) == 0
    bob = capsys.readouterr().out.strip()
    assert path.stat().st_mode & 0o777 == 0o600
    parsed = keys.read_keys(str(path))
    assert keys.verify(parsed, alice) == "alice" and keys.verify(parsed, bob) == "bob"
    assert cli.main(["create-key", "alice", "--keys-file", str(path)]) == 2
    assert "already has a key named 'alice'" in capsys.readouterr().err
    assert cli.main(["create-key", "no spaces"]) == 2
    assert keys.read_keys(str(path)) == parsed


def sseproxy(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "sseproxy", *args], env=clean_env(),
                          capture_output=True, text=True, timeout=30)


def test_serve_on_a_public_address_without_auth_refuses_to_start_with_exit_2() -> None:
    out = sseproxy("serve", "--host", "0.0.0.0", "--port", "1")
    assert out.returncode == 2
    assert "auth.mode = 'none'" in out.stderr and "auth.allow_anonymous = true" in out.stderr
    assert "auth.keys_file" in out.stderr and "Traceback" not in out.stderr


def test_a_public_address_is_accepted_with_allow_anonymous_or_keys(
    tmp_path: Path, keyring: Keyring,
) -> None:
    # (checked with check-config: a test does not listen beyond loopback)
    anonymous = tmp_path / "anonymous.toml"
    anonymous.write_text('[server]\nhost = "0.0.0.0"\n[auth]\nallow_anonymous = true\n')
    with_keys_file = tmp_path / "keys.toml"
    with_keys_file.write_text(
        f'[server]\nhost = "0.0.0.0"\n[auth]\nmode = "keys"\nkeys_file = "{keyring.path}"\n')
    refused = tmp_path / "refused.toml"
    refused.write_text('[server]\nhost = "0.0.0.0"\n')
    assert sseproxy("check-config", str(anonymous)).returncode == 0
    assert sseproxy("check-config", str(with_keys_file)).returncode == 0
    out = sseproxy("check-config", str(refused))
    assert out.returncode == 2 and "auth.allow_anonymous" in out.stderr
    assert keyring.alice not in sseproxy("check-config", str(with_keys_file)).stdout


def test_sighup_rereads_the_keys_file_and_a_bad_one_keeps_the_old_keys(
    tmp_path: Path, keyring: Keyring,
) -> None:
    conf = tmp_path / "sseproxy.toml"
    conf.write_text(f'[auth]\nmode = "keys"\nkeys_file = "{keyring.path}"\n')
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    log = tmp_path / "serve.log"
    carol = keys.new_key()
    with process("serve", "--config", str(conf), "--port", str(port), url=base + "/healthz",
                 log=log) as proc:
        def status(key: str) -> int:
            return httpx.get(base + "/v1/personas", headers=bearer(key), timeout=5).status_code

        before = status(keyring.alice), status(carol)
        keyring.path.write_text(keys.key_line("carol", carol) + "\n")
        proc.send_signal(signal.SIGHUP)
        wait_for_count(log, "config_reloaded", 1)
        after = status(keyring.alice), status(carol)
        keyring.path.write_text("carol\n")
        proc.send_signal(signal.SIGHUP)
        failed = wait_for_count(log, "config_reload_failed", 1)
        kept = status(carol)
    assert before == (200, 401) and after == (401, 200) and kept == 200
    assert f"keys file {str(keyring.path)!r}, line 1" in failed[0]
    assert "cookie_secret_random" in log.read_text()


async def test_the_separate_metrics_listener_needs_no_key(keyring: Keyring) -> None:
    async with running(SHORT, **with_keys(keyring, metrics__port=1)) as r:
        server = tornado.httpserver.HTTPServer(app.make_metrics_app(r.deps))
        sock, port = bind_unused_port()
        server.add_sockets([sock])
        try:
            async with httpx.AsyncClient() as c:
                scrape = await c.get(f"http://127.0.0.1:{port}/metrics",
                                     headers={"Cookie": "sseproxy_session=x"})
        finally:
            server.stop()
            await server.close_all_connections()
    assert scrape.status_code == 200 and "sseproxy_streams_active" in scrape.text
