"""Rough edges of issue 13 that need a job that really ran (tiny model, CPU, the local target)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
from jobfiles import cli, write_job
from tinymodel import make_model

pytestmark = pytest.mark.slow


def local(tmp_path: Path, tmux_socket: str) -> dict:
    return {"host": "local", "remote_root": str(tmp_path / "remote"), "tmux_socket": tmux_socket,
            "python": sys.executable}  # fmt: skip


def test_a_finished_job_from_a_relative_model_path_with_skipped_rows_cannot_be_cancelled(
    tmp_path: Path, tmux_socket: str, local_home: Path
) -> None:
    """The model given as `./base` on the local target, two bad rows skipped; then cancel on it, done."""
    folder = tmp_path / "job"
    make_model(folder / "base")
    job = write_job(folder, model="./base", instance=local(tmp_path, tmux_socket), data={"on_error": "skip"})
    with open(folder / "train.jsonl", "a") as f:
        f.write("{not json\n" + json.dumps({"unrelated": 1}) + "\n")
    sub = cli("submit", str(job), "--follow")
    job_id = sub.stdout.splitlines()[0].strip()
    assert "2 invalid rows skipped" in sub.stderr
    status = json.loads(cli("status", job_id, "--json").stdout)
    assert status["state"] == "done" and status["step"] == 6

    res = cli("cancel", job_id, check=False)
    assert res.returncode == 6 and "already ended (done)" in res.stderr, res.stderr
    assert "cancelled" not in res.stdout
    assert [j["state"] for j in json.loads(cli("ls", "--json").stdout)] == ["done"]
    res = cli("tail", job_id)
    assert "no final adapter" not in res.stdout + res.stderr


def test_a_relative_model_path_that_is_not_there_is_refused_at_check(tmp_path: Path, tmux_socket: str) -> None:
    job = write_job(tmp_path / "job", model="./nowhere", instance=local(tmp_path, tmux_socket))
    res = cli("check", str(job), check=False)
    assert res.returncode == 2 and "model.name_or_path" in res.stderr and "nowhere" in res.stderr
