"""The guard waits for after-training tasks (eval, export): while one runs, and until its result is acknowledged."""

from __future__ import annotations

import json
from pathlib import Path

from jobs.layout import JobPaths
from jobs.manifest import write_manifest
from remote_worker.guard import Guard
from tests.test_guard import Clock, ack, finish, make_job, running_process  # noqa: F401 - a fixture


def test_an_eval_that_runs_or_waits_for_its_fetch_holds_the_shutdown(tmp_path, running_process):  # noqa: F811
    job = make_job(tmp_path, idle_grace_minutes=10)
    g = Guard(job, monotonic=Clock())
    ack(job, finish(job))
    task = JobPaths(job.job_dir).post("eval")
    Path(task.dir).mkdir(parents=True)
    proc = running_process(Path(task.dir))  # the eval runs: the job counts as running
    assert g.decide().reason == "running"
    proc.kill()
    proc.wait()
    result = Path(task.post_result)
    result.mkdir()
    (result / "eval.json").write_text("{}")
    sha = write_manifest(result)
    d = g.decide()
    assert (d.action, d.reason) == ("wait", "waiting for the fetch")  # the adapter is fetched, its eval is not
    Path(task.fetched).write_text(json.dumps({"manifest_sha256": "0" * 64, "what": "eval"}))
    assert g.decide().action == "wait"  # an acknowledgement of another result is not enough
    Path(task.fetched).write_text(json.dumps({"manifest_sha256": sha, "what": "eval"}))
    d = g.decide()
    assert (d.action, d.reason) == ("shutdown", "fetched")


def test_a_task_that_made_nothing_holds_nothing(tmp_path):
    job = make_job(tmp_path, idle_grace_minutes=10)
    ack(job, finish(job))
    Path(JobPaths(job.job_dir).post("export-merged").dir).mkdir(parents=True)  # failed: no result
    (Path(job.job_dir) / "post" / "not a task").mkdir()  # not ours
    d = Guard(job, monotonic=Clock()).decide()
    assert (d.action, d.reason) == ("shutdown", "fetched")
