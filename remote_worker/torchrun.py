"""torchrun (torch.distributed.run), plus what only it knows: which rank died, and how.

A rank killed by a signal (SIGKILL from the kernel's OOM killer when host memory runs out, or a
`kill -9`) writes nothing; the ranks still alive then fail in their next collective with gloo's or
NCCL's "Connection reset by peer", which names neither the rank nor the cause. torchrun's agent sees
every rank's exit code: when it ends in failure and a rank died of a signal, this writes one `failed`
event saying which rank, the signal, the likely cause, the last good checkpoint and the `resume`
command (client.progress takes it in place of the ranks' own failures of the same run).

`python -m remote_worker.torchrun ARGS` takes torchrun's ARGS; the worker's job.json is the last one.
"""

from __future__ import annotations

import signal
import sys
from pathlib import Path

from jobs.events import EventWriter, Failed
from jobs.layout import JobPaths
from jobs.protocol import ProtocolError, read_model
from jobs.spec import WorkerJob
from remote_worker import nodewatch


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import parse_args, run

    parsed = parse_args(args)
    # worker.log says which machine of several this is (node 0 holds global rank 0, the one writer)
    print(f"torchrun: node {parsed.node_rank} of {parsed.nnodes}, {parsed.nproc_per_node} process(es) on it",
          file=sys.stderr, flush=True)  # fmt: skip
    nnodes = max(int(n) for n in str(parsed.nnodes).split(":"))
    nodewatch.start(parsed.node_rank, nnodes, parsed.master_addr, parsed.master_port, args[-1])
    try:
        run(parsed)
    except ChildFailedError as exc:
        print(exc.format_msg(), file=sys.stderr, flush=True)
        killed = signalled(exc.failures)
        if killed is not None:
            report(args[-1], *killed)
        return 1
    return 0


def signalled(failures: dict) -> tuple[int, object] | None:
    """(global rank, ProcessFailure) of the rank that died of a signal first; None when none did.

    Once one rank dies, torchrun's agent stops the others with SIGTERM, and its failures carry whole-second
    timestamps: the rank killed first and the ones the agent stopped after it often tie. So a rank killed by
    anything but SIGTERM is the cause when there is one (a SIGKILLed rank 1 was reported as "rank 0 killed
    by SIGTERM" under load); among those, the earliest, then the lowest rank."""
    dead = [(f.timestamp, rank, f) for rank, f in failures.items() if f.exitcode is not None and f.exitcode < 0]
    if not dead:
        return None
    cause = [d for d in dead if -d[2].exitcode != signal.SIGTERM] or dead
    _, rank, failure = min(cause, key=lambda x: (x[0], x[1]))
    return rank, failure


def describe(rank: int, failure, job_id: str, last_good: Path | None) -> Failed:
    sig = -failure.exitcode
    try:
        name = signal.Signals(sig).name
    except ValueError:
        name = f"signal {sig}"
    message = (
        f"rank {rank} (local rank {failure.local_rank}, pid {failure.pid}) was killed by signal {sig} ({name}); "
        "the other ranks then lost their connection to it (gloo/NCCL: 'Connection reset by peer')"
    )
    if sig == signal.SIGKILL:
        cause = (
            "SIGKILL with nothing logged is most often the kernel's OOM killer: the instance ran out of host "
            "memory (RAM, not GPU memory; `dmesg | grep -i oom`, `free -g`). Every rank holds its own copy of "
            f"what it loads: fewer GPUs (`autodl-run resume {job_id} --gpus N`; a resume does not read job.toml "
            'again), an instance with more RAM, or train.distributed = "fsdp" (rank 0 alone reads the weights) '
            "in job.toml and a new `autodl-run submit JOB.toml` (it starts over: a resume keeps the "
            "distribution its checkpoint was trained with)"
        )
    else:
        cause = f"something on the instance sent {name} to the rank"
    then = (
        f"; then continue from {last_good.name} with `autodl-run resume {job_id}`"
        if last_good is not None
        else "; no checkpoint was saved: submit the job again"
    )
    return Failed(error_class="RankKilled", message=message, hint=cause + then,
                  checkpoint=str(last_good) if last_good else "")  # fmt: skip


def report(job_json: str, rank: int, failure) -> None:
    try:
        job = read_model(WorkerJob, Path(job_json).read_bytes(), job_json)
    except (OSError, ProtocolError) as exc:
        print(f"cannot read {job_json} to report the failure: {exc}", file=sys.stderr)
        return
    from remote_worker import checkpoints

    paths = JobPaths(job.job_dir)
    good = checkpoints.complete(Path(paths.checkpoints))
    event = describe(rank, failure, job.job_id, good[-1] if good else None)
    try:
        writer = EventWriter(paths.events)
        writer.emit(event)
        writer.close()
    except OSError as exc:
        print(f"cannot write the failure to {paths.events}: {exc}", file=sys.stderr)
    print(f"failed: {event.message}\nhint: {event.hint}", file=sys.stderr, flush=True)


if __name__ == "__main__":
    sys.exit(main())
