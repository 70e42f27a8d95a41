"""httpx's own transport, through the proxy the environment names (``upstream.transport =
"httpx"``).

:class:`~sseproxy.upstream.UpstreamClient` hands requests straight to a transport, not to
an ``httpx.AsyncClient``, which is where httpx reads ``HTTPS_PROXY`` and its like. This
makes the same choice per request: ``HTTPS_PROXY`` / ``HTTP_PROXY`` by the URL's scheme,
else ``ALL_PROXY``, none for a host ``NO_PROXY`` names (read by :mod:`urllib.request`, in
either case, as curl and httpx read them). ``SSL_CERT_FILE`` and ``SSL_CERT_DIR`` are
honoured too (``trust_env``).
"""

from __future__ import annotations

import urllib.request

import httpx


class EnvProxyTransport(httpx.AsyncBaseTransport):
    """One ``httpx.AsyncHTTPTransport`` for direct requests and one per proxy in use."""

    def __init__(self, *, limits: httpx.Limits) -> None:
        self._limits = limits
        self._proxies = urllib.request.getproxies_environment()
        self._direct = httpx.AsyncHTTPTransport(limits=limits, trust_env=True)
        self._via: dict[str, httpx.AsyncHTTPTransport] = {}

    def proxy_for(self, url: httpx.URL) -> str | None:
        """The proxy URL a request to ``url`` goes through, or None."""
        proxy = self._proxies.get(url.scheme) or self._proxies.get("all")
        bypass = urllib.request.proxy_bypass_environment(  # type: ignore[attr-defined]
            url.host, self._proxies)  # (in the standard library, but not in typeshed)
        return None if not proxy or bypass else proxy

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        proxy = self.proxy_for(request.url)
        if proxy is None:
            return await self._direct.handle_async_request(request)
        transport = self._via.get(proxy)
        if transport is None:
            transport = self._via[proxy] = httpx.AsyncHTTPTransport(
                limits=self._limits, trust_env=True, proxy=proxy)
        return await transport.handle_async_request(request)

    async def aclose(self) -> None:
        await self._direct.aclose()
        for transport in self._via.values():
            await transport.aclose()
