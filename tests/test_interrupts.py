"""Ctrl-C in a real terminal (a tmux pane): every command exits 130 and says so.

The keys go through `tmux send-keys C-c`, so the terminal's line discipline sends SIGINT to the
whole foreground process group, as a person's Ctrl-C does: the CLI and its rsync/ssh children.
Each test waits for a condition showing the command is where it should be (the live view drawn,
rsync started), never for a time.
"""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from jobfiles import write_job

from client.ledger import Ledger
from client.remote import launcher
from client.specfile import load_spec
from client.transport.local import LocalTransport
from jobs.layout import JobPaths

ROOT = Path(__file__).resolve().parent.parent
MESSAGE = "interrupted; a launched job keeps running"

pytestmark = pytest.mark.skipif(shutil.which("tmux") is None, reason="tmux is not installed")


def wait_for(cond: Callable[[], object], timeout: float = 120.0, what: str = "") -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what or cond}")
        time.sleep(0.05)


class Terminal:
    """One command in a tmux pane of its own server; its exit code and stderr land in files."""

    def __init__(self, socket: str, folder: Path, args: list[str], env: dict[str, str]):
        self.socket, self.rc, self.err = socket, folder / "rc", folder / "stderr"
        exports = " ".join(f"{k}={shlex.quote(v)}" for k, v in env.items())
        cli = shlex.join([sys.executable, "-m", "client.cli", *args])
        cmd = f"cd {shlex.quote(str(ROOT))} && env {exports} {cli} 2> {shlex.quote(str(self.err))}; echo $? > {self.rc}; sleep 600"
        subprocess.run(["tmux", "-L", socket, "-f", "/dev/null", "new-session", "-d", "-s", "t", "-x", "160",
                        "-y", "50", cmd], check=True)  # fmt: skip

    def screen(self) -> str:
        return subprocess.run(["tmux", "-L", self.socket, "capture-pane", "-p", "-t", "t"],
                              capture_output=True, text=True).stdout  # fmt: skip

    def ctrl_c(self) -> tuple[int, str]:
        subprocess.run(["tmux", "-L", self.socket, "send-keys", "-t", "t", "C-c"], check=True)
        wait_for(lambda: self.rc.exists() and self.rc.read_text().strip(), what="the command to exit")
        return int(self.rc.read_text()), self.err.read_text()


@pytest.fixture
def terminal_socket() -> object:
    name = f"autodl-term-{os.getpid()}-{time.monotonic_ns()}"
    yield name
    subprocess.run(["tmux", "-L", name, "kill-server"], capture_output=True)


def _env(autodl_home: Path, home: Path, path: str | None = None) -> dict[str, str]:
    return {
        "AUTODL_RUN_HOME": str(autodl_home),
        "HOME": str(home),
        "PYTHONPATH": str(ROOT),
        "PATH": path or os.environ["PATH"],
        "TERM": "xterm-256color",
    }


def _local_job(tmp_path: Path, tmux_socket: str, job_id: str, state: str) -> tuple[JobPaths, object]:
    remote = tmp_path / "remote"
    job = write_job(tmp_path / "job", model="m", instance={
        "host": "local", "remote_root": str(remote), "tmux_socket": tmux_socket, "python": sys.executable,
    })  # fmt: skip
    spec = load_spec(job)
    spec.instance.remote_root = str(remote)
    Ledger().add(job_id, spec, job, "d", "b", state=state)
    return JobPaths(str(remote / "jobs" / job_id)), spec


def test_ctrl_c_during_tail_exits_130_and_says_so(
    tmp_path: Path, tmux_socket: str, terminal_socket: str, autodl_home: Path, local_home: Path
) -> None:
    paths, _ = _local_job(tmp_path, tmux_socket, "t-job-1", "running")
    launcher.launch(LocalTransport(), paths, ["sleep", "600"], socket=tmux_socket, session="t-job-1", env={})
    term = Terminal(terminal_socket, tmp_path, ["tail", "t-job-1"], _env(autodl_home, local_home))
    wait_for(lambda: "t-job-1" in term.screen(), what="the live view")
    rc, err = term.ctrl_c()
    assert rc == 130, err
    assert MESSAGE in err and "Traceback" not in err
    assert launcher.job_status(LocalTransport(), paths).alive  # the job keeps running


def test_ctrl_c_while_rsync_fetches_exits_130_and_says_so(
    tmp_path: Path, tmux_socket: str, terminal_socket: str, autodl_home: Path, local_home: Path
) -> None:
    paths, _ = _local_job(tmp_path, tmux_socket, "t-job-2", "done")
    adapter = Path(paths.adapter)
    adapter.mkdir(parents=True)
    (adapter / "adapter_config.json").write_text("{}")
    (adapter / "manifest.json").write_text('{"version": 1, "files": []}')
    # an rsync that hangs until Ctrl-C kills it (and says it started); --version is the real one's
    real = shutil.which("rsync")
    if real is None:
        pytest.skip("rsync is not installed")
    fake = tmp_path / "bin"
    fake.mkdir()
    started = tmp_path / "rsync-started"
    (fake / "rsync").write_text(
        f'#!/bin/sh\ncase "$1" in --version) exec {real} --version;; esac\ntouch {started}\nexec sleep 600\n'
    )
    (fake / "rsync").chmod(0o755)
    env = _env(autodl_home, local_home, f"{fake}:{os.environ['PATH']}")
    term = Terminal(terminal_socket, tmp_path, ["fetch", "t-job-2"], env)
    wait_for(started.exists, what="rsync to start")
    rc, err = term.ctrl_c()
    assert rc == 130, err
    assert MESSAGE in err and "Traceback" not in err
    assert Ledger().get("t-job-2").fetched_to is None  # nothing was recorded as fetched
