"""The rough edges a new user hit (issue 13): each one reproduced through the real command line."""

from __future__ import annotations

import io
import json
import sys
from pathlib import Path

from jobfiles import cli, write_toml
from rich.console import Console

from client.views import jobs as view


def test_init_creates_missing_folders(tmp_path: Path) -> None:
    from client.specfile import load_spec

    dest = tmp_path / "sub" / "dir" / "job.toml"
    res = cli("init", str(dest))
    assert "Traceback" not in res.stderr
    assert load_spec(dest).name == "support-bot"


def test_init_onto_an_existing_file_is_a_usage_error_with_force_as_the_way_out(tmp_path: Path) -> None:
    dest = tmp_path / "job.toml"
    dest.write_text("mine\n")
    res = cli("init", str(dest), check=False)
    assert res.returncode == 2 and "already exists" in res.stderr and "--force" in res.stderr
    assert dest.read_text() == "mine\n"
    cli("init", str(dest), "--force")
    assert "[instance]" in dest.read_text()


def test_doctor_without_a_saved_host_is_a_usage_error() -> None:
    res = cli("doctor", check=False)
    assert res.returncode == 2, res.stderr
    assert "none is saved yet" in res.stderr and "cannot reach" not in res.stderr
    assert "local" in res.stderr and "autodl-run login" in res.stderr
    res = cli("doctor", "nosuch", check=False)
    assert res.returncode == 2 and "no saved host named nosuch" in res.stderr


def test_doctor_local_checks_this_machine(local_home: Path) -> None:
    res = cli("doctor", "local", "--json", check=False)
    assert res.returncode in (0, 5), res.stderr
    report = json.loads(res.stdout)
    assert report["target"] == "local" and report["python"]["version"]
    assert {c["name"] for c in report["checks"]} >= {"python", "tmux"}


def test_a_host_name_that_does_not_resolve_says_so(tmp_path: Path) -> None:
    job = write_toml(
        tmp_path / "job.toml",
        {"name": "x"},
        {
            "instance": {"host": "no-such-host.invalid", "connect_timeout": 5.0, "python": sys.executable},
            "model": {"name_or_path": "Qwen/Qwen2.5-0.5B"},
            "data": {"train": "train.jsonl"},
        },
    )
    res = cli("doctor", str(job), check=False)
    assert res.returncode == 4
    assert "no-such-host.invalid does not resolve" in res.stderr and "spelling" in res.stderr
    assert "powered on" not in res.stderr


FAKE_APT = """#!/bin/sh
echo "$*" >> "{log}"
case " $* " in *" install "*) exit 1;; esac
exit 0
"""


def _fake_apt(folder: Path, log: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    apt = folder / "apt-get"
    apt.write_text(FAKE_APT.format(log=log))
    apt.chmod(0o755)
    return folder


def test_instance_side_apt_waits_for_the_lock(tmp_path: Path, local_home: Path) -> None:
    from jobfiles import write_job

    from client.remote.setup import Tools, _ensure_tmux
    from client.specfile import load_spec
    from client.transport.local import LocalTransport

    log = tmp_path / "apt.log"
    fake = _fake_apt(tmp_path / "fakebin", log)
    (local_home / ".profile").write_text(f'PATH="{fake}:$PATH"\n')
    inst = {"host": "local", "remote_root": str(tmp_path / "remote"), "python": sys.executable}
    spec = load_spec(write_job(tmp_path / "job", model="m", instance=inst))
    tools = Tools(tmux=False, rsync=True, apt=True, apt_failed=False, root=True)
    _ensure_tmux(LocalTransport(), spec, tools, lambda _msg: None)
    calls = log.read_text().splitlines()
    assert [c.split()[2] for c in calls] == ["install", "update", "install"]
    assert all(c.startswith("-o DPkg::Lock::Timeout=") for c in calls), calls


def test_setup_sh_waits_for_the_apt_lock(tmp_path: Path) -> None:
    import shutil
    import subprocess

    root = Path(__file__).resolve().parent.parent
    repo = tmp_path / "repo"
    (repo / "scripts").mkdir(parents=True)
    shutil.copy(root / "scripts" / "setup.sh", repo / "scripts" / "setup.sh")
    shutil.copy(root / "pyproject.toml", repo / "pyproject.toml")
    venv = repo / ".venv" / "bin"
    venv.mkdir(parents=True)
    for tool in ("python", "pip", "autodl-run"):
        (venv / tool).write_text("#!/bin/sh\necho fake\n")
        (venv / tool).chmod(0o755)
    log = tmp_path / "apt.log"
    fake = _fake_apt(tmp_path / "bin", log)
    (fake / "apt-get").write_text(f'#!/bin/sh\necho "$*" >> "{log}"\n')
    (fake / "id").write_text("#!/bin/sh\necho 0\n")
    for tool in ("dirname", "cat", "sha256sum", "cut", "grep"):  # and no sshd, rsync, tmux nor ip
        (fake / tool).symlink_to(shutil.which(tool))
    for f in fake.iterdir():
        f.chmod(0o755) if not f.is_symlink() else None
    res = subprocess.run([shutil.which("bash"), str(repo / "scripts" / "setup.sh")], capture_output=True,
                         text=True, env={"PATH": str(fake)}, timeout=300)  # fmt: skip
    assert res.returncode == 0, res.stderr
    calls = log.read_text().splitlines()
    assert [c.split()[2] for c in calls] == ["update", "install"], calls
    assert all(c.startswith("-o DPkg::Lock::Timeout=") for c in calls), calls


def _ledger_with_long_values(tmp_path: Path) -> list[str]:
    from client.ledger import Ledger
    from client.specfile import load_spec

    job = write_toml(
        tmp_path / "job.toml",
        {"name": "a-rather-long-job-name-for-a-fine-tune"},
        {
            "instance": {"host": "connect.westb.seetacloud-region-long-name.com", "port": 38076},
            "model": {"name_or_path": "Qwen/Qwen2.5-0.5B"},
            "data": {"train": "train.jsonl"},
        },
    )
    spec = load_spec(job)
    ids = [f"{spec.name}-20261130-1452{i:02d}-9c2{i}" for i in range(3)]
    ledger = Ledger()
    for i, job_id in enumerate(ids):
        ledger.add(job_id, spec, job, "d" * 64, "b" * 64, state="done", submitted_at=1_780_000_000 + i)
    ledger.update(ids[0], fetched_to=str(tmp_path / "runs" / ids[0] / "adapter"))
    ledger.close()
    return ids


def test_piped_ls_and_status_print_whole_values(tmp_path: Path) -> None:
    ids = _ledger_with_long_values(tmp_path)
    out = cli("ls").stdout  # stdout is a pipe here
    for job_id in ids:
        line = next(ln for ln in out.splitlines() if job_id in ln)
        assert "connect.westb.seetacloud-region-long-name.com:38076" in line and "…" not in line
        assert len(line.split("│")[4].strip()) == len("2026-05-28 12:26")  # the date whole, on the id's line
    adapter = str(tmp_path / "runs" / ids[0] / "adapter")
    buf = io.StringIO()
    info = {"id": ids[0], "instance": "x", "state": "done", "phase": "done", "total_steps": 0, "step": 0,
            "loss": None, "tokens_per_s": None, "elapsed_s": 1.0, "eta_s": None, "spent": None, "error": None,
            "fetched_to": adapter}  # fmt: skip
    view.status(info, Console(file=buf, width=40))
    assert adapter in buf.getvalue() and "…" not in buf.getvalue()


def test_ls_in_a_narrow_terminal_keeps_ids_whole(tmp_path: Path, tmux_socket: str) -> None:
    import os
    import shutil
    import subprocess
    import time

    if not shutil.which("tmux"):
        import pytest

        pytest.skip("tmux is not installed")
    ids = _ledger_with_long_values(tmp_path)
    root = Path(__file__).resolve().parent.parent
    cmd = (f"env AUTODL_RUN_HOME={os.environ['AUTODL_RUN_HOME']} PYTHONPATH={root} {sys.executable} -m client.cli ls;"
           " echo LS-END; sleep 600")  # fmt: skip
    subprocess.run(["tmux", "-L", tmux_socket, "new-session", "-d", "-x", "70", "-y", "40", cmd], check=True)
    deadline, screen = time.monotonic() + 120, ""
    while "LS-END" not in screen and time.monotonic() < deadline:
        time.sleep(0.2)
        screen = subprocess.run(["tmux", "-L", tmux_socket, "capture-pane", "-p"], capture_output=True,
                                text=True).stdout  # fmt: skip
    assert "LS-END" in screen, screen
    for job_id in ids:
        line = next((ln for ln in screen.splitlines() if job_id in ln), None)
        assert line is not None, screen  # whole, on one line
        assert len(line) <= 70


def test_a_global_batch_in_sequences_is_the_mean_sequence_length_in_tokens() -> None:
    import numpy as np
    import pytest
    from pydantic import ValidationError

    from jobs.spec import TrainSpec
    from remote_worker import data

    split = data.Split("train", [data.Seq(np.ones(n, dtype=np.int64), np.ones(n, dtype=np.int64)) for n in (10, 30)])
    assert data.mean_tokens(split) == 20
    train = TrainSpec(global_batch_sequences=8)  # LLaMA-Factory: per_device_train_batch_size 2 x accumulation 4
    assert data.global_batch_tokens(train, data.mean_tokens(split)) == 160
    assert data.grad_accum(train, 40, data.mean_tokens(split)) == 4
    assert data.grad_accum(TrainSpec(global_batch_tokens=160), 40) == 4  # the same as in tokens
    assert data.grad_accum(TrainSpec(), 40, 20) == 1
    with pytest.raises(ValidationError, match="not both"):
        TrainSpec(global_batch_tokens=160, global_batch_sequences=8)


def test_check_accepts_a_global_batch_in_sequences_and_refuses_both(tmp_path: Path) -> None:
    from jobfiles import write_job

    inst = {"host": "local", "python": sys.executable}
    job = write_job(tmp_path / "a", model="Qwen/Qwen2.5-0.5B", instance=inst, train={"global_batch_sequences": 16})
    cli("check", str(job))
    job = write_job(tmp_path / "b", model="Qwen/Qwen2.5-0.5B", instance=inst,
                    train={"global_batch_sequences": 16, "global_batch_tokens": 4096})  # fmt: skip
    res = cli("check", str(job), check=False)
    assert res.returncode == 2 and "not both" in res.stderr


def _resumed_progress():
    from client.progress import Progress
    from jobs import events as ev

    p = Progress("j")
    p.apply(ev.Phase(phase="setup", t=0.0))
    p.apply(ev.Failed(error_class="Interrupted", message="stopped by SIGTERM", t=100.0))
    return p


def test_piped_step_lines_carry_the_jobs_elapsed_time_and_an_eta() -> None:
    from client.views.render import event_line, fmt_duration
    from jobs import events as ev

    p = _resumed_progress()
    p.apply(ev.Phase(phase="setup", t=3600.0))
    step = ev.Step(step=10, total_steps=40, epoch=1.0, loss=1.0, lr=1e-4, elapsed_s=20.0, t=3660.0)
    p.apply(step)
    line = event_line(step, p)
    assert f"elapsed {fmt_duration(p.elapsed_s(3660.0))}" in line and "elapsed 2m40s" in line
    assert f"ETA {fmt_duration(p.eta_s)}" in line and "ETA 1m00s" in line


def test_check_prints_the_over_length_and_skipped_counts(tmp_path: Path) -> None:
    from jobfiles import write_job

    job = write_job(tmp_path / "job", model="Qwen/Qwen2.5-0.5B", instance={"host": "local"},
                    data={"max_length": 64, "on_error": "skip"})  # fmt: skip
    with open(tmp_path / "job" / "train.jsonl", "a") as f:
        for i in range(3):
            f.write(json.dumps({"instruction": f"long {i} " + "word " * 400, "input": "", "output": "a"}) + "\n")
        f.write("{not json\n")
    out = cli("check", str(job)).stdout
    report = json.loads(cli("check", str(job), "--json").stdout)["dataset"]
    assert report["overlong"]["count"] == 3 and report["invalid_count"] == 1
    assert "1 skipped as invalid" in out
    assert "3 record(s) over max_length 64" in out and "dropped at prepare" in out


def test_ssh_under_rsync_names_a_host_that_does_not_resolve(tmp_path: Path) -> None:
    from client.transport.errors_map import from_ssh_stderr
    from client.transport.ssh import SshTransport

    t = SshTransport("exmaple.invalid", 2222, known_hosts=tmp_path / "kh").target
    err = from_ssh_stderr("ssh: Could not resolve hostname exmaple.invalid: Name or service not known", t)
    assert err is not None and "exmaple.invalid does not resolve" in str(err) and "spelling" in err.hint
    assert "powered on" not in str(err)
