"""Breaker tests for the multi-GPU path (issue 16): what the plan, the worker and a checkpoint agree on."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

pytest.importorskip("peft")

from jobs import cards, memory

CONFIGS = Path(__file__).parent / "fixtures" / "configs"
REPORT = {"train_records": 1000, "records_out": 1000, "tokens": {"total": 2_000_000}}


def _arch(name: str) -> memory.Arch:
    return memory.Arch.from_config(json.loads((CONFIGS / f"{name}.json").read_text()))


def _spec(**train):
    from jobs.spec import JobSpec

    return JobSpec.model_validate({"name": "t", "model": {"name_or_path": "Org/M"}, "data": {"train": "x"},
                                   "train": train, "instance": {"ssh": "ssh -p 1 root@h"}})  # fmt: skip


@pytest.mark.parametrize("train", [
    {},  # global batch 0: one micro-batch a rank, so two a step on two GPUs
    {"global_batch_tokens": 16384},  # one micro-batch's worth: still one a rank
    {"global_batch_tokens": 5 * 16384},  # five: round(2.5) = 2 a rank, four a step
])  # fmt: skip
def test_plan_of_a_max_steps_job_on_two_gpus_counts_the_micro_batches_the_worker_trains(train) -> None:
    """A max_steps job trains max_steps x (gpus x micro-batches a rank) micro-batches (recipe.step_accum):
    the plan counted one GPU's global batch, so two GPUs looked twice as fast as they are."""
    from client.plan import make_plan
    from remote_worker.recipe import step_accum

    table = [cards.find("RTX 4090", cards.table())]
    base = {"max_steps": 100, "micro_batch_tokens": 16384, **train}
    one = make_plan(_spec(**base), _arch("qwen2.5-7b"), "fixture", REPORT, table, 1).rows[0]
    two = make_plan(_spec(gpus=2, **base), _arch("qwen2.5-7b"), "fixture", REPORT, table, 2).rows[0]
    assert two.parallel == "ddp" and two.shape.micro_batch_tokens == one.shape.micro_batch_tokens == 16384
    spec = _spec(gpus=2, **base)
    per_step_2 = 2 * step_accum(spec, 16384, 2, None)
    per_step_1 = step_accum(_spec(**base), 16384, 1, None)
    # the training time is the micro-batches trained over the speed: the ratio is the worker's
    assert two.train_s * two.tokens_per_s / (one.train_s * one.tokens_per_s) == pytest.approx(per_step_2 / per_step_1)


# --- two CPU processes (gloo) against one -------------------------------------------------------------

import os  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402

import tinyjob  # noqa: E402
from jobfiles import PAIRS, chat, run_in_process  # noqa: E402

from jobs import events as ev  # noqa: E402
from jobs.spec import JobSpec, WorkerJob  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
DATA_REPEATS = 2
data_dir, model_dir, one_thread = tinyjob.data_dir, tinyjob.model_dir, tinyjob.one_thread  # module fixtures


def _worker_job(folder: Path, model_dir: Path, data_dir: Path, gpus: int, **train) -> Path:
    spec = JobSpec.model_validate({
        "name": "brk", "model": {"name_or_path": str(model_dir)},
        "data": {"train": "train.jsonl", "max_length": 64}, "quant": {"bits": 16}, "lora": {"r": 8, "alpha": 16},
        "train": {"learning_rate": 5e-3, "micro_batch_tokens": 96, "device": "cpu", "save_every_minutes": 0,
                  "gpus": gpus, **train},
    })  # fmt: skip
    folder.mkdir(parents=True, exist_ok=True)
    job = WorkerJob(job_id=folder.name, spec=spec, data_dir=str(data_dir), job_dir=str(folder / "job"),
                    hf_home=str(folder / "hf"))  # fmt: skip
    (folder / "job.json").write_text(job.model_dump_json())
    return folder / "job.json"


def _run(job_json: Path, gpus: int) -> list:
    """The worker as the launcher runs it under torchrun with `gpus` gloo processes; one process, the
    reference, runs the same recipe in this process (a worker process would import torch again)."""
    path = job_json.parent / "job" / "events.jsonl"
    if gpus == 1:
        run_in_process(WorkerJob.model_validate_json(job_json.read_text()))
        return [ev.parse(ln) for ln in path.read_text().splitlines() if ln.strip()]
    env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
           "OMP_NUM_THREADS": "1"}  # fmt: skip
    launch = ["-m", "torch.distributed.run", "--standalone", "--nnodes", "1", "--nproc-per-node", str(gpus)]
    argv = [sys.executable, *launch, "-m", "remote_worker", str(job_json)]
    res = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-4000:]
    return [ev.parse(ln) for ln in path.read_text().splitlines() if ln.strip()]


def test_the_eval_loss_of_two_processes_is_the_one_process_eval_loss(tmp_path, model_dir, data_dir) -> None:
    """Evaluation on N ranks: transformers divides each rank's eval micro-batch by the labels of all ranks'
    micro-batches that round (average_tokens_across_devices, meant for the training step), and counts the
    micro-batch accelerate repeats to even the ranks out; one process takes each micro-batch's own mean.
    The same weights (the step losses match) gave another eval_loss on two processes (6.019 against 6.014)."""
    data = tmp_path / "data"
    data.mkdir()
    (data / "train.jsonl").write_text((data_dir / "train.jsonl").read_text())
    rows = [chat(f"{q} [{i}]", a) for i in range(2) for q, a in PAIRS[:3]]  # three eval micro-batches of two
    (data / "eval.jsonl").write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    got = {}
    for gpus in (1, 2):
        job = _worker_job(tmp_path / f"g{gpus}", model_dir, data, gpus, max_steps=2, save_steps=1,
                          global_batch_tokens=2 * 96)  # fmt: skip
        events = _run(job, gpus)
        got[gpus] = ({e.step: e.loss for e in events if isinstance(e, ev.Step)},
                     {e.step: e.eval_loss for e in events if isinstance(e, ev.Eval)})  # fmt: skip
    (steps_1, evals_1), (steps_2, evals_2) = got[1], got[2]
    assert sorted(evals_1) == sorted(evals_2) == [1, 2]
    for step in (1, 2):
        assert steps_2[step] == pytest.approx(steps_1[step], abs=1e-4)  # the same weights
        assert evals_2[step] == pytest.approx(evals_1[step], abs=1e-4), step


def test_tail_and_status_show_the_processes_and_each_ranks_memory() -> None:
    """A 2-GPU job's `started` line said "micro-batch 8192 tokens x 2", half the step it trains (2 ranks x 2),
    and never the processes; the step line and the status panel showed one peak, not each rank's
    (rank_peak_mem_gb, in the event since issue 16)."""
    from rich.console import Console

    from client.progress import Progress
    from client.views.render import event_line, panel

    started = ev.Started(total_steps=10, device="H200", dtype="bfloat16", attention="sdpa", quant="nf4",
                         trainable_params=1, total_params=2, train_sequences=1, train_tokens=1,
                         micro_batch_tokens=8192, grad_accum=2, gradient_checkpointing=False, world_size=2,
                         distributed="ddp")  # fmt: skip
    line = event_line(started)
    assert "micro-batch 8192 tokens x 2" in line and "on 2 processes (ddp): 4 micro-batches a step" in line, line
    alone = event_line(started.model_copy(update={"world_size": 1, "distributed": "none"}))
    assert "processes" not in alone
    step = ev.Step(step=1, total_steps=10, epoch=0.1, loss=1.0, lr=1e-4, tokens_per_s=2000.0, peak_mem_gb=20.5,
                   rank_peak_mem_gb=[19.25, 20.5])  # fmt: skip
    assert "mem 20.5GB (ranks 19.2/20.5)" in event_line(step)
    p = Progress("j")
    p.apply(started)
    p.apply(step)
    console = Console(width=120, record=True)
    console.print(panel(p, "running"))
    assert "20.5 GB peak (ranks 19.2, 20.5 GB)" in console.export_text()
    assert p.as_dict()["rank_peak_mem_gb"] == [19.25, 20.5]  # status --json
