"""The out-of-memory hints name commands that work. Every knob but the number of GPUs is a job.toml
field, and `resume` never reads job.toml again (it runs the ledger's spec and continues the checkpoint
as it was trained, train.distributed included): the hint says to submit again for those."""

from __future__ import annotations

import signal
from pathlib import Path

import pytest

from jobs.spec import JobSpec, WorkerJob
from remote_worker.__main__ import oom_hint


def _job(**train) -> WorkerJob:
    spec = JobSpec.model_validate({"name": "j", "model": {"name_or_path": "m"}, "data": {"train": "t.jsonl"},
                                   "train": train})  # fmt: skip
    return WorkerJob(job_id="j-1", spec=spec, data_dir="/d", job_dir="/jobs/j-1")


@pytest.mark.parametrize("train", [{"gpus": 2}, {"gpus": 1}])
def test_the_oom_hint_says_a_new_submit_applies_the_distribution(train):
    hint = oom_hint(_job(**train))
    assert 'train.distributed = "fsdp"' in hint
    assert "then submit it again (`autodl-run submit JOB.toml`" in hint, hint
    assert "`autodl-run resume j-1` runs the job as it was submitted" in hint, hint


def test_the_rank_killed_hint_says_fsdp_needs_a_new_submit(tmp_path):
    pytest.importorskip("torch")
    from torch.distributed.elastic.multiprocessing.errors import ProcessFailure

    from remote_worker.torchrun import describe

    failure = ProcessFailure(local_rank=1, pid=4242, exitcode=-signal.SIGKILL, error_file=str(tmp_path / "none"))
    hint = describe(1, failure, "j-1", Path("/jobs/j-1/checkpoints/step-4")).hint
    assert 'train.distributed = "fsdp"' in hint and "a new `autodl-run submit JOB.toml`" in hint, hint
