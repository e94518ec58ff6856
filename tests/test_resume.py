"""Resume on the tiny model: an interrupted-then-resumed run ends where an uninterrupted one does.

The same job trains three ways: straight through; stopped at a step by a (simulated) SIGTERM and
resumed in-process; and as the real `python -m remote_worker`, sent a real SIGTERM mid-run, then
started again. Each resumed run ends at the same global step with the same final loss (within
1e-3): global step, optimizer, LR schedule (cosine, with warmup), data order across epochs and
the RNG all continue.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("peft")

import tinyjob  # noqa: E402
from jobfiles import run_in_process  # noqa: E402
from test_faults import STOPHOOK, arm, wait_stopped  # noqa: E402

from jobs import events as ev  # noqa: E402
from jobs.manifest import verify_manifest  # noqa: E402
from jobs.spec import JobSpec, WorkerJob  # noqa: E402

pytestmark = pytest.mark.slow
data_dir, model_dir, one_thread = tinyjob.data_dir, tinyjob.model_dir, tinyjob.one_thread  # shared module fixtures
REPO = Path(__file__).resolve().parent.parent
STEPS = 40
DATA_REPEATS = 4  # tinyjob.data_dir




def make_job(folder: Path, model_dir: Path, data_dir: Path, **train) -> WorkerJob:
    spec = JobSpec.model_validate(
        {
            "name": "resume",
            "model": {"name_or_path": str(model_dir)},
            "data": {"train": "train.jsonl", "max_length": 64},
            "quant": {"bits": 16},
            "lora": {"r": 8, "alpha": 16},
            "train": {
                "max_steps": STEPS,
                "learning_rate": 5e-3,
                "lr_scheduler": "cosine",  # the schedule must continue, not restart
                "warmup_ratio": 0.1,
                "micro_batch_tokens": 96,  # a few micro-batches an epoch: the run spans several epochs
                "device": "cpu",
                "save_every_minutes": 0,
                **train,
            },
        }
    )
    job = WorkerJob(
        job_id=folder.name,
        spec=spec,
        data_dir=str(data_dir),
        job_dir=str(folder / "job"),
        hf_home=str(folder / "hf"),
    )
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "job.json").write_text(job.model_dump_json(indent=1))
    return job


def read_events(job_dir: str | Path) -> list:
    return [ev.parse(ln) for ln in (Path(job_dir) / "events.jsonl").read_text().splitlines() if ln.strip()]


def losses(events: list) -> dict[int, float]:
    return {e.step: e.loss for e in events if isinstance(e, ev.Step)}


@pytest.fixture(scope="module")
def straight(tmp_path_factory, model_dir, data_dir) -> tuple[ev.Done, dict[int, float], dict[int, float]]:
    job = make_job(tmp_path_factory.mktemp("straight"), model_dir, data_dir, save_steps=10)
    done = run_in_process(job)
    events = read_events(job.job_dir)
    lrs = {e.step: e.lr for e in events if isinstance(e, ev.Step)}
    return done, losses(events), lrs


def test_a_resumed_run_ends_like_an_uninterrupted_one(tmp_path, model_dir, data_dir, straight, monkeypatch):
    from remote_worker import stopping
    from remote_worker.callbacks import EventCallback

    done_a, loss_a, lr_a = straight
    assert done_a.steps == STEPS
    job = make_job(tmp_path / "b", model_dir, data_dir, save_steps=10)

    original = EventCallback.on_step_end

    def sigterm_at_17(self, args, state, control, **kw):
        if state.global_step == 17:
            stopping.SIGNALS.requested = "SIGTERM"  # what the handler records for a real SIGTERM
        return original(self, args, state, control, **kw)

    monkeypatch.setattr(EventCallback, "on_step_end", sigterm_at_17)
    with pytest.raises(stopping.Interrupted, match="SIGTERM at step 17"):
        run_in_process(job)
    monkeypatch.setattr(EventCallback, "on_step_end", original)

    first = read_events(job.job_dir)
    saved = [e for e in first if isinstance(e, ev.Checkpoint)]
    assert [(c.step, c.reason) for c in saved] == [(10, "steps"), (17, "signal")]
    assert verify_manifest(saved[-1].path) == saved[-1].adapter_sha256
    assert verify_manifest(saved[-1].adapter_path) == saved[-1].adapter_manifest_sha256
    assert not (Path(job.job_dir) / "output" / "adapter").exists()  # stopped: no final adapter

    done_b = run_in_process(job)
    events = read_events(job.job_dir)
    second_run = events[len(first) :]
    started = next(e for e in second_run if isinstance(e, ev.Started))
    assert started.resumed_from_step == 17
    loss_b, lr_b = losses(second_run), {e.step: e.lr for e in second_run if isinstance(e, ev.Step)}
    assert sorted(loss_b) == list(range(18, STEPS + 1))  # the global step continues
    assert done_b.steps == done_a.steps == STEPS
    for step in loss_b:  # the LR schedule, data order and RNG continue: every later step matches
        assert lr_b[step] == pytest.approx(lr_a[step], rel=1e-9), step
        assert loss_b[step] == pytest.approx(loss_a[step], abs=1e-3), step
    assert abs(done_b.final_loss - done_a.final_loss) < 1e-3
    verify_manifest(done_b.adapter_path, done_b.manifest_sha256)


def test_a_real_sigterm_saves_a_checkpoint_and_the_rerun_resumes(tmp_path, model_dir, data_dir):
    """The worker process itself: SIGTERM mid-run -> checkpoint, `cancelled`; started again -> resumes."""
    total = 60
    # the worker freezes once its step-10 checkpoint is complete (tests/stophook): the SIGTERM lands
    # mid-run whatever the machine's speed
    job = make_job(tmp_path / "c", model_dir, data_dir, max_steps=total, save_steps=10)
    job_dir = Path(job.job_dir)
    stops = tmp_path / "stops"
    arm(stops, "after", 10)
    env = {**os.environ, "PYTHONPATH": f"{STOPHOOK}:{REPO}", "AUTODL_TEST_STOPS": str(stops),
           "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "OMP_NUM_THREADS": "1"}  # fmt: skip
    argv = [sys.executable, "-m", "remote_worker", str(tmp_path / "c" / "job.json")]
    proc = subprocess.Popen(
        argv, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    try:
        # on a busy 2-core machine its imports alone once took over 120 s (the wait is a hang guard)
        assert wait_stopped(stops, "after", 10, job_dir, timeout=600) == proc.pid
    except BaseException:
        proc.kill()
        raise
    proc.send_signal(signal.SIGTERM)
    proc.send_signal(signal.SIGCONT)
    out, _ = proc.communicate(timeout=300)  # a hang guard
    assert proc.returncode == 1, out
    assert (job_dir / "state").read_text().strip() == "cancelled"
    first = read_events(job_dir)
    saved = [e for e in first if isinstance(e, ev.Checkpoint)]
    assert [c.reason for c in saved] == ["steps", "signal"] and saved[0].step == 10, out
    assert 10 <= saved[1].step < total  # the step that was running when the signal came, finished
    failed = first[-1]
    assert isinstance(failed, ev.Failed) and failed.error_class == "Interrupted"
    assert failed.checkpoint == saved[1].path and "autodl-run resume" in failed.hint
    verify_manifest(saved[1].path, saved[1].adapter_sha256)

    res = subprocess.run(argv, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    second = read_events(job_dir)[len(first) :]
    assert next(e for e in second if isinstance(e, ev.Started)).resumed_from_step == saved[1].step
    assert isinstance(second[-1], ev.Done) and second[-1].steps == total
    steps = [e.step for e in second if isinstance(e, ev.Step)]
    assert steps == list(range(saved[1].step + 1, total + 1))
    assert (job_dir / "state").read_text().strip() == "done"
