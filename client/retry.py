"""The retry policy: how many tries, and how long to wait between them (exponential backoff, capped).

Used where a laptop-side operation meets a flaky link: rsync's transient failures
(client.transport.rsync) and the follower's reconnects (client.remote.follow).
"""

from __future__ import annotations

from dataclasses import dataclass

_MAX_DOUBLINGS = 64  # the exponent stops growing here: a long outage never overflows a float


@dataclass(frozen=True)
class Backoff:
    """Wait `initial` seconds before the first retry, `factor` times longer before each next one,
    never more than `cap`; give up after `attempts` tries in all (None: the caller decides, e.g. on a deadline)."""

    attempts: int | None = None
    initial: float = 1.0
    factor: float = 2.0
    cap: float = float("inf")

    def wait(self, retry: int) -> float:
        """Seconds to wait before retry number `retry` (1 = the first retry)."""
        return min(self.cap, self.initial * self.factor ** min(max(retry - 1, 0), _MAX_DOUBLINGS))

    def retries_after(self, attempt: int) -> bool:
        """Whether try number `attempt` (1 = the first) may be followed by another."""
        return self.attempts is None or attempt < self.attempts
