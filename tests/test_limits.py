"""Per-key limits, the pure core and the limiter on an injected clock (issue 18).

Budgets, decisions, reconciliation and header values are checked table-driven with
``now`` given; the limiter's memory backend runs on a fake clock, so a window of a minute
passes without anyone waiting for it.
"""

from __future__ import annotations

import asyncio
import math
from typing import Any

import pytest

from sseproxy import config, errors, limits
from sseproxy.limiter import Limiter, key_limits
from sseproxy.limits import Decision, KeyLimits, KeyState, Quota
from sseproxy.metrics import Metrics
from sseproxy.validate import ChatRequest

W = 60.0  # the window


@pytest.mark.parametrize("tat, cost, limit, now, expected", [
    # an empty budget of 10 per minute: one costs 6 s of it
    (0.0, 1, 10, 100.0, (106.0, 0.0)),
    # the whole budget at once fits exactly
    (0.0, 10, 10, 100.0, (160.0, 0.0)),
    # one more than the budget holds: refused, it fits after 6 s
    (160.0, 1, 10, 100.0, (160.0, 6.0)),
    # a cost over the whole budget counts as the whole budget: fits only when it is full
    (0.0, 50, 10, 100.0, (160.0, 0.0)),
    (101.0, 50, 10, 100.0, (101.0, 1.0)),
    # no limit: always fits, nothing changes
    (500.0, 10**9, 0, 100.0, (500.0, 0.0)),
])
def test_take_charges_a_budget_that_refills_over_its_window(
        tat: float, cost: int, limit: int, now: float, expected: tuple[float, float]) -> None:
    new, wait = limits.take(tat, cost, limit, W, now)
    assert (new, wait) == pytest.approx(expected)


@pytest.mark.parametrize("tat, now, expected", [
    (0.0, 100.0, Quota(10, 10, 0.0)),       # full
    (106.0, 100.0, Quota(10, 9, 6.0)),      # one used: whole again in 6 s
    (160.0, 100.0, Quota(10, 0, 60.0)),     # all used
    (220.0, 100.0, Quota(10, 0, 120.0)),    # overdrawn by a reconciliation
])
def test_quota_reports_remaining_and_the_time_until_the_budget_is_whole(
        tat: float, now: float, expected: Quota) -> None:
    assert limits.quota(tat, 10, W, now) == expected


@pytest.mark.parametrize("seconds, text", [
    (0.0, "0ms"), (0.0201, "21ms"), (0.999, "999ms"), (1.0, "1s"), (1.5, "1.5s"),
    (59.9991, "60s"), (60.0, "1m0s"), (360.0, "6m0s"), (3723.2, "1h2m4s"),
])
def test_durations_are_written_as_openai_writes_its_reset_headers(
        seconds: float, text: str) -> None:
    assert limits.duration(seconds) == text


@pytest.mark.parametrize("chars, max_tokens, default, expected", [
    (0, None, 256, 256), (1, None, 256, 257), (8, 10, 256, 12), (9, 0, 256, 3),
])
def test_the_estimate_is_prompt_characters_over_four_plus_the_reply_budget(
        chars: int, max_tokens: int | None, default: int, expected: int) -> None:
    assert limits.estimate(chars, max_tokens, default) == expected


@pytest.mark.parametrize("usage, prompt, output, answered, expected", [
    ({"total_tokens": 42, "prompt_tokens": 1, "completion_tokens": 1}, 400, 400, True, 42),
    ({"prompt_tokens": 5, "completion_tokens": 7}, 400, 400, True, 12),
    (None, 40, 8, True, 12),            # no usage (cancelled): estimated from characters
    (None, 40, 0, False, 0),            # the upstream refused: nothing used
    ({"total_tokens": "x"}, 4, 4, True, 2),
])
def test_what_a_stream_used_comes_from_the_upstreams_usage_or_its_characters(
        usage: Any, prompt: int, output: int, answered: bool, expected: int) -> None:
    assert limits.used(usage, prompt, output, answered) == expected


def test_a_key_at_its_stream_limit_is_refused_until_a_permit_is_released() -> None:
    state, key = KeyState(), KeyLimits(max_streams=2)
    assert limits.admit(state, key, 1, "a", 0.0, W, 100.0).admitted
    assert limits.admit(state, key, 1, "b", 0.0, W, 100.0).admitted
    refused = limits.admit(state, key, 1, "c", 0.0, W, 100.0)
    assert refused == Decision(False, "streams", limits.STREAMS_RETRY_S)
    limits.reconcile(state, key, "a", 0, 1.0, W)
    assert limits.admit(state, key, 1, "c", 1.0, W, 100.0).admitted
    # a lease that outlived its instance is forgotten
    assert not limits.admit(state, key, 1, "d", 99.0, W, 100.0).admitted
    assert limits.admit(state, key, 1, "d", 100.0, W, 100.0).admitted


def test_requests_per_minute_refill_continuously() -> None:
    state, key = KeyState(), KeyLimits(requests_per_minute=3)
    got = [limits.admit(state, key, 0, str(i), 0.0, W, 1.0) for i in range(4)]
    assert [d.admitted for d in got] == [True, True, True, False]
    assert got[2].requests == Quota(3, 0, 60.0)
    assert got[3].limit == "requests" and got[3].retry_after_s == pytest.approx(20.0)
    assert not limits.admit(state, key, 0, "x", 19.9, W, 1.0).admitted
    assert limits.admit(state, key, 0, "x", 20.0, W, 1.0).admitted


def test_a_stream_that_used_more_than_its_estimate_holds_back_the_next_until_refilled() -> None:
    state, key = KeyState(), KeyLimits(tokens_per_minute=1000)
    first = limits.admit(state, key, 100, "a", 0.0, W, 100.0)
    assert first.admitted and first.tokens == Quota(1000, 900, 6.0)
    # it used 1500 tokens in the end (an estimate that was far too low): charged at its end
    limits.reconcile(state, key, "a", 1400, 10.0, W)
    refused = limits.admit(state, key, 100, "b", 10.0, W, 100.0)
    assert not refused.admitted and refused.limit == "tokens"
    # the 1400 over its estimate, charged at t=10, empty the budget until t=94 (0.06 s per
    # token); 100 more fit once 100 have refilled: at t=40
    assert refused.tokens == Quota(1000, 0, 84.0)
    assert refused.retry_after_s == pytest.approx(30.0)
    assert not limits.admit(state, key, 100, "b", 39.9, W, 100.0).admitted
    assert limits.admit(state, key, 100, "b", 40.0, W, 100.0).admitted


def test_a_stream_that_used_less_than_its_estimate_gives_the_rest_back() -> None:
    state, key = KeyState(), KeyLimits(tokens_per_minute=1000)
    assert limits.admit(state, key, 1000, "a", 0.0, W, 100.0).admitted
    assert not limits.admit(state, key, 20, "b", 1.0, W, 100.0).admitted  # 16 refilled
    limits.reconcile(state, key, "a", -900, 1.0, W)  # it used 100
    assert limits.admit(state, key, 20, "b", 1.0, W, 100.0).tokens == Quota(1000, 896, 6.2)


def test_the_limit_named_is_the_one_with_the_longest_wait() -> None:
    state = KeyState()
    key = KeyLimits(requests_per_minute=60, tokens_per_minute=60)
    assert limits.admit(state, key, 60, "a", 0.0, W, 100.0).admitted
    refused = limits.admit(state, key, 30, "b", 0.0, W, 100.0)
    # requests: 1 s to wait; tokens: 30 s
    assert refused.limit == "tokens" and refused.retry_after_s == pytest.approx(30.0)


def test_headers_report_both_budgets_and_retry_after_in_whole_seconds() -> None:
    decision = Decision(False, "tokens", 2.2, Quota(60, 59, 1.0), Quota(1000, 0, 90.0))
    assert limits.headers(decision) == {
        "x-ratelimit-limit-requests": "60", "x-ratelimit-remaining-requests": "59",
        "x-ratelimit-reset-requests": "1s",
        "x-ratelimit-limit-tokens": "1000", "x-ratelimit-remaining-tokens": "0",
        "x-ratelimit-reset-tokens": "1m30s",
        "Retry-After": "3",
    }
    assert limits.headers(Decision(True)) == {}


def test_per_key_tables_override_the_defaults_and_are_checked(tmp_path: Any) -> None:
    path = tmp_path / "c.toml"
    path.write_text("[limits]\nkey_max_streams = 2\nkey_tokens_per_minute = 100\n"
                    "[limits.keys.batch]\nmax_streams = 9\n")
    settings = config.load(str(path), environ={})
    assert key_limits(settings, "batch") == KeyLimits(9, 0, 100)
    assert key_limits(settings, "other") == KeyLimits(2, 0, 100)
    assert config.describe(settings)["limits"]["keys"] == {"batch": {"max_streams": 9}}
    path.write_text("[limits.keys.batch]\nmax_stream = 9\n")
    with pytest.raises(errors.ConfigError, match="did you mean 'max_streams'"):
        config.load(str(path), environ={})
    path.write_text("[limits.keys.batch]\nmax_streams = -1\n")
    with pytest.raises(errors.ConfigError, match="integer >= 0"):
        config.load(str(path), environ={})


class FakeClock:
    def __init__(self) -> None:
        self.now = 1_000_000.0

    def __call__(self) -> float:
        return self.now


def request(chars: int = 40, max_tokens: int | None = None) -> ChatRequest:
    params = {} if max_tokens is None else {"max_tokens": max_tokens}
    return ChatRequest(messages=[{"role": "user", "content": "x" * chars}], model="m",
                       params=params)


def test_the_limiter_refuses_a_key_over_its_tokens_until_the_window_passed() -> None:
    async def run() -> None:
        clock = FakeClock()
        metrics = Metrics(process=False)
        limiter = Limiter(metrics, clock=clock)
        settings = config.load(None, environ={}, overrides={
            "limits.key_tokens_per_minute": 100, "limits.key_max_streams": 1})
        permit = await limiter.acquire("k", request(40, 10), settings)  # 10 + 10 tokens
        assert permit is not None and permit.estimate == 20
        assert permit.headers["x-ratelimit-remaining-tokens"] == "80"
        # another key has its own budget, even while this one holds its one stream
        assert await limiter.acquire("other", request(), settings) is not None
        with pytest.raises(errors.RateLimited) as refused:
            await limiter.acquire("k", request(40, 10), settings)
        assert refused.value.limit == "streams"
        permit.release({"total_tokens": 150}, 0, True)
        permit.release({"total_tokens": 150}, 0, True)  # a second release changes nothing
        with pytest.raises(errors.RateLimited) as refused:
            await limiter.acquire("k", request(40, 10), settings)
        assert refused.value.limit == "tokens"
        assert refused.value.headers()["x-ratelimit-remaining-tokens"] == "0"
        wait = refused.value.retry_after_s
        assert wait == pytest.approx(0.6 * (150 + 20 - 100))  # 0.6 s per token
        clock.now += wait - 0.01
        with pytest.raises(errors.RateLimited):
            await limiter.acquire("k", request(40, 10), settings)
        clock.now += 0.01
        assert await limiter.acquire("k", request(40, 10), settings) is not None
        text = metrics.exposition()[0].decode()
        assert 'sseproxy_rate_limited_total{limit="tokens"} 2.0' in text
        assert 'sseproxy_rate_limited_total{limit="streams"} 1.0' in text
        assert 'sseproxy_rate_limited_total{limit="requests"} 0.0' in text

    asyncio.run(run())


def test_a_key_without_limits_gets_no_permit_and_no_headers() -> None:
    async def run() -> None:
        limiter = Limiter(Metrics(process=False), clock=FakeClock())
        assert await limiter.acquire("k", request(), config.Settings()) is None

    asyncio.run(run())


def test_the_estimate_counts_the_persona_prompt_and_max_completion_tokens() -> None:
    messages: list[dict[str, Any]] = [
        {"role": "system", "content": "y" * 8},
        {"role": "user", "content": [{"type": "text", "text": "x" * 8}]}]
    assert limits.prompt_chars(messages) == 16
    assert math.ceil(16 / limits.CHARS_PER_TOKEN) == limits.tokens_of(16)
