"""One session per command, one pipeline of timed steps (issue 11, items 4 and 5).

- `tail` of a job that checkpoints and finishes opens at most two SSH connections of its own (the
  follower's session, reused for the final fetch and the guard; the auto-fetch's): counted in the test
  sshd's log ("Accepted publickey", one a connection), less the ones rsync's ssh opened (counted by an
  `ssh` on PATH that notes each run, then runs the real one).
- `submit` and `resume` print the same timed steps (resume has no `prepare`: the data is prepared at submit).
- The user's spec is never changed: the ledger keeps it as written, and the resolved root apart; a
  ledger from before that column is migrated, and its rows (whose spec held the resolved root) still read.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import sqlite3
import sys
import time
from pathlib import Path

import pytest
from jobfiles import cli, cli_here, ssh_instance, write_job
from tinymodel import make_model

from client.ledger import Ledger
from jobs.manifest import verify_manifest

pytestmark = pytest.mark.slow
STEP_LINE = re.compile(r"^✓ (\S+)\s+\d+\.\d\ds$", re.M)


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_model(tmp_path_factory.mktemp("model") / "tiny-qwen2")


def _wait(cond, timeout: float = 180.0) -> None:
    end = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < end, "timed out"
        time.sleep(0.2)


@pytest.mark.ssh
def test_tail_uses_at_most_two_connections(
    sshd, tmp_path: Path, tmux_socket: str, tiny_model: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    job = write_job(
        tmp_path / "job", model=tiny_model, instance=ssh_instance(sshd, tmp_path / "remote", tmux_socket),
        train={"max_steps": 6, "save_steps": 2},
    )  # fmt: skip
    job_id = json.loads(cli_here("submit", str(job), "--json").stdout)["job_id"]

    # rsync's own ssh runs, counted apart: each is one connection of rsync's, not of a session
    tools = tmp_path / "tools"
    tools.mkdir()
    runs = tmp_path / "ssh-runs"
    (tools / "ssh").write_text(f'#!/bin/sh\necho x >> {runs}\nexec {shutil.which("ssh")} "$@"\n')
    (tools / "ssh").chmod(0o755)
    monkeypatch.setenv("PATH", f"{tools}:{os.environ['PATH']}")
    before = sshd.log().count("Accepted publickey")
    out = cli("tail", job_id)
    accepted = sshd.log().count("Accepted publickey") - before
    rsync_runs = len(runs.read_text().splitlines()) if runs.exists() else 0

    runs_dir = tmp_path / "job" / "runs" / job_id
    verify_manifest(runs_dir / "adapter")  # the final adapter came
    assert list((runs_dir / "checkpoints").glob("step-*/adapter/manifest.json")), "no checkpoint was fetched"
    assert rsync_runs >= 2, out.stderr  # a checkpoint's adapter and the final one, at least
    sessions = accepted - rsync_runs
    assert 1 <= sessions <= 2, f"{accepted} connections, {rsync_runs} of them rsync's\n{out.stderr}"


def test_submit_and_resume_print_the_same_timed_steps_and_resume_skips_a_damaged_checkpoint(
    tmp_path: Path, tmux_socket: str, tiny_model: Path, local_home: Path
) -> None:
    """One job, submitted, cancelled once two checkpoints are written, its newest checkpoint damaged, resumed:
    submit and resume print the same timed steps (less `prepare`), and resume says which checkpoint the
    worker took (issue 13: formerly test_edges_jobs' own job; one worker run less for the same assertions)."""
    from jobs import events as ev

    inst = {"host": "local", "remote_root": str(tmp_path / "remote"), "tmux_socket": tmux_socket,
            "python": sys.executable}  # fmt: skip
    job = write_job(tmp_path / "job", model=tiny_model, instance=inst, train={"max_steps": 3000, "save_steps": 2},
                    rows=32)  # fmt: skip
    sub = cli("submit", str(job))
    job_id = sub.stdout.splitlines()[0].strip()
    submitted = STEP_LINE.findall(sub.stderr)
    assert submitted == ["check", "prepare", "connect", "plan", "sync", "setup", "model", "launch"], sub.stderr

    job_dir = tmp_path / "remote" / "jobs" / job_id
    checkpoints = job_dir / "output" / "checkpoints"

    def steps() -> list[int]:
        return sorted(int(p.name[5:]) for p in checkpoints.glob("step-*")) if checkpoints.is_dir() else []

    _wait(lambda: len(steps()) >= 2, timeout=300)
    cli("cancel", job_id, timeout=300)  # it saves a checkpoint, then stops: resumable
    *_, before, newest = steps()
    damaged = next(p for p in (checkpoints / f"step-{newest}").rglob("*.safetensors"))
    damaged.write_bytes(damaged.read_bytes()[:-8] + b"damaged!")
    runs = len(_events_of(job_dir))

    res = cli("resume", job_id)
    resumed = STEP_LINE.findall(res.stderr)
    assert resumed == [s for s in submitted if s != "prepare"], f"resume's timed steps differ: {res.stderr}"
    # back once the new run is under way: `tail` (and `resume --follow`) never show the last run's end
    assert any(isinstance(e, ev.Phase) and e.phase == "setup" for e in _events_of(job_dir)[runs:]), res.stderr
    said = res.stdout + res.stderr
    assert f"step-{newest} is damaged" in said and f"resumed from the checkpoint before it, step-{before}" in said
    assert f"from checkpoint step-{before}" in said and f"from checkpoint step-{newest}" not in said, said
    _wait(lambda: any(isinstance(e, ev.Started) for e in _events_of(job_dir)[runs:]), timeout=300)
    started = next(e for e in _events_of(job_dir)[runs:] if isinstance(e, ev.Started))
    assert started.resumed_from_step == before, "the worker did not resume from the checkpoint before the damaged one"
    cli("cancel", job_id, timeout=300)


def _events_of(job_dir: Path) -> list:
    from jobs import events as ev

    path = job_dir / "events.jsonl"
    return [ev.parse(ln) for ln in path.read_text().splitlines() if ln.strip()] if path.exists() else []


def test_the_spec_is_kept_as_written_and_old_ledgers_still_read(
    sshd, tmp_path: Path, tmux_socket: str, tiny_model: Path
) -> None:
    root = "~/placed-root"
    job = write_job(
        tmp_path / "job", model=tiny_model,
        instance={**ssh_instance(sshd, tmp_path / "unused", tmux_socket), "remote_root": root},
        train={"max_steps": 2},
    )  # fmt: skip
    job_id = json.loads(cli_here("submit", str(job), "--json").stdout)["job_id"]
    ledger = Ledger()
    record = ledger.get(job_id)
    assert record.spec.instance.remote_root == root  # as the user wrote it
    assert record.remote_root == str(sshd.home / "placed-root")  # resolved, apart
    assert (sshd.home / "placed-root" / "jobs" / job_id).is_dir()
    cli("tail", job_id, "--no-fetch")
    ledger.close()

    # a ledger from before the column: its spec held the resolved root
    path = Path(ledger.path)
    db = sqlite3.connect(path)
    spec = json.loads(db.execute("SELECT spec_json FROM jobs WHERE id = ?", (job_id,)).fetchone()[0])
    spec["instance"]["remote_root"] = str(sshd.home / "placed-root")
    db.execute("UPDATE jobs SET spec_json = ?", (json.dumps(spec),))
    db.execute("ALTER TABLE jobs DROP COLUMN remote_root")
    db.commit()
    db.close()
    status = json.loads(cli("status", job_id, "--json").stdout)
    assert status["state"] == "done" and status["step"] == 2
    assert Ledger().get(job_id).remote_root is None  # the column is back, empty for the old row
