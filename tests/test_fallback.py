"""Instances that lack tmux or rsync (tests/netns.py hides them from PATH): setsid and SFTP take over."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from netns import _make_instance, _netns_ok, login  # noqa: F401  (fixtures)

from client.errors import TransferError
from client.remote import launcher
from client.remote.setup import Tools, ensure_worker_deps
from client.transport import connect, sftp
from client.transport import rsync as rs
from client.transport.ssh import SshTransport
from jobs.layout import RemoteLayout
from jobs.protocol import JobState
from jobs.spec import InstanceSpec, JobSpec

pytestmark = pytest.mark.ssh
NASTY = [
    "plain.txt",
    "with space.txt",
    "it's.txt",
    'dq"uote.txt',
    "$(touch pwned).txt",
    "-dash.txt",
    "back\\slash.txt",
]


def _tree(root: Path) -> Path:
    (root / "sub dir" / "deeper").mkdir(parents=True)
    for i, name in enumerate(NASTY):
        (root / name).write_text(f"file {i}\n")
    (root / "sub dir" / "deeper" / "x.bin").write_bytes(bytes(range(256)) * 400)
    (root / "run.sh").write_text("#!/bin/sh\necho hi\n")
    (root / "run.sh").chmod(0o755)
    (root / "link").symlink_to("plain.txt")
    return root


def _files(root: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(root)): p.read_bytes()
        for p in sorted(root.rglob("*"))
        if p.is_file() and not p.is_symlink()
    }


def _spec(**instance: object) -> JobSpec:
    return JobSpec.model_validate(
        {"name": "t", "instance": {"profile": "gpu1", "connect_timeout": 30, **instance},
         "model": {"name_or_path": "/root/model"}, "data": {"train": "t.jsonl"}, "quant": {"bits": 16}}
    )  # fmt: skip


def test_no_tmux_tries_apt_once_then_runs_the_job_under_setsid(make_instance, tmp_path: Path) -> None:
    inst = make_instance(hide=("tmux",))
    login(inst)
    spec = _spec()
    lines: list[str] = []
    with connect(spec.instance) as t:
        info = ensure_worker_deps(t, spec, log=lines.append)
        assert info.tools == Tools(tmux=False, rsync=True, apt=True, apt_failed=False, root=True)
        tried = inst.apt_log.read_text()
        assert "install -y -q --no-install-recommends tmux" in tried and "update" in tried
        assert any("setsid nohup" in ln for ln in lines), lines
        ensure_worker_deps(t, spec, log=lines.append)  # apt failed once: not tried on every submit
        assert inst.apt_log.read_text() == tried and "could not install it before" in lines[-1]

        paths = RemoteLayout("/root/autodl-tmp/autodl-run").job("j-1")
        status = launcher.launch(
            t,
            paths,
            ["sh", "-c", "echo started; while [ ! -e go ]; do sleep 0.05; done; exit 3"],  # `go`: after the checks
            socket="autodl-run",
            session="j-1",
            env={"A": "b c"},
        )
        # starting: the wrapper wrote its pid (launch waits for that) but not yet `state`
        assert status.state in ("starting", "running") and status.alive
        pid = status.pid
        sid = int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[3])
        assert sid == pid  # a session of its own: setsid, not a tmux pane
        (inst.root / "autodl-tmp" / "autodl-run" / "jobs" / "j-1" / "go").touch()
        deadline = time.monotonic() + 120  # a hang guard
        while launcher.job_status(t, paths).state in ("starting", "running") and time.monotonic() < deadline:
            time.sleep(0.2)
        assert launcher.job_status(t, paths) == launcher.LaunchStatus(JobState.FAILED, 3, False, pid)
    job = inst.root / "autodl-tmp" / "autodl-run" / "jobs" / "j-1"
    assert (job / "exit_code").read_text().strip() == "3" and (job / "state").read_text().strip() == "failed"
    assert "started" in (job / "worker.log").read_text()


def test_no_rsync_means_sftp_with_the_same_results(make_instance, tmp_path: Path) -> None:
    inst = make_instance(hide=("rsync",))
    login(inst)
    src = _tree(tmp_path / "src")
    remote = "/root/autodl-tmp/sftp test/dest"
    on_disk = inst.root / "autodl-tmp" / "sftp test" / "dest"
    with connect(InstanceSpec(profile="gpu1", connect_timeout=30)) as t:
        assert t.file_method == "rsync"
        t.put(src, remote)
        assert t.file_method == "sftp"  # rsync was missing there: SFTP from then on
        assert _files(on_disk) == _files(src)
        assert (on_disk / "run.sh").stat().st_mode & 0o777 == 0o755
        assert (on_disk / "link").is_symlink() and (on_disk / "link").readlink() == Path("plain.txt")
        assert not list(tmp_path.rglob("pwned")) and not list(inst.root.rglob("pwned"))

        (src / "plain.txt").unlink()
        (src / "sub dir" / "deeper" / "x.bin").write_bytes(b"changed")
        t.put(src, remote, delete=True)
        assert _files(on_disk) == _files(src) and not (on_disk / "plain.txt").exists()

        one = tmp_path / "one file's name.txt"
        one.write_text("hello\n")
        t.put(one, "/root/autodl-tmp/a/b c/renamed.txt")
        assert (inst.root / "autodl-tmp" / "a" / "b c" / "renamed.txt").read_text() == "hello\n"

        t.get(remote, tmp_path / "back")
        assert _files(tmp_path / "back") == _files(src)
        t.get("/root/autodl-tmp/a/b c/renamed.txt", tmp_path / "x" / "y.txt")
        assert (tmp_path / "x" / "y.txt").read_text() == "hello\n"
        assert not list((tmp_path / "back").rglob("*.autodl-part")) and not list(
            on_disk.rglob("*.autodl-part")
        )
    assert "subsystem 'sftp'" in inst.log()


def test_sftp_verification_catches_a_corrupted_copy(make_instance, tmp_path: Path, monkeypatch) -> None:
    inst = make_instance(hide=("rsync",))
    login(inst)
    src = _tree(tmp_path / "src")
    real_send = sftp._send

    def corrupting_send(client, local: Path, remote: str) -> None:
        real_send(client, local, remote)
        if local.name == "x.bin":
            with client.open(remote, "r+") as f:
                f.write(b"\xff")

    monkeypatch.setattr(sftp, "_send", corrupting_send)
    with connect(InstanceSpec(profile="gpu1", connect_timeout=30)) as t:
        t.file_method = "sftp"
        with pytest.raises(TransferError, match="verification failed.*x.bin"):
            t.put(src, "/root/autodl-tmp/v")
        monkeypatch.setattr(sftp, "_send", real_send)
        t.put(src, "/root/autodl-tmp/v")  # run again: the corrupted file is sent again, the rest skipped
        assert _files(inst.root / "autodl-tmp" / "v") == _files(src)


def test_a_laptop_without_rsync_uses_sftp(
    ssh_transport: SshTransport, sshd, tmp_path: Path, monkeypatch
) -> None:
    monkeypatch.setattr(rs, "rsync_version", lambda: None)
    t = SshTransport.from_instance(sshd.instance(), known_hosts=tmp_path / "kh")
    assert t.file_method == "sftp"
    src = _tree(tmp_path / "src")
    t.put(src, str(tmp_path / "remote"))
    t.get(str(tmp_path / "remote"), tmp_path / "back")
    assert _files(tmp_path / "back") == _files(src)
    t.close()
