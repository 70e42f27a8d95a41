"""The chat page's login: a client key exchanged for a signed session cookie.

* ``POST /v1/login`` with ``{"key": "..."}``: a valid key sets the session cookie
  (``HttpOnly``, ``SameSite=Strict``, ``Secure`` when the request came over https, signed by
  Tornado, valid for ``auth.session_ttl_s``) and answers the session; a wrong one is ``401``.
* ``POST /v1/logout`` clears it (``204``).
* ``GET /v1/session``: ``{"mode", "authenticated", "name"}``, which the page asks first to
  know whether to show its login form.

Login and logout change state in the browser, so both must come from the page's own origin
(login too: a foreign page must not log a visitor in under its own key).
"""

from __future__ import annotations

import json
from typing import Any

from . import access, errors, keys
from .frames import dumps
from .handlers import BaseHandler

#: Longest login body (a key is about 50 bytes).
MAX_LOGIN_BYTES = 4096


class SessionHandlerBase(BaseHandler):
    public = True

    def send_session(self, name: str | None) -> None:
        mode = self.cfg.auth.mode
        self.set_header("Cache-Control", "no-store")
        self.set_header("Content-Type", "application/json; charset=utf-8")
        self.finish(dumps({"mode": mode, "authenticated": mode == "none" or name is not None,
                           "name": name}))

    def cookie_options(self) -> dict[str, Any]:
        return {"path": "/", "httponly": True, "samesite": "Strict",
                "secure": self.request.protocol == "https"}


class LoginHandler(SessionHandlerBase):
    """``POST /v1/login``."""

    async def post(self) -> None:
        refused = access.cross_site(self)
        if refused is not None:
            self.send_error_object(refused)
            return
        if self.cfg.auth.mode == "none":
            self.send_session(None)
            return
        body = self.request.body
        if len(body) > MAX_LOGIN_BYTES:
            self.send_error_object(errors.BodyTooLarge(
                f"a login body has at most {MAX_LOGIN_BYTES} bytes"))
            return
        try:
            key = json.loads(body).get("key")
        except (ValueError, AttributeError):
            key = None
        if not isinstance(key, str) or not key:
            self.send_error_object(errors.RequestError('expected {"key": "<your key>"}'))
            return
        name = keys.verify(self.cfg.client_keys, key)
        if name is None:
            access.log.info("login_refused")
            self.send_error_object(errors.Unauthenticated("this key is not valid"))
            return
        self.set_signed_cookie(access.SESSION_COOKIE,
                               keys.session_value(name, self.cfg.client_keys),
                               expires_days=self.cfg.auth.session_ttl_s / 86400,
                               **self.cookie_options())
        access.log.info("login", client=name)
        self.send_session(name)


class LogoutHandler(SessionHandlerBase):
    """``POST /v1/logout``."""

    async def post(self) -> None:
        refused = access.cross_site(self)
        if refused is not None:
            self.send_error_object(refused)
            return
        self.clear_cookie(access.SESSION_COOKIE, **self.cookie_options())
        self.set_status(204)
        self.finish()


class SessionHandler(SessionHandlerBase):
    """``GET /v1/session``."""

    async def get(self) -> None:
        self.send_session(self.current_user)


def routes(route: dict[str, Any]) -> list[Any]:
    """The routes of this module, for :func:`sseproxy.app.make_app`."""
    return [
        (r"/v1/login", LoginHandler, route),
        (r"/v1/logout", LogoutHandler, route),
        (r"/v1/session", SessionHandler, route),
    ]
