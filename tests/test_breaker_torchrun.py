"""Breaker: a rank killed by the OOM killer is told how to resume on fewer processes. "fewer GPUs
(train.gpus)" sent the user to edit job.toml, which `resume` never reads again (it resumes the
ledger's spec): the way is `resume JOB --gpus N`."""

from __future__ import annotations

import signal
from pathlib import Path

import pytest

pytest.importorskip("torch")

from torch.distributed.elastic.multiprocessing.errors import ProcessFailure  # noqa: E402

from remote_worker.torchrun import describe  # noqa: E402


def test_the_oom_hint_names_resume_with_gpus(tmp_path):
    failure = ProcessFailure(local_rank=1, pid=4242, exitcode=-signal.SIGKILL, error_file=str(tmp_path / "none"))
    failed = describe(1, failure, "j-1", Path("/jobs/j-1/checkpoints/step-4"))
    assert "`autodl-run resume j-1 --gpus N`" in failed.hint
    assert "continue from step-4 with `autodl-run resume j-1`" in failed.hint


def test_the_rank_killed_is_named_not_the_one_torchrun_stopped_after_it(tmp_path):
    """torchrun SIGTERMs the surviving ranks in the same second as the SIGKILLed one: the SIGKILLed rank 1
    is the cause, though rank 0's failure ties on the timestamp and has the lower rank."""
    from remote_worker.torchrun import signalled

    stopped = ProcessFailure(local_rank=0, pid=1, exitcode=-signal.SIGTERM, error_file=str(tmp_path / "a"))
    killed = ProcessFailure(local_rank=1, pid=2, exitcode=-signal.SIGKILL, error_file=str(tmp_path / "b"))
    killed.timestamp = stopped.timestamp  # whole seconds: the same one
    assert signalled({0: stopped, 1: killed})[0] == 1
    assert signalled({0: stopped})[0] == 0  # a SIGTERM alone is still named (sent from outside)
