"""Where `resume` continues and what `--deadline` accepts: parsing and errors, no training."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from jobfiles import write_job, write_toml

from client.errors import SpecError
from client.lifecycle.resume import instance_for_profile, instance_from_file, same_target
from jobs.spec import InstanceSpec

CLI = [sys.executable, "-m", "client.cli"]


def cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([*CLI, *args], capture_output=True, text=True, timeout=120, env=os.environ.copy())


def test_instance_from_a_toml_file(tmp_path: Path) -> None:
    path = write_toml(
        tmp_path / "other.toml", {"name": "x"}, {"instance": {"ssh": "ssh -p 2222 root@box.example"}}
    )
    inst = instance_from_file(path)
    assert (inst.host, inst.port, inst.user) == ("box.example", 2222, "root")
    (tmp_path / "none.toml").write_text('name = "x"\n')
    with pytest.raises(SpecError, match="no \\[instance\\] table"):
        instance_from_file(tmp_path / "none.toml")
    write_toml(tmp_path / "bad.toml", {}, {"instance": {"port": 0, "bogus": 1}})
    with pytest.raises(SpecError) as info:
        instance_from_file(tmp_path / "bad.toml")
    assert "instance.port" in str(info.value) and "instance.bogus" in str(info.value)
    with pytest.raises(SpecError, match="cannot read"):
        instance_from_file(tmp_path / "missing.toml")


def test_a_profile_keeps_the_jobs_own_instance_settings() -> None:
    old = InstanceSpec(
        host="old.example", python="/root/miniconda3/bin/python", shutdown_after="done",
        idle_grace_minutes=5, max_hours=3, price_per_hour=1.9, remote_root="/data/x",
    )  # fmt: skip
    new = instance_for_profile(old, "gpu2")
    assert new.profile == "gpu2" and new.host is None and not new.is_local
    assert (new.python, new.shutdown_policy, new.idle_grace_minutes, new.max_hours) == (
        "/root/miniconda3/bin/python", "done", 5, 3,
    )  # fmt: skip
    assert new.price_per_hour is None and new.remote_root is None  # the new machine's own


def test_same_target() -> None:
    a = InstanceSpec(host="h", port=22, remote_root="/r")
    assert same_target(a, InstanceSpec(host="h", port=22))
    assert not same_target(a, InstanceSpec(host="h", port=23))
    assert not same_target(a, InstanceSpec(host="h", remote_root="/elsewhere"))
    assert same_target(InstanceSpec(), InstanceSpec(host="local"))


def test_bad_deadlines_are_refused_before_anything_runs(tmp_path: Path) -> None:
    job = write_job(
        tmp_path / "job", model="m", instance={"host": "local", "remote_root": str(tmp_path / "r")}
    )
    res = cli("submit", str(job), "--deadline", "soonish")
    assert res.returncode == 2 and "cannot read the deadline 'soonish'" in res.stderr
    res = cli("submit", str(job), "--deadline", "2020-01-01 00:00")
    assert res.returncode == 2 and "the deadline has passed" in res.stderr and "--deadline" in res.stderr
    text = job.read_text().replace("[instance]", '[instance]\nexpires_at = "2020-01-01T00:00:00"')
    job.write_text(text)
    res = cli("submit", str(job))
    assert res.returncode == 2 and "instance.expires_at" in res.stderr
    assert not (tmp_path / "r").exists()


def test_resume_needs_a_known_job_and_one_place(tmp_path: Path) -> None:
    res = cli("resume", "nope")
    assert res.returncode == 6 and "no job `nope`" in res.stderr
    res = cli("resume", "nope", "--profile", "a", "--instance-from", str(tmp_path / "x.toml"))
    assert res.returncode == 2 and "not both" in res.stderr
