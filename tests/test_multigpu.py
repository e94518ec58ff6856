"""More than one process, on the CPU: train.gpus = 2 runs two gloo processes under torchrun.

- Two processes with the global batch of one process (one micro-batch each, against two
  accumulated) train the same steps to the same losses: the micro-batches are dealt out, not
  repeated, and the gradients are averaged over the ranks.
- Launched through the real launcher (tmux, run.sh, torchrun) and cancelled mid-run: the signal
  reaches both ranks, they agree to checkpoint at the same step, rank 0 alone writes it, the
  job is `cancelled`; launched again, it resumes and ends with the one-process run's final loss.
- One event stream: every step once, `started` says two processes.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
import time
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("peft")

import tinyjob  # noqa: E402
from jobfiles import run_in_process  # noqa: E402
from test_faults import STOPHOOK, arm, stop_signal_pending, wait_stopped  # noqa: E402

from client.remote import launcher  # noqa: E402
from client.transport.local import LocalTransport  # noqa: E402
from jobs import events as ev  # noqa: E402
from jobs.layout import JobPaths  # noqa: E402
from jobs.manifest import verify_manifest  # noqa: E402
from jobs.protocol import JobState  # noqa: E402
from jobs.spec import JobSpec, WorkerJob  # noqa: E402

pytestmark = pytest.mark.slow
data_dir, model_dir, one_thread = tinyjob.data_dir, tinyjob.model_dir, tinyjob.one_thread  # shared module fixtures
REPO = Path(__file__).resolve().parent.parent
STEPS = 60
MICRO = 96


def make_job(folder: Path, model_dir: Path, data_dir: Path, **train) -> WorkerJob:
    spec = JobSpec.model_validate({
        "name": "multi",
        "model": {"name_or_path": str(model_dir)},
        "data": {"train": "train.jsonl", "max_length": 64},
        "quant": {"bits": 16},
        "lora": {"r": 8, "alpha": 16},
        "train": {"max_steps": STEPS, "learning_rate": 5e-3, "warmup_ratio": 0.1, "micro_batch_tokens": MICRO,
                  "global_batch_tokens": 2 * MICRO, "device": "cpu", "save_every_minutes": 0, **train},
    })  # fmt: skip
    job = WorkerJob(job_id=folder.name, spec=spec, data_dir=str(data_dir), job_dir=str(folder / "job"),
                    hf_home=str(folder / "hf"))  # fmt: skip
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "job.json").write_text(job.model_dump_json(indent=1))
    return job


def read_events(job_dir: str | Path) -> list:
    path = Path(job_dir) / "events.jsonl"
    return [ev.parse(ln) for ln in path.read_text().splitlines() if ln.strip()] if path.exists() else []


def losses(events: list) -> dict[int, float]:
    return {e.step: e.loss for e in events if isinstance(e, ev.Step)}


def worker_env() -> dict[str, str]:
    return {"PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "OMP_NUM_THREADS": "1",
            "PYTHONUNBUFFERED": "1"}  # fmt: skip


def wait_for(cond, timeout: float = 300.0, what: str = "", log: Path | None = None):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        got = cond()
        if got:
            return got
        time.sleep(0.1)
    tail = log.read_text()[-4000:] if log is not None and log.exists() else ""
    raise AssertionError(f"timed out waiting for {what}\n{tail}")


@pytest.fixture(scope="module")
def one_process(tmp_path_factory, model_dir, data_dir):
    job = make_job(tmp_path_factory.mktemp("one"), model_dir, data_dir)
    done = run_in_process(job)
    return done, losses(read_events(job.job_dir))


def test_worker_argv_runs_torchrun_only_for_more_than_one_process(tmp_path, model_dir, data_dir):
    job = make_job(tmp_path / "a", model_dir, data_dir)
    assert launcher.worker_argv("py", "j.json", job.spec.train) == ["py", "-m", "remote_worker", "j.json"]
    two = job.spec.train.model_copy(update={"gpus": 2})
    argv = launcher.worker_argv("py", "j.json", two)
    assert argv[argv.index("py"):argv.index("--standalone")] == ["py", "-m", "remote_worker.torchrun"]
    assert argv[argv.index("--nproc-per-node") + 1] == "2" and argv[-3:] == ["-m", "remote_worker", "j.json"]
    node = launcher.Node(rank=1, count=2, master="10.0.0.1", port=29555)
    argv = launcher.worker_argv("py", "j.json", job.spec.train, node)
    assert "--standalone" not in argv
    for flag, value in (("--node-rank", "1"), ("--nnodes", "2"), ("--master-addr", "10.0.0.1"),
                        ("--master-port", "29555"), ("--nproc-per-node", "1")):  # fmt: skip
        assert argv[argv.index(flag) + 1] == value


def test_two_processes_cancelled_and_resumed_end_like_one(tmp_path, model_dir, data_dir, one_process, tmux_socket):
    done_1, loss_1 = one_process
    assert done_1.steps == STEPS
    job = make_job(tmp_path / "two", model_dir, data_dir, gpus=2, save_steps=4)
    paths = JobPaths(job.job_dir)
    Path(job.job_dir).mkdir(parents=True)
    argv = launcher.worker_argv(sys.executable, str(tmp_path / "two" / "job.json"), job.spec.train)
    log = Path(paths.log)
    # rank 0 freezes once its step-8 checkpoint is complete (tests/stophook) until cancel's signal waits on
    # it: the cancel lands mid-run, not after a 52-step margin the test could lose on a loaded machine
    stops = tmp_path / "stops"
    arm(stops, "after", 8)
    env = {**worker_env(), "PYTHONPATH": f"{STOPHOOK}:{REPO}", "AUTODL_TEST_STOPS": str(stops)}
    launcher.launch(LocalTransport(), paths, argv, socket=tmux_socket, session="two-1", env=env)
    frozen = wait_stopped(stops, "after", 8, Path(job.job_dir))
    cancelled: list[object] = []

    def cancel() -> None:
        try:
            cancelled.append(launcher.cancel(LocalTransport(), paths, socket=tmux_socket, session="two-1", grace=120))
        except BaseException as exc:  # noqa: BLE001 - raised again in the test's thread
            cancelled.append(exc)

    canceller = threading.Thread(target=cancel)
    canceller.start()
    try:
        wait_for(lambda: stop_signal_pending(frozen) or not canceller.is_alive(), what="cancel's signal", log=log)
    finally:
        os.kill(frozen, signal.SIGCONT)
    canceller.join(timeout=600)  # a hang guard
    (status,) = cancelled
    if isinstance(status, BaseException):
        raise status
    assert status.state is JobState.CANCELLED and not status.alive, log.read_text()[-4000:]
    first = read_events(job.job_dir)
    stops = [e for e in first if isinstance(e, ev.Checkpoint) and e.reason == "signal"]
    assert len(stops) == 1, log.read_text()[-4000:]
    stop = stops[0]
    assert stop.step < STEPS, "the job ended before the signal: make it longer"
    verify_manifest(stop.path, stop.adapter_sha256)
    assert isinstance(first[-1], ev.Failed) and first[-1].error_class == "Interrupted"
    started = next(e for e in first if isinstance(e, ev.Started))
    assert started.world_size == 2 and started.distributed == "ddp" and started.grad_accum == 1
    steps = [e.step for e in first if isinstance(e, ev.Step)]
    assert steps == list(range(1, stop.step + 1)), "one stream: each step once, from rank 0"
    for step in steps:  # two processes of one micro-batch each train the one process's steps
        assert first[[e.step if isinstance(e, ev.Step) else -1 for e in first].index(step)].loss == pytest.approx(
            loss_1[step], abs=2e-3
        ), step

    launcher.launch(LocalTransport(), paths, argv, socket=tmux_socket, session="two-2", env=worker_env())
    wait_for(lambda: launcher.job_status(LocalTransport(), paths).state is JobState.DONE, what="the resumed run",
             log=log)  # fmt: skip
    second = read_events(job.job_dir)[len(first):]
    assert next(e for e in second if isinstance(e, ev.Started)).resumed_from_step == stop.step
    loss_2 = losses(second)
    assert sorted(loss_2) == list(range(stop.step + 1, STEPS + 1))
    done_2 = second[-1]
    assert isinstance(done_2, ev.Done) and done_2.steps == STEPS
    assert done_2.final_loss == pytest.approx(done_1.final_loss, abs=2e-3)
    verify_manifest(done_2.adapter_path, done_2.manifest_sha256)
    assert not any(p.name.startswith("checkpoint-") for p in Path(paths.checkpoints).iterdir())


def test_nodes_of_a_spec_with_hosts():
    from pydantic import ValidationError

    from client.lifecycle.steps import node_of

    spec = JobSpec.model_validate({
        "name": "n", "model": {"name_or_path": "m"}, "data": {"train": "t.jsonl"},
        "instance": {"ssh": "ssh -p 2222 root@gw.example", "hosts": ["ssh -p 22 root@10.0.0.2"],
                     "rdzv_host": "10.0.0.1", "rdzv_port": 29555},
    })  # fmt: skip
    assert node_of(spec, 0) == launcher.Node(0, 2, "10.0.0.1", 29555)
    assert node_of(spec, 1).rank == 1
    with pytest.raises(ValidationError, match="hosts"):
        JobSpec.model_validate({"name": "n", "model": {"name_or_path": "m"}, "data": {"train": "t.jsonl"},
                                "instance": {"hosts": ["scp root@x"]}})  # fmt: skip
    with pytest.raises(ValidationError, match="gpus"):
        JobSpec.model_validate({"name": "n", "model": {"name_or_path": "m"}, "data": {"train": "t.jsonl"},
                                "train": {"gpus": 0}})  # fmt: skip


def test_fillers_make_whole_global_batches_and_train_nothing():
    import numpy as np

    from remote_worker.data import IGNORE, MicroBatches, Seq

    seqs = [Seq(np.arange(1, 11, dtype=np.int64), np.ones(10, dtype=np.uint8)) for _ in range(5)]
    alone = MicroBatches(seqs, micro_batch_tokens=10, packing=True, pad_id=0, seed=1)
    four = MicroBatches(seqs, micro_batch_tokens=10, packing=True, pad_id=0, seed=1, multiple=4)
    assert len(alone) == 5 and len(four) == 8 and four.groups[:5] == alone.groups
    for i in range(5, 8):  # a filler: one pad token, nothing trained
        assert four[i]["input_ids"].tolist() == [[0]] and (four[i]["labels"] == IGNORE).all()


def test_resume_onto_another_number_of_processes_keeps_the_global_batch(tmp_path):
    from jobs.protocol import BatchShape
    from remote_worker.checkpoints import ResumeMismatch, resumed_grad_accum

    two_by_two = BatchShape(micro_batch_tokens=96, gradient_checkpointing=False, world_size=2, grad_accum=2)
    assert resumed_grad_accum(tmp_path, two_by_two, 1, 1) == 4
    assert resumed_grad_accum(tmp_path, two_by_two, 1, 4) == 1
    assert resumed_grad_accum(tmp_path, None, 2, 2) == 1  # an older checkpoint: one process, two a step
    with pytest.raises(ResumeMismatch, match="3 processes cannot split") as err:
        resumed_grad_accum(tmp_path, two_by_two, 1, 3)
    assert "train.gpus = one of [1, 2, 4]" in err.value.hint


def test_one_process_alone_sees_one_gpu():
    """A train.gpus = 1 job on a machine with several GPUs: the Trainer must not wrap the model in
    DataParallel (it failed on a 2-GPU H200 with the collator's "too many values to unpack")."""
    from remote_worker.__main__ import one_gpu

    env: dict[str, str] = {}
    one_gpu(env)
    assert env == {"CUDA_VISIBLE_DEVICES": "0"}
    chosen = {"CUDA_VISIBLE_DEVICES": "1"}
    one_gpu(chosen)  # the user's choice stands
    assert chosen == {"CUDA_VISIBLE_DEVICES": "1"}
    ranked = {"WORLD_SIZE": "2", "LOCAL_RANK": "1"}
    one_gpu(ranked)  # torchrun's ranks pin their own GPU (remote_worker.distributed.init)
    assert "CUDA_VISIBLE_DEVICES" not in ranked


def rank_pid(wrapper_pid: int, rank: int) -> int | None:
    """The process of `rank` among the wrapper's descendants (torchrun's children), by its environment."""
    todo, want = [wrapper_pid], f"RANK={rank}".encode()
    while todo:
        pid = todo.pop()
        try:
            env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
            for task in Path(f"/proc/{pid}/task").iterdir():
                todo += [int(c) for c in (task / "children").read_text().split()]
        except OSError:
            continue
        if want in env and b"-m" in Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0"):
            if b"remote_worker" in Path(f"/proc/{pid}/cmdline").read_bytes():
                return pid
    return None


@pytest.mark.parametrize("rank", [1, 0])
def test_a_rank_killed_by_sigkill_is_named_with_its_cause_and_the_resume(
    tmp_path, model_dir, data_dir, tmux_socket, rank
):
    from client.progress import Progress

    job = make_job(tmp_path / "k", model_dir, data_dir, gpus=2, save_steps=2, max_steps=400)
    paths = JobPaths(job.job_dir)
    Path(job.job_dir).mkdir(parents=True)
    argv = launcher.worker_argv(sys.executable, str(tmp_path / "k" / "job.json"), job.spec.train)
    log = Path(paths.log)
    # rank 0 freezes once its step-2 checkpoint is complete (tests/stophook): the kill lands mid-run, not
    # after a margin of steps the test could lose on a loaded machine
    stops = tmp_path / "stops"
    arm(stops, "after", 2)
    env = {**worker_env(), "PYTHONPATH": f"{STOPHOOK}:{REPO}", "AUTODL_TEST_STOPS": str(stops)}
    launcher.launch(LocalTransport(), paths, argv, socket=tmux_socket, session="k-1", env=env)
    frozen = wait_stopped(stops, "after", 2, Path(job.job_dir))
    victim = wait_for(lambda: rank_pid(int(Path(paths.pid).read_text()), rank), what=f"rank {rank}", log=log)
    os.kill(victim, signal.SIGKILL)
    if victim != frozen:
        os.kill(frozen, signal.SIGCONT)  # rank 0 goes on, as it would have, and meets the dead rank
    wait_for(lambda: launcher.job_status(LocalTransport(), paths).state is JobState.FAILED, what="the end", log=log)
    events = read_events(job.job_dir)
    last_good = sorted(Path(paths.checkpoints).glob("step-*"), key=lambda p: int(p.name[5:]))[-1]
    progress = Progress(job.job_id)
    for e in events:
        progress.apply(e)
    failed = progress.failed
    assert failed is not None and failed.error_class == "RankKilled", log.read_text()[-3000:]
    assert f"rank {rank} " in failed.message and f"pid {victim}" in failed.message and "SIGKILL" in failed.message
    assert "OOM killer" in failed.hint and "host memory" in failed.hint
    assert f"continue from {last_good.name} with `autodl-run resume {job.job_id}`" in failed.hint
    assert failed.checkpoint == str(last_good)
    assert progress.runs == 1, "the ranks' failures and torchrun's are one run's end"
