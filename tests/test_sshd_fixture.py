"""The sshd fixture itself: it answers, the client key gets in, and kill/start keep port and host key."""

from __future__ import annotations

import subprocess
import time

import pytest
from sshd import BANNER, Sshd

pytestmark = pytest.mark.ssh


def _ssh(sshd: Sshd, tmp_path, *cmd: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["ssh", "-p", str(sshd.port), "-i", str(sshd.identity_file), "-o", "BatchMode=yes",
         "-o", "IdentitiesOnly=yes", "-o", "StrictHostKeyChecking=accept-new",
         "-o", f"UserKnownHostsFile={tmp_path / 'kh'}", "-o", "LogLevel=ERROR",
         f"{sshd.user}@{sshd.host}", *cmd],
        capture_output=True, text=True, timeout=120,  # a hang guard
    )  # fmt: skip


def test_banner_login_and_restart_on_the_same_port(sshd_factory, tmp_path) -> None:
    server = sshd_factory()
    assert server.running and server._banner()
    assert (server.dir.stat().st_mode & 0o777) == 0o700
    first = _ssh(server, tmp_path, "echo", "hello")
    assert (first.returncode, first.stdout) == (0, "hello\n"), first.stderr + server.log()
    home = _ssh(server, tmp_path, "bash", "-lc", "'echo $HOME'").stdout
    assert home == f"{server.home}\n"

    port = server.port
    server.kill()
    assert not server.running
    assert _ssh(server, tmp_path, "true").returncode == 255  # refused while down

    server.start()
    assert server.port == port
    again = _ssh(server, tmp_path, "echo", "back")  # same host key: the pinned entry still matches
    assert (again.returncode, again.stdout) == (0, "back\n"), again.stderr


def test_kill_cuts_open_connections(sshd_factory, tmp_path) -> None:
    server = sshd_factory()
    proc = subprocess.Popen(
        ["ssh", "-p", str(server.port), "-i", str(server.identity_file), "-o", "BatchMode=yes",
         "-o", "StrictHostKeyChecking=no", "-o", f"UserKnownHostsFile={tmp_path / 'kh'}", "-o", "LogLevel=ERROR",
         f"{server.user}@{server.host}", "sleep 600"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 120  # a hang guard: the command runs on the server before the kill
        while not any("sleep" in _cmdline(p) for p in _descendants_of(server)):
            assert proc.poll() is None and time.monotonic() < deadline, "the command never ran on the server"
            time.sleep(0.05)
        server.kill()
        assert proc.wait(timeout=120) == 255  # the client saw the connection drop (a hang guard; not the sleep's end)
    finally:
        proc.kill()


def test_instance_spec_points_at_the_server(sshd) -> None:
    spec = sshd.instance(connect_timeout=3)
    assert (spec.host, spec.port, spec.user, spec.connect_timeout) == (sshd.host, sshd.port, sshd.user, 3)
    assert spec.identity_file == str(sshd.identity_file)
    assert not spec.is_local
    assert BANNER.startswith(b"SSH-2.0")


def _descendants_of(server: Sshd) -> list[int]:
    from sshd import descendants

    return descendants(server.proc.pid) if server.proc else []


def _cmdline(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ").decode()
    except OSError:
        return ""
