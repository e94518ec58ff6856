"""`recover JOB.toml`: add to the ledger the jobs an instance knows and this laptop does not.

The instance's own record is the source of truth: each job's `launch.json` (written before the
job was launched, client.remote.submission). A job launched before a cut link, from another laptop, or
lost with a damaged ledger comes back with its state as the instance says. The instance's files
are untrusted: a bad one is skipped and named, never a traceback.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from client.errors import AutodlRunError
from client.ledger import Ledger
from client.lifecycle.resume import instance_from_file
from client.lifecycle.submit import resolve_remote_root
from client.remote import launcher
from client.remote.submission import launch_records
from client.transport import connect
from jobs.layout import RemoteLayout
from jobs.protocol import JobState
from jobs.spec import JobSpec


def recover(instance_file: Path, ledger: Ledger, log: Callable[[str], None] = print) -> dict:
    """{added: [job ids], known: [job ids], skipped: [why]} for the instance of INSTANCE_FILE."""
    ledger.check()
    instance = instance_from_file(instance_file)
    transport = connect(instance)
    added: list[str] = []
    known: list[str] = []
    try:
        probe = JobSpec.model_construct(instance=instance)  # only its instance is read
        instance.remote_root = resolve_remote_root(probe, transport)
        layout = RemoteLayout(instance.remote_root)
        found = launch_records(transport, layout)
        for rec in sorted(found.records, key=lambda r: r.at):
            if ledger.has(rec.job_id):
                known.append(rec.job_id)
                continue
            # the spec the job runs, reached the way this laptop reaches the instance
            spec = JobSpec.model_validate_json(rec.spec_json)
            spec = spec.model_copy(update={"instance": instance.model_copy()})
            try:
                status = launcher.job_status(transport, layout.job(rec.job_id))
            except AutodlRunError as exc:
                found.skipped.append(f"{rec.job_id}: cannot read its state: {exc.message}")
                continue
            state = JobState.RUNNING if status.state is JobState.STARTING else status.state
            ledger.add(rec.job_id, spec, rec.job_file, rec.data_digest, rec.bundle_digest,
                       state=state.value, submitted_at=rec.at)  # fmt: skip
            added.append(rec.job_id)
            log(f"  {rec.job_id}: {state}")
    finally:
        transport.close()
    return {"instance": instance.describe(), "added": added, "known": known, "skipped": found.skipped}
