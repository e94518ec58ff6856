"""`resume JOB`: continue a run from its last checkpoint, on the same instance or on another one.

The worker always resumes from the newest complete, verified checkpoint in its job folder
(remote_worker.recipe): the global step, optimizer, LR schedule, data order and RNG continue. So:

- **Same instance** (the default): the job folder is still there; its worker is started again
  in place, with a fresh deadline, the current worker code and a new guard. Same job id.
- **Another instance** (`--instance-from FILE`: the `[instance]` table of a TOML file, a job.toml
  works; or `--profile NAME`: a host saved by `autodl-run login`, keeping this job's other
  instance settings): the checkpoint fetched last, whole (`fetch --checkpoints`; fetched from
  the old instance now if the laptop holds only its adapter), is uploaded into a new job's folder
  there with the data and the worker, and the job continues as a new job id (the ledger keeps
  one row a job and instance).

A job that is running already is not started twice: `resume` reattaches to it. A job that ran to
its end has nothing to resume (one stopped early by its deadline or max_hours has).

`--gpus N` continues on another number of GPUs (processes) per node: the checkpoint's global batch
(`batch_shape.json`: processes x micro-batches a step) is kept, so N x nodes must divide it; a number
that does not is refused here, before anything is launched, naming the numbers that do. It applies to
this run: a later `resume` without `--gpus` goes back to the submitted `train.gpus`. A number above the
GPUs the instance lists (its CPU cores on a CPU job) is refused as well (client.lifecycle.steps.check_processes).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

import tomllib
from pydantic import ValidationError

from client import dataset
from client.errors import JobError, Problem, SpecError, VerifyError
from client.home import prepared_dir
from client.ledger import JobRecord, Ledger
from client.lifecycle import steps
from client.lifecycle.fetch import fetch_checkpoint, local_checkpoints, local_copy, remote_steps
from client.lifecycle.pipeline import Pipeline, Report, Step
from client.lifecycle.steps import deadline_for
from client.lifecycle.tail import status_progress
from client.remote import launcher
from client.remote.follow import poll_once
from client.remote.submission import submission_key, write_launch_record
from client.remote.sync import sync_dir
from client.session import Session
from client.transport.paths import shell_path
from jobs import events as ev
from jobs.layout import BATCH_SHAPE, DATASET_MANIFEST, JOB_FILES, MANIFEST, JobPaths, checkpoint_step
from jobs.manifest import ManifestError, verify_manifest
from jobs.protocol import BatchShape, DatasetManifest, JobState, LaunchRecord, ProtocolError, read_model
from jobs.spec import InstanceSpec, JobSpec, TrainSpec

Log = Callable[[str], None]
# A failure that the same data fails again with: `resume` refuses it (resuming needs the same data).
RERUN_FAILS_THE_SAME = ("DataError",)
RESUME_SEEN_TIMEOUT_S = 180.0  # how long resume waits for the worker to say which checkpoint it took
# Settings of the job, not of the machine: kept when `--profile` moves the job to another host.
CARRIED = (
    "python", "tmux_socket", "install_deps", "pip_index_url", "hf_endpoint", "network_turbo",
    "shutdown_after", "shutdown_command", "idle_grace_minutes", "max_hours", "currency", "connect_timeout",
)  # fmt: skip


@dataclass
class Resumed:
    job_id: str  # the job that runs now: a new id when it moved to another instance
    from_job: str
    where: str
    from_step: int | None  # the checkpoint it continues from (None: from the start)
    moved: bool = False
    reattached: bool = False  # it was running already: nothing was started

    def as_dict(self) -> dict:
        return {
            "job_id": self.job_id,
            "from_job": self.from_job,
            "instance": self.where,
            "from_step": self.from_step,
            "moved": self.moved,
            "reattached": self.reattached,
        }


# --- where to continue ---------------------------------------------------------------------------------


def instance_from_file(path: Path) -> InstanceSpec:
    """The `[instance]` table of a TOML file (a whole job.toml works), validated."""
    path = Path(path)
    try:
        raw = tomllib.loads(path.read_text(encoding="utf-8-sig"))
    except OSError as exc:
        raise SpecError(
            f"cannot read {path}: {exc.strerror}", [], hint="give the path of a TOML file"
        ) from None
    except tomllib.TOMLDecodeError as exc:
        raise SpecError(f"{path} is not valid TOML", [Problem(str(path), None, "", str(exc))]) from None
    table = raw.get("instance")
    if not isinstance(table, dict):
        raise SpecError(
            f"{path} has no [instance] table",
            [Problem(str(path), None, "instance", "missing")],
            hint='add one, e.g. [instance] ssh = "ssh -p 38076 root@region-41.autodl.com"',
        )
    try:
        return InstanceSpec.model_validate(table)
    except ValidationError as exc:
        problems = [
            Problem(str(path), None, "instance." + ".".join(str(x) for x in e["loc"]), e["msg"])
            for e in exc.errors()
        ]
        raise SpecError(f"{path}: the [instance] table is not valid", problems) from None


def instance_for_profile(old: InstanceSpec, profile: str) -> InstanceSpec:
    """The host profile NAME (`autodl-run login`), with this job's own instance settings carried over."""
    return InstanceSpec(profile=profile, **{k: getattr(old, k) for k in CARRIED})


def same_target(a: InstanceSpec, b: InstanceSpec) -> bool:
    def key(i: InstanceSpec) -> tuple:
        return (i.is_local, i.host, i.port, i.user, i.profile)

    return key(a) == key(b) and (
        a.remote_root is None or b.remote_root is None or a.remote_root == b.remote_root
    )


# --- another number of GPUs -----------------------------------------------------------------------------


def with_gpus(spec: JobSpec, gpus: int | str | None, job_file: str) -> JobSpec:
    """The job's spec with `train.gpus` replaced for this run (None: as submitted), validated like the TOML."""
    if gpus is None:
        return spec
    value: int | str = gpus
    if isinstance(gpus, str) and gpus != "all":
        try:
            value = int(gpus)
        except ValueError:
            value = gpus
    try:
        train = TrainSpec.model_validate({**spec.train.model_dump(), "gpus": value})
    except ValidationError as exc:
        problems = [Problem(job_file, None, "train.gpus (--gpus)", e["msg"]) for e in exc.errors()]
        raise SpecError(f"--gpus {gpus}: not a number of GPUs this job can use", problems,
                        hint='give a whole number of GPUs per node (1, 2, ...), or "all" on GPUs') from None  # fmt: skip
    return spec.model_copy(update={"train": train})


def check_split(shape: BatchShape | None, spec: JobSpec, job_id: str, step: int) -> None:
    """Refuse a number of processes that cannot split the checkpoint's global batch (the worker's own
    rule, remote_worker.checkpoints.resumed_grad_accum), before anything is launched."""
    gpus = spec.train.gpus
    if shape is None or not shape.grad_accum or not isinstance(gpus, int):
        return  # an older checkpoint, or "all": the worker checks once it knows the count
    nodes = 1 + len(spec.instance.hosts)
    total, world = shape.world_size * shape.grad_accum, gpus * nodes
    if total % world == 0:
        return
    fits = [n for n in range(1, total + 1) if total % (n * nodes) == 0]
    raise JobError(
        f"checkpoint step-{step} of {job_id} was trained with {total} micro-batches a step "
        f"({shape.world_size} process(es) x {shape.grad_accum}); {world} process(es) "
        f"({gpus} GPU(s) x {nodes} node(s)) cannot split that evenly, so the data order and the learning-rate "
        "schedule could not continue. The global batch cannot change on a resume",
        hint=(f"resume with --gpus one of {fits}" if fits else "resume on as many nodes as before")
        + f", or submit the job again to start over on {gpus} GPU(s)",
    )


def _remote_shape(session: Session, paths: JobPaths, step: int) -> BatchShape | None:
    where = f"{paths.checkpoint(step)}/{BATCH_SHAPE}"
    res = session.transport.run(f"cat -- {shell_path(where)}", check=False)
    return _parse_shape(res.stdout_bytes, where) if res.ok else None


def _parse_shape(raw: bytes, where: str) -> BatchShape | None:
    try:
        return read_model(BatchShape, raw, where)
    except ProtocolError:
        return None


# --- resume ----------------------------------------------------------------------------------------------


def _check(spec: JobSpec, job_file: Path, ledger: Ledger, deadline_unix: float | None) -> float | None:
    deadline = deadline_for(spec, job_file, deadline_unix)
    ledger.check()  # before launching: a damaged ledger could not record it
    return deadline


CHECK = Step("check", _check)


def resume(
    record: JobRecord,
    ledger: Ledger,
    *,
    instance: InstanceSpec | None = None,
    deadline_unix: float | None = None,
    gpus: int | str | None = None,
    log: Log = print,
    report: Report | None = None,
) -> Resumed:
    """check → connect → plan → sync (checkpoint, data, worker) → setup → model → launch: submit's steps,
    timed and reported the same way (client.lifecycle.pipeline). `gpus`: train.gpus for this run."""
    run = Pipeline(report, log)
    spec = with_gpus(record.spec, gpus, record.job_file)
    field = "train.gpus" if gpus is None else "--gpus"  # what set the number, for a refusal
    if instance is None or same_target(instance, record.spec.instance):
        return _in_place(record, spec, ledger, deadline_unix, run, log, field)
    return _elsewhere(record, spec, ledger, instance, deadline_unix, run, log, field)


def _in_place(
    record: JobRecord, spec: JobSpec, ledger: Ledger, deadline_unix: float | None, run: Pipeline, log: Log,
    field: str = "train.gpus",
) -> Resumed:
    deadline = run.run(CHECK, spec, Path(record.job_file), ledger, deadline_unix)
    with run.run(steps.CONNECT, record) as session:
        paths = session.layout.job(record.id)
        status = launcher.job_status(session.transport, paths)
        where = session.where
        if status.active:
            log(f"job {record.id} is {status.state} on {where}: reattaching (nothing started)")
            if status.alive:
                steps.ensure_guard(session, spec, record.id, record.bundle_digest)
            return Resumed(record.id, record.id, where, None, reattached=True)
        missing = status.state is JobState.MISSING
        if missing:
            log(f"the job folder is gone from {where}: uploading the checkpoint fetched last")
        else:
            _refuse_if_finished(record, session)
        found = [] if missing else remote_steps(session.transport, paths)
        if not missing and not found:
            log(f"{record.id} saved no checkpoint before it ended ({status.state}): it starts over from step 0")
        if found:
            check_split(_remote_shape(session, paths, found[-1]), spec, record.id, found[-1])
        offset = 0 if missing else _events_end(session, paths)

        def checkpoint() -> int | None:
            if missing:
                return _upload_local_checkpoint(record, spec, session, record.id, log)
            return found[-1] if found else None

        step, bundle = _sync_and_launch(run, session, record, spec, record.id, deadline, checkpoint, log,
                                        field=field)  # fmt: skip
        if not missing:  # back once the new run is under way: `tail` then never shows the last run's end
            step = _worker_resumed_from(session, paths, offset, found, log)
    ledger.update(record.id, state="running", finished_at=None, bundle_digest=bundle)
    log(f"resumed {record.id} on {where} " + (f"from checkpoint step-{step}" if step else "from the start"))
    return Resumed(record.id, record.id, where, step)


def _elsewhere(
    record: JobRecord, spec: JobSpec, ledger: Ledger, instance: InstanceSpec, deadline_unix: float | None,
    run: Pipeline, log: Log, field: str = "train.gpus",
) -> Resumed:
    spec = spec.model_copy(update={"instance": instance.model_copy()})
    job_file = Path(record.job_file)
    deadline = run.run(CHECK, spec, job_file, ledger, deadline_unix)
    with run.run(steps.CONNECT, spec) as session:
        job_id = steps.new_job_id(spec.name)

        def record_first(bundle_digest: str) -> None:  # the laptop and the instance know the job before it runs
            ledger.add(job_id, spec, job_file, record.data_digest, bundle_digest, state="launching",
                       placement=session.placement)  # fmt: skip
            write_launch_record(session.transport, session.layout, LaunchRecord(
                job_id=job_id, name=spec.name, submit_key=submission_key(session.placed(spec), record.data_digest),
                data_digest=record.data_digest, bundle_digest=bundle_digest, job_file=str(job_file),
                spec_json=session.placed(spec).model_dump_json(),
            ))  # fmt: skip

        step, _ = _sync_and_launch(
            run, session, record, spec, job_id, deadline,
            lambda: _upload_local_checkpoint(record, spec, session, job_id, log), log, record_first, field,
        )  # fmt: skip
        ledger.update(job_id, state="running")
        where = session.where
    log(f"{record.id} continues as {job_id} on {where} from checkpoint step-{step}")
    return Resumed(job_id, record.id, where, step, moved=True)


# --- the pieces -------------------------------------------------------------------------------------------


def _sync_and_launch(
    run: Pipeline,
    session: Session,
    record: JobRecord,
    spec: JobSpec,
    job_id: str,
    deadline: float | None,
    checkpoint: Callable[[], int | None],
    log: Log,
    before_launch: Callable[[str], None] | None = None,
    field: str = "train.gpus",
) -> tuple[int | None, str]:
    """sync (the checkpoint, the data prepared again only if the instance lacks it, the worker), setup,
    model, launch. Returns (the checkpoint's step, the worker bundle's digest)."""

    def sync() -> tuple[int | None, steps.Synced]:
        step = checkpoint()
        return step, steps.sync(session, record.data_digest, lambda: _prepare_again(record, spec))

    steps.check_processes(session, spec, record.job_file, field)  # within the GPUs (cores) it has, before a launch
    run.run(steps.PLAN, session, spec, _prepared_report(record))  # the instance may be another card now
    step, synced = run.run(Step("sync", sync, lambda r: r[1].describe()))
    bundle = synced.bundle_digest
    run.run(steps.SETUP, session, spec, bundle, log)
    run.run(steps.MODEL, session, spec, job_id, bundle, log)
    with ExitStack() as nodes:  # every other node ready before any is launched, as submit does
        ready = steps.prepare_nodes(spec, record.job_file, job_id, record.data_digest,
                                    lambda: _prepare_again(record, spec), deadline, log, nodes)  # fmt: skip
        if before_launch is not None:
            before_launch(bundle)
        run.run(steps.LAUNCH, session, spec, job_id, record.data_digest, bundle, deadline)
        if ready:  # they take rank 0's checkpoint from their own job folder (a shared disk), or fail naming it
            steps.launch_nodes(spec, job_id, ready, session, log)
    return step, bundle


def _prepared_report(record: JobRecord) -> dict:
    """The dataset report `prepare` wrote on this laptop for the job's data ({} where it is gone: the plan
    then estimates without token counts)."""
    try:
        path = prepared_dir() / record.data_digest / DATASET_MANIFEST
        return read_model(DatasetManifest, path.read_bytes(), str(path)).report
    except (OSError, ProtocolError):
        return {}


def _prepare_again(record: JobRecord, spec: JobSpec) -> Path:
    prepared = dataset.prepare(spec, Path(record.job_file), prepared_dir())
    if prepared.digest != record.data_digest:
        raise JobError(
            f"the dataset of {record.id} changed since it was submitted "
            f"({record.data_digest[:12]} -> {prepared.digest[:12]})",
            hint="resuming needs the same data; submit the job again to train on the new data",
        )
    return prepared.dir


def _refuse_if_finished(record: JobRecord, session: Session) -> None:
    progress, _ = status_progress(record, session)
    failed = progress.failed
    if failed is not None and failed.error_class in RERUN_FAILS_THE_SAME:
        raise JobError(
            f"job {record.id} failed on its data ({failed.error_class}: {failed.message}): resuming runs the "
            "same data and would fail the same way",
            hint=f"fix the dataset or [data] in {record.job_file} (`autodl-run check {record.job_file}`), "
            f"then submit it again: autodl-run submit {record.job_file}",
        )
    done = progress.done
    if done is not None and not done.stopped:
        raise JobError(
            f"job {record.id} ran to its end ({done.steps} steps): there is nothing to resume",
            hint=f"fetch its adapter with `autodl-run fetch {record.id}`, or submit the job again to train anew",
        )


def _local_full_checkpoint(record: JobRecord, log: Log) -> tuple[int, Path]:
    """The newest whole checkpoint on the laptop, fetched from the old instance first when needed."""
    full = [(n, p) for n, p, is_full in local_checkpoints(local_copy(record)) if is_full]
    if not full:
        log(
            f"the laptop holds no whole checkpoint of {record.id}: fetching the newest from {record.spec.instance.describe()}"
        )
        try:
            got = fetch_checkpoint(record, full=True)
        except Exception as exc:
            raise JobError(
                f"no whole checkpoint of {record.id} on the laptop, and none could be fetched: {exc}",
                hint=f"while the old instance is up: `autodl-run fetch {record.id} --checkpoints`; "
                "auto-fetch during `tail` keeps only the adapter",
            ) from None
        full = [(got.step, got.path)]
    step, path = full[-1]
    try:
        verify_manifest(path)
    except ManifestError as exc:
        raise VerifyError(
            f"the checkpoint {path} is damaged: {exc}",
            hint=f"fetch it again: `autodl-run fetch {record.id} --checkpoints`",
        ) from None
    return step, path


def _upload_local_checkpoint(record: JobRecord, spec: JobSpec, session: Session, job_id: str, log: Log) -> int:
    step, local = _local_full_checkpoint(record, log)
    shape = local / BATCH_SHAPE
    check_split(_parse_shape(shape.read_bytes(), str(shape)) if shape.is_file() else None, spec, record.id, step)
    dest = session.layout.job(job_id).checkpoint(step)
    sent = sync_dir(session.transport, local, dest, marker=MANIFEST)
    log(f"  checkpoint step-{step} {'uploaded' if sent else 'already on the instance'}")
    return step


# --- what the worker did ---------------------------------------------------------------------------------


def _events_end(session: Session, paths: JobPaths) -> int:
    """The byte offset of the end of the job's event file now: what a relaunched worker writes comes after."""
    offset, skipping = 0, False
    while True:
        poll, offset = poll_once(session.transport, paths, JOB_FILES["events"], offset, skipping=skipping)
        skipping = poll.skipping
        if not poll.more:
            return offset


def _worker_resumed_from(session: Session, paths: JobPaths, offset: int, found: list[int], log: Log) -> int | None:
    """The checkpoint the relaunched worker took, read from its events: it skips a damaged one (a `resuming`
    phase naming it, right after `setup`) for the one before. Its next phase settles it; while none came
    within RESUME_SEEN_TIMEOUT_S, the newest is assumed and said to be. Without checkpoints, the new run's
    first event is enough (it starts over)."""
    newest = found[-1] if found else None
    damaged: dict[int, str] = {}
    deadline = time.monotonic() + RESUME_SEEN_TIMEOUT_S
    settled, skipping = False, False
    while not settled and time.monotonic() < deadline:
        poll, offset = poll_once(session.transport, paths, JOB_FILES["events"], offset, skipping=skipping)
        skipping = poll.skipping
        for line in poll.lines:
            e = ev.parse_or_none(line)
            if newest is None:
                return None
            if isinstance(e, ev.Started):
                return _said_resumed(e.resumed_from_step or None, found, damaged, log)
            if isinstance(e, ev.Phase) and e.phase == "resuming" and " is damaged" in e.message:
                step = checkpoint_step(e.message.split(" ", 1)[0])
                if step is not None:
                    damaged[step] = e.message
            elif isinstance(e, ev.Phase | ev.Failed | ev.Done | ev.Step) and not (
                isinstance(e, ev.Phase) and e.phase in ("setup", "resuming")
            ):
                settled = True
        if poll.state.finished and not poll.lines:
            settled = True
        if not settled and not poll.more:
            time.sleep(0.5)
    if newest is None:
        return None
    if not settled:
        log(f"  the worker has not said yet which checkpoint it took: step-{newest} unless it is damaged "
            "(`autodl-run tail` shows it)")  # fmt: skip
        return newest
    good = [s for s in found if s not in damaged]
    return _said_resumed(good[-1] if good else None, found, damaged, log)


def _said_resumed(step: int | None, found: list[int], damaged: dict[int, str], log: Log) -> int | None:
    for note in damaged.values():
        log(f"  the worker found {note.split('; ')[0]}")
    newest = found[-1]
    if step != newest:
        before = found[-2] if len(found) > 1 else None
        took = (f"the checkpoint before it, step-{step}" if step == before
                else f"an older checkpoint, step-{step}" if step else "none: it starts over from step 0")  # fmt: skip
        log(f"  the newest checkpoint step-{newest} is damaged; the worker resumed from {took}")
    return step
