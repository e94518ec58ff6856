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
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import tomllib
from pydantic import ValidationError

from client import dataset
from client.errors import JobError, Problem, SpecError, VerifyError
from client.home import prepared_dir
from client.ledger import JobRecord, Ledger
from client.lifecycle.fetch import fetch_checkpoint, job_root, local_checkpoints, remote_steps
from client.lifecycle.submit import (
    deadline_for,
    ensure_guard,
    launch_job,
    new_job_id,
    resolve_remote_root,
    sync_bundle,
)
from client.lifecycle.tail import status_progress
from client.remote import launcher
from client.remote.prefetch import prefetch_model
from client.remote.setup import ensure_worker_deps
from client.remote.submission import submission_key, write_launch_record
from client.remote.sync import remote_exists, sync_dir
from client.transport import connect
from client.transport.base import Transport
from jobs.layout import DATASET_MANIFEST, MANIFEST, RemoteLayout, layout_for
from jobs.manifest import ManifestError, verify_manifest
from jobs.protocol import JobState, LaunchRecord
from jobs.spec import InstanceSpec, JobSpec

Log = Callable[[str], None]
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


# --- resume ----------------------------------------------------------------------------------------------


def resume(
    record: JobRecord,
    ledger: Ledger,
    *,
    instance: InstanceSpec | None = None,
    deadline_unix: float | None = None,
    log: Log = print,
) -> Resumed:
    if instance is None or same_target(instance, record.spec.instance):
        return _in_place(record, ledger, deadline_unix, log)
    return _elsewhere(record, ledger, instance, deadline_unix, log)


def _in_place(record: JobRecord, ledger: Ledger, deadline_unix: float | None, log: Log) -> Resumed:
    spec = record.spec
    layout = layout_for(spec)
    paths = layout.job(record.id)
    transport = connect(spec.instance)
    try:
        status = launcher.job_status(transport, paths)
        where = transport.where
        if status.active:
            log(f"job {record.id} is {status.state} on {where}: reattaching (nothing started)")
            if status.alive and record.bundle_digest:
                ensure_guard(transport, spec, layout, record.id, record.bundle_digest)
            return Resumed(record.id, record.id, where, None, reattached=True)
        if status.state is JobState.MISSING:
            log(f"the job folder is gone from {where}: uploading the checkpoint fetched last")
            step = _upload_local_checkpoint(record, transport, layout, record.id, log)
        else:
            _refuse_if_finished(record, transport)
            steps = remote_steps(transport, paths)
            step = steps[-1] if steps else None
        deadline = deadline_for(spec, Path(record.job_file), deadline_unix)
        ledger.check()  # before launching: a damaged ledger could not record it
        bundle = _prepare_and_launch(record, spec, transport, layout, record.id, deadline, log)
    finally:
        transport.close()
    ledger.update(record.id, state="running", finished_at=None, bundle_digest=bundle)
    log(f"resumed {record.id} on {where} " + (f"from checkpoint step-{step}" if step else "from the start"))
    return Resumed(record.id, record.id, where, step)


def _elsewhere(
    record: JobRecord, ledger: Ledger, instance: InstanceSpec, deadline_unix: float | None, log: Log
) -> Resumed:
    spec = record.spec.model_copy(update={"instance": instance.model_copy()})
    job_file = Path(record.job_file)
    deadline = deadline_for(spec, job_file, deadline_unix)
    ledger.check()
    transport = connect(spec.instance)
    try:
        transport.run(["true"])  # an unreachable host fails here, before anything else
        spec.instance.remote_root = resolve_remote_root(spec, transport)
        layout = layout_for(spec)
        job_id = new_job_id(spec.name)
        step = _upload_local_checkpoint(record, transport, layout, job_id, log)

        def record_first(bundle_digest: str) -> None:  # the laptop and the instance know the job before it runs
            ledger.add(job_id, spec, job_file, record.data_digest, bundle_digest, state="launching")
            write_launch_record(transport, layout, LaunchRecord(
                job_id=job_id, name=spec.name, submit_key=submission_key(spec, record.data_digest),
                data_digest=record.data_digest, bundle_digest=bundle_digest, job_file=str(job_file),
                spec_json=spec.model_dump_json(),
            ))  # fmt: skip

        _prepare_and_launch(record, spec, transport, layout, job_id, deadline, log, record_first)
        ledger.update(job_id, state="running")
        where = transport.where
    finally:
        transport.close()
    log(f"{record.id} continues as {job_id} on {where} from checkpoint step-{step}")
    return Resumed(job_id, record.id, where, step, moved=True)


# --- the pieces -------------------------------------------------------------------------------------------


def _refuse_if_finished(record: JobRecord, transport: Transport) -> None:
    progress, _ = status_progress(record, transport)
    done = progress.done
    if done is not None and not done.stopped:
        raise JobError(
            f"job {record.id} ran to its end ({done.steps} steps): there is nothing to resume",
            hint=f"fetch its adapter with `autodl-run fetch {record.id}`, or submit the job again to train anew",
        )


def _local_full_checkpoint(record: JobRecord, log: Log) -> tuple[int, Path]:
    """The newest whole checkpoint on the laptop, fetched from the old instance first when needed."""
    full = [(n, p) for n, p, is_full in local_checkpoints(job_root(record)) if is_full]
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


def _upload_local_checkpoint(
    record: JobRecord, transport: Transport, layout: RemoteLayout, job_id: str, log: Log
) -> int:
    step, local = _local_full_checkpoint(record, log)
    dest = layout.job(job_id).checkpoint(step)
    sent = sync_dir(transport, local, dest, marker=MANIFEST)
    log(f"  checkpoint step-{step} {'uploaded' if sent else 'already on the instance'}")
    return step


def _prepare_and_launch(
    record: JobRecord,
    spec: JobSpec,
    transport: Transport,
    layout: RemoteLayout,
    job_id: str,
    deadline: float | None,
    log: Log,
    before_launch: Callable[[str], None] | None = None,
) -> str:
    """Data (prepared again only if the instance lacks it), worker, packages, then job.json, worker and guard.

    Returns the worker bundle's digest.
    """
    digest = record.data_digest
    if not remote_exists(transport, layout.data_dir(digest) + "/" + DATASET_MANIFEST):
        prepared = dataset.prepare(spec, Path(record.job_file), prepared_dir())
        if prepared.digest != digest:
            raise JobError(
                f"the dataset of {record.id} changed since it was submitted ({digest[:12]} -> {prepared.digest[:12]})",
                hint="resuming needs the same data; submit the job again to train on the new data",
            )
        sync_dir(transport, prepared.dir, layout.data_dir(digest), marker=DATASET_MANIFEST)
        log("  data uploaded")
    bundle_digest, _ = sync_bundle(transport, layout)
    ensure_worker_deps(transport, spec, log=log, bundle_dir=layout.bundle_dir(bundle_digest))
    prefetch_model(transport, spec, layout.job(job_id), layout.bundle_dir(bundle_digest), log=log)
    if before_launch is not None:
        before_launch(bundle_digest)
    launch_job(transport, spec, job_id, layout, digest, bundle_digest, deadline)
    return bundle_digest
