"""Breaker: best-fit by room buckets packs exactly as the one-sorted-list version did (a resume depends on
the same micro-batches), edge cases included. The bucket version was made because the list one was
quadratic in the number of open micro-batches (13 s vs 4 s for 1M sequences here; no duration asserted)."""

from __future__ import annotations

import bisect

import numpy as np
import pytest

from jobs.packing import best_fit, efficiency, pack


def _reference(lengths, budget):  # the packer as committed in 1aad4c8..6bac4a8
    order = sorted(range(len(lengths)), key=lambda i: -int(lengths[i]))
    groups, room = [], []
    for i in order:
        n = int(lengths[i])
        at = bisect.bisect_left(room, (n, -1))
        if at < len(room):
            left, g = room.pop(at)
            groups[g].append(i)
            if left - n > 0:
                bisect.insort(room, (left - n, g))
            continue
        groups.append([i])
        if budget - n > 0:
            bisect.insort(room, (budget - n, len(groups) - 1))
    return groups


def test_the_same_groups_as_the_reference_on_random_and_odd_lengths():
    rng = np.random.default_rng(7)
    for _ in range(2000):
        lengths = rng.integers(0, 70, int(rng.integers(0, 60))).tolist()
        budget = int(rng.integers(1, 50))
        assert best_fit(lengths, budget) == _reference(lengths, budget), (lengths, budget)
    big = np.concatenate([rng.integers(2049, 4096, 5000), rng.integers(1, 2047, 5000)]).tolist()
    assert best_fit(big, 4096) == _reference(big, 4096)


@pytest.mark.parametrize("lengths,budget,groups", [
    ([], 4096, []), ([0, 0, 0], 4096, [[0, 1, 2]]), ([5, 5, 5], 1, [[0], [1], [2]]), ([9000, 1], 4096, [[0], [1]]),
])  # fmt: skip
def test_edges(lengths, budget, groups):
    assert pack(lengths, budget) == groups
    assert efficiency([], 4096) is None and efficiency([3], 0) is None
