"""`recover JOB.toml`: add to the ledger the jobs an instance knows and this laptop does not.

The instance's own record says which jobs exist: each job's `launch.json` (written before the job
was launched, client.remote.submission). A job launched before a cut link, from another laptop, or
lost with a damaged ledger comes back with its state as the instance says. Everything the laptop
will act on (where it fetches to, which model and data files it reads, trust_remote_code) comes
from JOB.toml, never from the instance: the instance's spec is not read back, and jobs launched from
another job file (another name) are skipped with the command that recovers them. The instance's
files are untrusted: a bad one is skipped and named, never a traceback.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from client.errors import AutodlRunError
from client.ledger import Ledger
from client.remote import launcher
from client.remote.submission import launch_records
from client.session import open_session
from client.specfile import load_spec
from jobs.protocol import JobState


@dataclass
class Recovered:
    instance: str
    added: list[str] = field(default_factory=list)  # job ids
    known: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)  # why, one line each

    def as_dict(self) -> dict:
        return {"instance": self.instance, "added": self.added, "known": self.known, "skipped": self.skipped}


def recover(instance_file: Path, ledger: Ledger, log: Callable[[str], None] = print) -> Recovered:
    """The jobs of the instance of INSTANCE_FILE: added to the ledger, known already, or skipped (and why)."""
    ledger.check()
    job_file = Path(instance_file).resolve()
    spec = load_spec(job_file)  # the laptop's own: the instance never chooses what the laptop reads or writes
    instance = spec.instance
    out = Recovered(instance.describe())
    with open_session(instance) as session:
        layout = session.layout
        found = launch_records(session.transport, layout)
        out.skipped = found.skipped
        for rec in sorted(found.records, key=lambda r: r.at):
            if ledger.has(rec.job_id):
                out.known.append(rec.job_id)
                continue
            if rec.name != spec.name:
                out.skipped.append(
                    f"{rec.job_id}: launched from another job file (name {rec.name!r}, not {spec.name!r}): "
                    "recover it with that file"
                )
                continue
            try:
                status = launcher.job_status(session.transport, layout.job(rec.job_id))
            except AutodlRunError as exc:
                out.skipped.append(f"{rec.job_id}: cannot read its state: {exc.message}")
                continue
            state = JobState.RUNNING if status.state is JobState.STARTING else status.state
            ledger.add(rec.job_id, spec, job_file, rec.data_digest, rec.bundle_digest,
                       state=state.value, submitted_at=rec.at, placement=session.placement)  # fmt: skip
            out.added.append(rec.job_id)
            log(f"  {rec.job_id}: {state}")
    return out
