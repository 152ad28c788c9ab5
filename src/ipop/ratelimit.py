"""A token bucket: at most ``rate`` events a second, ``burst`` saved up; pure (time passed in).

Used wherever ipop must not flood: signaling messages, con_req, unknown-destination
notifications.
"""

from __future__ import annotations

from ipop.errors import ConfigError


class TokenBucket:
    """``rate`` tokens per second, at most ``burst`` saved up; one token per message."""

    def __init__(self, rate: float, burst: float) -> None:
        if rate <= 0 or burst < 1:
            raise ConfigError("send_rate", "token bucket needs rate > 0 and burst >= 1")
        self.rate = rate
        self.burst = burst
        self._tokens = burst
        self._last: float | None = None

    def take(self, now: float) -> bool:
        """Spend one token at time ``now`` (seconds, monotonic); False if there is none."""
        if self._last is not None and now > self._last:
            self._tokens = min(self.burst, self._tokens + (now - self._last) * self.rate)
        if self._last is None or now > self._last:
            self._last = now
        if self._tokens >= 1:
            self._tokens -= 1
            return True
        return False
