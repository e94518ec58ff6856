"""Breaker tests for the multi-GPU path (issue 16): what the plan, the worker and a checkpoint agree on."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

pytest.importorskip("peft")

from jobs import cards, memory

CONFIGS = Path(__file__).parent / "fixtures" / "configs"
REPORT = {"train_records": 1000, "records_out": 1000, "tokens": {"total": 2_000_000}}


def _arch(name: str) -> memory.Arch:
    return memory.Arch.from_config(json.loads((CONFIGS / f"{name}.json").read_text()))


def _spec(**train):
    from jobs.spec import JobSpec

    return JobSpec.model_validate({"name": "t", "model": {"name_or_path": "Org/M"}, "data": {"train": "x"},
                                   "train": train, "instance": {"ssh": "ssh -p 1 root@h"}})  # fmt: skip


@pytest.mark.parametrize("train", [
    {},  # global batch 0: one micro-batch a rank, so two a step on two GPUs
    {"global_batch_tokens": 16384},  # one micro-batch's worth: still one a rank
    {"global_batch_tokens": 5 * 16384},  # five: round(2.5) = 2 a rank, four a step
])  # fmt: skip
def test_plan_of_a_max_steps_job_on_two_gpus_counts_the_micro_batches_the_worker_trains(train) -> None:
    """A max_steps job trains max_steps x (gpus x micro-batches a rank) micro-batches (recipe.step_accum):
    the plan counted one GPU's global batch, so two GPUs looked twice as fast as they are."""
    from client.plan import make_plan
    from jobs.spec import JobSpec
    from remote_worker.recipe import step_accum

    table = [cards.find("RTX 4090", cards.table())]
    base = {"max_steps": 100, "micro_batch_tokens": 16384, **train}
    one = make_plan(_spec(**base), _arch("qwen2.5-7b"), "fixture", REPORT, table, 1).rows[0]
    two = make_plan(_spec(gpus=2, **base), _arch("qwen2.5-7b"), "fixture", REPORT, table, 2).rows[0]
    assert two.parallel == "ddp" and two.shape.micro_batch_tokens == one.shape.micro_batch_tokens == 16384
    spec: JobSpec = _spec(gpus=2, **base)
    per_step_2 = 2 * step_accum(spec, 16384, 2, None)
    per_step_1 = step_accum(_spec(**base), 16384, 1, None)
    # the training time is the micro-batches trained over the speed: the ratio is the worker's
    assert two.train_s * two.tokens_per_s / (one.train_s * one.tokens_per_s) == pytest.approx(per_step_2 / per_step_1)
