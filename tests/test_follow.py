"""Following a job's event file: offsets, partial lines, terminal states, reconnects, rendering."""

from __future__ import annotations

import io
from pathlib import Path

from rich.console import Console

from client.errors import ConnectError
from client.remote.follow import Follower, JobStatus, Reconnecting, poll_once
from client.transport.local import LocalTransport
from client.views.render import Progress, event_line, panel
from jobs import events as ev
from jobs.layout import JobPaths


def _write(path: Path, data: str) -> None:
    with open(path, "a", encoding="utf-8") as f:
        f.write(data)


def _step(n: int, total: int = 3, loss: float = 1.0) -> str:
    return (
        ev.dumps(
            ev.Step(
                step=n,
                total_steps=total,
                epoch=n / total,
                loss=loss,
                lr=1e-4,
                tokens_per_s=1000.0,
                elapsed_s=float(n),
            )
        )
        + "\n"
    )


def test_poll_consumes_only_complete_lines(tmp_path: Path) -> None:
    import subprocess

    paths = JobPaths(str(tmp_path))
    (tmp_path / "state").write_text("running")
    worker = subprocess.Popen(["sleep", "300"], cwd=tmp_path)  # a process that runs in the job's folder
    (tmp_path / "pid").write_text(str(worker.pid))
    try:
        _consumes_only_complete_lines(tmp_path, paths)
    finally:
        worker.kill()
        worker.wait()


def _consumes_only_complete_lines(tmp_path: Path, paths: JobPaths) -> None:
    first = _step(1)
    _write(tmp_path / "events.jsonl", first + _step(2)[:10])  # the second line is half-written
    t = LocalTransport()
    poll, offset = poll_once(t, paths, "events.jsonl", 0)
    assert [ev.parse(x).step for x in poll.lines] == [1]
    assert offset == len(first.encode())
    _write(tmp_path / "events.jsonl", _step(2)[10:])
    poll, offset2 = poll_once(t, paths, "events.jsonl", offset)
    assert [ev.parse(x).step for x in poll.lines] == [2]
    assert poll.state.state == "running"


def test_state_from_exit_code_when_worker_died_without_outcome(tmp_path: Path) -> None:
    paths = JobPaths(str(tmp_path))
    (tmp_path / "state").write_text("running")
    (tmp_path / "exit_code").write_text("137")
    poll, _ = poll_once(LocalTransport(), paths, "events.jsonl", 0)
    assert (poll.state.state, poll.state.exit_code) == ("failed", 137)


class FlakyTransport(LocalTransport):
    """A real local transport whose connection 'drops' on chosen calls (fault injection)."""

    def __init__(self, fail_on: set[int], counter: list[int]):
        super().__init__()
        self.fail_on, self.counter = fail_on, counter

    def run(self, cmd, **kw):
        self.counter[0] += 1
        if self.counter[0] in self.fail_on:
            raise ConnectError("connection reset by peer")
        return super().run(cmd, **kw)


def test_follower_reconnects_without_losing_or_repeating_events(tmp_path: Path) -> None:
    paths = JobPaths(str(tmp_path))
    events = tmp_path / "events.jsonl"
    (tmp_path / "state").write_text("running")
    counter = [0]
    writes = iter(
        [_step(1), _step(2), _step(3) + ev.dumps(ev.Done(adapter_path="a", manifest_sha256="x")) + "\n"]
    )
    connects = []

    def connect():
        connects.append(1)
        return FlakyTransport({2, 3, 5}, counter)

    def sleep(_s: float) -> None:
        nxt = next(writes, None)
        if nxt is not None:
            _write(events, nxt)
        elif (tmp_path / "state").read_text() == "running":
            (tmp_path / "state").write_text("done")

    seen, notices, final = [], [], None
    for item in Follower(connect, paths, "events.jsonl", sleep=sleep):
        if isinstance(item, Reconnecting):
            notices.append(item)
        elif isinstance(item, JobStatus):
            final = item
        else:
            seen += [ev.parse(x) for x in item]
    assert [e.step for e in seen if isinstance(e, ev.Step)] == [1, 2, 3]
    assert isinstance(seen[-1], ev.Done)
    assert final is not None and final.state == "done"
    assert len(notices) >= 2 and len(connects) >= 3


def test_progress_spend_eta_and_rendering() -> None:
    p = Progress("job-1", price_per_hour=3.6)
    p.apply(ev.Phase(phase="loading model", t=1000.0))
    p.apply(
        ev.Step(
            step=10,
            total_steps=40,
            epoch=0.25,
            loss=1.2345,
            lr=2e-4,
            tokens_per_s=4321.0,
            elapsed_s=100.0,
            peak_mem_gb=14.3,
            t=1100.0,
        )
    )
    assert p.eta_s == 300.0
    spent, projected = p.spend(now=1100.0)
    assert round(spent, 4) == 0.1 and round(projected, 4) == 0.4  # 3.6 CNY/h = 0.001 a second
    out = io.StringIO()
    Console(file=out, width=100, color_system=None).print(panel(p, "running", now=1100.0))
    text = out.getvalue()
    for want in ("job-1 [running]", "10/40", "1.2345", "4,321", "14.3 GB", "5m00s", "0.10 CNY so far"):
        assert want in text, want
    assert event_line(p.last) == "step 10/40  loss 1.2345  lr 2.00e-04  4,321 tok/s  1m40s  mem 14.3GB"


def test_no_price_no_spend() -> None:
    p = Progress("j")
    p.apply(ev.Step(step=1, total_steps=2, epoch=0.5, loss=1.0, lr=1.0, t=5.0))
    assert p.spend() is None and p.as_dict()["spent"] is None


def test_a_zombie_wrapper_is_not_a_running_job(tmp_path: Path, local_home: Path) -> None:
    """A tmux server may be slow to reap the job's ended wrapper: kill -0 still answers for the zombie,
    which made `tail` follow a finished job forever. The pid must run in the job's folder."""
    import subprocess
    import time

    from jobs.protocol import JobState

    paths = JobPaths(str(tmp_path / "job"))
    Path(paths.dir).mkdir()
    child = subprocess.Popen(["sh", "-c", "exit 0"], cwd=paths.dir)  # never waited for: a zombie
    try:
        deadline = time.monotonic() + 120  # a hang guard
        while Path(f"/proc/{child.pid}/stat").read_text().split()[2] != "Z":
            assert time.monotonic() < deadline
            time.sleep(0.05)
        Path(paths.pid).write_text(f"{child.pid}\n")
        Path(paths.state).write_text("done\n")
        Path(paths.exit_code).write_text("0\n")
        poll, _ = poll_once(LocalTransport(), paths, "events.jsonl", 0)
        assert poll.state.state is JobState.DONE and not poll.state.alive
    finally:
        child.wait()
