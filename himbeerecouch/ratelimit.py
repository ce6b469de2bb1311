"""A token bucket: `rate` events a second on average, bursts of `burst` (discovery replies,
programs' log lines)."""
from __future__ import annotations

import time
from typing import Callable


class TokenBucket:
    def __init__(self, rate: float, burst: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.rate = rate
        self.burst = burst
        self._clock = clock
        self._tokens = float(burst)
        self._last = clock()

    def _refill(self) -> None:
        now = self._clock()
        self._tokens = min(self.burst, self._tokens + (now - self._last) * self.rate)
        self._last = now

    def take(self) -> bool:
        """One event: True when the bucket allows it (and counts it)."""
        self._refill()
        if self._tokens >= 1.0:
            self._tokens -= 1.0
            return True
        return False

    def ready(self, events: float = 1.0) -> bool:
        """Whether the next `events` would be allowed (without counting them)."""
        self._refill()
        return self._tokens >= events
