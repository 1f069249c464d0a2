"""Retry schedule: exponential backoff with full jitter, capped, with a fixed retry budget."""

from __future__ import annotations

import random
from dataclasses import dataclass, field


@dataclass(slots=True)
class RetryPolicy:
    """`delay(n)` after the n-th failed attempt is uniform in [0, min(max_delay,
    base_delay * 2**(n-1))] ("full jitter"), which spreads a thundering herd of
    retries after an outage. A message may fail `max_retries + 1` times in all
    (the first attempt and its retries) before it is dead-lettered."""

    base_delay: float = 1.0
    max_delay: float = 60.0
    max_retries: int = 5
    rng: random.Random = field(default_factory=random.Random)

    def ceiling(self, failures: int) -> float:
        """The upper bound of the delay after `failures` failed attempts (no jitter)."""
        if failures <= 0:
            return 0.0
        # Cap the exponent: 2**1000 is a float overflow, and anything past 2**64 is the cap anyway.
        return min(self.max_delay, self.base_delay * 2.0 ** min(failures - 1, 64))

    def delay(self, failures: int) -> float:
        return self.rng.uniform(0.0, self.ceiling(failures))

    def exhausted(self, failures: int) -> bool:
        """True once a message has failed more often than its retry budget allows."""
        return failures > self.max_retries
