"""A token bucket that holds a sender to a byte rate, so background replication stays in its budget."""

from __future__ import annotations

import time
from collections.abc import Callable

__all__ = ["TokenBucket"]


class TokenBucket:
    """Allows ``rate_bytes_per_s`` on average with bursts of at most ``burst_bytes``.

    The bucket starts empty and refills at the rate up to the burst. ``consume(n)`` returns at once
    while tokens last and otherwise sleeps until the bucket would have refilled ``n``; a request
    larger than the burst is let through into debt, so any chunk size works and the rate holds.
    """

    def __init__(
        self,
        rate_bytes_per_s: float,
        *,
        burst_bytes: float | None = None,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        if not rate_bytes_per_s > 0:
            raise ValueError(
                f"rate_bytes_per_s={rate_bytes_per_s!r}: expected a positive byte rate, or None "
                "for no limit"
            )
        self.rate_bytes_per_s = float(rate_bytes_per_s)
        # A tenth of a second of traffic by default: smooth enough, few sleeps.
        self.burst_bytes = float(burst_bytes if burst_bytes is not None else rate_bytes_per_s / 10)
        self._clock = clock
        self._sleep = sleep
        # Start empty: a transfer never exceeds the rate, even in its first tenth of a second.
        self._tokens = 0.0
        self._last = clock()

    def consume(self, count: int) -> float:
        """Take ``count`` bytes' worth of tokens, sleeping as needed; the seconds slept."""
        now = self._clock()
        self._tokens = min(
            self.burst_bytes, self._tokens + (now - self._last) * self.rate_bytes_per_s
        )
        self._last = now
        self._tokens -= count
        if self._tokens >= 0:
            return 0.0
        wait_s = -self._tokens / self.rate_bytes_per_s
        self._sleep(wait_s)
        return wait_s
