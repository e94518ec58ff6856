"""A multi-node `submit` that fails on another node leaves nothing waiting at node 0's rendezvous.

    laptop --ssh--> server A (node 0) ; node 1: a login nobody answers, or a server whose tmux fails

- node 1 unreachable: every node is made ready before any is launched, so node 0 is never launched;
- node 1's launch fails (a `tmux` on its PATH that cannot start a session): node 0, launched already,
  is stopped (it would wait at the rendezvous until `cancel`).
Either way the error names node 1, its login and what to do. (The old code launched node 0 first and
left it running.)
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
from jobfiles import cli, ssh_instance, write_job
from sshd import free_port
from test_multigpu_ssh import ROOT, _login, _read, _reap_nodes, servers, tiny_model  # noqa: F401

from jobs.layout import JOB_FILES

pytestmark = [pytest.mark.slow, pytest.mark.ssh]


def _job(folder: Path, node0, node1_login: str, tmux_socket: str, model: Path) -> Path:
    inst = ssh_instance(node0, f"~/{ROOT}", tmux_socket, hosts=[node1_login], rdzv_port=free_port())
    return write_job(folder, model=model, instance=inst, train={"gpus": 1, "max_steps": 100000}, rows=16)


def _node0_jobs(server) -> list[Path]:
    jobs = server.home / ROOT / "jobs"
    return sorted(jobs.iterdir()) if jobs.exists() else []


def _alive(job_dir: Path) -> bool:
    pid = _read(job_dir / JOB_FILES["pid"]).strip()
    return pid.isdigit() and Path(f"/proc/{pid}").exists() and b" Z " not in Path(f"/proc/{pid}/stat").read_bytes()


def test_an_unreachable_node_launches_nothing(servers, tmp_path, tmux_socket, tiny_model) -> None:  # noqa: F811
    before = _node0_jobs(servers[0])
    login = f"ssh -p {free_port()} -i {servers[1].identity_file} {servers[1].user}@127.0.0.1"
    res = cli("submit", str(_job(tmp_path / "job", servers[0], login, tmux_socket, tiny_model)), check=False,
              timeout=600)  # fmt: skip
    assert res.returncode != 0
    started = [j for j in _node0_jobs(servers[0]) if j not in before]
    assert not any(_alive(j) for j in started), "node 0 was launched and waits for node 1"
    assert not any((j / JOB_FILES["pid"]).exists() for j in started), "node 0 was launched"
    assert "node 1 of 2" in res.stderr and "instance.hosts[0]" in res.stderr and login in res.stderr, res.stderr
    assert "submit the job again" in res.stderr, res.stderr


def test_a_node_that_fails_to_launch_stops_node_0(servers, sshd_factory, tmp_path, tmux_socket, tiny_model) -> None:  # noqa: F811
    node1 = sshd_factory()
    fake = node1.home / "fakebin"
    fake.mkdir()
    tmux = shutil.which("tmux")
    (fake / "tmux").write_text(
        f'#!/bin/sh\ncase "$*" in *new-session*) echo "tmux: cannot start a session" >&2; exit 1 ;; esac\n'
        f'exec {tmux} "$@"\n'
    )
    os.chmod(fake / "tmux", 0o755)
    (node1.home / ".profile").write_text(f'export TMUX_TMPDIR="$HOME" PATH="{fake}:$PATH"\n')
    try:
        before = _node0_jobs(servers[0])
        res = cli("submit", str(_job(tmp_path / "job", servers[0], _login(node1), tmux_socket, tiny_model)),
                  check=False, timeout=600)  # fmt: skip
    finally:
        from test_multigpu_ssh import _kill_under

        _kill_under(node1.home / ROOT)
    assert res.returncode != 0
    started = [j for j in _node0_jobs(servers[0]) if j not in before]
    assert len(started) == 1 and (started[0] / JOB_FILES["pid"]).exists(), "node 0 was launched first"
    assert not _alive(started[0]), "node 0 still waits at the rendezvous"
    assert _read(started[0] / JOB_FILES["state"]).strip() == "cancelled"
    assert "node 1 of 2" in res.stderr and "failed to launch" in res.stderr, res.stderr
    assert "the job was stopped on node(s) 0" in res.stderr, res.stderr
