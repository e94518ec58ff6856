"""`submit`: check → prepare → connect → sync → setup → launch, each step timed and shown.

Submitting a job that is already launching or running on its instance (the same resolved spec and
data, from any laptop) reattaches to it instead of launching a second copy (client.remote.submission). `--deadline` (or `instance.expires_at`, whichever is sooner) becomes the
worker's `deadline_unix`: it stops in time to save and fetch. With a shutdown policy other than
"never", the guard (remote_worker.guard) is launched beside the job.
"""

from __future__ import annotations

import json
import posixpath
import re
import secrets
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path

from client import dataset
from client.errors import AutodlRunError, JobError, Problem, RemoteCommandError, RemoteEnvError, SpecError
from client.home import prepared_dir
from client.ledger import JobRecord, Ledger
from client.remote import guard as guard_launch
from client.remote import launcher, submission
from client.remote.bundle import sync_bundle
from client.remote.prefetch import prefetch_model
from client.remote.setup import ensure_worker_deps, remote_root
from client.remote.sync import sync_dir
from client.specfile import load_spec
from client.transport import connect
from client.transport.base import Transport
from jobs.layout import DATASET_MANIFEST, JobPaths, RemoteLayout, layout_for
from jobs.protocol import LaunchRecord
from jobs.spec import JobSpec, WorkerJob

Log = Callable[[str], None]


@dataclass
class Submitted:
    job_id: str
    spec: JobSpec
    job_file: Path
    report: dict
    data_sent: bool
    bundle_sent: bool
    timings: dict[str, float]
    reattached: bool = False  # the same job was running already: nothing was launched
    deadline_unix: float | None = None
    guard: bool = False  # a guard was launched beside the job

    def as_dict(self) -> dict:
        return {
            "job_id": self.job_id,
            "instance": self.spec.instance.describe(),
            "remote_root": self.spec.instance.remote_root,
            "data_digest": self.report.get("digest"),
            "data_sent": self.data_sent,
            "bundle_sent": self.bundle_sent,
            "reattached": self.reattached,
            "deadline_unix": self.deadline_unix,
            "shutdown_after": self.spec.instance.shutdown_policy,
            "guard": self.guard,
            "timings_s": {k: round(v, 3) for k, v in self.timings.items()},
        }


@contextmanager
def _step(name: str, timings: dict[str, float], log: Log) -> Iterator[None]:
    t = time.monotonic()
    yield
    timings[name] = time.monotonic() - t
    log(f"[green]✓[/] {name:<8} {timings[name]:6.2f}s")


def new_job_id(name: str) -> str:
    return f"{name}-{time.strftime('%Y%m%d-%H%M%S')}-{secrets.token_hex(2)}"


def resolve_remote_root(spec: JobSpec, transport: Transport) -> str:
    root = remote_root(spec)
    if root.startswith("~"):
        remote_home = transport.run(["bash", "-c", 'printf %s "$HOME"']).stdout.strip()
        root = remote_home + root[1:]
    return root


def worker_env(spec: JobSpec, layout: RemoteLayout, bundle_dir: str) -> dict[str, str]:
    env = {
        "PYTHONPATH": bundle_dir,
        "PYTHONUNBUFFERED": "1",
        "HF_HOME": layout.hf_home(),
        # Without it the CUDA allocator reserved 70 GB for 28 GB allocated (shared/anchors.md).
        "PYTORCH_CUDA_ALLOC_CONF": "expandable_segments:True",
        "TOKENIZERS_PARALLELISM": "false",
    }
    if spec.instance.hf_endpoint:
        env["HF_ENDPOINT"] = spec.instance.hf_endpoint
    return env


_DURATION = re.compile(
    r"^\+?(?:(\d+(?:\.\d+)?)d)?(?:(\d+(?:\.\d+)?)h)?(?:(\d+(?:\.\d+)?)m)?(?:(\d+(?:\.\d+)?)s)?$"
)


def parse_deadline(text: str, now: float | None = None) -> float:
    """`--deadline`: a duration from now (`90m`, `3h`, `1h30m`, `+45s`, `2d`), a clock time today
    (`18:30`, tomorrow if already past), or a date and time (`2026-12-01 18:00`, ISO 8601, local
    time unless it names an offset). Returns unix time; raises ValueError."""
    now = time.time() if now is None else now
    text = text.strip()
    m = _DURATION.match(text.lower())
    if text and m and any(m.groups()):
        d, h, mi, sec = (float(g) if g else 0.0 for g in m.groups())
        return now + d * 86400 + h * 3600 + mi * 60 + sec
    try:
        clock = re.match(r"^(\d{1,2}):(\d{2})$", text)
        if clock:
            base = datetime.fromtimestamp(now)
            at = base.replace(hour=int(clock.group(1)), minute=int(clock.group(2)), second=0, microsecond=0)
            if at.timestamp() <= now:
                at += timedelta(days=1)
            return at.timestamp()
        return datetime.fromisoformat(text).timestamp()
    except ValueError:
        raise ValueError(
            f"cannot read the deadline {text!r}: give a duration (90m, 3h, 1h30m), a time (18:30) "
            "or a date and time (2026-12-01 18:00)"
        ) from None


def deadline_for(
    spec: JobSpec, job_file: Path, deadline_unix: float | None, now: float | None = None
) -> float | None:
    """The sooner of `instance.expires_at` and `--deadline`; an error if it has passed already."""
    now = time.time() if now is None else now
    candidates: list[tuple[float, str]] = []
    if spec.instance.expires_at is not None:
        candidates.append((spec.instance.expires_at.timestamp(), "instance.expires_at"))
    if deadline_unix is not None:
        candidates.append((deadline_unix, "--deadline"))
    if not candidates:
        return None
    at, field = min(candidates)
    if at <= now:
        when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(at))
        raise SpecError(
            f"the deadline has passed ({when})",
            [Problem(str(job_file), None, field, f"{when} is in the past")],
            hint="give a later time, or leave the deadline out",
        )
    return at


def submit(
    job_file: Path, *, ledger: Ledger, log: Log = print, deadline_unix: float | None = None
) -> Submitted:
    """Check → prepare → connect → sync → setup → claim → launch. The ledger is checked before connecting,
    and the job's identity is recorded on the laptop (state `launching`) and on the instance before it
    is launched (client.remote.submission); the same job launching or running there is reattached to."""
    timings: dict[str, float] = {}
    job_file = Path(job_file).resolve()
    with _step("check", timings, log):
        spec = load_spec(job_file)
        deadline = deadline_for(spec, job_file, deadline_unix)
        ledger.check()  # a damaged ledger fails here, before anything runs that it could not record
    with _step("prepare", timings, log):
        prepared = dataset.prepare(spec, job_file, prepared_dir())
        r = prepared.report
        log(
            f"  {r['records_out']:,} records ({r['train_records']:,} train, {r['eval_records']:,} eval), "
            f"{r['duplicates_removed']:,} duplicates removed, {r['overlong']['count']:,} over max_length "
            f"({r['overlong']['action']}); dataset {prepared.digest[:12]}"
        )
    with _step("connect", timings, log):
        transport = connect(spec.instance)
        transport.run(["true"])  # connect now, so an unreachable host fails here and says so
    try:
        root = resolve_remote_root(spec, transport)
        spec.instance.remote_root = root
        layout = layout_for(spec)
        key = submission.submission_key(spec, prepared.digest)
        found = submission.current(transport, layout, key)
        if found is not None:
            return _reattach(found, transport, spec, job_file, prepared, ledger, timings, log)
        with _step("sync", timings, log):
            data_sent, bundle_digest, bundle_sent = sync_worker(
                transport, layout, prepared.dir, prepared.digest, log
            )
        with _step("setup", timings, log):
            info = ensure_worker_deps(transport, spec, log=log, bundle_dir=layout.bundle_dir(bundle_digest))
            log(f"  python {info.python}, torch {info.torch}")
        job_id = new_job_id(spec.name)
        prefetch_model(transport, spec, layout.job(job_id), layout.bundle_dir(bundle_digest), log=log)
        record = LaunchRecord(
            job_id=job_id, name=spec.name, submit_key=key, data_digest=prepared.digest,
            bundle_digest=bundle_digest, job_file=str(job_file), spec_json=spec.model_dump_json(),
        )  # fmt: skip
        ledger.add(job_id, spec, job_file, prepared.digest, bundle_digest, state="launching")
        claim = submission.claim(transport, layout, record)
        if not claim.mine:
            ledger.remove(job_id)
            return _reattach(claim, transport, spec, job_file, prepared, ledger, timings, log)
        if claim.superseded and claim.superseded != job_id and ledger.has(claim.superseded):
            ledger.update(claim.superseded, state="lost")
        with _step("launch", timings, log):
            try:
                guard = launch_job(transport, spec, job_id, layout, prepared.digest, bundle_digest, deadline)
            except (JobError, RemoteEnvError, RemoteCommandError, KeyboardInterrupt):
                # The instance answers. If the worker runs (its guard failed), both records stay; if
                # not, they go. (A cut link leaves both records: submit again reattaches.)
                _drop_unless_running(transport, layout, key, job_id, ledger)
                raise
        ledger.update(job_id, state="running")
    finally:
        transport.close()
    return Submitted(job_id, spec, job_file, prepared.report, data_sent, bundle_sent, timings,
                     deadline_unix=deadline, guard=guard)  # fmt: skip


def _drop_unless_running(transport: Transport, layout: RemoteLayout, key: str, job_id: str, ledger: Ledger) -> None:
    try:
        if launcher.job_status(transport, layout.job(job_id)).alive:
            ledger.update(job_id, state="running")
            return
        submission.unclaim(transport, layout, key, job_id)
    except AutodlRunError:
        return  # it cannot be told now: both records stay, and a later submit finds the job
    ledger.remove(job_id)


def _reattach(
    found: submission.Claim,
    transport: Transport,
    spec: JobSpec,
    job_file: Path,
    prepared: dataset.Prepared,
    ledger: Ledger,
    timings: dict[str, float],
    log: Log,
) -> Submitted:
    """The same job is launching or running there already: nothing is launched; the ledger learns of it
    (another laptop's job, or ours from before a cut link) and its guard is made sure of."""
    job_id, rec = found.job_id, found.record
    bundle_digest = rec.bundle_digest if rec else ""
    state = "running" if found.status is not None and found.status.alive else "launching"
    if not ledger.has(job_id):
        submitted_at = rec.at if rec else None
        ledger.add(job_id, spec, rec.job_file if rec and rec.job_file else job_file, prepared.digest,
                   bundle_digest, state=state, submitted_at=submitted_at)  # fmt: skip
    else:
        ledger.update(job_id, state=state)
    guard = False
    if found.status is not None and found.status.alive and bundle_digest:
        guard = ensure_guard(transport, spec, layout_for(spec), job_id, bundle_digest)
    log(f"[green]✓[/] job {job_id} is {state} already on {transport.where}: reattaching (nothing launched)")
    if state == "launching":
        log(f"  another submit is launching it; if none is, submit again after {submission.LAUNCH_STALE_S // 60} "
            "minutes to launch it anew")
    return Submitted(job_id, spec, job_file, prepared.report, False, False, timings, reattached=True,
                     guard=guard)  # fmt: skip


def ensure_guard(transport: Transport, spec: JobSpec, layout: RemoteLayout, job_id: str, bundle_digest: str) -> bool:
    """A running job whose guard is not running gets one (unless the policy is "never"). Returns whether
    one was started."""
    if spec.instance.shutdown_policy == "never":
        return False
    paths = layout.job(job_id)
    if launcher.job_status(transport, paths.guard).active:
        return False
    env = worker_env(spec, layout, layout.bundle_dir(bundle_digest))
    return guard_launch.start_guard(transport, spec, paths, job_id, env) is not None


def ensure_guard_for(record: JobRecord) -> bool:
    """`tail`'s check: the job runs, so its guard must too. One connection; False when it cannot tell."""
    spec = record.spec
    if spec.instance.shutdown_policy == "never" or not record.bundle_digest:
        return False
    transport = connect(spec.instance)
    try:
        layout = layout_for(spec)
        if not launcher.job_status(transport, layout.job(record.id)).alive:
            return False
        return ensure_guard(transport, spec, layout, record.id, record.bundle_digest)
    finally:
        transport.close()


def sync_worker(
    transport: Transport, layout: RemoteLayout, data_dir: Path, digest: str, log: Log
) -> tuple[bool, str, bool]:
    """Send the prepared data and the worker bundle unless the instance has them.

    Returns (data sent, bundle digest, bundle sent).
    """
    data_sent = sync_dir(transport, data_dir, layout.data_dir(digest), marker=DATASET_MANIFEST)
    bundle_digest, bundle_sent = sync_bundle(transport, layout)
    log(
        f"  data {'uploaded' if data_sent else 'already on the instance'}, "
        f"worker {'uploaded' if bundle_sent else 'already on the instance'}"
    )
    return data_sent, bundle_digest, bundle_sent


def launch_job(
    transport: Transport,
    spec: JobSpec,
    job_id: str,
    layout: RemoteLayout,
    digest: str,
    bundle_digest: str,
    deadline_unix: float | None,
) -> bool:
    """Write job.json, start the worker under tmux, then its guard (unless the policy is "never").

    Returns whether a guard was started. The worker resumes from the newest checkpoint in its job folder.
    """
    paths = layout.job(job_id)
    env = worker_env(spec, layout, layout.bundle_dir(bundle_digest))
    _upload_job_json(transport, spec, job_id, paths, layout, digest, deadline_unix)
    argv = [spec.instance.python, "-m", "remote_worker", paths.spec]
    launcher.launch(transport, paths, argv, socket=spec.instance.tmux_socket, session=job_id, env=env)
    return guard_launch.start_guard(transport, spec, paths, job_id, env) is not None


def _upload_job_json(
    transport: Transport,
    spec: JobSpec,
    job_id: str,
    paths: JobPaths,
    layout: RemoteLayout,
    digest: str,
    deadline_unix: float | None = None,
) -> None:
    job = WorkerJob(
        job_id=job_id,
        spec=spec,
        data_dir=layout.data_dir(digest),
        job_dir=paths.dir,
        hf_home=layout.hf_home(),
        deadline_unix=deadline_unix,
    )
    with tempfile.TemporaryDirectory() as tmp:
        local = Path(tmp) / posixpath.basename(paths.spec)
        local.write_text(json.dumps(job.model_dump(mode="json"), indent=2))
        transport.put(local, paths.spec)
