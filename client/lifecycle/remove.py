"""`autodl-run rm JOB...`: forget old jobs on the laptop and delete their folders on the instance.

Only the job's own folder (`{remote_root}/jobs/{id}`, the id checked by jobs.safepath as one plain
name) is deleted there, never what it links to; a job that still runs is refused. What the laptop
fetched (the adapter under fetch.to) is kept.
"""

from __future__ import annotations

import posixpath
from dataclasses import dataclass, field

from client.errors import AutodlRunError, JobError
from client.ledger import JobRecord, Ledger
from client.remote import launcher
from client.session import open_session
from client.transport import shell_path
from jobs.protocol import JobState
from jobs.safepath import UnsafePathError, check_relpath


@dataclass
class Removed:
    removed: list[str] = field(default_factory=list)
    folders: list[str] = field(default_factory=list)  # deleted on their instance

    def as_dict(self) -> dict:
        return {"removed": self.removed, "folders": self.folders}


def job_folder(record: JobRecord) -> str:
    """The job's folder on its instance, refused unless it is one plain name inside the layout's jobs folder."""
    try:
        name = check_relpath(record.id)
    except UnsafePathError as exc:
        raise JobError(f"job id {record.id!r} is not a plain folder name: {exc}; nothing was deleted",
                       hint="`autodl-run rm --local-only` forgets it on the laptop only") from None  # fmt: skip
    jobs = record.layout.jobs_dir
    folder = record.layout.job(name).dir
    if "/" in name or posixpath.dirname(folder) != jobs or not posixpath.isabs(jobs) or jobs in ("/", "/jobs"):
        raise JobError(f"the folder of {record.id} ({folder}) is not inside a jobs folder; nothing was deleted",
                       hint="`autodl-run rm --local-only` forgets it on the laptop only")  # fmt: skip
    return folder


def remove(records: list[JobRecord], ledger: Ledger, *, local_only: bool = False) -> Removed:
    out = Removed()
    for record in records:
        if not local_only:
            folder = job_folder(record)
            try:
                with open_session(record) as session:
                    status = launcher.job_status(session.transport, session.layout.job(record.id))
                    if status.active:
                        raise JobError(f"job {record.id} is {status.state} on {session.where}: not removed",
                                       hint=f"cancel it first: autodl-run cancel {record.id}")  # fmt: skip
                    if status.state is not JobState.MISSING:
                        session.transport.run(f"rm -rf -- {shell_path(folder)}")
                        out.folders.append(folder)
            except JobError:
                raise
            except AutodlRunError as exc:
                exc.hint = (f"{exc.hint}; or forget it on the laptop only (its folder there stays): "
                            f"autodl-run rm {record.id} --local-only").lstrip("; ")  # fmt: skip
                raise
        ledger.remove(record.id)
        out.removed.append(record.id)
    return out
