"""The rough edges a new user hit (issue 13): each one reproduced through the real command line."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from jobfiles import cli, write_toml


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
                         text=True, env={"PATH": str(fake)}, timeout=60)  # fmt: skip
    assert res.returncode == 0, res.stderr
    calls = log.read_text().splitlines()
    assert [c.split()[2] for c in calls] == ["update", "install"], calls
    assert all(c.startswith("-o DPkg::Lock::Timeout=") for c in calls), calls
