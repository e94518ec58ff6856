"""jobs.packing: the worker's micro-batches and the laptop's packing estimate come from one packer."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from client.dataset import stats  # noqa: E402
from jobs import packing  # noqa: E402
from remote_worker import data  # noqa: E402

LENGTHS = [5, 17, 3, 30, 9, 12, 1, 8, 22, 4, 14, 6]


def _worker(lengths, budget, seed, packed=True) -> data.MicroBatches:
    """The worker's micro-batches; sequence i is made of the token id i, so a group names its sequences."""
    seqs = [data.Seq(np.full(n, i, np.int64), np.ones(n, np.uint8)) for i, n in enumerate(lengths)]
    return data.MicroBatches(seqs, budget, packing=packed, pad_id=0, seed=seed)


def test_the_worker_keeps_its_data_order():
    """A resumed run replays the same micro-batches: this pins the order the worker has always used
    (numpy's permutation of the seed, then next-fit)."""
    packed = _worker(LENGTHS, 32, seed=42)
    assert [[int(packed.sequences[j].ids[0]) for j in g] for g in packed.groups] == [
        [0, 7, 6, 9, 11], [3], [5, 2, 4], [10, 1], [8]]
    padded = _worker(LENGTHS, 32, seed=3, packed=False)
    assert [[int(padded.sequences[j].ids[0]) for j in g] for g in padded.groups] == [
        [11, 7, 2], [10, 0], [1], [4, 6, 9], [5], [3], [8]]
    assert packing.pack(LENGTHS, 32, 42) == [[0, 7, 6, 9, 11], [3], [5, 2, 4], [10, 1], [8]]


@pytest.mark.parametrize("seed", [0, 7, 42, 1234])
@pytest.mark.parametrize("budget", [16, 32, 64])
def test_laptop_estimate_is_the_worker_packing(seed, budget):
    rng = np.random.default_rng(seed + budget)
    lengths = rng.integers(1, budget + budget // 2, size=40).tolist()  # some over the budget
    mb = _worker(lengths, budget, seed)
    slots = sum(max(budget, int(mb[i]["input_ids"].numel())) for i in range(len(mb)))
    assert stats.packing_efficiency(lengths, budget, seed) == round(sum(lengths) / slots, 4)
    assert mb.groups == packing.pack(lengths, budget, seed)


def test_no_seed_keeps_the_order():
    assert packing.pack([3, 4, 2, 9, 1], 8) == [[0, 1], [2], [3], [4]]
    assert packing.efficiency([], 8) is None and packing.efficiency([3], 0) is None
