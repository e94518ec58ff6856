"""Numbers for the report: length percentiles and the packing efficiency to expect.

Percentiles are nearest-rank (an actual length from the data). Without a tokenizer, tokens
are estimated at 4 bytes of UTF-8 a token (about right for English and for Chinese alike).
Packing efficiency is the worker's own packer (`jobs.packing`: shuffled with the seed, then
best-fit decreasing into micro-batches of `capacity` tokens); efficiency = tokens / (micro-batches x capacity).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from jobs import packing

BYTES_PER_TOKEN = 4


def percentiles(values: Sequence[int]) -> dict:
    if not len(values):
        return {"p50": 0, "p90": 0, "p99": 0, "max": 0}
    s = sorted(values)
    n = len(s)

    def rank(q: float) -> int:
        return int(s[max(0, math.ceil(q * n / 100) - 1)])

    return {"p50": rank(50), "p90": rank(90), "p99": rank(99), "max": int(s[-1])}


def estimate_tokens(nbytes: int) -> int:
    return -(-nbytes // BYTES_PER_TOKEN)


def packing_efficiency(lengths: Sequence[int], capacity: int, seed: int = 42) -> float | None:
    return packing.efficiency(lengths, capacity, seed)
