"""Progress on the laptop's long steps (client.activity): rsync's bytes and rate, prepare's rows, pip's lines,
drawn live in a real terminal (tmux) and one line per step when piped."""

from __future__ import annotations

import os
import shlex
import sys
import threading
import time
from pathlib import Path

import tmuxterm
from jobfiles import cli, write_job

from client import activity
from client.activity import Activity
from client.dataset.prepare import prepare
from client.remote.setup import pip_news, run_pip
from client.specfile import load_spec
from client.transport import rsync
from client.transport.local import LocalTransport
from jobs.spec import JobSpec

ROOT = Path(__file__).resolve().parent.parent
ROWS = 5000


def wait_for(cond, timeout: float = 120.0, what: str = "") -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what or cond}")
        time.sleep(0.05)


def ends(events: list[Activity]) -> list[Activity]:
    return [e for e in events if e.kind == "end"]


# -- the events the library reports ---------------------------------------------------------------------


def test_rsync_reports_the_bytes_sent_and_the_rate(tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    (src / "weights.bin").write_bytes(os.urandom(3 << 20))
    (src / "small.txt").write_text("x" * 1000)
    events: list[Activity] = []
    with activity.reporting(events.append), activity.naming("upload the dataset"):
        rsync.run_rsync(rsync.rsync_argv(f"{src}/", str(tmp_path / "dest")), where="local")
    assert (tmp_path / "dest" / "weights.bin").read_bytes() == (src / "weights.bin").read_bytes()
    (end,) = ends(events)
    assert end.what == "upload the dataset" and end.unit == "bytes" and end.ok
    assert end.done == (3 << 20) + 1000 and end.total == end.done and end.rate and end.rate > 0
    assert events[0].kind == "start"

    rsync.run_rsync(rsync.rsync_argv(f"{src}/", str(tmp_path / "dest2")), where="local")  # nobody watching
    assert (tmp_path / "dest2" / "small.txt").exists()


def test_an_upload_over_ssh_is_named_and_measured(ssh_transport, tmp_path: Path) -> None:
    src = tmp_path / "bundle"
    src.mkdir()
    (src / "a.bin").write_bytes(os.urandom(1 << 20))
    events: list[Activity] = []
    with activity.reporting(events.append):
        ssh_transport.put(src, str(tmp_path / "remote" / "bundle"))
    (end,) = ends(events)
    assert end.what == "upload bundle" and end.done >= 1 << 20 and end.ok


def test_parse_progress2_reads_rsync_lines() -> None:
    assert rsync.parse_progress2(b"     12,345,678  45%   11.77MB/s    0:00:01 (xfr#3, to-chk=5/10)") == (
        12345678, 45, 11.77 * (1 << 20)
    )  # fmt: skip
    assert rsync.parse_progress2(b"sending incremental file list") is None


def _job(tmp_path: Path, rows: int = ROWS) -> Path:
    return write_job(tmp_path / "job", model="/root/model", instance={"host": "local"}, rows=rows)


def test_prepare_reports_rows_per_batch_and_a_last_count(tmp_path: Path) -> None:
    job = _job(tmp_path)
    calls: list[tuple[str, int, int | None]] = []
    prepared = prepare(
        load_spec(job), job, tmp_path / "out", tokenizer=None, progress=lambda *a: calls.append(a)
    )
    phases = [c[0] for c in calls]
    assert phases[0] == "reading" and "writing" in phases and calls[-1] == ("done", ROWS, ROWS)
    assert all(total == ROWS for p, _, total in calls if p == "writing")
    assert len(calls) < ROWS / 100  # a call per batch, not per row
    assert prepared.report["records_out"] == ROWS

    events: list[Activity] = []  # the default: meters, one per phase, each ended with its count
    with activity.reporting(events.append):
        prepare(load_spec(job), job, tmp_path / "out2", tokenizer=None)
    assert [(e.what, e.done, e.unit) for e in ends(events)] == [
        ("prepare: reading", ROWS, "rows"), ("prepare: writing", ROWS, "rows")
    ]  # fmt: skip


def _local_spec(tmp_path: Path) -> JobSpec:
    return JobSpec.model_validate(
        {"name": "t", "instance": {"host": "local", "remote_root": str(tmp_path / "root")},
         "model": {"name_or_path": "/m"}, "data": {"train": "t.jsonl"}}
    )  # fmt: skip


def test_pip_runs_detached_and_its_latest_line_is_the_progress(tmp_path: Path) -> None:
    go = tmp_path / "go"
    command = (
        "echo 'Requirement already satisfied: numpy'; echo 'Collecting peft>=0.17'; "
        f"while [ ! -e {shlex.quote(str(go))} ]; do sleep 0.05; done; "
        "echo 'Successfully installed peft-0.17.0'"
    )
    events: list[Activity] = []
    out: list[object] = []

    def run() -> None:
        with activity.reporting(events.append):
            out.append(run_pip(LocalTransport(), _local_spec(tmp_path), command, poll_s=0.05))

    thread = threading.Thread(target=run)
    thread.start()
    wait_for(lambda: any(e.note == "Collecting peft>=0.17" for e in events), what="pip's line as progress")
    go.touch()
    thread.join(timeout=120)
    (res,) = out
    assert res.ok and "Successfully installed peft-0.17.0" in res.stdout
    assert ends(events)[-1].what == "pip install on the instance" and ends(events)[-1].ok
    assert not any((tmp_path / "root" / ".setup").glob("pip-*"))  # its log and exit code cleaned up

    failed = run_pip(
        LocalTransport(), _local_spec(tmp_path), "echo 'ERROR: No matching distribution'; exit 3"
    )
    assert failed.exited == 3 and "No matching distribution" in failed.tail(8)
    assert pip_news(
        "Collecting a\r\nDownloading a-1.0.whl (12.3 MB)\n  Requirement already satisfied: b\n"
    ) == ("Downloading a-1.0.whl (12.3 MB)")


# -- what a person sees -----------------------------------------------------------------------------------

DRIVER = """
import sys
from pathlib import Path
from rich.console import Console
from client import activity
from client.dataset.prepare import prepare
from client.specfile import load_spec
from client.views.progress import showing

job, out, go = Path(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3])
rows = activity.rows("prepare")

def progress(phase, done, total):
    rows(phase, done, total)
    if phase == "writing" and done >= 3072:  # hold the bar on screen until the test has seen it
        while not go.exists():
            __import__("time").sleep(0.05)

with showing(Console(stderr=True)):
    prepare(load_spec(job), job, out, tokenizer=None, progress=progress)
print("FINISHED", flush=True)
"""


def test_a_terminal_shows_a_live_bar_that_leaves_one_line(tmp_path: Path, tmux_socket: str) -> None:
    job = _job(tmp_path)
    driver = tmp_path / "driver.py"
    driver.write_text(DRIVER)
    go = tmp_path / "go"
    cmd = shlex.join([sys.executable, str(driver), str(job), str(tmp_path / "out"), str(go)])
    env = f"PYTHONPATH={shlex.quote(str(ROOT))} TERM=xterm-256color COLUMNS=150"
    tmuxterm.start(tmux_socket, f"cd {shlex.quote(str(ROOT))} && env {env} {cmd}; sleep 600", width=150, height=40)
    live = tmuxterm.wait_for(tmux_socket, lambda s: "3,072 rows of" in s and "rows/s" in s)
    bar = next(ln for ln in live.splitlines() if "prepare: writing" in ln)
    assert f"3,072 rows of {ROWS:,} rows" in bar and "━" in bar, live  # where it is, of how many
    assert f"prepare: reading: {ROWS:,} rows in" in live  # the finished phase left its line
    go.touch()
    done = tmuxterm.wait_for(tmux_socket, lambda s: "FINISHED" in s)
    assert f"prepare: writing: {ROWS:,} rows in" in done and "rows/s)" in done
    assert not any("of 5,000 rows" in ln for ln in done.splitlines()), done  # the bar is gone


def test_piped_output_is_one_line_per_step(tmp_path: Path) -> None:
    job = _job(tmp_path)
    res = cli("prepare", str(job))  # stderr is a pipe here
    lines = [ln for ln in res.stderr.splitlines() if ln.strip().startswith("prepare: ")]
    assert [ln.split(":")[1].strip() for ln in lines] == ["reading", "writing"], res.stderr
    assert all(f"{ROWS:,} rows in" in ln and "rows/s)" in ln for ln in lines)
    assert "\r" not in res.stderr and "\x1b" not in res.stderr
