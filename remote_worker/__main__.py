"""`python -m remote_worker JOB_JSON`: run one job, leaving `state` and a terminal event behind.

`state` in the job folder goes running -> done | failed (| cancelled on SIGTERM/SIGINT). Every
failure becomes a `failed` event with the error class, the message, the newest complete
checkpoint and, for the failures we know, a hint naming what to change; the traceback goes to
stdout (worker.log). Exit code 0 on success, 1 on failure, 2 on a bad command line.

SIGTERM/SIGINT during training: the step finishes, a checkpoint is saved, then the job stops as
`cancelled` (resumable). A second signal, or one before training started, stops it at once
(remote_worker.stopping). A full disk: the worker's ballast file is freed first, so the failure
can still be written down.

Under torchrun (train.gpus > 1, remote_worker.distributed) every rank runs this same main: rank 0
writes `state` and the events; another rank writes down only its own failure (a `failed` event
naming its rank), so an OOM on rank 3 is not hidden behind rank 0's broken collective.
"""

from __future__ import annotations

import os
import re
import sys
import traceback
from collections.abc import Iterator
from pathlib import Path

from jobs.events import EventWriter, Failed
from jobs.layout import JobPaths
from jobs.requirements import QLORA_REQUIREMENTS, WORKER_REQUIREMENTS
from jobs.spec import WorkerJob
from remote_worker import checkpoints, distributed, stopping

USAGE = "usage: python -m remote_worker JOB_JSON"
PIP_NAMES = {**WORKER_REQUIREMENTS, **QLORA_REQUIREMENTS, "flash_attn": "flash-attn"}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1 or argv[0].startswith("-"):
        print(USAGE, file=sys.stderr)
        return 2
    job_json = Path(argv[0])
    try:
        job = WorkerJob.model_validate_json(job_json.read_text(encoding="utf-8"))
    except Exception as exc:  # unreadable or from another version of the client
        return _fail(
            job_json.parent, exc, f"{job_json} is not a job this worker understands; submit the job again"
        )

    job_dir = Path(job.job_dir)
    job_dir.mkdir(parents=True, exist_ok=True)
    _set_environment(job)
    rank = distributed.world()
    if rank.main:
        write_state(job_dir, "running")
    stopping.install_signal_handlers()
    events = EventWriter(JobPaths(str(job_dir)).events) if rank.main else _Discard()
    try:
        # Imported only now: transformers and huggingface_hub read HF_HOME when first imported.
        from remote_worker import recipe

        done = recipe.run(job, events)
        if job.spec.eval is not None and job.spec.eval.at_end and not done.stopped:
            from remote_worker import evaluate

            evaluate.at_end(job)  # before `state` says done: the guard waits while the worker runs
    except BaseException as exc:  # KeyboardInterrupt too: `state` must never stay "running"
        if rank.main:
            checkpoints.release_reserve(job_dir)  # on a full disk, the room to write the failure down
            code = _fail(job_dir, exc, hint_for(exc, job), events)
        else:
            code = _fail_rank(job_dir, exc, hint_for(exc, job), rank.rank)
        _print_traceback()
        return code
    finally:
        events.close()
        if rank.main:
            checkpoints.release_reserve(job_dir)
        distributed.finish()
    if rank.main:
        write_state(job_dir, "done")
    return 0


class _Discard(EventWriter):
    """The events of a rank other than 0: rank 0 writes the one stream."""

    def __init__(self) -> None:
        self._fd = None

    def emit(self, event) -> None:
        pass


def _print_traceback() -> None:
    try:
        traceback.print_exc()
        sys.stdout.flush()
    except OSError:  # worker.log sits on the disk that may be full
        pass


def _set_environment(job: WorkerJob) -> None:
    if job.hf_home:
        os.environ["HF_HOME"] = job.hf_home
    if job.spec.instance.hf_endpoint:
        os.environ.setdefault("HF_ENDPOINT", job.spec.instance.hf_endpoint)
    # Without it the CUDA allocator reserved 70 GB for 28 GB allocated (shared/anchors.md §1).
    os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")
    one_gpu(os.environ)


def one_gpu(env) -> None:
    """One process alone trains on one GPU. On a machine with several, the Trainer would otherwise wrap
    the model in nn.DataParallel over all of them and hand the collator one micro-batch per GPU (a
    train.gpus = 1 job on a 2-GPU H200 failed so). Under torchrun each rank pins its own GPU instead."""
    if "WORLD_SIZE" not in env and not env.get("CUDA_VISIBLE_DEVICES"):
        env["CUDA_VISIBLE_DEVICES"] = "0"


def _fail(job_dir: Path, exc: BaseException, hint: str, events: EventWriter | None = None) -> int:
    cancelled = isinstance(exc, KeyboardInterrupt)
    good = checkpoints.complete(Path(JobPaths(str(job_dir)).checkpoints))
    event = Failed(
        error_class=type(exc).__name__,
        message=str(exc) or repr(exc),
        hint=hint,
        checkpoint=str(good[-1]) if good else "",
    )
    try:
        job_dir.mkdir(parents=True, exist_ok=True)
        writer = events or EventWriter(JobPaths(str(job_dir)).events)
        writer.emit(event)
        if events is None:
            writer.close()
        write_state(job_dir, "cancelled" if cancelled else "failed")
    except OSError as io_exc:  # nowhere to report: the exit code and worker.log still tell
        print(f"cannot write the failure to {job_dir}: {io_exc}", file=sys.stderr)
    try:
        print(
            f"failed: {event.error_class}: {event.message}" + (f"\nhint: {hint}" if hint else ""),
            file=sys.stderr,
        )
    except OSError:
        pass
    return 1


def _fail_rank(job_dir: Path, exc: BaseException, hint: str, rank: int) -> int:
    """Another rank failed: its own `failed` event (not for a stop rank 0 reports too), no state."""
    if not isinstance(exc, KeyboardInterrupt):
        try:
            writer = EventWriter(JobPaths(str(job_dir)).events)
            writer.emit(Failed(error_class=type(exc).__name__, message=f"rank {rank}: {exc or repr(exc)}", hint=hint))
            writer.close()
        except OSError:
            pass
    try:
        print(f"rank {rank} failed: {type(exc).__name__}: {exc}", file=sys.stderr)
    except OSError:
        pass
    return 1


def write_state(job_dir: Path, state: str) -> None:
    """Replace `state` atomically; a `cancelled` written by the launcher is kept."""
    path = Path(JobPaths(str(job_dir)).state)
    if state != "running" and path.is_file() and path.read_text().strip() == "cancelled":
        return
    tmp = path.with_name(".state.tmp")
    tmp.write_text(state + "\n")
    tmp.replace(path)


# --- hints for the failures we know --------------------------------------------------------------


def hint_for(exc: BaseException, job: WorkerJob) -> str:
    for e in _chain(exc):
        if hint := getattr(e, "hint", ""):
            return str(hint)
        if _is_cuda_oom(e):
            return oom_hint(job)
        if isinstance(e, ImportError):
            return import_hint(e)
        if isinstance(e, KeyboardInterrupt):
            return resume_hint(job)
        if checkpoints.is_disk_full(e, Path(job.job_dir)):
            return f"free space on the instance (df -h {job.job_dir}), then `autodl-run resume {job.job_id}`"
    return ""


def resume_hint(job: WorkerJob) -> str:
    good = checkpoints.complete(Path(JobPaths(job.job_dir).checkpoints))
    if not good:
        return "the job was stopped before its first checkpoint; submit it again"
    return f"the job was stopped; continue it from {good[-1].name} with `autodl-run resume {job.job_id}`"


def _chain(exc: BaseException) -> Iterator[BaseException]:
    seen = set()
    e: BaseException | None = exc
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        yield e
        e = e.__cause__ or e.__context__


def _is_cuda_oom(exc: BaseException) -> bool:
    # By name and message: torch may be what failed to import, so this path never imports it.
    return type(exc).__name__ == "OutOfMemoryError" or "CUDA out of memory" in str(exc)


def oom_hint(job: WorkerJob) -> str:
    """What to change after a CUDA OOM. Every knob but the number of GPUs is a job.toml field that only a
    new submit reads: a resume runs the job as submitted (the ledger's spec) and continues its checkpoint
    as it was trained (train.distributed included)."""
    t, d = job.spec.train, job.spec.data
    now = t.micro_batch_tokens or f"0 = auto, max({d.max_length}, 16384)"
    knobs = [f"lower train.micro_batch_tokens (now {now})", f"data.max_length (now {d.max_length})"]
    if t.gradient_checkpointing != "on":
        knobs.append('set train.gradient_checkpointing = "on"')
    if t.multi_process and t.distributed != "fsdp":
        knobs.append('set train.distributed = "fsdp" (shards the model over the GPUs)')
    elif not t.multi_process:
        knobs.append('train on more GPUs with train.gpus = N and train.distributed = "fsdp" (shards what does not fit one)')
    return (
        "the GPU ran out of memory: in your job.toml " + ", or ".join(knobs)
        + ", then submit it again (`autodl-run submit JOB.toml`: it starts over; `autodl-run resume "
        + f"{job.job_id}` runs the job as it was submitted and cannot change these)"
    )


def import_hint(exc: ImportError) -> str:
    module = (exc.name or "").split(".")[0]
    if module not in PIP_NAMES:  # e.g. transformers' "requires the `accelerate` library"
        module = next((m for m in PIP_NAMES if re.search(rf"\b{m}\b", str(exc))), module)
    if not module:
        return f"a package is missing; install it into {sys.executable}"
    requirement = PIP_NAMES.get(module, module.replace("_", "-"))
    return f"the package `{module}` is missing: {sys.executable} -m pip install '{requirement}'"


if __name__ == "__main__":
    raise SystemExit(main())
