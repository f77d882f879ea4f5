"""Per-key rate limits: RateLimit-* headers on every answer to a key, 429 with Retry-After."""

from __future__ import annotations

from collections.abc import Callable

from mailsuite.web.ratelimit import RateLimiter
from tests.harness import Mailsuite
from tests.web.client import ApiClient


def test_a_key_over_its_limit_gets_429_and_other_keys_do_not(
        start_mailsuite: Callable[..., Mailsuite]) -> None:
    server = start_mailsuite({"api": {"rate_limit": 5}})
    _, busy_secret = server.store.api_key_add("busy", ["admin"])
    _, calm_secret = server.store.api_key_add("calm", ["admin"])
    busy, calm = ApiClient(server.http, busy_secret), ApiClient(server.http, calm_secret)
    remaining = [int(busy.get("/v1/me").headers["RateLimit-Remaining"]) for _ in range(5)]
    assert remaining == [4, 3, 2, 1, 0]
    over = busy.get("/v1/me")
    assert over.status == 429 and over.error_code == "rate_limited"
    assert over.headers["RateLimit-Limit"] == "5"
    assert 1 <= int(over.headers["Retry-After"]) <= 12
    assert calm.get("/v1/me").status == 200
    # Open endpoints and unauthenticated calls are not counted against a key.
    assert ApiClient(server.http).get("/healthz").headers.get("RateLimit-Limit") is None


def test_the_bucket_refills_at_the_rate() -> None:
    now = [0.0]
    limiter = RateLimiter(60, clock=lambda: now[0])
    assert all(limiter.take("k").allowed for _ in range(60))
    refused = limiter.take("k")
    assert not refused.allowed and refused.retry_after == 1
    now[0] += 1.0
    assert limiter.take("k").allowed and not limiter.take("k").allowed
    now[0] += 60.0
    assert limiter.take("k").remaining == 59
