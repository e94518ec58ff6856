"""Two nodes through the client over SSH: `submit` with instance.hosts, then `cancel`.

    laptop (the CLI) --ssh--> server A (node 0, the instance)
                     --ssh--> server B (node 1, instance.hosts = [B's login])

Both are real sshd servers on 127.0.0.1 (their own ports and homes). Node 0's address is 127.0.0.1,
which node 1 reaches as it is (one machine), so the static rendezvous needs no `rdzv_host` and no
network namespace: `rdzv_port` is a free port. `remote_root = "~/autodl"` puts each node's job folder
in its own server's home; node 1's ~/.profile gives it a tmux server of its own (TMUX_TMPDIR), as a
second machine would have. One CPU process per node (gloo).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from jobfiles import cli, cli_here, ssh_instance, write_job
from sshd import Sshd, free_port
from tinymodel import make_model

from jobs import events as ev
from jobs.layout import JOB_FILES

pytestmark = [pytest.mark.slow, pytest.mark.ssh]
pytest.importorskip("torch")
pytest.importorskip("peft")


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_model(tmp_path_factory.mktemp("model") / "tiny-qwen2")


ROOT = "autodl"  # remote_root, in each server's home ("~/autodl")


def _kill_under(folder: Path) -> None:
    mark = str(folder).encode()
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and int(entry.name) != os.getpid():
            try:
                if mark in (entry / "cmdline").read_bytes():
                    os.kill(int(entry.name), signal.SIGKILL)
            except OSError:
                pass


@pytest.fixture(scope="module")
def servers(sshd_factory) -> Iterator[list[Sshd]]:
    pair = [sshd_factory(), sshd_factory()]
    (pair[1].home / ".profile").write_text('export TMUX_TMPDIR="$HOME"\n')
    try:
        yield pair
    finally:
        for server in pair:  # the jobs live in the servers' homes, outside the tests' tmp_path (not sshd)
            _kill_under(server.home / ROOT)


@pytest.fixture(autouse=True)
def _reap_nodes(servers: list[Sshd]) -> Iterator[None]:
    """A test's workers never outlive it (conftest's reaper looks in tmp_path only)."""
    yield
    for server in servers:
        _kill_under(server.home / ROOT)


def _login(server: Sshd) -> str:
    return f"ssh -p {server.port} -i {server.identity_file} {server.user}@{server.host}"


def _two_node_job(folder: Path, servers: list[Sshd], tmux_socket: str, model: Path, **train) -> Path:
    inst = ssh_instance(servers[0], f"~/{ROOT}", tmux_socket, hosts=[_login(servers[1])], rdzv_port=free_port())
    return write_job(folder, model=model, instance=inst, train={"gpus": 1, **train}, rows=16)


def _job_dir(server: Sshd, job_id: str) -> Path:
    return server.home / ROOT / "jobs" / job_id


def _read(path: Path) -> str:
    return path.read_text() if path.exists() else ""


def test_submit_trains_on_both_nodes(servers, tmp_path, tmux_socket, tiny_model) -> None:
    job = _two_node_job(tmp_path / "job", servers, tmux_socket, tiny_model, max_steps=4)
    sub = cli("submit", str(job), "--follow", "--json", timeout=900)
    job_id = json.loads(sub.stdout[: sub.stdout.index("\n}") + 2])["job_id"]
    nodes = [_job_dir(s, job_id) for s in servers]
    events = [ev.parse(ln) for ln in _read(nodes[0] / JOB_FILES["events"]).splitlines()]
    started = next(e for e in events if isinstance(e, ev.Started))
    assert started.world_size == 2, "both nodes' processes joined one run"
    assert isinstance(events[-1], ev.Done) and events[-1].steps == 4
    for rank, folder in enumerate(nodes):
        assert f"torchrun: node {rank} of 2" in _read(folder / JOB_FILES["log"]), _read(folder / JOB_FILES["log"])
        assert _read(folder / JOB_FILES["exit_code"]).strip() == "0", _read(folder / JOB_FILES["log"])[-3000:]
    assert _read(nodes[1] / JOB_FILES["events"]) == "", "node 1 writes no events: global rank 0 is on node 0"


def _submit_and_wait_for_a_step(job: Path, servers: list[Sshd]) -> tuple[str, list[Path]]:
    job_id = cli_here("submit", str(job), timeout=900).stdout.strip()  # sets the scenario up: in this process
    nodes = [_job_dir(s, job_id) for s in servers]
    deadline = time.monotonic() + 600
    while '"type":"step"' not in _read(nodes[0] / JOB_FILES["events"]).replace(" ", ""):
        assert time.monotonic() < deadline, _read(nodes[1] / JOB_FILES["log"])[-3000:]
        time.sleep(0.5)
    return job_id, nodes


def test_cancel_reports_a_node_it_cannot_reach(servers, tmp_path, tmux_socket, tiny_model) -> None:
    """Node 1's sshd goes away mid-run (its worker keeps training): cancel stops node 0, names node 1
    and what to do, and succeeds; node 1's ranks then stop with node 0's."""
    job = _two_node_job(tmp_path / "job", servers, tmux_socket, tiny_model, max_steps=100000)
    job_id, nodes = _submit_and_wait_for_a_step(job, servers)
    servers[1].kill()
    try:
        res = cli("cancel", job_id, timeout=600)
    finally:
        servers[1].start()
    assert _read(nodes[0] / JOB_FILES["state"]).strip() == "cancelled"
    assert f"cancelled {job_id}" in res.stdout, res.stdout + res.stderr
    assert "node 1 (" in res.stderr and "not reached" in res.stderr, res.stderr
    assert f"port {servers[1].port}" in res.stderr and f"autodl-run cancel {job_id}" in res.stderr, res.stderr
    deadline = time.monotonic() + 600
    while _read(nodes[1] / JOB_FILES["state"]).strip() in ("", "running"):
        assert time.monotonic() < deadline, "node 1's worker did not stop with node 0's"
        time.sleep(0.5)


def test_status_names_the_other_nodes_when_node_0_vanishes(servers, tmp_path, tmux_socket, tiny_model) -> None:
    """Node 0's host goes away mid-run (its sshd and its worker killed): node 1 stops within
    instance.node_timeout_s, and `status`, which cannot reach node 0, says how node 1 ended."""
    inst = ssh_instance(servers[0], f"~/{ROOT}", tmux_socket, hosts=[_login(servers[1])], rdzv_port=free_port(),
                        node_timeout_s=10)  # fmt: skip
    job = write_job(tmp_path / "job", model=tiny_model, instance=inst, train={"gpus": 1, "max_steps": 100000}, rows=16)
    job_id, nodes = _submit_and_wait_for_a_step(job, servers)
    servers[0].kill()
    try:
        _kill_under(servers[0].home / ROOT)
        deadline = time.monotonic() + 300
        while _read(nodes[1] / JOB_FILES["state"]).strip() in ("", "running"):
            assert time.monotonic() < deadline, "node 1 still runs without node 0"
            time.sleep(0.5)
        res = cli("status", job_id, check=False)
    finally:
        servers[0].start()
    assert res.returncode != 0, res.stdout
    assert "node 1 (" in res.stderr and "): failed: " in res.stderr, res.stderr


def test_cancel_stops_every_node_and_a_resume_launches_every_node(servers, tmp_path, tmux_socket, tiny_model) -> None:
    """`cancel` stops every node. Then a resume in place launches node 1 again too (it launched node 0
    alone, which then waited at the rendezvous). Without a shared disk node 1 lacks rank 0's checkpoint:
    its rank fails naming it. (One job for both: the cancel is the resume's first half.)"""
    job = _two_node_job(tmp_path / "job", servers, tmux_socket, tiny_model, max_steps=100000, save_steps=1,
                        save_every_minutes=0)  # fmt: skip
    job_id, nodes = _submit_and_wait_for_a_step(job, servers)
    res = cli("cancel", job_id, timeout=600)
    for folder in nodes:  # node 1 was stopped by cancel itself, not only by its ranks' agreement with node 0's
        assert _read(folder / JOB_FILES["state"]).strip() == "cancelled", _read(folder / JOB_FILES["log"])[-3000:]
    assert f"cancelled {job_id}" in res.stdout, res.stdout + res.stderr
    assert "node 1 (" in res.stdout and "): cancelled" in res.stdout, res.stdout + res.stderr
    for folder in nodes:
        pid = int(_read(folder / JOB_FILES["pid"]))
        assert not Path(f"/proc/{pid}").exists() or b"Z" in Path(f"/proc/{pid}/stat").read_bytes().split()[2]
    tmux = subprocess.run(["tmux", "-L", tmux_socket, "has-session", "-t", job_id], capture_output=True,
                          env={**os.environ, "TMUX_TMPDIR": str(servers[1].home)})  # fmt: skip
    assert tmux.returncode != 0, "node 1's tmux session ended with its worker"
    status = json.loads(cli("status", job_id, "--json").stdout)
    assert status["state"] == "cancelled"

    assert list((nodes[0] / "output" / "checkpoints").glob("step-*")), "no checkpoint to resume from"
    runs = _read(nodes[1] / JOB_FILES["log"]).count("torchrun: node 1 of 2")
    cli("resume", job_id, check=False, timeout=600)
    deadline = time.monotonic() + 300
    while "is not on this node" not in _read(nodes[1] / JOB_FILES["log"]):
        assert time.monotonic() < deadline, "node 1 was not launched by the resume: " + _read(nodes[1] / JOB_FILES["log"])[-2000:]
        time.sleep(0.5)
    assert _read(nodes[1] / JOB_FILES["log"]).count("torchrun: node 1 of 2") == runs + 1
