"""One session per command, one pipeline of timed steps (issue 11, items 4 and 5).

- `submit` and `resume` print the same timed steps (resume has no `prepare`: the data is prepared at submit);
  the same job, its newest checkpoint damaged, shows that resume says which checkpoint the worker took.
- `tail` of a job that checkpoints and finishes opens at most two SSH connections of its own, and the
  user's spec is kept as written (an old ledger still reads): asserted in test_e2e's
  test_submit_follow_fetch_over_ssh, on the jobs that test trains over ssh anyway.
"""

from __future__ import annotations

import re
import time
from pathlib import Path

import pytest
from jobfiles import cli, write_job
from test_faults import (
    arm,
    cancel_frozen,
    events_of,
    steps_on_disk,
    wait_stopped,
    worker_python,
)
from tinymodel import make_model

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


def test_submit_and_resume_print_the_same_timed_steps_and_resume_skips_a_damaged_checkpoint(
    tmp_path: Path, tmux_socket: str, tiny_model: Path, local_home: Path
) -> None:
    """One job, submitted, cancelled once two checkpoints are written, its newest checkpoint damaged, resumed:
    submit and resume print the same timed steps (less `prepare`), and resume says which checkpoint the
    worker took (issue 13: formerly test_edges_jobs' own job; one worker run less for the same assertions)."""
    from jobs import events as ev

    stops = tmp_path / "stops"  # its worker freezes at a checkpoint while the test cancels it
    inst = {"host": "local", "remote_root": str(tmp_path / "remote"), "tmux_socket": tmux_socket,
            "python": worker_python(tmp_path / "bin", stops)}  # fmt: skip
    job = write_job(tmp_path / "job", model=tiny_model, instance=inst, train={"max_steps": 3000, "save_steps": 2},
                    rows=32)  # fmt: skip
    arm(stops, "after", 4)
    sub = cli("submit", str(job))
    job_id = sub.stdout.splitlines()[0].strip()
    submitted = STEP_LINE.findall(sub.stderr)
    assert submitted == ["check", "prepare", "connect", "plan", "sync", "setup", "model", "launch"], sub.stderr

    job_dir = tmp_path / "remote" / "jobs" / job_id
    checkpoints = job_dir / "output" / "checkpoints"
    cancel_frozen(job_id, wait_stopped(stops, "after", 4, job_dir))  # it saves a checkpoint, then stops: resumable
    *_, before, newest = steps_on_disk(job_dir)
    damaged = next(p for p in (checkpoints / f"step-{newest}").rglob("*.safetensors"))
    damaged.write_bytes(damaged.read_bytes()[:-8] + b"damaged!")
    runs = len(events_of(job_dir))

    arm(stops, "after", 6)
    res = cli("resume", job_id)
    resumed = STEP_LINE.findall(res.stderr)
    assert resumed == [s for s in submitted if s != "prepare"], f"resume's timed steps differ: {res.stderr}"
    # back once the new run is under way: `tail` (and `resume --follow`) never show the last run's end
    assert any(isinstance(e, ev.Phase) and e.phase == "setup" for e in events_of(job_dir)[runs:]), res.stderr
    said = res.stdout + res.stderr
    assert f"step-{newest} is damaged" in said and f"resumed from the checkpoint before it, step-{before}" in said
    assert f"from checkpoint step-{before}" in said and f"from checkpoint step-{newest}" not in said, said
    _wait(lambda: any(isinstance(e, ev.Started) for e in events_of(job_dir)[runs:]), timeout=300)
    started = next(e for e in events_of(job_dir)[runs:] if isinstance(e, ev.Started))
    assert started.resumed_from_step == before, "the worker did not resume from the checkpoint before the damaged one"
    cancel_frozen(job_id, wait_stopped(stops, "after", 6))  # the resumed run, mid-run (its folder holds the first end)

