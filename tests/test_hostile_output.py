"""What an instance prints is bounded and escaped (found by the breaker, against the real sshd).

- a guard status.json that is a symlink to /dev/zero is read as "no status", not buffered;
- a command whose output never ends fails with a clear error once it passes the cap, instead of
  filling the laptop's memory;
- escape sequences in a remote tool's stderr (quoted in an error) never reach the terminal raw.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest
from jobfiles import CLI
from test_hostile_fetch import JOB, Instance, inst, server  # noqa: F401  (fixtures)

from client.errors import TransportError
from client.remote import guard as guard_launch
from client.transport import ssh as ssh_module
from jobs.layout import RemoteLayout

pytestmark = pytest.mark.ssh


def test_a_guard_status_that_never_ends_is_no_status(ssh_transport, tmp_path: Path, monkeypatch) -> None:
    paths = RemoteLayout(str(tmp_path / "root")).job("j")
    Path(paths.guard_status).parent.mkdir(parents=True)
    os.symlink("/dev/zero", paths.guard_status)
    seen = []
    real_run = ssh_transport.run

    def run(*args, **kwargs):
        res = real_run(*args, **kwargs)  # raises on a flood (the cap) or a timeout: then nothing is seen
        seen.append(len(res.stdout_bytes))
        return res

    monkeypatch.setattr(ssh_transport, "run", run)
    assert guard_launch.guard_status(ssh_transport, paths) is None
    assert seen and max(seen) <= guard_launch.MAX_STATUS_BYTES  # read, but only a status file's worth


def test_output_past_the_cap_is_an_error_not_a_flood(ssh_transport, monkeypatch) -> None:
    monkeypatch.setattr(ssh_module, "MAX_STDOUT", 1 << 20)
    with pytest.raises(TransportError, match="more than 1 MiB"):
        ssh_transport.run("cat /dev/zero", timeout=120)
    assert ssh_transport.run(["echo", "again"]).stdout == "again\n"  # the next command reconnects


def test_escape_sequences_in_a_remote_tools_stderr_are_escaped(inst: Instance) -> None:  # noqa: F811
    inst.manifest()
    inst.lie("rsync", "printf '\\033]52;c;cm0gLXJmIH4K\\007\\033]0;PWNED\\007\\033[2J boom\\n' >&2\nexit 1\n")
    res = subprocess.run([*CLI, "fetch", JOB, "--to", str(inst.laptop)], capture_output=True, text=True,
                         timeout=300, env=os.environ.copy())  # fmt: skip
    assert res.returncode != 0
    assert "\x1b" not in res.stderr + res.stdout and "\x07" not in res.stderr + res.stdout
    assert "\\x1b]0;PWNED" in res.stderr  # shown, escaped
