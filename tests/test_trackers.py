"""Trackers (issue 13): TensorBoard for every job, SwanLab and W&B from `[track] report_to` through
transformers' own integrations; one that cannot connect warns (a `warning` event and a log line) and
never stops training; AutoDL's network_turbo reaches the trackers' process only once the model is loaded.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from test_worker_run import REPO, make_job, make_model, read_events, run_worker

from jobs.events import EventWriter
from jobs.spec import JobSpec
from remote_worker import callbacks


class Boom:
    def __init__(self):
        self.calls = 0

    def on_log(self, *a, **k):
        self.calls += 1
        raise ConnectionError("api.example: connection refused")


def test_a_tracker_that_raises_warns_once_and_is_switched_off(tmp_path: Path) -> None:
    from jobs.events import parse

    writer = EventWriter(tmp_path / "events.jsonl")
    inner = Boom()
    guarded = callbacks.GuardedTracker(inner, "wandb", writer)
    for _ in range(3):
        assert guarded.on_log(None, None, None, logs={"loss": 1.0}) is None
    writer.close()
    events = [parse(ln) for ln in (tmp_path / "events.jsonl").read_text().splitlines()]
    assert inner.calls == 1 and [e.type for e in events] == ["warning"]
    assert events[0].source == "wandb" and "connection refused" in events[0].message


def test_network_turbo_sets_the_proxy_for_this_process(tmp_path: Path, monkeypatch) -> None:
    for var in callbacks.PROXY_VARS:
        monkeypatch.delenv(var, raising=False)
    turbo = tmp_path / "network_turbo"
    turbo.write_text('echo "设置成功"\nexport http_proxy=http://10.0.0.7:12798 && export https_proxy=http://10.0.0.7:12798\n')
    writer = EventWriter(tmp_path / "events.jsonl")
    found = callbacks.turbo_for_trackers(writer, str(turbo))
    assert found == {"http_proxy": "http://10.0.0.7:12798", "https_proxy": "http://10.0.0.7:12798"}
    assert os.environ["https_proxy"] == "http://10.0.0.7:12798"
    assert callbacks.turbo_for_trackers(writer, str(tmp_path / "absent")) == {}  # not AutoDL: nothing


def test_trackers_asked_for_come_after_tensorboard() -> None:
    spec = JobSpec.model_validate({"name": "n", "model": {"name_or_path": "m"}, "data": {"train": "t"},
                                   "track": {"report_to": ["swanlab", "wandb", "wandb"]}})  # fmt: skip
    assert callbacks.trackers(spec) == (["tensorboard", "swanlab", "wandb"], [])
    with pytest.raises(ValueError):
        JobSpec.model_validate({"name": "n", "model": {"name_or_path": "m"}, "data": {"train": "t"},
                                "track": {"report_to": ["myspace"]}})  # fmt: skip


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    return make_model(tmp_path_factory.mktemp("tiny"))


@pytest.mark.slow
def test_trackers_that_cannot_connect_warn_and_training_finishes(tmp_path: Path, model_dir: Path, monkeypatch) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    # Online, with endpoints on a closed port of this machine: no network needed, every connection refused.
    monkeypatch.setenv("WANDB_MODE", "online")
    monkeypatch.setenv("WANDB_API_KEY", "x" * 40)
    monkeypatch.setenv("WANDB_BASE_URL", "http://127.0.0.1:9")
    monkeypatch.setenv("WANDB_INIT_TIMEOUT", "3")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    monkeypatch.setenv("SWANLAB_API_KEY", "k" * 21)
    monkeypatch.setenv("SWANLAB_API_HOST", "http://127.0.0.1:9/api")
    monkeypatch.setenv("SWANLAB_WEB_HOST", "http://127.0.0.1:9")
    monkeypatch.setenv("SWANLAB_SAVE_DIR", str(tmp_path / "swan"))
    job = make_job(tmp_path, str(model_dir), train={"max_steps": 4})
    spec = job.spec.model_copy(update={"track": job.spec.track.model_copy(update={"report_to": ["wandb", "swanlab"]})})
    (tmp_path / "job.json").write_text(job.model_copy(update={"spec": spec}).model_dump_json(indent=1))
    before = _swanlog_in_cwd()
    proc = run_worker(tmp_path / "job.json")
    assert _swanlog_in_cwd() == before  # the worker's cwd (the repository here) gets no swanlog/
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    events = read_events(job.job_dir)
    assert events[-1].type == "done" and events[-1].steps == 4
    warned = {e.source for e in events if e.type == "warning"}
    assert warned == {"wandb", "swanlab"}, [e for e in events if e.type == "warning"]
    assert "warning: wandb failed" in proc.stderr and "warning: swanlab failed" in proc.stderr
    assert (Path(job.job_dir) / "swanlog").is_dir()  # SwanLab's files in the job folder, not the worker's cwd
    acc = EventAccumulator(str(Path(job.job_dir) / "tensorboard"))  # TensorBoard went on regardless
    acc.Reload()
    assert [s.step for s in acc.Scalars("train/loss")] == [1, 2, 3, 4]


def _swanlog_in_cwd() -> set[str]:
    return {p.name for p in (REPO / "swanlog").glob("*")} if (REPO / "swanlog").is_dir() else set()


@pytest.mark.slow
def test_swanlab_local_mode_logs_inside_the_job_folder(tmp_path: Path, model_dir: Path, monkeypatch) -> None:
    monkeypatch.delenv("SWANLAB_LOGDIR", raising=False)
    monkeypatch.setenv("SWANLAB_SAVE_DIR", str(tmp_path / "swan"))
    job = make_job(tmp_path, str(model_dir), train={"max_steps": 2})
    track = job.spec.track.model_copy(update={"report_to": ["swanlab"], "swanlab_mode": "local"})
    (tmp_path / "job.json").write_text(
        job.model_copy(update={"spec": job.spec.model_copy(update={"track": track})}).model_dump_json(indent=1)
    )
    before = _swanlog_in_cwd()
    proc = run_worker(tmp_path / "job.json")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    events = read_events(job.job_dir)
    assert events[-1].type == "done" and not [e for e in events if e.type == "warning"], events
    runs = list((Path(job.job_dir) / "swanlog").glob("run-*/*.swanlab"))
    assert runs and runs[0].stat().st_size > 0, list((Path(job.job_dir)).rglob("*"))
    assert _swanlog_in_cwd() == before
