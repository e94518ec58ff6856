"""The local job ledger: one SQLite table under `$AUTODL_RUN_HOME` (default `~/.autodl-run`).

It only remembers what the laptop needs to find a job again; the truth about a job lives on
the instance (jobs.layout), so another laptop can reattach with the job id and the spec.
"""

from __future__ import annotations

import json
import os
import sqlite3
import time
from dataclasses import dataclass
from pathlib import Path

from client.errors import JobError
from jobs.spec import JobSpec

_SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    id            TEXT PRIMARY KEY,
    name          TEXT NOT NULL,
    job_file      TEXT NOT NULL,
    spec_json     TEXT NOT NULL,
    data_digest   TEXT NOT NULL,
    bundle_digest TEXT NOT NULL,
    submitted_at  REAL NOT NULL,
    state         TEXT NOT NULL,
    finished_at   REAL,
    fetched_to    TEXT
);
"""


def home() -> Path:
    path = Path(os.environ.get("AUTODL_RUN_HOME") or Path.home() / ".autodl-run").expanduser()
    path.mkdir(parents=True, exist_ok=True)
    return path


@dataclass
class JobRecord:
    id: str
    name: str
    job_file: str
    spec: JobSpec
    data_digest: str
    bundle_digest: str
    submitted_at: float
    state: str
    finished_at: float | None
    fetched_to: str | None

    def as_dict(self) -> dict:
        return {
            "id": self.id,
            "name": self.name,
            "job_file": self.job_file,
            "instance": self.spec.instance.describe(),
            "data_digest": self.data_digest,
            "submitted_at": self.submitted_at,
            "state": self.state,
            "finished_at": self.finished_at,
            "fetched_to": self.fetched_to,
        }


class Ledger:
    def __init__(self, path: Path | None = None):
        self.path = path or home() / "ledger.sqlite"
        self._db = sqlite3.connect(self.path)
        self._db.row_factory = sqlite3.Row
        self._db.executescript(_SCHEMA)

    def add(self, job_id: str, spec: JobSpec, job_file: Path, data_digest: str, bundle_digest: str) -> None:
        with self._db:
            self._db.execute(
                "INSERT INTO jobs (id, name, job_file, spec_json, data_digest, bundle_digest, submitted_at, state)"
                " VALUES (?, ?, ?, ?, ?, ?, ?, 'running')",
                (job_id, spec.name, str(job_file), spec.model_dump_json(), data_digest, bundle_digest, time.time()),
            )

    def update(self, job_id: str, **fields: object) -> None:
        allowed = {"state", "finished_at", "fetched_to"}
        if not fields.keys() <= allowed:
            raise ValueError(f"cannot update {sorted(fields.keys() - allowed)}")
        cols = ", ".join(f"{k} = ?" for k in fields)
        with self._db:
            self._db.execute(f"UPDATE jobs SET {cols} WHERE id = ?", (*fields.values(), job_id))

    def get(self, job_id: str | None = None) -> JobRecord:
        """A job by id (or a unique prefix of one); the latest job when no id is given."""
        if job_id is None:
            row = self._db.execute("SELECT * FROM jobs ORDER BY submitted_at DESC LIMIT 1").fetchone()
            if row is None:
                raise JobError("no jobs yet", hint="submit one with `autodl-run submit job.toml`")
            return _record(row)
        rows = self._db.execute(
            "SELECT * FROM jobs WHERE id = ? OR id LIKE ? ORDER BY submitted_at DESC", (job_id, job_id + "%")
        ).fetchall()
        exact = [r for r in rows if r["id"] == job_id]
        if exact:
            return _record(exact[0])
        if len(rows) == 1:
            return _record(rows[0])
        if not rows:
            raise JobError(f"no job `{job_id}` in the ledger {self.path}", hint="`autodl-run ls` lists the jobs")
        raise JobError(
            f"`{job_id}` matches {len(rows)} jobs: {', '.join(r['id'] for r in rows[:5])}",
            hint="give more of the job id",
        )

    def find_running(self, name: str) -> list[JobRecord]:
        rows = self._db.execute(
            "SELECT * FROM jobs WHERE name = ? AND state = 'running' ORDER BY submitted_at DESC", (name,)
        ).fetchall()
        return [_record(r) for r in rows]

    def all(self) -> list[JobRecord]:
        return [_record(r) for r in self._db.execute("SELECT * FROM jobs ORDER BY submitted_at DESC")]

    def close(self) -> None:
        self._db.close()


def _record(row: sqlite3.Row) -> JobRecord:
    return JobRecord(
        id=row["id"],
        name=row["name"],
        job_file=row["job_file"],
        spec=JobSpec.model_validate(json.loads(row["spec_json"])),
        data_digest=row["data_digest"],
        bundle_digest=row["bundle_digest"],
        submitted_at=row["submitted_at"],
        state=row["state"],
        finished_at=row["finished_at"],
        fetched_to=row["fetched_to"],
    )
