"""The shell programs the client sends to the instance (jobs/scripts/*.sh): they parse, and they ship."""

from __future__ import annotations

import fnmatch
import shutil
import subprocess
from pathlib import Path

import pytest
import tomllib

import jobs
from client.remote import bundle

SCRIPTS = sorted((Path(jobs.__file__).parent / "scripts").glob("*.sh"))
POSIX_SH = {"job_wrapper.sh"}  # run by `sh` (dash on Debian/Ubuntu), not bash


def test_the_launcher_scripts_are_there() -> None:
    assert {"job_control.sh", "job_wrapper.sh"} <= {p.name for p in SCRIPTS}


@pytest.mark.parametrize("path", SCRIPTS, ids=lambda p: p.name)
def test_script_parses(path: Path) -> None:
    shells = ["bash"] + (["sh"] + (["dash"] if shutil.which("dash") else []) if path.name in POSIX_SH else [])
    for shell in shells:
        res = subprocess.run([shell, "-n", str(path)], capture_output=True, text=True)
        assert res.returncode == 0, (shell, res.stderr)


@pytest.mark.parametrize("path", SCRIPTS, ids=lambda p: p.name)
def test_script_ships_as_package_data_and_in_the_bundle(path: Path) -> None:
    root = Path(jobs.__file__).parent.parent
    data = tomllib.loads((root / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]["jobs"]
    assert any(fnmatch.fnmatch(f"scripts/{path.name}", pattern) for pattern in data)
    assert f"jobs/scripts/{path.name}" in dict(bundle._files())
    assert bundle.script(path.name) == path.read_text()
