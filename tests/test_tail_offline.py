"""`tail` of an ended job with its instance gone (issue 13): the panel a person reads in a real terminal
(tmux) comes from the laptop's record, and the worker's warnings show in it, and as lines when piped,
escaped as the untrusted text they are."""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

import pytest
import tmuxterm
from jobfiles import cli, ssh_instance, write_job

from client.ledger import Ledger
from client.lifecycle.fetch import local_copy
from client.record import FINAL
from client.specfile import load_spec
from jobs.layout import Placement

pytestmark = pytest.mark.ssh

ROOT = Path(__file__).resolve().parent.parent
JOB = "t-job-offline"
HOSTILE = "[bold red]FAKE[/] \x1b]0;owned\x07\x1b[2J swanlab could not connect"


def _events() -> str:
    lines = [{"type": "phase", "phase": "setup", "t": 1000.0}]
    lines += [{"type": "warning", "source": "wandb", "message": f"old warning {i}", "t": 1000.5 + i} for i in range(3)]
    lines += [{"type": "step", "step": i, "total_steps": 6, "epoch": 0.5, "loss": 2.0 / i, "lr": 1e-3,
               "tokens": 100 * i, "tokens_per_s": 50.0, "elapsed_s": float(i), "t": 1000.0 + 10 * i}
              for i in range(1, 7)]  # fmt: skip
    lines.append({"type": "warning", "source": "swanlab", "message": HOSTILE, "t": 1065.0})
    lines.append({"type": "done", "adapter_path": "/x/adapter", "manifest_sha256": "0" * 64, "steps": 6,
                  "total_steps": 6, "final_loss": 0.33, "t": 1070.0})  # fmt: skip
    return "".join(json.dumps(e) + "\n" for e in lines)


@pytest.fixture
def ended(sshd_factory, tmp_path: Path, tmux_socket: str) -> str:
    """A done job whose record is on the laptop, and whose instance (its own sshd) is stopped."""
    server = sshd_factory()
    job = write_job(tmp_path / "job", model="m", instance=ssh_instance(server, tmp_path / "remote", tmux_socket))
    spec = load_spec(job)
    ledger = Ledger()
    ledger.add(JOB, spec, job, "d", "b", state="done", placement=Placement(str(tmp_path / "remote")))
    copy = local_copy(ledger.get(JOB))
    copy.adapter.mkdir(parents=True)
    (copy.adapter / "adapter_config.json").write_text("{}")
    ledger.update(JOB, finished_at=time.time(), fetched_to=str(copy.adapter))
    copy.record.mkdir()
    copy.record_file("events").write_text(_events())
    copy.record_file("log").write_text("worker log line\n")
    (copy.record / FINAL).write_text("done\n")
    server.stop()
    return JOB


def test_the_offline_panel_of_an_ended_job_in_a_real_terminal(ended: str, tmux_socket: str) -> None:
    env = " ".join(f"{k}={shlex.quote(v)}" for k, v in (
        ("PYTHONPATH", str(ROOT)), ("AUTODL_RUN_HOME", os.environ["AUTODL_RUN_HOME"]), ("TERM", "xterm-256color"),
        ("COLUMNS", "160"), ("HOME", os.environ.get("HOME", "/tmp")),
    ))  # fmt: skip
    cmd = shlex.join([sys.executable, "-m", "client.cli", "tail", ended])
    tmuxterm.start(tmux_socket, f"env {env} {cmd}; echo EXIT=$?; sleep 600")
    shown = tmuxterm.wait_for(tmux_socket, lambda s: "EXIT=" in s, timeout=300)  # a hang guard
    assert "EXIT=0" in shown, shown
    assert f"{JOB} [done]" in shown and "6/6" in shown and "laptop's record" in shown, shown
    assert "cannot reach" not in shown and "retrying" not in shown, shown
    warned = [ln for ln in shown.splitlines() if "warned" in ln]
    assert len(warned) == 3, shown  # the latest three, the oldest one dropped
    assert "old warning 0" not in shown and "old warning 2" in shown
    assert "warning (swanlab): [bold red]FAKE[/] \\x1b]0;owned\\x07\\x1b[2J swanlab" in shown, shown
    title = subprocess.run(["tmux", "-L", tmux_socket, "display-message", "-p", "-t", "t", "#{pane_title}"],
                           capture_output=True, text=True).stdout  # fmt: skip
    assert "owned" not in title


def test_piped_tail_prints_each_warning_as_an_escaped_line(ended: str) -> None:
    res = cli("tail", ended)
    lines = [ln for ln in res.stdout.splitlines() if ln.startswith("warning (")]
    assert [ln.split(")")[0] for ln in lines] == ["warning (wandb"] * 3 + ["warning (swanlab"], res.stdout
    assert lines[-1] == "warning (swanlab): [bold red]FAKE[/] \\x1b]0;owned\\x07\\x1b[2J swanlab could not connect"
    assert "\x1b" not in res.stdout + res.stderr


# --- the live panel of a running job (a local instance: its folder and a live process) -------------------


def test_the_live_panel_shows_the_latest_warnings_escaped(tmp_path: Path, local_home: Path, tmux_socket: str) -> None:
    from test_edges_verbs import add_job, local

    folder = add_job(tmp_path, "t-job-live", local(tmp_path), state="running")
    sleeper = subprocess.Popen(["sleep", "300"], cwd=folder)  # the worker: alive, so the job runs
    try:
        (folder / "pid").write_text(f"{sleeper.pid}\n")
        (folder / "exit_code").unlink()
        events = _events().splitlines(keepends=True)[:-1]  # all but `done`: it still runs
        (folder / "events.jsonl").write_text("".join(events))
        env = " ".join(f"{k}={shlex.quote(v)}" for k, v in (
            ("PYTHONPATH", str(ROOT)), ("AUTODL_RUN_HOME", os.environ["AUTODL_RUN_HOME"]),
            ("TERM", "xterm-256color"), ("COLUMNS", "160"), ("HOME", str(local_home)),
        ))  # fmt: skip
        cmd = shlex.join([sys.executable, "-m", "client.cli", "tail", "t-job-live"])
        tmuxterm.start(tmux_socket, f"env {env} {cmd}; sleep 600")
        shown = tmuxterm.wait_for(tmux_socket, lambda s: "warning (swanlab)" in s)
        assert "t-job-live [running]" in shown and "6/6" in shown, shown
        assert "warning (swanlab): [bold red]FAKE[/] \\x1b]0;owned\\x07\\x1b[2J swanlab" in shown, shown
        assert len([ln for ln in shown.splitlines() if "warned" in ln]) == 3, shown

        with open(folder / "events.jsonl", "a") as f:  # a new one while it is followed: it shows, the oldest goes
            f.write(json.dumps({"type": "warning", "source": "wandb", "message": "newest warning"}) + "\n")
        shown = tmuxterm.wait_for(tmux_socket, lambda s: "newest warning" in s, timeout=240)
        assert "old warning 1" not in shown and "old warning 2" in shown
    finally:
        sleeper.kill()
