"""Test-wide settings: the hypothesis profile of the fuzz tests, and the upstream
transports the relay suites run on (issue 18).

A test (or a module, with ``pytestmark = pytest.mark.usefixtures("upstream_transport")``)
that uses the ``upstream_transport`` fixture runs once per transport: ``fast`` (sseproxy's
own, ``h1.py``) and ``httpx`` (httpx's own); ``--upstream-transport=fast`` (or ``httpx``)
runs one. A test marked ``fast_transport`` checks what only the fast transport does (a
pushed body, the socket paused for backpressure) and runs on it alone.
"""

from __future__ import annotations

import os

import pytest
import servers
from hypothesis import HealthCheck, settings

#: About 60 s of fuzzing in all on a busy 2-core machine; the examples are derived from
#: each test's name, so a run is the same every time (no example database either).
settings.register_profile(
    "ci", deadline=None, derandomize=True, database=None, print_blob=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
#: Many more examples, random: ``HYPOTHESIS_PROFILE=long`` before a release.
settings.register_profile(
    "long", deadline=None, max_examples=20_000, database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

TRANSPORTS = ("fast", "httpx")


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--upstream-transport", default="both", choices=(*TRANSPORTS, "both"),
                     help="the upstream transport(s) the relay suites run on")


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "upstream_transport" not in metafunc.fixturenames:
        return
    chosen = metafunc.config.getoption("upstream_transport")
    names = [n for n in TRANSPORTS if chosen in (n, "both")]
    if metafunc.definition.get_closest_marker("fast_transport") is not None:
        names = [n for n in names if n == "fast"]
    metafunc.parametrize("upstream_transport", names, indirect=True)


@pytest.fixture
def upstream_transport(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """The ``upstream.transport`` that ``servers.running()`` gives sseproxy."""
    name: str = getattr(request, "param", "fast")
    monkeypatch.setattr(servers, "UPSTREAM_TRANSPORT", name)
    return name
