"""Who may call sseproxy, and the headers that keep a browser safe.

* :func:`identify` finds the client key of a request: ``Authorization: Bearer <key>`` (an
  API client) or the chat page's signed session cookie (a browser). A Bearer header, when
  present, decides alone: a wrong one is refused even beside a valid cookie. Keys never
  travel in URLs.
* :func:`refusal` is the policy every handler applies in ``prepare()``: with
  ``auth.mode = keys`` a request without a valid key is ``401`` (before any upstream call);
  a state-changing request authenticated by the cookie must come from the page's own origin
  (:func:`cross_site`), or it is ``403``. Bearer requests need no such check: a browser
  never adds that header by itself.
* CORS is off unless ``server.cors_origins`` lists origins: those get
  ``Access-Control-Allow-Origin`` (Bearer keys only: no credentials are allowed) and their
  preflights are answered; every other preflight is ``403``.
* :class:`StaticHandler` serves the page and its assets with ``Content-Security-Policy``,
  ``X-Content-Type-Options`` and ``Referrer-Policy``; every API response carries
  ``X-Content-Type-Options: nosniff``.
"""

from __future__ import annotations

import structlog
import tornado.web

from . import errors, keys
from .config import Settings

log = structlog.get_logger("sseproxy.auth")

#: The chat page's session cookie (signed by Tornado with ``$SSEPROXY_COOKIE_SECRET``).
SESSION_COOKIE = "sseproxy_session"
#: The same policy as the page's own ``<meta>``, plus what only a header can say.
CSP = ("default-src 'self'; img-src 'self' data:; style-src 'self'; script-src 'self'; "
       "connect-src 'self'; object-src 'none'; base-uri 'none'; form-action 'self'; "
       "frame-ancestors 'none'")
PAGE_HEADERS = {
    "Content-Security-Policy": CSP,
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
}
#: Response headers a cross-origin page may read.
EXPOSED = ("X-Request-ID, X-Stream-ID, Retry-After, Location, x-ratelimit-limit-requests, "
           "x-ratelimit-remaining-requests, x-ratelimit-reset-requests, "
           "x-ratelimit-limit-tokens, x-ratelimit-remaining-tokens, x-ratelimit-reset-tokens")
SAFE_METHODS = ("GET", "HEAD", "OPTIONS")


def identify(handler: tornado.web.RequestHandler, cfg: Settings) -> tuple[str | None, str]:
    """``(key name, "bearer" | "cookie")`` of the request, ``(None, "")`` without a valid
    key, and always ``(None, "")`` with ``auth.mode = none``."""
    if cfg.auth.mode == "none":
        return None, ""
    header = handler.request.headers.get("Authorization")
    if header is not None:
        token = keys.bearer(header)
        name = keys.verify(cfg.client_keys, token) if token else None
        return name, "bearer" if name else ""
    raw = handler.get_signed_cookie(SESSION_COOKIE, max_age_days=cfg.auth.session_ttl_s / 86400,
                                    min_version=2)
    if raw is None:
        return None, ""
    try:
        name = keys.session_user(raw.decode("utf-8"), cfg.client_keys)
    except UnicodeDecodeError:
        return None, ""
    return name, "cookie" if name else ""


def cross_site(handler: tornado.web.RequestHandler) -> errors.Forbidden | None:
    """A refusal when a browser sent this request from a page of another origin."""
    headers = handler.request.headers
    if keys.same_origin(headers.get("Sec-Fetch-Site"), headers.get("Origin"),
                        handler.request.protocol, handler.request.host):
        return None
    log.warning("cross_site_refused", path=handler.request.path,
                origin=headers.get("Origin", "")[:200],
                sec_fetch_site=headers.get("Sec-Fetch-Site", "")[:40])
    return errors.Forbidden("cross_site_request",
                            "this request came from another site; the session cookie is only "
                            "good for the chat page's own requests")


def refusal(handler: tornado.web.RequestHandler, cfg: Settings, user: str | None,
            via: str) -> errors.SSEProxyError | None:
    """Why this request, which needs a key, may not go on (``401``/``403``), or None."""
    method = handler.request.method or "GET"
    if cfg.auth.mode == "none" or method == "OPTIONS":
        return None
    if user is None:
        reason = "unknown key" if "Authorization" in handler.request.headers else "no key"
        log.info("auth_refused", path=handler.request.path, reason=reason)
        return errors.Unauthenticated()
    structlog.contextvars.bind_contextvars(client=user)
    if via == "cookie" and method not in SAFE_METHODS:
        return cross_site(handler)
    return None


def default_headers(handler: tornado.web.RequestHandler, cfg: Settings | None) -> None:
    """``nosniff`` on everything; the CORS headers for an allowed origin."""
    handler.set_header("X-Content-Type-Options", "nosniff")
    if cfg is None or not cfg.server.cors_origins:
        return
    handler.set_header("Vary", "Origin")
    origin = handler.request.headers.get("Origin")
    if origin in cfg.server.cors_origins:
        handler.set_header("Access-Control-Allow-Origin", origin)
        handler.set_header("Access-Control-Expose-Headers", EXPOSED)


def preflight(handler: tornado.web.RequestHandler, cfg: Settings) -> errors.Forbidden | None:
    """Answer a CORS preflight from an allowed origin (``204``); else the refusal."""
    origin = handler.request.headers.get("Origin")
    if not origin or origin not in cfg.server.cors_origins:
        return errors.Forbidden("cors_origin_not_allowed",
                                "this origin is not in server.cors_origins")
    handler.set_status(204)
    handler.set_header("Access-Control-Allow-Methods", "GET, POST, DELETE, OPTIONS")
    requested = handler.request.headers.get("Access-Control-Request-Headers")
    handler.set_header("Access-Control-Allow-Headers", requested or "Authorization, Content-Type")
    handler.set_header("Access-Control-Max-Age", "600")
    handler.finish()
    return None


class StaticHandler(tornado.web.StaticFileHandler):
    """The chat page and its assets, with the browser's security headers."""

    def set_default_headers(self) -> None:
        for name, value in PAGE_HEADERS.items():
            self.set_header(name, value)
