"""Checkpoints complete or absent, a full disk, deadline margins, `--deadline`, and the progress of resumed runs.

No training here (see test_resume.py and test_faults.py): the checkpoint folders are made by hand,
the way the Trainer leaves them.
"""

from __future__ import annotations

import errno
import json
import os
import time
from datetime import datetime
from pathlib import Path

import pytest

from client.lifecycle.submit import parse_deadline
from client.views.render import Progress, event_line
from jobs import events as ev
from jobs.manifest import read_manifest, verify_manifest
from remote_worker import checkpoints
from remote_worker.stopping import DEFAULT_TRANSFER_BPS, Stopper

TRAINER_FILES = {
    "adapter_model.safetensors": b"A" * 3000,
    "adapter_config.json": b"{}",
    "tokenizer.json": b"{}",
    "optimizer.pt": b"O" * 6000,
    "scheduler.pt": b"S",
    "rng_state.pth": b"R",
    "trainer_state.json": b"{}",
    "training_args.bin": b"T",
}


def trainer_checkpoint(root: Path, step: int) -> Path:
    """What the Trainer writes: `checkpoint-N` with the adapter and the training state side by side."""
    d = root / f"checkpoint-{step}"
    d.mkdir(parents=True)
    for name, data in TRAINER_FILES.items():
        (d / name).write_bytes(data)
    return d


@pytest.fixture
def small_fs(tmpfs) -> Path:
    return tmpfs("1m")


def fill(folder: Path, leave: int = 0) -> Path:
    """Write a file until only `leave` bytes are free (ENOSPC stops it earlier if need be)."""
    path = folder / "filler"
    st = os.statvfs(folder)
    free = st.f_bavail * st.f_frsize - leave
    with open(path, "wb") as f:
        try:
            while free > 0:
                n = min(free, 1 << 16)
                f.write(b"\0" * n)
                free -= n
            f.flush()
        except OSError as exc:
            assert exc.errno == errno.ENOSPC
    return path


# --- complete or absent -----------------------------------------------------------------------------


def test_finalize_adds_the_adapter_folder_and_manifests_then_renames(tmp_path):
    root = tmp_path / "checkpoints"
    done = checkpoints.finalize(trainer_checkpoint(root, 10), 10)
    assert done.path == root / "step-10" and not (root / "checkpoint-10").exists()
    assert verify_manifest(done.path) == done.manifest_sha256
    assert verify_manifest(done.adapter_path) == done.adapter_manifest_sha256
    adapter_files = {e["path"] for e in read_manifest(done.adapter_path)["files"]}
    assert adapter_files == {"adapter_model.safetensors", "adapter_config.json", "tokenizer.json"}
    every = {e["path"] for e in read_manifest(done.path)["files"]}
    assert "optimizer.pt" in every and "adapter/adapter_model.safetensors" in every
    # hard links: the adapter folder costs no space
    assert (done.path / "adapter" / "adapter_model.safetensors").stat().st_ino == (
        done.path / "adapter_model.safetensors"
    ).stat().st_ino
    manifests = (
        (done.path / "manifest.json").stat().st_size,
        (done.adapter_path / "manifest.json").stat().st_size,
    )
    assert done.adapter_bytes == 3004 + manifests[1]
    assert done.bytes == sum(len(v) for v in TRAINER_FILES.values()) + manifests[0]


def test_an_interrupted_save_never_replaces_a_good_checkpoint(tmp_path):
    root = tmp_path / "checkpoints"
    checkpoints.finalize(trainer_checkpoint(root, 10), 10)
    half = trainer_checkpoint(root, 20)  # killed while writing: never renamed
    (half / "optimizer.pt").write_bytes(b"O" * 10)
    assert [p.name for p in checkpoints.complete(root)] == ["step-10"]
    assert checkpoints.latest_verified(root) == root / "step-10"
    assert checkpoints.remove_partials(root) == ["checkpoint-20"]
    assert sorted(p.name for p in root.iterdir()) == ["step-10"]


def test_rotation_keeps_the_newest_two_and_a_damaged_one_is_skipped(tmp_path):
    root = tmp_path / "checkpoints"
    for step in (5, 10, 15):
        checkpoints.finalize(trainer_checkpoint(root, step), step)
        checkpoints.rotate(root)
    assert [p.name for p in checkpoints.complete(root)] == ["step-10", "step-15"]
    (root / "step-15" / "optimizer.pt").write_bytes(b"bit rot")
    notes = []
    assert checkpoints.latest_verified(root, log=notes.append) == root / "step-10"
    assert "step-15 is damaged" in notes[0] and "optimizer.pt" in notes[0]


def test_saving_the_same_step_again_replaces_it_whole(tmp_path):
    root = tmp_path / "checkpoints"
    checkpoints.finalize(trainer_checkpoint(root, 10), 10)
    again = checkpoints.finalize(trainer_checkpoint(root, 10), 10)
    assert verify_manifest(again.path) == again.manifest_sha256
    assert sorted(p.name for p in root.iterdir()) == ["step-10"]


# --- a full disk ----------------------------------------------------------------------------------------


def test_an_event_that_does_not_fit_leaves_no_torn_line(small_fs):
    path = small_fs / "events.jsonl"
    writer = ev.EventWriter(path)
    fill(small_fs, leave=0)
    big = ev.Phase(phase="x", message="y" * 20000)  # more than the last page can take
    with pytest.raises(OSError) as info:
        for _ in range(100):
            writer.emit(big)
    assert info.value.errno == errno.ENOSPC
    data = path.read_bytes()
    assert data == b"" or data.endswith(b"\n")
    (small_fs / "filler").unlink()
    writer.emit(ev.Phase(phase="after"))
    writer.close()
    lines = path.read_text().splitlines()
    assert ev.parse(lines[-1]).phase == "after" and all(ev.parse(ln) for ln in lines)


def test_the_reserve_makes_room_to_report_a_full_disk(small_fs):
    job_dir = small_fs / "job"
    root = job_dir / "output" / "checkpoints"
    root.mkdir(parents=True)
    checkpoints.make_reserve(job_dir)
    assert (job_dir / ".reserve").stat().st_size == checkpoints.RESERVE_BYTES
    checkpoints.finalize(trainer_checkpoint(root, 10), 10)
    fill(small_fs)
    with pytest.raises(OSError) as info:  # the next save runs out of space half-way
        trainer_checkpoint(root, 20).joinpath("more").write_bytes(b"x" * 200_000)
    assert checkpoints.is_disk_full(info.value, job_dir)
    err = checkpoints.disk_full_error(job_dir, "job-1", root)
    assert "is full" in str(err) and "the last good checkpoint step-10 is intact" in str(err)
    assert "removed the half-written checkpoint-20" in str(err) and "autodl-run resume job-1" in err.hint
    assert not (job_dir / ".reserve").exists() and not (root / "checkpoint-20").exists()
    verify_manifest(root / "step-10")
    writer = ev.EventWriter(job_dir / "events.jsonl")  # the failure can still be written down
    writer.emit(ev.Failed(error_class="DiskFull", message=str(err)))
    writer.close()


def test_disk_full_is_recognized_through_wrapping_errors(tmp_path):
    inner = OSError(errno.ENOSPC, "No space left on device")
    outer = RuntimeError("saving failed")
    outer.__cause__ = inner
    assert checkpoints.is_disk_full(outer, tmp_path)
    assert not checkpoints.is_disk_full(RuntimeError("something else"), tmp_path)


# --- when to stop -----------------------------------------------------------------------------------------


def test_the_deadline_margin_grows_with_what_was_measured(tmp_path, monkeypatch):
    monkeypatch.setenv("AUTODL_RUN_DEADLINE_SAFETY_S", "10")
    s = Stopper(deadline_unix=10_000.0, job_dir=tmp_path, adapter_bytes=10 * 2**20)
    before = s.deadline_margin_s()
    # 40 MiB to fetch (3x the adapter for the checkpoint, plus the adapter) at the cautious default speed
    assert before == pytest.approx(10 + 1.5 * (1 + 30 / 100) + 1.5 * 40 * 2**20 / DEFAULT_TRANSFER_BPS + 5)
    s.note_step(2.0)
    s.note_save(checkpoint_bytes=100 * 2**20, adapter_bytes=20 * 2**20, seconds=8.0)
    (tmp_path / "transfer.json").write_text(json.dumps({"bytes_per_s": 12 * 2**20}))
    s._bps_read_at = -1e9
    assert s.deadline_margin_s() == pytest.approx(10 + 2.0 + 1.5 * 8.0 + 1.5 * 120 / 12 + 5)
    margin = s.deadline_margin_s()
    assert s.check(now=10_000 - margin - 1) is None
    assert s.check(now=10_000 - margin + 1) == "deadline"


def test_max_hours_saves_before_the_hard_limit():
    s = Stopper(max_hours=1.0, started_unix=0.0, adapter_bytes=2**20)
    s.note_save(3 * 2**20, 2**20, 4.0)
    assert s.check(now=3600 - s.hard_margin_s() - 1) is None
    assert s.check(now=3600 - s.hard_margin_s()) == "max_hours"
    assert Stopper().check(now=time.time()) is None


def test_parse_deadline():
    now = datetime(2026, 11, 28, 15, 0, 0).timestamp()
    assert parse_deadline("90m", now) == now + 5400
    assert parse_deadline("+1h30m", now) == now + 5400
    assert parse_deadline("2d", now) == now + 2 * 86400
    assert parse_deadline("45s", now) == now + 45
    assert parse_deadline("18:30", now) == datetime(2026, 11, 28, 18, 30).timestamp()
    assert parse_deadline("09:00", now) == datetime(2026, 11, 29, 9, 0).timestamp()  # tomorrow
    assert parse_deadline("2026-12-01 18:00", now) == datetime(2026, 12, 1, 18, 0).timestamp()
    assert parse_deadline("2026-12-01T18:00:00+00:00", now) == 1796148000.0
    for bad in ("soon", "", "3x", "25:00"):
        with pytest.raises(ValueError, match="cannot read the deadline"):
            parse_deadline(bad, now)


# --- what the client shows ---------------------------------------------------------------------------


def test_progress_of_a_resumed_job_counts_runs_not_gaps():
    p = Progress("j", price_per_hour=3.6)
    p.apply(ev.Phase(phase="setup", t=0.0))
    p.apply(ev.Started(total_steps=100, device="cpu", dtype="float32", attention="sdpa", quant="none",
                       trainable_params=1, total_params=2, train_sequences=1, train_tokens=1,
                       micro_batch_tokens=1, grad_accum=1, gradient_checkpointing=False, t=10.0))  # fmt: skip
    p.apply(ev.Checkpoint(step=40, path="/x/step-40", t=90.0))
    p.apply(ev.Failed(error_class="Interrupted", message="stopped by SIGTERM", t=100.0))
    assert p.failed and p.elapsed_s() == 100.0
    # an hour later, resumed
    p.apply(ev.Phase(phase="setup", t=3700.0))
    assert p.failed is None and p.runs == 2
    p.apply(ev.Started(total_steps=100, device="cpu", dtype="float32", attention="sdpa", quant="none",
                       trainable_params=1, total_params=2, train_sequences=1, train_tokens=1,
                       micro_batch_tokens=1, grad_accum=1, gradient_checkpointing=False,
                       resumed_from_step=40, t=3710.0))  # fmt: skip
    p.apply(ev.Step(step=50, total_steps=100, epoch=1.0, loss=1.0, lr=1e-4, elapsed_s=20.0, t=3730.0))
    assert p.eta_s == pytest.approx(20.0 / 10 * 50)  # from this run's rate, not 20 s for 50 steps
    assert p.elapsed_s(now=3730.0) == pytest.approx(130.0)
    spent, projected = p.spend(now=3730.0)
    assert spent == pytest.approx(0.13) and projected == pytest.approx(0.23)
    assert p.as_dict()["checkpoint"] == {"step": 40, "path": "/x/step-40"}
    done = ev.Done(
        adapter_path="/a", manifest_sha256="s", steps=60, total_steps=100, stopped="deadline", t=3800.0
    )
    p.apply(done)
    assert "done early (deadline): 60/100 steps, resumable" == p.phase
    assert "stopped early: deadline, 60 of 100 steps; resumable" in event_line(done)
