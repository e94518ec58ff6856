"""`autodl-run check` shows its progress while it reads a large dataset (issue 13): a live rows/s bar in a
real terminal (tmux), one line per phase when piped, nothing drawn."""

from __future__ import annotations

import shlex
import sys
from pathlib import Path

import tmuxterm
from jobfiles import cli, write_job

from client import activity
from client.activity import Activity
from client.dataset.prepare import check
from client.specfile import load_spec

ROOT = Path(__file__).resolve().parent.parent
ROWS = 5000


def _job(tmp_path: Path) -> Path:
    return write_job(tmp_path / "job", model="/root/model", instance={"host": "local"}, rows=ROWS)


def test_check_reports_its_rows_and_ends_its_meter(tmp_path: Path) -> None:
    job = _job(tmp_path)
    events: list[Activity] = []
    with activity.reporting(events.append):
        report = check(load_spec(job), job, tokenizer=None)
    assert report["records_out"] == ROWS
    ends = [e for e in events if e.kind == "end"]
    assert [(e.what, e.done, e.unit, e.ok) for e in ends] == [("check: reading", ROWS, "rows", True)]
    assert sum(e.kind == "update" for e in events) >= ROWS // 1024  # a call per batch while it reads


DRIVER = """
import sys, time
from pathlib import Path
from rich.console import Console
from client import activity
import importlib
p = importlib.import_module("client.dataset.prepare")
from client.specfile import load_spec
from client.views.progress import showing

job, go = Path(sys.argv[1]), Path(sys.argv[2])
write = p._Discard.write

def held(self, line):  # hold the bar on screen, past 3,072 rows, until the test has seen it
    held.n += 1
    if held.n == 3073:
        while not go.exists():
            time.sleep(0.05)
    return write(self, line)

held.n = 0
p._Discard.write = held
with showing(Console(stderr=True)):
    p.check(load_spec(job), job, tokenizer=None)
print("FINISHED", flush=True)
"""


def test_check_in_a_terminal_shows_a_live_bar_that_leaves_one_line(tmp_path: Path, tmux_socket: str) -> None:
    job = _job(tmp_path)
    driver = tmp_path / "driver.py"
    driver.write_text(DRIVER)
    go = tmp_path / "go"
    cmd = shlex.join([sys.executable, str(driver), str(job), str(go)])
    env = f"PYTHONPATH={shlex.quote(str(ROOT))} TERM=xterm-256color COLUMNS=150"
    tmuxterm.start(tmux_socket, f"env {env} {cmd}; sleep 600", width=150, height=40)
    shown = tmuxterm.wait_for(tmux_socket, lambda s: "3,072 rows" in s and "rows/s" in s)
    bar = next(ln for ln in shown.splitlines() if "check: reading" in ln)
    assert "3,072 rows" in bar and "rows/s" in bar, bar
    go.touch()
    done = tmuxterm.wait_for(tmux_socket, lambda s: "FINISHED" in s, timeout=240)
    assert f"check: reading: {ROWS:,} rows in" in done and "rows/s)" in done, done
    assert not any("3,072 rows" in ln for ln in done.splitlines()), done  # the bar is gone


def test_piped_check_prints_one_line_and_no_bar(tmp_path: Path) -> None:
    res = cli("check", str(_job(tmp_path)))  # stderr is a pipe here
    lines = [ln.strip() for ln in res.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith(f"check: reading: {ROWS:,} rows in"), res.stderr
    assert "\r" not in res.stderr and "\x1b" not in res.stderr
    assert f"{ROWS:,}" in res.stdout  # the summary itself is unchanged, on stdout
