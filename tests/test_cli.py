"""The command line as a user meets it: help, usage errors, and docs that match the commands."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

from client.cli import app

ROOT = Path(__file__).resolve().parent.parent


def run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "client.cli", *args], capture_output=True, text=True, timeout=300)  # a hang guard


def commands() -> list[str]:
    return sorted(c.name or c.callback.__name__ for c in app.registered_commands)


def test_help_lists_every_command_and_the_exit_codes() -> None:
    res = run("--help")
    assert res.returncode == 0
    for name in commands():
        assert re.search(rf"^\s+{name}\s", res.stdout, re.M), name
    assert "Exit codes: 0 ok" in " ".join(res.stdout.split())


def test_readme_documents_every_command() -> None:
    readme = (ROOT / "README.md").read_text()
    for name in commands():
        assert f"`{name}" in readme, f"README does not describe `{name}`"


def test_usage_errors_exit_2_without_a_traceback() -> None:
    res = run("fetch", "--bogus")
    assert res.returncode == 2
    assert "No such option: --bogus" in res.stderr and "Traceback" not in res.stderr
    res = run("submit")
    assert res.returncode == 2 and "Missing argument" in res.stderr


def test_version() -> None:
    res = run("--version")
    assert res.returncode == 0 and res.stdout.startswith("autodl-run ")


def test_init_writes_a_spec_that_loads(tmp_path: Path) -> None:
    from client.specfile import load_spec

    dest = tmp_path / "job.toml"
    res = run("init", str(dest))
    assert res.returncode == 0, res.stderr
    assert load_spec(dest).name == "support-bot"
    assert run("init", str(dest)).returncode == 2  # never overwrites (a usage error)
