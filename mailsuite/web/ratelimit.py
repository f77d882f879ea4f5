"""Requests per API key: a token bucket per key, in this process."""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass


@dataclass
class Verdict:
    allowed: bool
    limit: int
    remaining: int
    reset: int  # seconds until the bucket is full again
    retry_after: int  # seconds until the next request is allowed (0: now)


class RateLimiter:
    """`per_minute` requests a minute per key, in bursts of up to `per_minute`."""

    def __init__(self, per_minute: int, clock: Callable[[], float] = time.monotonic) -> None:
        self.per_minute = per_minute
        self.clock = clock
        self._buckets: dict[str, tuple[float, float]] = {}  # key -> (tokens, when)

    def take(self, key: str) -> Verdict:
        now = self.clock()
        rate = self.per_minute / 60.0
        tokens, when = self._buckets.get(key, (float(self.per_minute), now))
        tokens = min(float(self.per_minute), tokens + (now - when) * rate)
        allowed = tokens >= 1.0
        if allowed:
            tokens -= 1.0
        self._buckets[key] = (tokens, now)
        if len(self._buckets) > 100_000:
            self._forget_full(now, rate)
        return Verdict(allowed=allowed, limit=self.per_minute, remaining=int(tokens),
                       reset=math.ceil((self.per_minute - tokens) / rate),
                       retry_after=0 if allowed else math.ceil((1.0 - tokens) / rate))

    def _forget_full(self, now: float, rate: float) -> None:
        """A bucket that has refilled is the same as no bucket."""
        self._buckets = {key: (tokens, when) for key, (tokens, when) in self._buckets.items()
                         if tokens + (now - when) * rate < self.per_minute}
