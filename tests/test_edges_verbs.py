"""The verbs a SkyPilot user reaches for (issue 13, item 6): hosts, ssh JOB, rm JOB."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from jobfiles import CLI, cli, ssh_instance, write_toml

from client.ledger import Ledger
from client.specfile import load_spec
from jobs.layout import Placement


def add_job(tmp_path: Path, job_id: str, instance: dict, state: str = "done") -> Path:
    """A ledger row for `job_id` and its folder under tmp_path/remote (the instance's side)."""
    job = write_toml(tmp_path / f"{job_id}.toml", {"name": "t-job"}, {
        "instance": instance, "model": {"name_or_path": "m"}, "data": {"train": "train.jsonl"}})  # fmt: skip
    root = tmp_path / "remote"
    folder = root / "jobs" / job_id
    folder.mkdir(parents=True)
    (folder / "state").write_text(state + "\n")
    (folder / "exit_code").write_text("0\n")
    (folder / "pid").write_text("999999\n")
    (folder / "worker.log").write_text("hello from the worker\n")
    ledger = Ledger()
    ledger.add(job_id, load_spec(job), job, "d" * 64, "b" * 64, state=state, placement=Placement(str(root)))
    ledger.close()
    return folder


def local(tmp_path: Path) -> dict:
    return {"host": "local", "remote_root": str(tmp_path / "remote"), "python": sys.executable}


def test_hosts_lists_the_saved_profiles() -> None:
    from client.instances import profiles

    assert "no saved hosts yet" in cli("hosts").stdout
    profiles.save(profiles.Profile(name="region-41", host="region-41.autodl.com", port=38076,
                                   identity_file="/home/me/.ssh/id_ed25519"))  # fmt: skip
    out = cli("hosts").stdout
    line = next(ln for ln in out.splitlines() if "region-41 " in ln or "region-41" in ln.split())
    assert "root@region-41.autodl.com:38076" in line and "/home/me/.ssh/id_ed25519" in line
    listed = json.loads(cli("hosts", "--json").stdout)
    assert [p["name"] for p in listed] == ["region-41"] and listed[0]["port"] == 38076


@pytest.mark.ssh
def test_ssh_runs_in_the_jobs_folder_on_its_instance(sshd, ssh_transport, tmp_path: Path, tmux_socket: str) -> None:
    ssh_transport.run("true")  # pins the host key where the job's commands find it
    folder = add_job(tmp_path, "t-job-1", ssh_instance(sshd, tmp_path / "remote", tmux_socket))
    res = cli("ssh", "t-job-1", "--", "pwd;", "cat", "worker.log")
    assert res.stdout.splitlines() == [str(folder), "hello from the worker"]

    # interactively, in a real terminal: a login shell there, in the folder
    cmd = f"env AUTODL_RUN_HOME={os.environ['AUTODL_RUN_HOME']} PYTHONPATH={Path.cwd()} {shlex_join(CLI)} ssh t-job-1; echo SSH-ENDED $?; sleep 60"
    subprocess.run(["tmux", "-L", tmux_socket, "new-session", "-d", "-x", "200", "-y", "30", cmd], check=True)
    screen = ""
    deadline = time.monotonic() + 300  # a hang guard: the CLI's start, ssh's login, a login shell
    sent = 0.0
    while f"SHELL-IN-{folder}" not in screen and time.monotonic() < deadline:
        if time.monotonic() - sent > 3:  # again until the shell there reads it; looked at far more often
            subprocess.run(["tmux", "-L", tmux_socket, "send-keys", 'echo SHELL-IN-"$(pwd)"', "Enter"], check=False)
            sent = time.monotonic()
        time.sleep(0.2)
        screen = subprocess.run(["tmux", "-L", tmux_socket, "capture-pane", "-p"], capture_output=True,
                                text=True).stdout  # fmt: skip
    assert f"SHELL-IN-{folder}" in screen, "\n".join(ln for ln in screen.splitlines() if ln.strip())


@pytest.mark.ssh
def test_ssh_refuses_a_host_key_that_was_never_pinned(sshd, tmp_path: Path, tmux_socket: str) -> None:
    add_job(tmp_path, "t-job-2", ssh_instance(sshd, tmp_path / "remote", tmux_socket))
    res = cli("ssh", "t-job-2", "--", "echo", "RAN", check=False)
    assert res.returncode != 0 and "RAN" not in res.stdout


def shlex_join(argv: list[str]) -> str:
    import shlex

    return shlex.join(argv)


def test_ssh_on_the_local_target_is_a_shell_in_the_folder(tmp_path: Path, local_home: Path) -> None:
    folder = add_job(tmp_path, "t-job-3", local(tmp_path))
    assert cli("ssh", "t-job-3", "--", "pwd").stdout.strip() == str(folder)


def test_rm_asks_refuses_a_running_job_and_deletes_only_the_jobs_folder(tmp_path: Path, local_home: Path) -> None:
    old = add_job(tmp_path, "t-job-old", local(tmp_path))
    outside = tmp_path / "precious"
    outside.mkdir()
    (outside / "keep.txt").write_text("mine")
    (old / "link").symlink_to(outside)
    running = add_job(tmp_path, "t-job-run", local(tmp_path), state="running")
    sleeper = subprocess.Popen(["sleep", "600"], cwd=running)  # a live process in its folder: it runs (killed below)
    try:
        (running / "pid").write_text(f"{sleeper.pid}\n")
        (running / "exit_code").unlink()

        res = cli("rm", "t-job-old", check=False)  # stdin is no terminal: it does not ask, it refuses
        assert res.returncode == 2 and "--yes" in res.stderr and old.is_dir()
        assert str(old) in res.stderr  # it says what it would delete

        res = cli("rm", "t-job-run", "--yes", check=False)
        assert res.returncode == 6 and "cancel it first" in res.stderr and running.is_dir()

        res = cli("rm", "t-job-old", "--yes")
        assert not old.exists() and (outside / "keep.txt").read_text() == "mine"
        assert [j["id"] for j in json.loads(cli("ls", "--json").stdout)] == ["t-job-run"]
        assert (tmp_path / "remote" / "jobs").is_dir()
    finally:
        sleeper.kill()


def test_rm_local_only_forgets_without_touching_the_instance(tmp_path: Path, local_home: Path) -> None:
    folder = add_job(tmp_path, "t-job-4", local(tmp_path))
    cli("rm", "t-job-4", "--yes", "--local-only")
    assert folder.is_dir() and json.loads(cli("ls", "--json").stdout) == []
