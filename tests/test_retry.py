"""client.retry: the backoff schedules of rsync and of the follower's reconnects."""

from __future__ import annotations

from client.remote import follow
from client.retry import Backoff


def test_reconnect_schedule_doubles_to_a_cap_and_never_overflows():
    assert [follow.RECONNECT.wait(n) for n in range(1, 9)] == [1, 2, 4, 8, 16, 30, 30, 30]
    assert follow.RECONNECT.wait(10**6) == 30  # a long outage with a fast clock: no OverflowError
    assert follow.RECONNECT.retries_after(10**6)  # no count limit: reconnect_timeout_s decides


def test_attempts_bound_the_tries():
    policy = Backoff(attempts=3, initial=0.5)
    assert [policy.retries_after(n) for n in (1, 2, 3)] == [True, True, False]
    assert [policy.wait(n) for n in (1, 2)] == [0.5, 1.0]
