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
import threading
import time
from pathlib import Path

import pytest

from client.remote import guard as guard_launch
from client.transport.local import LocalTransport
from jobs.layout import JobPaths
from jobs.manifest import verify_manifest, write_manifest
from jobs.protocol import GuardPhase, GuardStatus
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
        p = subprocess.Popen(["sleep", "600"], cwd=folder)  # alive whatever the test takes (killed after)
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
    mono = Clock()
    g = Guard(job, monotonic=mono)
    proc = running_process(Path(job.job_dir))
    assert g.decide().reason == "running"
    proc.kill()
    proc.wait()
    sha = finish(job)
    d = g.decide()
    assert (d.action, d.reason) == ("wait", "waiting for the fetch")
    ack(job, "0" * 64)  # some other adapter: not good enough
    assert g.decide().action == "wait"
    (Path(job.job_dir) / "fetched.json").write_text("{garbage")  # a malformed one neither
    assert g.decide().action == "wait"
    ack(job, sha)
    mono.t += 1
    d = g.decide()
    assert (d.action, d.reason) == ("shutdown", "fetched")


def test_no_acknowledgement_within_the_grace_shuts_down_anyway(tmp_path):
    job = make_job(tmp_path, idle_grace_minutes=1)
    finish(job)
    mono = Clock()
    g = Guard(job, monotonic=mono)
    assert g.decide().action == "wait"  # the end is noticed now
    mono.t += 59
    assert g.decide().action == "wait"
    mono.t += 1
    d = g.decide()
    assert (d.action, d.reason) == ("shutdown", "grace")


def test_never_while_a_fetch_is_in_progress(tmp_path):
    job = make_job(tmp_path, idle_grace_minutes=1)
    sha = finish(job)
    mono = Clock()
    g = Guard(job, monotonic=mono)
    g.decide()
    held = lease(job, time.time())
    mono.t += 120  # past the grace
    assert g.decide().reason == "fetch in progress"  # it appeared within LEASE_S
    mono.t += guard_mod.LEASE_S - 1
    os.utime(held, (time.time() - 3600,) * 2)  # touched: its mtime changed (whatever the wall clock says)
    assert g.decide().reason == "fetch in progress"
    ack(job, sha)  # acknowledged, but the lease is still held (e.g. the optimizer state is coming)
    mono.t += guard_mod.LEASE_S - 1
    assert g.decide().reason == "fetch in progress"
    mono.t += 2  # the client died: no change for LEASE_S, the lease is stale
    assert g.decide().reason == "fetched"
    held.unlink()
    assert g.decide().reason == "fetched"


def test_done_policy_and_never_policy(tmp_path):
    done_job = make_job(tmp_path, "a", shutdown_after="done")
    finish(done_job)
    assert Guard(done_job).decide().reason == "done"
    never = make_job(tmp_path, "b", shutdown_after="never")
    assert Guard(never).decide().action == "exit"


def test_a_failed_job_idles_for_the_grace_then_shuts_down(tmp_path, running_process):
    job = make_job(tmp_path, idle_grace_minutes=2, shutdown_after="done")
    finish(job, "failed", adapter=False)
    mono = Clock()
    g = Guard(job, monotonic=mono)
    assert g.decide().action == "wait"
    mono.t += 100
    assert g.decide().action == "wait"
    proc = running_process(Path(job.job_dir))  # resumed on this instance: back to watching
    mono.t += 10
    assert g.decide().reason == "running"
    proc.kill()
    proc.wait()
    mono.t += 90
    assert g.decide().action == "wait"  # the grace counts from the new end
    mono.t += 120
    assert g.decide().reason == "idle"


def test_another_job_being_launched_or_downloading_its_model_holds_the_shutdown(tmp_path, running_process):
    job = make_job(tmp_path, "b", shutdown_after="done")
    finish(job)
    other = make_job(tmp_path, "a")
    (Path(other.job_dir) / "launch.json").write_text("{not a launch record")  # bad: still a launch
    mono = Clock()
    g = Guard(job, monotonic=mono)
    d = g.decide()
    assert (d.action, d.reason) == ("wait", "another job") and "job a is being launched" in d.message
    mono.t += guard_mod.LAUNCH_S + 1  # never started (the laptop went away): it holds the instance no more
    assert g.decide().action == "shutdown"
    prefetch = Path(other.job_dir) / "prefetch"  # its model download runs: the job is on its way
    prefetch.mkdir()
    running_process(prefetch)
    d = g.decide()
    assert (d.action, d.message) == ("leave", "job a runs on this instance: its guard decides")


def test_other_jobs_that_lose_nothing_do_not_hold_the_shutdown(tmp_path):
    fs = tmp_path / "autodl-fs"
    job = make_job(tmp_path, "d", shutdown_after="done")
    finish(job)
    finish(make_job(tmp_path, "a"), "failed", adapter=False)  # nothing to keep
    finish(make_job(tmp_path, "b", shutdown_after="never"))  # its owner keeps it
    kept = make_job(tmp_path, "c")
    finish(kept)
    g = Guard(job, monotonic=Clock())
    assert g.decide().reason == "another job"  # c's adapter: neither fetched nor on autodl-fs
    fs.mkdir()
    os.environ["AUTODL_RUN_FS"] = str(fs)
    try:
        assert g.preserve(g.views["c"]) == str(fs / "autodl-run" / "c" / "adapter")  # e.g. by c's own guard
        assert g.decide().reason == "done"
    finally:
        del os.environ["AUTODL_RUN_FS"]


# --- the process -----------------------------------------------------------------------------------


def run_guard(job: WorkerJob, env: dict | None = None) -> subprocess.Popen:
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
        wait_for(lambda: status_reason(job) is not None)  # the guard has looked at the job
        assert not (tmp_path / "shutdown-ran").exists()
        assert status(job)["phase"] == "waiting"
        ack(job, sha)
        assert proc.wait(timeout=300) == 0
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
    assert proc.wait(timeout=300) == 0
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
        wait_for(lambda: status_reason(job) is not None)  # the guard runs (its start takes what it takes)

        def past_the_grace() -> bool:  # the guard said so: its shutdown time is now (not in the future)
            os.utime(held)  # the lease is held (and refreshed) meanwhile
            assert proc.poll() is None and not (tmp_path / "shutdown-ran").exists()
            st = status(job)
            return st["shutdown_at"] is not None and st["shutdown_at"] <= st["t"]

        # the status is rewritten once its shutdown time moved by 5 s: about 6 s after the start
        wait_for(past_the_grace)
        assert status(job)["reason"] == "fetch in progress"
        held.unlink()
        assert proc.wait(timeout=300) == 0
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
    assert proc.wait(timeout=300) == 0
    copied = fs / "autodl-run" / "j1" / "checkpoints" / "step-20"
    assert verify_manifest(copied) == hashlib.sha256((newest / "manifest.json").read_bytes()).hexdigest()
    assert status(job)["reason"] == "idle" and (tmp_path / "shutdown-ran").exists()


def test_another_running_job_keeps_the_instance_up(tmp_path, running_process):
    job = make_job(tmp_path, "a", shutdown_after="done")
    finish(job)
    other = make_job(tmp_path, "b")
    running_process(Path(other.job_dir))
    assert run_guard(job).wait(timeout=300) == 0
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
    assert run_guard(job).wait(timeout=300) == 0
    assert status(job)["phase"] == "exited"


# --- every job on the instance -----------------------------------------------------------------------


def wait_for(cond, timeout: float = 300.0) -> None:  # a hang guard
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


def status_reason(job: WorkerJob) -> str | None:
    try:
        return status(job)["reason"]
    except (OSError, ValueError):
        return None


def two_jobs(tmp_path: Path, grace_a: float) -> tuple[WorkerJob, str, WorkerJob, Path]:
    """Job a done and not fetched; job b done and acknowledged; an empty autodl-fs."""
    fs = tmp_path / "autodl-fs"
    fs.mkdir()
    a = make_job(tmp_path, "a", idle_grace_minutes=grace_a)
    sha_a = finish(a)
    b = make_job(tmp_path, "b", idle_grace_minutes=10)
    ack(b, finish(b))
    return a, sha_a, b, fs


def test_a_guard_waits_for_another_jobs_unfetched_adapter_to_be_acknowledged(tmp_path):
    a, sha_a, b, fs = two_jobs(tmp_path, grace_a=10)
    proc = run_guard(b, env={"AUTODL_RUN_FS": str(fs)})
    try:
        wait_for(lambda: status_reason(b) == "another job" or proc.poll() is not None)
        assert proc.poll() is None and not (tmp_path / "shutdown-ran").exists()
        assert "job a's adapter is neither fetched nor on autodl-fs" in status(b)["message"]
        ack(a, sha_a)  # the laptop fetched a's adapter too
        assert proc.wait(timeout=300) == 0
    finally:
        proc.kill()
    assert (tmp_path / "shutdown-ran").exists()
    assert status(b)["reason"] == "fetched" and not (fs / "autodl-run").exists()  # nothing needed copying


def test_after_the_other_jobs_grace_its_adapter_is_copied_to_autodl_fs_before_the_shutdown(tmp_path):
    a, sha_a, b, fs = two_jobs(tmp_path, grace_a=0.02)  # 1.2 s, counted from when b's guard saw a end
    proc = run_guard(b, env={"AUTODL_RUN_FS": str(fs)})
    try:
        assert proc.wait(timeout=300) == 0
    finally:
        proc.kill()
    copied = fs / "autodl-run" / "a" / "adapter"
    assert verify_manifest(copied) == sha_a
    assert (tmp_path / "shutdown-ran").exists()
    st = status(b)
    assert st["phase"] == "shut down" and f"job a's adapter copied to {copied}" in st["message"]
    assert "neither fetched nor on autodl-fs" in (Path(b.job_dir) / "guard.log").read_text()  # waited


def test_bad_files_in_another_jobs_folder_count_as_not_safe_and_never_stop_the_guard(tmp_path):
    a, sha_a, b, fs = two_jobs(tmp_path, grace_a=10)
    (Path(a.job_dir) / "job.json").write_text("{not json")  # its grace: b's guard's own
    (Path(a.job_dir) / "fetched.json").write_text('{"manifest_sha256": 5}')  # not an acknowledgement
    (Path(a.job_dir) / "state").write_bytes(b"\xff\xfe done")
    (Path(a.job_dir) / "exit_code").write_text("0\n")
    b.spec.instance.idle_grace_minutes = 0.02
    (Path(b.job_dir) / "job.json").write_text(b.model_dump_json())
    proc = run_guard(b, env={"AUTODL_RUN_FS": str(fs)})
    try:
        assert proc.wait(timeout=300) == 0
    finally:
        proc.kill()
    assert verify_manifest(fs / "autodl-run" / "a" / "adapter") == sha_a
    assert (tmp_path / "shutdown-ran").exists() and status(b)["phase"] == "shut down"


def test_a_clock_jump_forward_ends_neither_the_grace_nor_a_live_lease(tmp_path, monkeypatch):
    monkeypatch.setenv("AUTODL_RUN_GUARD_POLL_S", "0.05")
    job = make_job(tmp_path, idle_grace_minutes=60)
    sha = finish(job)
    held = lease(job, time.time())
    jump = [0.0]
    ticks: list[float] = []
    touching = [True]

    def sleep(s: float) -> None:  # the guard's pause; meanwhile the client keeps its lease fresh
        if touching[0]:
            os.utime(held)
        ticks.append(s)
        time.sleep(s)

    g = Guard(job, clock=lambda: time.time() + jump[0])  # the wall clock; durations: time.monotonic
    result: list[int] = []
    thread = threading.Thread(target=lambda: result.append(g.run(sleep=sleep)), daemon=True)
    thread.start()

    def ticks_after(n: int) -> None:
        start = len(ticks)
        wait_for(lambda: len(ticks) >= start + n or not thread.is_alive())

    ticks_after(3)
    assert status(job)["reason"] == "fetch in progress"
    jump[0] = 2 * 3600.0  # the instance's clock jumps two hours forward
    ticks_after(10)
    assert thread.is_alive() and not (tmp_path / "shutdown-ran").exists()
    assert status(job)["reason"] == "fetch in progress"  # the lease is still live
    touching[0] = False
    held.unlink()  # the fetch ended without an acknowledgement yet
    ticks_after(10)
    assert thread.is_alive() and not (tmp_path / "shutdown-ran").exists()  # the 60 min grace still runs
    st = status(job)
    assert st["reason"] == "waiting for the fetch"
    assert st["shutdown_at"] > time.time() + jump[0] + 50 * 60  # shown on the (jumped) wall clock
    ack(job, sha)
    thread.join(timeout=300)  # a hang guard
    assert result == [0] and status(job)["reason"] == "fetched" and (tmp_path / "shutdown-ran").exists()


# --- the client's side of the contract -------------------------------------------------------------


def test_the_client_reads_the_status_through_its_model_and_never_chokes_on_a_bad_one(tmp_path):
    job = make_job(tmp_path, idle_grace_minutes=10)
    finish(job)
    paths = JobPaths(job.job_dir)
    transport = LocalTransport()
    assert guard_launch.guard_status(transport, paths) is None  # no guard yet
    Guard(job, monotonic=Clock()).write_status(
        GuardPhase.WAITING, guard_mod.Decision("wait", guard_mod.Reason.WAITING_FOR_FETCH, "waiting for it"),
        "waiting for it",
    )  # fmt: skip
    st = guard_launch.guard_status(transport, paths)
    assert isinstance(st, GuardStatus) and st.phase is GuardPhase.WAITING and not st.phase.acted
    assert st.reason == "waiting for the fetch" and guard_launch.describe(st).startswith("waiting for it")
    for bad in ('{"phase": "exploded", "policy": "fetched"}', "[]", "{", "\xff"):
        Path(paths.guard_status).write_text(bad)
        assert guard_launch.guard_status(transport, paths) is None
    assert guard_launch.describe(None) == ""
