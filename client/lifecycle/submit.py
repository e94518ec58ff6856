"""`submit`: check → prepare → connect → plan → sync → setup → model → launch, each step timed and shown.

The plan step (client.lifecycle.steps.plan) plans the job for the card the instance reports and stops before
anything is uploaded or downloaded when it cannot fit.

Submitting a job that is already launching or running on its instance (the same resolved spec and
data, from any laptop) reattaches to it instead of launching a second copy (client.remote.submission). `--deadline` (or `instance.expires_at`, whichever is sooner) becomes the
worker's `deadline_unix`: it stops in time to save and fetch. With a shutdown policy other than
"never", the guard (remote_worker.guard) is launched beside the job.
"""

from __future__ import annotations

from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

from client import dataset
from client.errors import AutodlRunError, JobError, RemoteCommandError, RemoteEnvError
from client.home import prepared_dir
from client.ledger import JobRecord, Ledger
from client.lifecycle import steps
from client.lifecycle.pipeline import Log, Pipeline, Report, Step
from client.lifecycle.steps import deadline_for, parse_deadline  # noqa: F401  (the CLI's --deadline)
from client.remote import launcher, submission
from client.session import Session, open_session
from client.specfile import load_spec
from jobs.layout import Placement
from jobs.protocol import LaunchRecord
from jobs.spec import JobSpec


@dataclass
class Submitted:
    job_id: str
    spec: JobSpec  # as the user wrote it
    job_file: Path
    report: dict
    data_sent: bool
    bundle_sent: bool
    timings: dict[str, float]
    reattached: bool = False  # the same job was running already: nothing was launched
    deadline_unix: float | None = None
    guard: bool = False  # a guard was launched beside the job
    placement: Placement | None = None

    def as_dict(self) -> dict:
        return {
            "job_id": self.job_id,
            "instance": self.spec.instance.describe(),
            "remote_root": self.placement.remote_root if self.placement else self.spec.instance.remote_root,
            "data_digest": self.report.get("digest"),
            "data_sent": self.data_sent,
            "bundle_sent": self.bundle_sent,
            "reattached": self.reattached,
            "deadline_unix": self.deadline_unix,
            "shutdown_after": self.spec.instance.shutdown_policy,
            "guard": self.guard,
            "timings_s": {k: round(v, 3) for k, v in self.timings.items()},
        }


def _check(job_file: Path, ledger: Ledger, deadline_unix: float | None) -> tuple[JobSpec, float | None]:
    spec = load_spec(job_file)
    deadline = deadline_for(spec, job_file, deadline_unix)
    ledger.check()  # a damaged ledger fails here, before anything runs that it could not record
    return spec, deadline


def _prepare(spec: JobSpec, job_file: Path) -> dataset.Prepared:
    return dataset.prepare(spec, job_file, prepared_dir())


def _describe_prepared(prepared: dataset.Prepared) -> str:
    r = prepared.report
    return (
        f"{r['records_out']:,} records ({r['train_records']:,} train, {r['eval_records']:,} eval), "
        + (f"{r['invalid_count']:,} invalid rows skipped (data.on_error = \"skip\"), " if r.get("invalid_count") else "")
        + f"{r['duplicates_removed']:,} duplicates removed, {r['overlong']['count']:,} over max_length "
        f"({r['overlong']['action']}); dataset {prepared.digest[:12]}"
    )


CHECK = Step("check", _check)
PREPARE = Step("prepare", _prepare, _describe_prepared)


def submit(
    job_file: Path,
    *,
    ledger: Ledger,
    log: Log = print,
    deadline_unix: float | None = None,
    report: Report | None = None,
    gpu: str | None = None,
) -> Submitted:
    """Check → prepare → connect → plan → sync → setup → model → claim → launch, each step timed and reported
    (`report`; plain lines to `log` without one). The ledger is checked before connecting, and the job's
    identity is recorded on the laptop (state `launching`) and on the instance before it is launched
    (client.remote.submission); the same job launching or running there is reattached to."""
    run = Pipeline(report, log)
    job_file = Path(job_file).resolve()
    spec, deadline = run.run(CHECK, job_file, ledger, deadline_unix)
    prepared = run.run(PREPARE, spec, job_file)
    with run.run(steps.CONNECT, spec) as session:
        layout = session.layout
        key = submission.submission_key(session.placed(spec), prepared.digest)
        found = submission.current(session.transport, layout, key)
        if found is not None:
            return _reattach(found, session, spec, job_file, prepared, ledger, run, log)
        steps.check_processes(session, spec, str(job_file))  # train.gpus within the GPUs (cores) it has
        run.run(steps.PLAN, session, spec, prepared.report, gpu)  # refuses what cannot fit, before any upload
        synced = run.run(steps.SYNC, session, prepared.digest, prepared.dir)
        bundle_digest = synced.bundle_digest
        run.run(steps.SETUP, session, spec, bundle_digest, log)
        job_id = steps.new_job_id(spec.name)
        run.run(steps.MODEL, session, spec, job_id, bundle_digest, log)
        nodes = ExitStack()  # the other nodes' sessions, open from their preparation to their launch
        with nodes:
            # every other node ready before any is launched: one that fails here leaves nothing waiting
            ready = steps.prepare_nodes(spec, str(job_file), job_id, prepared.digest, prepared.dir, deadline, log,
                                        nodes)  # fmt: skip
            return _launch(session, spec, job_file, prepared, synced, job_id, key, deadline, ready, ledger, run, log)


def _launch(
    session: Session, spec: JobSpec, job_file: Path, prepared: dataset.Prepared, synced: steps.Synced, job_id: str,
    key: str, deadline: float | None, ready: list[steps.ReadyNode], ledger: Ledger, run: Pipeline, log: Log,
) -> Submitted:  # fmt: skip
    """Record the job (laptop, then instance), launch node 0, then the other nodes."""
    layout, bundle_digest = session.layout, synced.bundle_digest
    record = LaunchRecord(
        job_id=job_id, name=spec.name, submit_key=key, data_digest=prepared.digest,
        bundle_digest=bundle_digest, job_file=str(job_file), spec_json=session.placed(spec).model_dump_json(),
    )  # fmt: skip
    ledger.add(job_id, spec, job_file, prepared.digest, bundle_digest, state="launching",
               placement=session.placement)  # fmt: skip
    claim = submission.claim(session.transport, layout, record)
    if not claim.mine:
        ledger.remove(job_id)
        return _reattach(claim, session, spec, job_file, prepared, ledger, run, log)
    if claim.superseded and claim.superseded != job_id and ledger.has(claim.superseded):
        ledger.update(claim.superseded, state="lost")
    try:
        guard = run.run(steps.LAUNCH, session, spec, job_id, prepared.digest, bundle_digest, deadline)
        if ready:  # more nodes (docs/multigpu.md): they join node 0's rendezvous
            steps.launch_nodes(spec, job_id, ready, session, log)
    except (JobError, RemoteEnvError, RemoteCommandError, KeyboardInterrupt):
        # The instance answers. If the worker runs (its guard failed), both records stay; if
        # not, they go. (A cut link leaves both records: submit again reattaches.)
        _drop_unless_running(session, key, job_id, ledger)
        raise
    ledger.update(job_id, state="running")
    return Submitted(job_id, spec, job_file, prepared.report, synced.data_sent, synced.bundle_sent, run.timings,
                     deadline_unix=deadline, guard=guard, placement=session.placement)  # fmt: skip


def _drop_unless_running(session: Session, key: str, job_id: str, ledger: Ledger) -> None:
    try:
        if launcher.job_status(session.transport, session.layout.job(job_id)).alive:
            ledger.update(job_id, state="running")
            return
        submission.unclaim(session.transport, session.layout, key, job_id)
    except AutodlRunError:
        return  # it cannot be told now: both records stay, and a later submit finds the job
    ledger.remove(job_id)


def _reattach(
    found: submission.Claim,
    session: Session,
    spec: JobSpec,
    job_file: Path,
    prepared: dataset.Prepared,
    ledger: Ledger,
    run: Pipeline,
    log: Log,
) -> Submitted:
    """The same job is launching or running there already: nothing is launched; the ledger learns of it
    (another laptop's job, or ours from before a cut link) and its guard is made sure of."""
    job_id, rec = found.job_id, found.record
    bundle_digest = rec.bundle_digest if rec else ""
    state = "running" if found.status is not None and found.status.alive else "launching"
    if not ledger.has(job_id):
        submitted_at = rec.at if rec else None
        # this laptop's own spec and job file: the instance's record names the job, it never chooses what
        # the laptop reads or where it writes
        ledger.add(job_id, spec, job_file, prepared.digest,
                   bundle_digest, state=state, submitted_at=submitted_at, placement=session.placement)  # fmt: skip
    else:
        ledger.update(job_id, state=state)
    guard = False
    if found.status is not None and found.status.alive and bundle_digest:
        guard = steps.ensure_guard(session, spec, job_id, bundle_digest)
    log(f"✓ job {job_id} is {state} already on {session.where}: reattaching (nothing launched)")
    if state == "launching":
        log(f"  another submit is launching it; if none is, submit again after {submission.LAUNCH_STALE_S // 60} "
            "minutes to launch it anew")
    return Submitted(job_id, spec, job_file, prepared.report, False, False, run.timings, reattached=True,
                     guard=guard, placement=session.placement)  # fmt: skip


def ensure_guard_for(record: JobRecord) -> bool:
    """The job runs, so its guard must too. One connection; False when it cannot tell.
    (`tail` does this on its own session: client.lifecycle.tail.)"""
    if record.spec.instance.shutdown_policy == "never" or not record.bundle_digest:
        return False
    with open_session(record) as session:
        if not launcher.job_status(session.transport, session.layout.job(record.id)).alive:
            return False
        return steps.ensure_guard(session, record.spec, record.id, record.bundle_digest)
