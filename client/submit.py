"""`submit`: check → prepare → connect → sync → setup → launch, each step timed and shown."""

from __future__ import annotations

import json
import posixpath
import secrets
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from client import dataset, launcher
from client.bundle import stage_bundle
from client.errors import JobError
from client.ledger import Ledger, home
from client.setup import ensure_worker_deps
from client.specfile import load_spec
from client.sync import sync_dir
from client.transport import connect
from client.transport.base import Transport
from jobs.layout import MANIFEST, JobPaths, RemoteLayout
from jobs.spec import AUTODL_DATA_DISK_ROOT, JobSpec, WorkerJob

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

    def as_dict(self) -> dict:
        return {
            "job_id": self.job_id,
            "instance": self.spec.instance.describe(),
            "remote_root": self.spec.instance.remote_root,
            "data_digest": self.report.get("digest"),
            "data_sent": self.data_sent,
            "bundle_sent": self.bundle_sent,
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
    root = spec.instance.remote_root
    if root is None:
        root = str(home() / "local") if spec.instance.is_local else AUTODL_DATA_DISK_ROOT
    if root.startswith("~"):
        remote_home = transport.run(["bash", "-c", 'printf %s "$HOME"']).stdout.strip()
        root = remote_home + root[1:]
    return root


def layout_for(spec: JobSpec) -> RemoteLayout:
    assert spec.instance.remote_root, "the remote root is resolved at submit time"
    return RemoteLayout(spec.instance.remote_root)


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


def submit(job_file: Path, *, ledger: Ledger, log: Log = print) -> Submitted:
    timings: dict[str, float] = {}
    job_file = Path(job_file).resolve()
    with _step("check", timings, log):
        spec = load_spec(job_file)
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
            raise JobError(
                f"job `{running[0].id}` with the same name and data is still running on {transport.where}",
                hint=f"follow it with `autodl-run tail {running[0].id}`, or cancel it first",
            )
        with _step("sync", timings, log):
            data_sent = sync_dir(transport, prepared.dir, layout.data_dir(prepared.digest), marker=MANIFEST)
            bundle = stage_bundle(home() / "bundles")
            bundle_dir = layout.bundle_dir(bundle.digest)
            bundle_sent = sync_dir(transport, bundle.dir, bundle_dir, marker="remote_worker/__init__.py")
            log(
                f"  data {'uploaded' if data_sent else 'already on the instance'}, "
                f"worker {'uploaded' if bundle_sent else 'already on the instance'}"
            )
        with _step("setup", timings, log):
            info = ensure_worker_deps(transport, spec, log=log)
            log(f"  python {info['python']}, torch {info['torch']}")
        job_id = new_job_id(spec.name)
        paths = layout.job(job_id)
        with _step("launch", timings, log):
            _upload_job_json(transport, spec, job_id, paths, layout, prepared.digest)
            argv = [spec.instance.python, "-m", "remote_worker", paths.spec]
            launcher.launch(
                transport, paths, argv, socket=spec.instance.tmux_socket, session=job_id,
                env=worker_env(spec, layout, bundle_dir),
            )
        ledger.add(job_id, spec, job_file, prepared.digest, bundle.digest)
    finally:
        transport.close()
    return Submitted(job_id, spec, job_file, prepared.report, data_sent, bundle_sent, timings)


def launcher_alive(transport: Transport, record) -> bool:
    paths = layout_for(record.spec).job(record.id)
    status = launcher.job_status(transport, paths, record.spec.instance.tmux_socket, record.id)
    return status["state"] == "running" and bool(status.get("alive"))


def _upload_job_json(
    transport: Transport, spec: JobSpec, job_id: str, paths: JobPaths, layout: RemoteLayout, digest: str
) -> None:
    job = WorkerJob(
        job_id=job_id, spec=spec, data_dir=layout.data_dir(digest), job_dir=paths.dir, hf_home=layout.hf_home()
    )
    with tempfile.TemporaryDirectory() as tmp:
        local = Path(tmp) / "job.json"
        local.write_text(json.dumps(job.model_dump(mode="json"), indent=2))
        transport.put(local, posixpath.join(paths.dir, "job.json"))
