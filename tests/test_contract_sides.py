"""Each crossing file written by one side's own code and read by the other side's own code (issue 11).

The model round trips are in tests/test_contract.py; here the writers and readers are the real ones,
through the local transport (the same seam as SSH), so a field renamed on one side fails here.
"""

from __future__ import annotations

import time
from pathlib import Path

from test_guard import make_job

from client.lifecycle.fetch import acknowledge, report_speed
from client.remote import guard as guard_client
from client.remote.prefetch import read_result
from client.remote.submission import launch_records, write_launch_record
from client.transport.local import LocalTransport
from jobs.layout import JobPaths, RemoteLayout
from jobs.manifest import write_manifest
from jobs.protocol import FetchAck, GuardPhase, LaunchRecord, ModelDownload, dump_model
from remote_worker import guard as guard_worker
from remote_worker.checkpoints import read_batch_shape, write_batch_shape
from remote_worker.stopping import Stopper


def test_the_acknowledgement_the_laptop_writes_is_the_one_the_guard_accepts(tmp_path: Path, local_home) -> None:
    job = make_job(tmp_path)
    paths = JobPaths(job.job_dir)
    Path(paths.adapter).mkdir(parents=True)
    (Path(paths.adapter) / "adapter_model.safetensors").write_bytes(b"w" * 64)
    digest = write_manifest(paths.adapter)
    acknowledge(LocalTransport(), paths, manifest_sha256=digest)  # the laptop's code
    guard = guard_worker.Guard(job)
    view = guard.view(Path(job.job_dir), time.monotonic())  # the guard's code
    assert view.acked
    acknowledge(LocalTransport(), paths, manifest_sha256="0" * 64)  # another adapter's
    assert not guard.view(Path(job.job_dir), time.monotonic()).acked


def test_the_speed_the_laptop_measures_is_the_one_the_worker_sizes_its_margin_by(tmp_path: Path, local_home) -> None:
    paths = RemoteLayout(str(tmp_path)).job("j")
    Path(paths.dir).mkdir(parents=True)
    assert report_speed(LocalTransport(), paths, 50_000_000, 2.0) == 25_000_000
    assert Stopper(job_dir=Path(paths.dir)).transfer_bps() == 25_000_000


def test_the_guards_status_is_what_the_laptop_reads(tmp_path: Path, local_home) -> None:
    job = make_job(tmp_path)
    guard = guard_worker.Guard(job)
    decision = guard_worker.Decision("wait", guard_worker.Reason.RUNNING, "watching the job")
    guard.write_status(GuardPhase.WAITING, decision, "waiting for the fetch", copied_to="/root/autodl-fs/x")
    status = guard_client.guard_status(LocalTransport(), JobPaths(job.job_dir))
    assert status is not None and status.phase is GuardPhase.WAITING and status.copied_to == "/root/autodl-fs/x"
    assert "waiting for the fetch" in guard_client.describe(status)


def test_the_launch_record_the_laptop_writes_is_what_recover_and_the_guard_read(tmp_path: Path, local_home) -> None:
    layout = RemoteLayout(str(tmp_path))
    spec = make_job(tmp_path / "spec").spec.model_dump_json()
    record = LaunchRecord(job_id="j-1", name="n", submit_key="k", data_digest="ab" * 32, bundle_digest="cd" * 8,
                          spec_json=spec)  # fmt: skip
    write_launch_record(LocalTransport(), layout, record)
    assert launch_records(LocalTransport(), layout).records == [record]
    assert guard_worker.read_file(LaunchRecord, layout.job("j-1").launch) == record


def test_the_model_download_result_the_worker_writes_is_what_the_laptop_reads(tmp_path: Path, local_home) -> None:
    paths = RemoteLayout(str(tmp_path)).job("j")
    Path(paths.prefetch.dir).mkdir(parents=True)
    result = ModelDownload(ok=True, path="/hf/m", bytes=123, seconds=1.5)
    # what remote_worker.prefetch.Download.finish writes (it exits the process, so its writer is inlined)
    Path(paths.prefetch_result).write_text(dump_model(result))
    assert read_result(LocalTransport(), paths, "m") == result


def test_the_batch_shape_survives_a_checkpoint(tmp_path: Path) -> None:
    write_batch_shape(tmp_path, 8192, False)
    assert read_batch_shape(tmp_path) == (8192, False)


def test_an_ack_says_nothing_about_the_laptop(tmp_path: Path, local_home) -> None:
    paths = RemoteLayout(str(tmp_path)).job("j")
    Path(paths.dir).mkdir(parents=True)
    acknowledge(LocalTransport(), paths, manifest_sha256="0" * 64, step=3, what="checkpoint")
    ack = FetchAck.model_validate_json(Path(paths.fetched).read_text())
    assert set(ack.model_dump()) == {"what", "manifest_sha256", "step", "at"}
