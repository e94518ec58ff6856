"""`autodl-run resume JOB --gpus N` through the real CLI, sshd, tmux and torchrun (two CPU processes, gloo).

A job submitted with train.gpus = 2 (one micro-batch a rank, two a step) is cancelled after a checkpoint:
rank 0 is frozen right after saving step-2 (tests/stophook) until cancel's signal is pending on it, so the
cancel never races the job's end, however fast the machine.
- `--gpus 3` cannot split the checkpoint's two micro-batches a step: refused before anything is
  launched, naming the numbers that can;
- `--gpus 1` continues on one process from that checkpoint (one process accumulating two) to `done`;
- then, its folder gone, `--gpus 1000` (more than the instance's cores) is refused before anything is
  launched, naming --gpus (test_multigpu_count's resume case, on this job: one worker launch fewer).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from jobfiles import cli, cli_here, write_job
from test_faults import (  # noqa: F401
    arm,
    cancel_frozen,
    events_of,
    first_json,
    instance,
    steps_on_disk,
    stop_signal_pending,
    tiny_model,
    wait_for,
    wait_stopped,
)

from jobs import events as ev

pytestmark = [pytest.mark.slow, pytest.mark.ssh]
STEPS = 40
TOO_MANY = "1000"  # processes: more than any test machine has cores (test_multigpu_count.py)
MICRO = 128


def test_resume_onto_another_number_of_gpus(tmp_path: Path, sshd, tmux_socket, tiny_model) -> None:  # noqa: F811
    stops = tmp_path / "stops"
    arm(stops, "after", 2)
    job = write_job(
        tmp_path / "job", model=tiny_model, instance=instance(sshd, tmp_path / "remote", tmux_socket, stops),
        train={"max_steps": STEPS, "save_steps": 2, "gpus": 2, "micro_batch_tokens": MICRO,
               "global_batch_tokens": 2 * MICRO, "save_every_minutes": 0}, rows=32,
    )  # fmt: skip
    job_id = first_json(cli_here("submit", str(job), "--json").stdout)["job_id"]
    job_dir = tmp_path / "remote" / "jobs" / job_id
    frozen = wait_stopped(stops, "after", 2, job_dir)
    cancel_frozen(job_id, frozen)
    first = events_of(job_dir)
    started = next(e for e in first if isinstance(e, ev.Started))
    assert started.world_size == 2 and started.grad_accum == 1
    last = steps_on_disk(job_dir)[-1]
    assert last < STEPS, "the job ended before the cancel: make it longer"

    res = cli("resume", job_id, "--gpus", "3", check=False)
    assert res.returncode != 0
    assert "2 micro-batches a step" in res.stderr and "--gpus one of [1, 2]" in res.stderr, res.stderr
    assert len(events_of(job_dir)) == len(first), "nothing was launched"
    res = cli("resume", job_id, "--gpus", "two", check=False)
    assert res.returncode == 2 and "train.gpus (--gpus)" in res.stderr, res.stderr

    cli("resume", job_id, "--gpus", "1")
    cli_here("tail", job_id)  # waits for the end
    second = events_of(job_dir)[len(first):]
    again = next(e for e in second if isinstance(e, ev.Started))
    assert again.world_size == 1 and again.grad_accum == 2 and again.resumed_from_step == last
    assert [e.step for e in second if isinstance(e, ev.Step)] == list(range(last + 1, STEPS + 1))
    done = second[-1]
    assert isinstance(done, ev.Done) and done.steps == STEPS and not done.stopped
    status = json.loads(cli("status", job_id, "--json").stdout)
    assert status["state"] == "done"

    # test_multigpu_count's resume: more processes than the instance has cores, on a job whose folder is gone
    # (where the old code went on to look for a checkpoint to upload), is refused before anything is launched
    shutil.rmtree(job_dir)
    res = cli("resume", job_id, "--gpus", TOO_MANY, check=False)
    assert res.returncode == 2, res.stdout + res.stderr
    assert f"--gpus {TOO_MANY}" in res.stderr and "CPU core(s)" in res.stderr, res.stderr
    assert "use --gpus " in res.stderr, res.stderr
    assert not job_dir.exists(), "nothing was launched"
    status = json.loads(cli("status", job_id, "--json").stdout)
    assert status["state"] != "running"
