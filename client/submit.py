"""`submit`: check → prepare → connect → sync → setup → launch, each step timed and shown.

Submitting a job that is already running (same name, data and spec) reattaches to it instead of
launching a second copy. `--deadline` (or `instance.expires_at`, whichever is sooner) becomes the
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

from client import dataset, guard_launch, launcher
from client.bundle import sync_bundle
from client.errors import JobError, Problem, SpecError
from client.ledger import Ledger, home
from client.prefetch import prefetch_model
from client.setup import ensure_worker_deps, remote_root
from client.specfile import load_spec
from client.sync import sync_dir
from client.transport import connect
from client.transport.base import Transport
from jobs.layout import DATASET_MANIFEST, JobPaths, RemoteLayout, layout_for
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
    timings: dict[str, float] = {}
    job_file = Path(job_file).resolve()
    with _step("check", timings, log):
        spec = load_spec(job_file)
        deadline = deadline_for(spec, job_file, deadline_unix)
    with _step("prepare", timings, log):
        prepared = dataset.prepare(spec, job_file, home() / "prepared")
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
        running = [j for j in ledger.find_running(spec.name) if j.data_digest == prepared.digest]
        if running and launcher_alive(transport, running[0]):
            same = running[0].spec.model_dump() == spec.model_dump()
            if same:
                log(f"[green]✓[/] job {running[0].id} is running already: reattaching (nothing launched)")
                return Submitted(running[0].id, running[0].spec, job_file, prepared.report, False, False,
                                 timings, reattached=True)  # fmt: skip
            raise JobError(
                f"job `{running[0].id}` with the same name and data, but another spec, is still running "
                f"on {transport.where}",
                hint=f"follow it with `autodl-run tail {running[0].id}`, or cancel it first",
            )
        with _step("sync", timings, log):
            data_sent, bundle_digest, bundle_sent = sync_worker(
                transport, layout, prepared.dir, prepared.digest, log
            )
        with _step("setup", timings, log):
            info = ensure_worker_deps(transport, spec, log=log, bundle_dir=layout.bundle_dir(bundle_digest))
            log(f"  python {info['python']}, torch {info['torch']}")
        job_id = new_job_id(spec.name)
        prefetch_model(transport, spec, layout.job(job_id), layout.bundle_dir(bundle_digest), log=log)
        with _step("launch", timings, log):
            guard = launch_job(transport, spec, job_id, layout, prepared.digest, bundle_digest, deadline)
        ledger.add(job_id, spec, job_file, prepared.digest, bundle_digest)
    finally:
        transport.close()
    return Submitted(job_id, spec, job_file, prepared.report, data_sent, bundle_sent, timings,
                     deadline_unix=deadline, guard=guard)  # fmt: skip


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


def launcher_alive(transport: Transport, record) -> bool:
    paths = layout_for(record.spec).job(record.id)
    status = launcher.job_status(transport, paths, record.spec.instance.tmux_socket, record.id)
    return status["state"] == "running" and bool(status.get("alive"))


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
        local = Path(tmp) / "job.json"
        local.write_text(json.dumps(job.model_dump(mode="json"), indent=2))
        transport.put(local, posixpath.join(paths.dir, "job.json"))
