"""Numbers for the report: length percentiles and the packing efficiency to expect.

Percentiles are nearest-rank (an actual length from the data). Without a tokenizer, tokens
are estimated at 4 bytes of UTF-8 a token (about right for English and for Chinese alike).
Packing efficiency mirrors the worker's packer (remote_worker/data.py): sequences shuffled
with the seed, then laid end to end into micro-batches of `capacity` tokens, a micro-batch
closing when the next sequence would overflow it; efficiency = tokens / (micro-batches x capacity).
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence

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
    if not len(lengths) or capacity <= 0:
        return None
    order = list(lengths)
    random.Random(seed).shuffle(order)
    batches, fill = 0, capacity  # start "full" so the first sequence opens a micro-batch
    slots = 0
    for n in order:
        if fill + n > capacity:
            batches += 1
            slots += max(capacity, n)
            fill = 0
        fill += n
    return round(sum(order) / slots, 4) if slots else None
