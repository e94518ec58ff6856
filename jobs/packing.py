"""The packer: which sequences share a micro-batch. The worker trains on it; the laptop's report
estimates the packing efficiency with it; so both see the same micro-batches for the same lengths.

Order: the sequences are shuffled once with the seed (numpy's `default_rng(seed).permutation`;
no seed: kept in order), then cut into micro-batches in that order, next-fit: a micro-batch
closes when the next sequence would overflow the budget, and a sequence longer than the budget
gets a micro-batch of its own. Packed, a micro-batch costs the sum of its lengths; padded
(one sequence a row), rows × the longest row.

A resumed run depends on this order staying the same (tests/test_resume.py).
Pure: numpy and the standard library.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def shuffled(n: int, seed: int | None) -> list[int]:
    """The order the sequences are packed in: a permutation of range(n), or range(n) without a seed."""
    if seed is None:
        return list(range(n))
    return np.random.default_rng(seed).permutation(n).tolist()


def next_fit(lengths: Sequence[int], budget: int, padded: bool = False) -> list[list[int]]:
    """Cut positions 0..len(lengths)-1, in order, into micro-batches of at most `budget` tokens."""
    groups: list[list[int]] = []
    current: list[int] = []
    cost = longest = 0
    for i, n in enumerate(lengths):
        grown = (len(current) + 1) * max(longest, n) if padded else cost + n
        if current and grown > budget:
            groups.append(current)
            current, cost, longest = [], 0, 0
            grown = n
        current.append(i)
        cost, longest = grown, max(longest, n)
    if current:
        groups.append(current)
    return groups


def pack(lengths: Sequence[int], budget: int, seed: int | None = None, padded: bool = False) -> list[list[int]]:
    """The micro-batches, as lists of indices into `lengths`: shuffled with the seed, then next-fit."""
    order = shuffled(len(lengths), seed)
    return [[order[j] for j in g] for g in next_fit([int(lengths[i]) for i in order], budget, padded)]


def efficiency(lengths: Sequence[int], budget: int, seed: int | None = None) -> float | None:
    """Packed tokens / (micro-batches × budget), a sequence over the budget filling its own; None
    for no data."""
    if not len(lengths) or budget <= 0:
        return None
    slots = sum(max(budget, sum(int(lengths[i]) for i in g)) for g in pack(lengths, budget, seed))
    return round(sum(int(n) for n in lengths) / slots, 4) if slots else None
