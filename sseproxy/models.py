"""What ``GET /v1/models`` and ``GET /v1/personas`` list.

``/v1/models`` answers in OpenAI's list shape, ``{"object": "list", "data": [model, …]}``.
When the upstream has a model list (``GET {base_url}/models`` answers 200 with a ``data``
list of objects that have an ``id``), that list is relayed as the upstream wrote its
entries, fetched within :data:`FETCH_TIMEOUT_S` and kept for :data:`UPSTREAM_TTL_S`.
When it has none (unreachable, too slow, an error status, another shape, over
:data:`MAX_BODY_BYTES`), the list is sseproxy's own: ``upstream.model`` and the models
personas name; the upstream is then asked again only after :data:`FALLBACK_TTL_S`, so a
client polling the list never waits on an upstream that is down. Requests that arrive
while the list is fetched wait for that one fetch.

``/v1/models/{id}`` answers that entry of the list (a model id may hold ``/``), or ``404``
``model_not_found``, as OpenAI's retrieve does.

``/v1/personas`` lists each persona's name, title and model, never its system prompt.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Mapping
from typing import Any

import httpx
import structlog

from .config import Persona, Settings
from .upstream import UpstreamClient

log = structlog.get_logger("sseproxy.models")

#: How long the upstream's model list may take to arrive, connection included (seconds).
FETCH_TIMEOUT_S = 3.0
#: How long an upstream model list is served before it is fetched again (seconds).
UPSTREAM_TTL_S = 60.0
#: After a failed fetch, how long sseproxy's own list is served before asking again.
FALLBACK_TTL_S = 10.0
#: A model-list body larger than this is not read (OpenAI's is ~10 KB).
MAX_BODY_BYTES = 1 << 20


class ModelCatalog:
    """The upstream's model list, fetched on demand and kept briefly."""

    def __init__(self, upstream: UpstreamClient) -> None:
        self._upstream = upstream
        self._lock = asyncio.Lock()
        self._cached: list[dict[str, Any]] | None = None
        self._expires = float("-inf")
        #: ``created`` of the models sseproxy lists itself: when this process started.
        self.created = int(time.time())

    async def models(self, settings: Settings) -> dict[str, Any]:
        """The body of ``GET /v1/models``."""
        listed = await self._upstream_models()
        if listed is None:
            listed = [self._model(name) for name in own_models(settings)]
        return {"object": "list", "data": listed}

    async def model(self, settings: Settings, name: str) -> dict[str, Any] | None:
        """The body of ``GET /v1/models/{name}``: that entry of the list, or None."""
        listed = (await self.models(settings))["data"]
        return next((m for m in listed if m["id"] == name), None)

    def _model(self, name: str) -> dict[str, Any]:
        return {"id": name, "object": "model", "created": self.created, "owned_by": "sseproxy"}

    async def _upstream_models(self) -> list[dict[str, Any]] | None:
        loop = asyncio.get_running_loop()
        async with self._lock:  # one fetch at a time; who waited reads its result
            if loop.time() < self._expires:
                return self._cached
            try:
                self._cached = await self._fetch()
            except _NoList as exc:
                log.info("upstream_models_unavailable", reason=str(exc),
                         retry_in_s=FALLBACK_TTL_S)
                self._cached = None
            ttl = FALLBACK_TTL_S if self._cached is None else UPSTREAM_TTL_S
            self._expires = loop.time() + ttl
            return self._cached

    async def _fetch(self) -> list[dict[str, Any]]:
        request = self._upstream.get("models", FETCH_TIMEOUT_S)
        body = bytearray()
        try:
            async with asyncio.timeout(FETCH_TIMEOUT_S):
                response = await self._upstream.transport.handle_async_request(request)
                try:
                    if response.status_code != 200:
                        raise _NoList(f"the upstream answered HTTP {response.status_code}")
                    async for chunk in response.aiter_bytes():
                        body += chunk
                        if len(body) > MAX_BODY_BYTES:
                            raise _NoList(f"the list is over {MAX_BODY_BYTES} bytes")
                finally:
                    await response.aclose()
        except TimeoutError:
            raise _NoList(f"no answer within {FETCH_TIMEOUT_S:g} s") from None
        except httpx.HTTPError as exc:
            raise _NoList(f"the upstream could not be reached ({type(exc).__name__})") from None
        try:
            data = json.loads(body).get("data")
        except (ValueError, AttributeError):
            raise _NoList("the answer is not a JSON object") from None
        if not isinstance(data, list) or not all(
            isinstance(m, dict) and isinstance(m.get("id"), str) for m in data
        ):
            raise _NoList("the answer has no 'data' list of models")
        return data


class _NoList(Exception):
    """The upstream has no model list to relay (the message says why)."""


def own_models(settings: Settings) -> list[str]:
    """``upstream.model``, then the other models personas name, each once."""
    names = [settings.upstream.model]
    names += sorted({p.model for p in settings.personas.values() if p.model} - set(names))
    return names


def personas(settings: Settings) -> dict[str, Any]:
    """The body of ``GET /v1/personas``: names, titles and models, never a prompt."""
    return {"object": "list", "data": [
        _persona(name, persona, settings) for name, persona in settings.personas.items()
    ]}


def _persona(name: str, persona: Persona, settings: Settings) -> Mapping[str, Any]:
    return {"id": name, "object": "persona", "title": persona.title or name,
            "model": persona.model or settings.upstream.model}
