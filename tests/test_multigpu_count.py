"""train.gpus (or `resume --gpus`) above what the instance has is refused before anything is launched.

The test instance (sshd on this machine) lists no GPU, so a CPU job may run one process a core: 1000
is more than any test machine has. Submit refuses it before the upload, naming train.gpus, the count
found and what to do; `resume JOB --gpus 1000` refuses it the same way (naming --gpus), here on a job
whose folder is gone, where the old code went on to look for a checkpoint to upload.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from jobfiles import cli, write_job
from test_faults import first_json, instance, tiny_model, wait_for  # noqa: F401

from jobs.layout import JOB_FILES

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


def test_resume_refuses_more_processes_than_cores(tmp_path: Path, sshd, tmux_socket, tiny_model) -> None:  # noqa: F811
    remote = tmp_path / "remote"
    job = write_job(tmp_path / "job", model=tiny_model, instance=instance(sshd, remote, tmux_socket),
                    train={"max_steps": 100000})  # fmt: skip
    job_id = first_json(cli("submit", str(job), "--json").stdout)["job_id"]
    job_dir = remote / "jobs" / job_id
    wait_for(lambda: (job_dir / JOB_FILES["state"]).exists(), timeout=120)
    cli("cancel", job_id, timeout=300)
    shutil.rmtree(job_dir)
    res = cli("resume", job_id, "--gpus", TOO_MANY, check=False)
    assert res.returncode == 2, res.stdout + res.stderr
    assert f"--gpus {TOO_MANY}" in res.stderr and "CPU core(s)" in res.stderr, res.stderr
    assert "use --gpus " in res.stderr, res.stderr
    assert not job_dir.exists(), "nothing was launched"
    status = json.loads(cli("status", job_id, "--json").stdout)
    assert status["state"] != "running"
