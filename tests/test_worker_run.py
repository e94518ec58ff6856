"""The worker end to end on the CPU: `python -m remote_worker job.json` trains the tiny Qwen2 for real."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("peft")

from jobfiles import PAIRS, chat, run_in_process  # noqa: E402
from safetensors.torch import load_file  # noqa: E402
from tinymodel import make_model  # noqa: E402

from jobs import events as ev  # noqa: E402
from jobs.manifest import verify_manifest  # noqa: E402
from jobs.spec import JobSpec, WorkerJob  # noqa: E402

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    return make_model(tmp_path_factory.mktemp("tiny"))


def make_job(
    tmp_path: Path, model_path: str, *, train: dict | None = None, bits: int = 16, evals=True
) -> WorkerJob:
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    (data_dir / "train.jsonl").write_text("".join(json.dumps(chat(q, a)) + "\n" for q, a in PAIRS * 4))
    if evals:
        (data_dir / "eval.jsonl").write_text("".join(json.dumps(chat(q, a)) + "\n" for q, a in PAIRS[:2]))
    spec = JobSpec.model_validate(
        {
            "name": "tiny",
            "model": {"name_or_path": model_path},
            "data": {"train": "train.jsonl", "max_length": 64},
            "quant": {"bits": bits},
            "train": {
                "max_steps": 30,
                "learning_rate": 1e-2,
                "micro_batch_tokens": 128,
                "device": "cpu",  # the same run on a GPU machine too (CI has none)
                **(train or {}),
            },
        }
    )
    job = WorkerJob(
        job_id="tiny-1",
        spec=spec,
        data_dir=str(data_dir),
        job_dir=str(tmp_path / "job"),
        hf_home=str(tmp_path / "hf"),
    )
    (tmp_path / "job.json").write_text(job.model_dump_json(indent=1))
    return job


def run_worker(job_json: Path) -> subprocess.CompletedProcess:
    pythonpath = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p)
    env = {**os.environ, "PYTHONPATH": pythonpath, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    return subprocess.run(
        [sys.executable, "-m", "remote_worker", str(job_json)],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


def read_events(job_dir: str | Path) -> list:
    return [
        ev.parse(line) for line in (Path(job_dir) / "events.jsonl").read_text().splitlines() if line.strip()
    ]


def lora_weights(adapter_dir: str | Path, kind: str) -> dict[str, torch.Tensor]:
    weights = load_file(str(Path(adapter_dir) / "adapter_model.safetensors"))
    return {k: v for k, v in weights.items() if kind in k}


def _swanlog_in_cwd() -> set[str]:
    return {p.name for p in (REPO / "swanlog").glob("*")} if (REPO / "swanlog").is_dir() else set()


@pytest.mark.slow
def test_full_run(tmp_path, model_dir, monkeypatch):
    """The whole run, with W&B and SwanLab asked for and neither able to connect: each warns (a `warning`
    event and a log line) and training finishes; TensorBoard logs regardless. (The trackers' part was
    test_trackers' own worker run: the same assertions on this run, one worker launch less.)"""
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
    job = make_job(tmp_path, str(model_dir), train={"save_steps": 10})
    track = job.spec.track.model_copy(update={"report_to": ["wandb", "swanlab"]})
    job = job.model_copy(update={"spec": job.spec.model_copy(update={"track": track})})
    (tmp_path / "job.json").write_text(job.model_dump_json(indent=1))
    before = _swanlog_in_cwd()
    proc = run_worker(tmp_path / "job.json")
    assert _swanlog_in_cwd() == before  # the worker's cwd (the repository here) gets no swanlog/
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    job_dir = Path(job.job_dir)
    assert (job_dir / "state").read_text().strip() == "done"

    events = read_events(job_dir)
    types = [e.type for e in events]
    assert types[-1] == "done" and "failed" not in types
    assert types.index("started") < types.index("step")
    phases = [e.phase for e in events if e.type == "phase"]
    for name in ("loading tokenizer", "tokenizing", "loading model", "training", "saving"):
        assert name in phases

    started = next(e for e in events if e.type == "started")
    assert (started.total_steps, started.device, started.quant, started.grad_accum) == (30, "cpu", "none", 1)
    assert started.train_sequences == 16 and started.micro_batch_tokens == 128
    assert 0 < started.trainable_params < started.total_params

    steps = [e for e in events if e.type == "step"]
    assert [s.step for s in steps] == list(range(1, 31))
    assert all(s.total_steps == 30 and s.tokens_per_s > 0 and s.grad_norm is not None for s in steps)
    tokens = [s.tokens for s in steps]
    assert tokens == sorted(tokens) and tokens[-1] > 30 * 30  # every step saw real tokens
    losses = [s.loss for s in steps]
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5 - 0.4, losses  # it memorizes

    evals = [e for e in events if e.type == "eval"]
    assert [e.step for e in evals] == [10, 20, 30]
    assert evals[-1].eval_loss < evals[0].eval_loss

    checkpoints = [e for e in events if e.type == "checkpoint"]
    assert [c.step for c in checkpoints] == [10, 20, 30]
    kept = sorted(p.name for p in (job_dir / "output" / "checkpoints").iterdir())
    assert kept == ["step-20", "step-30"]  # the newest two, each complete
    assert verify_manifest(checkpoints[-1].path) == checkpoints[-1].adapter_sha256

    done = events[-1]
    assert done.steps == 30 and done.final_loss == pytest.approx(losses[-1])
    assert Path(done.adapter_path) == job_dir / "output" / "adapter"
    assert verify_manifest(done.adapter_path, done.manifest_sha256) == done.manifest_sha256
    lora_b = lora_weights(done.adapter_path, "lora_B")
    assert lora_b and all(w.abs().sum() > 0 for w in lora_b.values())  # B starts at 0: it moved
    assert not list((job_dir / "output").glob("adapter.*"))  # no temp folder left behind

    warned = {e.source for e in events if e.type == "warning"}
    assert warned == {"wandb", "swanlab"}, [e for e in events if e.type == "warning"]
    assert "warning: wandb failed" in proc.stderr and "warning: swanlab failed" in proc.stderr
    assert (job_dir / "swanlog").is_dir()  # SwanLab's files in the job folder, not the worker's cwd
    acc = EventAccumulator(str(job_dir / "tensorboard"))  # TensorBoard went on regardless
    acc.Reload()
    assert [s.step for s in acc.Scalars("train/loss")] == list(range(1, 31))


@pytest.mark.slow
def test_4bit_on_cpu_trains_through_bitsandbytes(tmp_path, model_dir):
    pytest.importorskip("bitsandbytes")
    job = make_job(tmp_path, str(model_dir), bits=4, train={"max_steps": 12})
    done = run_in_process(job)  # the evaluations run the model in eval mode between training steps
    events = read_events(job.job_dir)
    assert next(e for e in events if e.type == "started").quant == "nf4"
    assert [e.step for e in events if e.type == "eval"] == [3, 6, 9, 12]
    losses = [e.loss for e in events if e.type == "step"]
    assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3 - 0.1, losses
    lora_b = lora_weights(done.adapter_path, "lora_B")
    assert lora_b and all(w.abs().sum() > 0 for w in lora_b.values())
    verify_manifest(done.adapter_path, done.manifest_sha256)


@pytest.mark.slow
def test_timer_checkpoints_keep_the_newest_two(tmp_path, model_dir):
    job = make_job(tmp_path, str(model_dir), train={"max_steps": 4, "save_every_minutes": 1e-6}, evals=False)
    run_in_process(job)
    checkpoints = [e for e in read_events(job.job_dir) if e.type == "checkpoint"]
    assert [c.step for c in checkpoints] == [1, 2, 3, 4]
    kept = sorted(p.name for p in (Path(job.job_dir) / "output" / "checkpoints").iterdir())
    assert kept == ["step-3", "step-4"]


@pytest.mark.slow
def test_the_deadline_stops_training_and_still_saves(tmp_path, model_dir):
    job = make_job(tmp_path, str(model_dir), evals=False)
    job.deadline_unix = time.time() + 60  # inside the margin kept for saving: stop after this step
    done = run_in_process(job)
    assert done.steps == 1
    verify_manifest(done.adapter_path, done.manifest_sha256)
    assert any(e.type == "phase" and "deadline" in e.message for e in read_events(job.job_dir))


def test_4bit_model_is_quantized_by_bitsandbytes(model_dir):
    bnb = pytest.importorskip("bitsandbytes")
    from remote_worker import recipe
    from remote_worker.probe import Probe

    spec = JobSpec.model_validate(
        {"name": "t", "model": {"name_or_path": str(model_dir)}, "data": {"train": "x"}}
    )
    model = recipe.load_model(str(model_dir), spec, Probe("cpu", "cpu", False, "float32", "sdpa", {}))
    q_proj = model.model.layers[0].self_attn.q_proj
    assert isinstance(q_proj, bnb.nn.Linear4bit) and q_proj.weight.quant_type == "nf4"
    assert model.config.use_cache is False


def test_a_failing_job_reports_why(tmp_path):
    job = make_job(tmp_path, "/nonexistent/models/Qwen2.5-7B")
    proc = run_worker(tmp_path / "job.json")
    assert proc.returncode == 1
    assert (Path(job.job_dir) / "state").read_text().strip() == "failed"
    failed = read_events(job.job_dir)[-1]
    assert failed.type == "failed" and failed.error_class == "ModelNotFound"
    assert "/nonexistent/models/Qwen2.5-7B" in failed.message
    assert "model.name_or_path" in failed.hint


def test_an_unreadable_job_json_fails_in_its_folder(tmp_path):
    from remote_worker.__main__ import main

    (tmp_path / "job.json").write_text('{"job_id": "x"}')
    assert main([str(tmp_path / "job.json")]) == 1
    assert (tmp_path / "state").read_text().strip() == "failed"
    assert read_events(tmp_path)[-1].error_class == "ValidationError"
    assert main([]) == 2


def test_hints_name_the_knob(tmp_path, model_dir):
    from remote_worker.__main__ import hint_for

    job = make_job(tmp_path, str(model_dir))
    oom = torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
    hint = hint_for(oom, job)
    assert "train.micro_batch_tokens (now 128)" in hint and "data.max_length (now 64)" in hint
    assert 'train.gradient_checkpointing = "on"' in hint
    wrapped = RuntimeError("training failed")
    wrapped.__cause__ = oom
    assert hint_for(wrapped, job) == hint

    missing = ModuleNotFoundError("No module named 'flash_attn'", name="flash_attn")
    assert "pip install 'flash-attn'" in hint_for(missing, job)
    bnb = ImportError("Using `bitsandbytes` 4-bit quantization requires the latest version of bitsandbytes")
    assert "pip install 'bitsandbytes>=" in hint_for(bnb, job)
    assert hint_for(ValueError("something else"), job) == ""
