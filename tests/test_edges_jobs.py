"""Rough edges of issue 13 that need a job that really ran (tiny model, CPU, the local target)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
from jobfiles import cli, cli_here, write_job
from tinymodel import make_model

pytestmark = pytest.mark.slow


def local(tmp_path: Path, tmux_socket: str) -> dict:
    return {"host": "local", "remote_root": str(tmp_path / "remote"), "tmux_socket": tmux_socket,
            "python": sys.executable}  # fmt: skip


# A finished job from a relative model path with skipped rows, that cannot be cancelled: test_e2e's
# test_submit_follow_fetch_on_the_local_target (its job, fetched there too).


def test_a_relative_model_path_that_is_not_there_is_refused_at_check(tmp_path: Path, tmux_socket: str) -> None:
    job = write_job(tmp_path / "job", model="./nowhere", instance=local(tmp_path, tmux_socket))
    res = cli("check", str(job), check=False)
    assert res.returncode == 2 and "model.name_or_path" in res.stderr and "nowhere" in res.stderr


def test_a_dataset_with_nothing_to_train_is_refused_before_launch_with_a_hint_that_helps(
    tmp_path: Path, tmux_socket: str, local_home: Path
) -> None:
    """Every prompt is longer than max_length: truncation leaves nothing to train. This used to launch and
    fail on the worker with a DataError, after which `fetch` and `resume` gave hints that could not help;
    the laptop now refuses it before anything is launched (issue 12) and says what to change."""
    folder = tmp_path / "job"
    make_model(folder / "base")
    job = write_job(folder, model=folder / "base", instance=local(tmp_path, tmux_socket),
                    data={"max_length": 16, "overlong": "truncate"})  # fmt: skip
    sub = cli_here("submit", str(job), "--follow", check=False)
    assert sub.returncode == 3 and "nothing to train" in sub.stderr, sub.stderr
    assert "data.max_length" in sub.stderr.split("hint:", 1)[1]
    assert json.loads(cli("ls", "--json").stdout) == []  # nothing was launched, nothing to fetch or resume
    assert not (tmp_path / "remote" / "jobs").exists() or not any((tmp_path / "remote" / "jobs").iterdir())


# The damaged-checkpoint resume shares test_session's submitted-and-resumed job: see
# test_session.test_submit_and_resume_print_the_same_timed_steps_and_resume_skips_a_damaged_checkpoint.
