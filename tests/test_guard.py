"""The guard (remote_worker.guard): its decisions on a job folder, and the real process acting on them.

The shutdown command is always a harmless `touch FILE` here; the default /usr/bin/shutdown runs only
on a host that looks like AutoDL, which a test checks too.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from jobs.manifest import verify_manifest, write_manifest
from jobs.spec import JobSpec, WorkerJob
from remote_worker import guard as guard_mod
from remote_worker.guard import Guard

REPO = Path(__file__).resolve().parent.parent


class Clock:
    def __init__(self, t: float = 1000.0):
        self.t = t

    def __call__(self) -> float:
        return self.t


def make_job(root: Path, job_id: str = "j1", **instance) -> WorkerJob:
    job_dir = root / "jobs" / job_id
    job_dir.mkdir(parents=True)
    spec = JobSpec.model_validate(
        {
            "name": "g",
            "instance": {
                "host": "example.invalid",
                "shutdown_command": f"touch {root / 'shutdown-ran'}",
                **instance,
            },
            "model": {"name_or_path": "m"},
            "data": {"train": "t"},
        }
    )
    job = WorkerJob(job_id=job_id, spec=spec, data_dir=str(root / "data"), job_dir=str(job_dir))
    (job_dir / "job.json").write_text(job.model_dump_json())
    return job


def finish(job: WorkerJob, state: str = "done", adapter: bool = True) -> str | None:
    d = Path(job.job_dir)
    (d / "state").write_text(state + "\n")
    (d / "exit_code").write_text("0\n" if state == "done" else "1\n")
    if not adapter:
        return None
    a = d / "output" / "adapter"
    a.mkdir(parents=True)
    (a / "adapter_model.safetensors").write_bytes(b"weights")
    (a / "adapter_config.json").write_text("{}")
    return write_manifest(a)


def checkpoint(job: WorkerJob, step: int) -> Path:
    c = Path(job.job_dir) / "output" / "checkpoints" / f"step-{step}"
    (c / "adapter").mkdir(parents=True)
    (c / "optimizer.pt").write_bytes(b"adam" * 10)
    (c / "adapter" / "adapter_model.safetensors").write_bytes(b"w")
    write_manifest(c / "adapter")
    write_manifest(c)
    return c


def ack(job: WorkerJob, sha: str) -> None:
    (Path(job.job_dir) / "fetched.json").write_text(json.dumps({"manifest_sha256": sha, "what": "adapter"}))


def lease(job: WorkerJob, mtime: float) -> Path:
    p = Path(job.job_dir) / "fetching.abcd"
    p.touch()
    os.utime(p, (mtime, mtime))
    return p


@pytest.fixture
def running_process(tmp_path: Path):
    """Start a process whose cwd is a folder: what `alive` takes for a running job's wrapper."""
    procs = []

    def start(folder: Path) -> subprocess.Popen:
        p = subprocess.Popen(["sleep", "60"], cwd=folder)
        (folder / "pid").write_text(f"{p.pid}\n")
        procs.append(p)
        return p

    yield start
    for p in procs:
        p.kill()
        p.wait()


# --- decisions ------------------------------------------------------------------------------------


def test_fetched_policy_waits_for_an_acknowledgement_of_this_very_adapter(tmp_path, running_process):
    job = make_job(tmp_path, idle_grace_minutes=10)
    clock = Clock()
    g = Guard(job, clock=clock)
    proc = running_process(Path(job.job_dir))
    assert g.decide(clock.t).reason == "running"
    proc.kill()
    proc.wait()
    sha = finish(job)
    d = g.decide(clock.t)
    assert (d.action, d.reason) == ("wait", "waiting for the fetch")
    ack(job, "0" * 64)  # some other adapter: not good enough
    assert g.decide(clock.t).action == "wait"
    ack(job, sha)
    d = g.decide(clock.t + 1)
    assert (d.action, d.reason) == ("shutdown", "fetched")


def test_no_acknowledgement_within_the_grace_shuts_down_anyway(tmp_path):
    job = make_job(tmp_path, idle_grace_minutes=1)
    finish(job)
    clock = Clock()
    g = Guard(job, clock=clock)
    assert g.decide(clock.t).action == "wait"  # the end is noticed now
    assert g.decide(clock.t + 59).action == "wait"
    d = g.decide(clock.t + 60)
    assert (d.action, d.reason) == ("shutdown", "grace")


def test_never_while_a_fetch_is_in_progress(tmp_path):
    job = make_job(tmp_path, idle_grace_minutes=1)
    sha = finish(job)
    clock = Clock(time.time())
    g = Guard(job, clock=clock)
    g.decide(clock.t)
    held = lease(job, clock.t + 100)  # the client keeps touching it
    clock.t += 120  # past the grace
    assert g.decide(clock.t).reason == "fetch in progress"
    ack(job, sha)  # acknowledged, but the lease is still held (e.g. the optimizer state is coming)
    assert g.decide(clock.t).reason == "fetch in progress"
    os.utime(held, (clock.t - guard_mod.LEASE_S - 1,) * 2)  # the client died: the lease goes stale
    assert g.decide(clock.t).reason == "fetched"
    held.unlink()
    assert g.decide(clock.t).reason == "fetched"


def test_done_policy_and_never_policy(tmp_path):
    done_job = make_job(tmp_path, "a", shutdown_after="done")
    finish(done_job)
    assert Guard(done_job).decide(time.time()).reason == "done"
    never = make_job(tmp_path, "b", shutdown_after="never")
    assert Guard(never).decide(time.time()).action == "exit"


def test_a_failed_job_idles_for_the_grace_then_shuts_down(tmp_path, running_process):
    job = make_job(tmp_path, idle_grace_minutes=2, shutdown_after="done")
    finish(job, "failed", adapter=False)
    clock = Clock()
    g = Guard(job, clock=clock)
    assert (g.decide(clock.t).action, g.decide(clock.t + 100).action) == ("wait", "wait")
    proc = running_process(Path(job.job_dir))  # resumed on this instance: back to watching
    assert g.decide(clock.t + 110).reason == "running"
    proc.kill()
    proc.wait()
    assert g.decide(clock.t + 200).action == "wait"  # the grace counts from the new end
    assert g.decide(clock.t + 320).reason == "idle"


# --- the process -----------------------------------------------------------------------------------


def run_guard(job: WorkerJob, env: dict | None = None, timeout: float = 60) -> subprocess.Popen:
    e = {**os.environ, "PYTHONPATH": str(REPO), "AUTODL_RUN_GUARD_POLL_S": "0.1", **(env or {})}
    log = open(Path(job.job_dir) / "guard.log", "w")
    return subprocess.Popen(
        [sys.executable, "-m", "remote_worker.guard", str(Path(job.job_dir) / "job.json")],
        env=e, stdout=log, stderr=subprocess.STDOUT,
    )  # fmt: skip


def status(job: WorkerJob) -> dict:
    return json.loads((Path(job.job_dir) / "guard" / "status.json").read_text())


def test_the_process_shuts_down_only_after_a_verified_fetch(tmp_path):
    job = make_job(tmp_path, idle_grace_minutes=10)
    sha = finish(job)
    proc = run_guard(job)
    try:
        time.sleep(1.0)
        assert not (tmp_path / "shutdown-ran").exists()
        assert status(job)["phase"] == "waiting"
        ack(job, sha)
        assert proc.wait(timeout=30) == 0
    finally:
        proc.kill()
    assert (tmp_path / "shutdown-ran").exists()
    st = status(job)
    assert (st["phase"], st["reason"], st["command_rc"]) == ("shut down", "fetched", 0)
    assert st["copied_to"] is None  # the laptop has it: nothing to copy


def test_the_process_copies_to_autodl_fs_after_the_grace(tmp_path):
    fs = tmp_path / "autodl-fs"
    fs.mkdir()
    job = make_job(tmp_path, idle_grace_minutes=0.02)  # 1.2 s
    sha = finish(job)
    t = time.time()
    proc = run_guard(job, env={"AUTODL_RUN_FS": str(fs)})
    assert proc.wait(timeout=30) == 0
    assert time.time() - t >= 1.2
    copied = fs / "autodl-run" / "j1" / "adapter"
    assert verify_manifest(copied) == sha
    st = status(job)
    assert (st["reason"], st["copied_to"]) == ("grace", str(copied))
    assert (tmp_path / "shutdown-ran").exists()


def test_the_process_waits_for_a_fetch_in_progress(tmp_path):
    job = make_job(tmp_path, idle_grace_minutes=0.01)
    finish(job)
    held = lease(job, time.time())
    proc = run_guard(job)
    try:
        deadline = time.time() + 3
        while time.time() < deadline:  # well past the grace, the lease is held (and refreshed)
            os.utime(held)
            assert proc.poll() is None and not (tmp_path / "shutdown-ran").exists()
            time.sleep(0.2)
        assert status(job)["reason"] == "fetch in progress"
        held.unlink()
        assert proc.wait(timeout=30) == 0
    finally:
        proc.kill()
    assert (tmp_path / "shutdown-ran").exists()


def test_a_failed_job_keeps_its_newest_checkpoint_on_autodl_fs(tmp_path):
    fs = tmp_path / "autodl-fs"
    fs.mkdir()
    job = make_job(tmp_path, idle_grace_minutes=0.01)
    finish(job, "failed", adapter=False)
    checkpoint(job, 10)
    newest = checkpoint(job, 20)
    proc = run_guard(job, env={"AUTODL_RUN_FS": str(fs)})
    assert proc.wait(timeout=30) == 0
    copied = fs / "autodl-run" / "j1" / "checkpoints" / "step-20"
    assert verify_manifest(copied) == hashlib.sha256((newest / "manifest.json").read_bytes()).hexdigest()
    assert status(job)["reason"] == "idle" and (tmp_path / "shutdown-ran").exists()


def test_another_running_job_keeps_the_instance_up(tmp_path, running_process):
    job = make_job(tmp_path, "a", shutdown_after="done")
    finish(job)
    other = make_job(tmp_path, "b")
    running_process(Path(other.job_dir))
    assert run_guard(job).wait(timeout=30) == 0
    assert not (tmp_path / "shutdown-ran").exists()
    assert "job b runs on this instance" in status(job)["message"]


def test_the_default_command_runs_only_on_autodl(tmp_path, monkeypatch):
    job = make_job(tmp_path, shutdown_after="done")
    job.spec.instance.shutdown_command = guard_mod.DEFAULT_COMMAND
    finish(job)
    monkeypatch.setattr(guard_mod, "AUTODL_FILES", ())
    for var in guard_mod.AUTODL_ENV:
        monkeypatch.delenv(var, raising=False)
    ran = []
    monkeypatch.setattr(guard_mod.subprocess, "run", lambda *a, **k: ran.append(a))
    assert Guard(job).run(sleep=lambda s: None) == 0
    assert ran == [] and status(job)["phase"] == "not shut down"
    assert "set instance.shutdown_command" in status(job)["message"]
    monkeypatch.setenv("AutoDLContainerUUID", "abc")
    assert guard_mod.on_autodl()
    monkeypatch.setattr(guard_mod, "DEFAULT_COMMAND", "/bin/systemctl")  # a real machine's power-off
    assert not guard_mod.default_command_safe()


def test_a_never_policy_guard_exits_at_once(tmp_path):
    job = make_job(tmp_path, shutdown_after="never")
    assert run_guard(job).wait(timeout=30) == 0
    assert status(job)["phase"] == "exited"
