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


def test_submit_and_resume_print_the_same_timed_steps(tmp_path: Path, tmux_socket: str, tiny_model: Path) -> None:
    inst = {"host": "local", "remote_root": str(tmp_path / "remote"), "tmux_socket": tmux_socket,
            "python": sys.executable}  # fmt: skip
    job = write_job(tmp_path / "job", model=tiny_model, instance=inst, train={"max_steps": 3000, "save_steps": 1})
    sub = cli("submit", str(job))
    job_id = sub.stdout.splitlines()[0].strip()
    submitted = STEP_LINE.findall(sub.stderr)
    assert submitted == ["check", "prepare", "connect", "plan", "sync", "setup", "model", "launch"], sub.stderr

    checkpoints = tmp_path / "remote" / "jobs" / job_id / "output" / "checkpoints"
    _wait(lambda: checkpoints.is_dir() and any(p.name.startswith("step-") for p in checkpoints.iterdir()))
    cli("cancel", job_id, timeout=300)
    res = cli("resume", job_id)
    resumed = STEP_LINE.findall(res.stderr)
    assert resumed == [s for s in submitted if s != "prepare"], res.stderr
    assert "from checkpoint step-" in res.stderr
    cli("cancel", job_id, timeout=300)


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
