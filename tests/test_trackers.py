"""Trackers (issue 13): TensorBoard for every job, SwanLab and W&B from `[track] report_to` through
transformers' own integrations; one that cannot connect warns (a `warning` event and a log line) and
never stops training; AutoDL's network_turbo reaches the trackers' process only once the model is loaded.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

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


# With a worker run (each was one of its own here, ~12 s of CPU only to import torch):
# - trackers that cannot connect warn and training finishes: test_worker_run.test_full_run asks for W&B and
#   SwanLab online, against a closed port;
# - SwanLab in local mode logs inside the job folder: test_model_source's
#   test_the_worker_trains_from_where_the_model_was_downloaded.
