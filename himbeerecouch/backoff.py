"""Capped exponential back-off with jitter, for reconnects and program restarts."""
from __future__ import annotations

import random


class Backoff:
    def __init__(self, first: float = 1.0, cap: float = 60.0, jitter: float = 0.2,
                 rng: random.Random | None = None) -> None:
        self.first = first
        self.cap = cap
        self.jitter = jitter
        self.failures = 0
        self._rng = rng or random.Random()

    def next_delay(self) -> float:
        """Delay before the next attempt; each call counts one more failure."""
        base = min(self.cap, self.first * 2 ** self.failures)
        self.failures += 1
        # Spread a fleet's reconnects so a restarted server is not hit by every Pi at once.
        return min(self.cap, base * (1 - self.jitter + 2 * self.jitter * self._rng.random()))

    def reset(self) -> None:
        self.failures = 0
