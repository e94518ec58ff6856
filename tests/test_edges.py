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
