"""train.gpus (or `resume --gpus`) above what the instance has is refused before anything is launched.

The test instance (sshd on this machine) lists no GPU, so a CPU job may run one process a core: 1000
is more than any test machine has. Submit refuses it before the upload, naming train.gpus, the count
found and what to do. `resume JOB --gpus 1000` refuses it the same way (naming --gpus) on a job whose
folder is gone: at the end of test_multigpu_resume.py, on the job it resumed (one worker launch fewer).
"""

from __future__ import annotations

from pathlib import Path

import pytest
from jobfiles import cli, write_job
from test_faults import instance, tiny_model  # noqa: F401

pytestmark = [pytest.mark.slow, pytest.mark.ssh]
TOO_MANY = "1000"


def test_submit_refuses_more_processes_than_cores(tmp_path: Path, sshd, tmux_socket, tiny_model) -> None:  # noqa: F811
    remote = tmp_path / "remote"
    job = write_job(tmp_path / "job", model=tiny_model, instance=instance(sshd, remote, tmux_socket),
                    train={"gpus": int(TOO_MANY)})  # fmt: skip
    res = cli("submit", str(job), check=False)
    assert res.returncode == 2, res.stdout + res.stderr
    assert f"train.gpus = {TOO_MANY}" in res.stderr and "CPU core(s)" in res.stderr, res.stderr
    assert "train.gpus = " in res.stderr.split("hint:", 1)[1], "the hint says which number to use"
    assert not (remote / "jobs").exists() and not (remote / "data").exists(), "nothing was uploaded or launched"
