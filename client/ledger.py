"""The local job ledger: one SQLite table under `$AUTODL_RUN_HOME` (default `~/.autodl-run`).

It only remembers what the laptop needs to find a job again; the truth about a job lives on
the instance (jobs.layout), so another laptop can reattach with the job id and the spec.
"""

from __future__ import annotations

import json
import sqlite3
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from pydantic import ValidationError

from client.errors import JobError, LedgerError
from client.home import home, ledger_file  # noqa: F401  (home: re-exported)
from jobs.layout import Placement, RemoteLayout, layout_for
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
    fetched_to    TEXT,
    remote_root   TEXT
);
"""
# Columns added since the first ledgers: added to an older file when it is opened.
_ADDED = {"remote_root": "TEXT"}
_COLUMNS = ("id", "name", "job_file", "spec_json", "data_digest", "bundle_digest", "submitted_at", "state",
            "finished_at", "fetched_to", "remote_root")  # fmt: skip


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
    remote_root: str | None = None  # resolved on the instance when it was placed (the spec keeps its own)

    @property
    def placement(self) -> Placement:
        """Where the job lives: the stored placement, or (a row from before it was stored apart) the
        spec's remote_root, which submit resolved then."""
        root = self.remote_root or self.spec.instance.remote_root
        if not root:
            raise LedgerError(f"the ledger row of {self.id} does not say where the job lives on its instance",
                              hint="`autodl-run recover JOB.toml` adds it back from the instance")
        return Placement(root, python=self.spec.instance.python or "python3")

    @property
    def layout(self) -> RemoteLayout:
        return layout_for(self.placement)

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


REPAIR = "autodl-run ledger repair"


class Ledger:
    """Every sqlite error becomes a LedgerError naming the file and the repair (never a traceback)."""

    def __init__(self, path: Path | None = None):
        self.path = path or ledger_file()
        with self._guard("open"):
            self._db = sqlite3.connect(self.path, timeout=30)
            self._db.row_factory = sqlite3.Row
            self._db.executescript(_SCHEMA)
            have = {r[1] for r in self._db.execute("PRAGMA table_info(jobs)")}
            for col, kind in _ADDED.items():
                if col not in have:
                    self._db.execute(f"ALTER TABLE jobs ADD COLUMN {col} {kind}")
            self._db.commit()

    @contextmanager
    def _guard(self, doing: str) -> Iterator[None]:
        try:
            yield
        except sqlite3.OperationalError as exc:
            if "locked" in str(exc) or "busy" in str(exc):
                raise LedgerError(
                    f"the job ledger {self.path} is locked by another autodl-run ({doing})",
                    hint="wait for the other command to finish, then run this again",
                ) from None
            raise self._damaged(doing, exc) from None
        except (sqlite3.Error, ValidationError, ValueError) as exc:
            raise self._damaged(doing, exc) from None

    def _damaged(self, doing: str, exc: Exception) -> LedgerError:
        why = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        return LedgerError(
            f"the job ledger {self.path} is damaged ({doing}: {why})",
            hint=f"`{REPAIR}` moves it aside and starts a fresh one; then `autodl-run recover JOB.toml` "
            "adds back the jobs each instance knows",
        )

    def check(self) -> None:
        """Before launching anything: the file is sound (PRAGMA quick_check) and takes a write."""
        with self._guard("check"):
            problems = [r[0] for r in self._db.execute("PRAGMA quick_check").fetchall()]
            if problems != ["ok"]:
                raise sqlite3.DatabaseError("; ".join(problems[:3]))
            self._db.execute("BEGIN IMMEDIATE")
            try:
                self._db.execute(
                    "INSERT INTO jobs (id, name, job_file, spec_json, data_digest, bundle_digest, submitted_at,"
                    " state) VALUES ('.write-test', '', '', '{}', '', '', 0, 'test')"
                )
            finally:
                self._db.rollback()

    def add(
        self,
        job_id: str,
        spec: JobSpec,
        job_file: Path | str,
        data_digest: str,
        bundle_digest: str,
        *,
        state: str = "running",
        submitted_at: float | None = None,
        placement: Placement | None = None,
    ) -> None:
        """`spec` as the user wrote it; `placement`: where it was put on the instance."""
        with self._guard("add a job"), self._db:
            self._db.execute(
                "INSERT INTO jobs (id, name, job_file, spec_json, data_digest, bundle_digest, submitted_at, state,"
                " remote_root) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (job_id, spec.name, str(job_file), spec.model_dump_json(), data_digest, bundle_digest,
                 submitted_at or time.time(), state, placement.remote_root if placement else None),
            )  # fmt: skip

    def has(self, job_id: str) -> bool:
        with self._guard("read"):
            return self._db.execute("SELECT 1 FROM jobs WHERE id = ?", (job_id,)).fetchone() is not None

    def remove(self, job_id: str) -> None:
        with self._guard("remove a job"), self._db:
            self._db.execute("DELETE FROM jobs WHERE id = ?", (job_id,))

    def update(self, job_id: str, **fields: object) -> None:
        allowed = {"state", "finished_at", "fetched_to", "bundle_digest"}
        if not fields.keys() <= allowed:
            raise ValueError(f"cannot update {sorted(fields.keys() - allowed)}")
        cols = ", ".join(f"{k} = ?" for k in fields)
        with self._guard("update a job"), self._db:
            self._db.execute(f"UPDATE jobs SET {cols} WHERE id = ?", (*fields.values(), job_id))

    def get(self, job_id: str | None = None) -> JobRecord:
        """A job by id (or a unique prefix of one); the latest job when no id is given."""
        with self._guard("read"):
            return self._get(job_id)

    def _get(self, job_id: str | None) -> JobRecord:
        if job_id is None:
            row = self._db.execute("SELECT * FROM jobs ORDER BY submitted_at DESC LIMIT 1").fetchone()
            if row is None:
                raise JobError("no jobs yet", hint="submit one with `autodl-run submit job.toml`")
            return _record(row)
        # substr, not LIKE: '_' and '%' are ordinary characters of a job id
        rows = self._db.execute(
            "SELECT * FROM jobs WHERE substr(id, 1, ?) = ? ORDER BY submitted_at DESC", (len(job_id), job_id)
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

    def all(self) -> list[JobRecord]:
        with self._guard("read"):
            return [_record(r) for r in self._db.execute("SELECT * FROM jobs ORDER BY submitted_at DESC")]

    def close(self) -> None:
        self._db.close()


def repair(path: Path | None = None) -> tuple[Path | None, int]:
    """Move a damaged ledger aside and start a fresh one with every row that can still be read.

    Returns (where the damaged file went, or None when there was none; how many jobs were kept).
    """
    path = path or ledger_file()
    rows: list[tuple] = []
    if path.exists():
        try:
            old = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
            old.row_factory = sqlite3.Row
            try:
                for row in old.execute("SELECT * FROM jobs NOT INDEXED"):
                    rows.append(tuple(row[c] if c in row.keys() else None for c in _COLUMNS))
            finally:
                old.close()
        except sqlite3.Error:
            pass  # keep what was read before the damage
    aside = None
    if path.exists():
        aside = path.with_name(f"{path.name}.damaged-{time.strftime('%Y%m%d-%H%M%S')}")
        path.rename(aside)
    for suffix in ("-journal", "-wal", "-shm"):
        side = path.with_name(path.name + suffix)
        if side.exists():
            side.rename(Path(str(aside or path) + suffix))
    fresh = Ledger(path)
    kept = 0
    with fresh._guard("repair"), fresh._db:
        for row in rows:
            try:
                JobSpec.model_validate_json(row[3])
            except (ValidationError, ValueError, TypeError, IndexError):
                continue
            cur = fresh._db.execute(
                f"INSERT OR IGNORE INTO jobs ({', '.join(_COLUMNS)}) VALUES ({', '.join('?' * len(_COLUMNS))})", row
            )
            kept += cur.rowcount
    fresh.close()
    return aside, kept


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
        remote_root=row["remote_root"],
    )
