"""jobs.packing: the worker's micro-batches and the laptop's packing estimate come from one packer."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from client.dataset import stats  # noqa: E402
from jobs import packing  # noqa: E402
from remote_worker import data  # noqa: E402

LENGTHS = [5, 17, 3, 30, 9, 12, 1, 8, 22, 4, 14, 6]


def _worker(lengths, budget, seed, packed=True, packer=packing.DEFAULT) -> data.MicroBatches:
    """The worker's micro-batches; sequence i is made of the token id i, so a group names its sequences."""
    seqs = [data.Seq(np.full(n, i, np.int64), np.ones(n, np.uint8)) for i, n in enumerate(lengths)]
    return data.MicroBatches(seqs, budget, packing=packed, pad_id=0, seed=seed, packer=packer)


def test_the_worker_keeps_its_data_order():
    """A resumed run replays the same micro-batches: this pins the order checkpoints from before the
    packer was saved were trained in (numpy's permutation of the seed, then next-fit)..."""
    packed = _worker(LENGTHS, 32, seed=42, packer="next_fit")
    assert [[int(packed.sequences[j].ids[0]) for j in g] for g in packed.groups] == [
        [0, 7, 6, 9, 11], [3], [5, 2, 4], [10, 1], [8]]
    padded = _worker(LENGTHS, 32, seed=3, packed=False)
    assert [[int(padded.sequences[j].ids[0]) for j in g] for g in padded.groups] == [
        [11, 7, 2], [10, 0], [1], [4, 6, 9], [5], [3], [8]]
    assert packing.pack(LENGTHS, 32, 42, packer="next_fit") == [[0, 7, 6, 9, 11], [3], [5, 2, 4], [10, 1], [8]]
    # ... and best-fit decreasing, the default since: longest first, each into the fullest group that holds it
    assert packing.pack(LENGTHS, 32, 42) == [[3], [8, 4, 6], [1, 10], [5, 7, 11, 0], [9, 2]]
    assert [[int(_worker(LENGTHS, 32, 42).sequences[j].ids[0]) for j in g]
            for g in _worker(LENGTHS, 32, 42).groups] == [[3], [8, 4, 6], [1, 10], [5, 7, 11, 0], [9, 2]]


def test_best_fit_fills_micro_batches_that_next_fit_leaves_part_empty():
    """Alpaca-like lengths (lognormal, median 200, clipped to 16..2048) in 4k-token micro-batches."""
    rng = np.random.default_rng(0)
    lengths = np.clip(rng.lognormal(np.log(200), 0.75, 5000), 16, 2048).astype(int).tolist()
    best, nxt = packing.efficiency(lengths, 4096, 0), packing.efficiency(lengths, 4096, 0, packer="next_fit")
    assert best > 0.99 and nxt < 0.95
    groups = packing.pack(lengths, 4096, 0)
    assert sorted(i for g in groups for i in g) == list(range(len(lengths)))  # every sequence once
    assert all(sum(lengths[i] for i in g) <= 4096 for g in groups)
    assert packing.pack([5000, 300, 9000], 4096) == [[2], [0], [1]]  # over the budget: alone
    with pytest.raises(ValueError, match="unknown packer"):
        packing.pack(lengths, 4096, packer="first_fit")


def test_a_resume_packs_as_its_checkpoint_did(tmp_path):
    from remote_worker import checkpoints

    assert checkpoints.saved_packer(None) == packing.DEFAULT == "best_fit"
    checkpoints.write_batch_shape(tmp_path, 4096, True, packer="best_fit")
    assert checkpoints.saved_packer(tmp_path) == "best_fit"
    old = tmp_path / "old"
    old.mkdir()
    (old / "batch_shape.json").write_text('{"micro_batch_tokens": 4096, "gradient_checkpointing": true}')
    assert checkpoints.saved_packer(old) == "next_fit"  # written before the packer was saved
    assert checkpoints.saved_packer(tmp_path / "none") == "next_fit"


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
    assert packing.pack([3, 4, 2, 9, 1], 8, packer="next_fit") == [[0, 1], [2], [3], [4]]
    assert packing.pack([3, 4, 2, 9, 1], 8) == [[3], [1, 0, 4], [2]]  # best-fit: ties in position order
    assert packing.efficiency([], 8) is None and packing.efficiency([3], 0) is None
