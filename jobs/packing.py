"""The packer: which sequences share a micro-batch. The worker trains on it; the laptop's report
estimates the packing efficiency with it; so both see the same micro-batches for the same lengths.

Order: the sequences are shuffled once with the seed (numpy's `default_rng(seed).permutation`;
no seed: kept in order), then packed by one of two packers:
- "best_fit" (the default for packed rows since 2026-11-30): best-fit decreasing, as TRL's
  SFTTrainer packs ("bfd"): longest first (ties in the shuffled order), each sequence into the
  micro-batch with the least room left that still holds it. Next-fit left 7% of 4k-token
  micro-batches of alpaca-like rows empty; best-fit leaves under 1% (tests/test_packing.py).
  The micro-batches come out longest first; the Trainer's seeded sampler shuffles them.
- "next_fit": cut in the shuffled order, a micro-batch closing when the next sequence would
  overflow the budget. Padded rows (packing off) always use it: there a micro-batch costs
  rows × the longest row.
A sequence longer than the budget gets a micro-batch of its own.

A resumed run depends on this order staying the same (tests/test_resume.py): the checkpoint
records its packer (remote_worker.checkpoints, BatchShape.packer).
Pure: numpy and the standard library.
"""

from __future__ import annotations

import bisect
import heapq
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


def best_fit(lengths: Sequence[int], budget: int) -> list[list[int]]:
    """Positions 0..len(lengths)-1 packed best-fit decreasing into micro-batches of at most `budget`
    tokens (a longer one alone). Ties keep position order, so the result is deterministic: the group
    with the least room that holds the sequence, the oldest of those."""
    order = sorted(range(len(lengths)), key=lambda i: -int(lengths[i]))
    groups: list[list[int]] = []
    # by room left: a heap of group indices for each amount, and the sorted amounts that have one. The
    # amounts are at most `budget` distinct values, so keeping them sorted costs little however many
    # groups there are (one sorted list of every group was quadratic: 17 s for 1M sequences)
    holders: dict[int, list[int]] = {}
    rooms: list[int] = []
    for i in order:
        n = int(lengths[i])
        at = bisect.bisect_left(rooms, n)
        if at < len(rooms):
            left = rooms[at]
            heap = holders[left]
            g = heapq.heappop(heap)
            if not heap:
                del holders[left]
                rooms.pop(at)
            groups[g].append(i)
        else:
            groups.append([i])
            g, left = len(groups) - 1, budget
        if left - n > 0:
            if left - n not in holders:
                holders[left - n] = []
                bisect.insort(rooms, left - n)
            heapq.heappush(holders[left - n], g)
    return groups


PACKERS = ("best_fit", "next_fit")
DEFAULT = "best_fit"


def pack(
    lengths: Sequence[int], budget: int, seed: int | None = None, padded: bool = False, packer: str = DEFAULT
) -> list[list[int]]:
    """The micro-batches, as lists of indices into `lengths`: shuffled with the seed, then packed by
    `packer` (padded rows: next-fit always). Raises ValueError for an unknown packer."""
    if packer not in PACKERS:
        raise ValueError(f"unknown packer {packer!r}: one of {', '.join(PACKERS)}")
    order = shuffled(len(lengths), seed)
    ordered = [int(lengths[i]) for i in order]
    groups = next_fit(ordered, budget, padded) if padded or packer == "next_fit" else best_fit(ordered, budget)
    return [[order[j] for j in g] for g in groups]


def efficiency(lengths: Sequence[int], budget: int, seed: int | None = None, packer: str = DEFAULT) -> float | None:
    """Packed tokens / (micro-batches × budget), a sequence over the budget filling its own; None
    for no data."""
    if not len(lengths) or budget <= 0:
        return None
    slots = sum(max(budget, sum(int(lengths[i]) for i in g)) for g in pack(lengths, budget, seed, packer=packer))
    return round(sum(int(n) for n in lengths) / slots, 4) if slots else None
