"""Two nodes on two network namespaces: torchrun's rendezvous over their own addresses.

    node 0 (netns A, 10.231.x.1) --veth-- node 1 (netns B, 10.231.x.2)

Each node runs the worker's command line as the launcher writes it (client.remote.launcher.worker_argv,
Node(rank, 2, A's address)) with one CPU process, gloo between them over the veth pair. Node 0 holds
global rank 0: its job folder gets the one event stream (two processes, every step once) and the
adapter; node 1's folder gets no events. Both exit 0.
"""

from __future__ import annotations

import itertools
import os
import random
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytest.importorskip("torch")
pytest.importorskip("peft")

import netns  # noqa: E402
import tinyjob  # noqa: E402
from test_multigpu import REPO, losses, make_job, read_events, worker_env  # noqa: E402

from client.remote import launcher  # noqa: E402
from jobs import events as ev  # noqa: E402
from jobs.manifest import verify_manifest  # noqa: E402

pytestmark = pytest.mark.slow
data_dir, model_dir = tinyjob.data_dir, tinyjob.model_dir  # shared module fixtures
_n = itertools.count()


@pytest.fixture
def two_namespaces():
    reason = netns.missing()
    if reason:
        pytest.skip(reason)
    netns.cleanup_stale()
    n = next(_n)
    names = [f"{netns.PREFIX}{os.getpid()}-mg{n}{side}" for side in "ab"]
    veths = [f"mg{os.getpid() % 100000}{n}{side}"[:15] for side in "ab"]
    a, b = random.randrange(256), random.randrange(0, 256, 4)
    ips = [f"10.231.{a}.{b + 1}", f"10.231.{a}.{b + 2}"]
    try:
        for argv in (
            ["ip", "netns", "add", names[0]],
            ["ip", "netns", "add", names[1]],
            ["ip", "link", "add", veths[0], "type", "veth", "peer", "name", veths[1]],
            *[["ip", "link", "set", veths[i], "netns", names[i]] for i in (0, 1)],
            *[["ip", "-n", names[i], "addr", "add", f"{ips[i]}/30", "dev", veths[i]] for i in (0, 1)],
            *[["ip", "-n", names[i], "link", "set", dev, "up"] for i in (0, 1) for dev in (veths[i], "lo")],
        ):
            subprocess.run(argv, check=True, capture_output=True)
        yield list(zip(names, veths, ips, strict=True))
    finally:
        for name in names:
            netns._kill_netns_processes(name)
            subprocess.run(["ip", "netns", "del", name], capture_output=True)


def launch_two_nodes(tmp_path, model_dir, data_dir, two_namespaces, steps: int, **instance):
    """One worker a namespace under torchrun, meeting at node 0's address; (processes, jobs, "addr:port")."""
    master = two_namespaces[0][2]
    port = 29400 + random.randrange(1000)
    procs, jobs = [], []
    for rank, (ns, veth, _ip) in enumerate(two_namespaces):
        job = make_job(tmp_path / f"node{rank}", model_dir, data_dir, max_steps=steps, global_batch_tokens=0)
        if instance:
            job = job.model_copy(update={"spec": job.spec.model_copy(update={
                "instance": job.spec.instance.model_copy(update=instance)})})  # fmt: skip
            (tmp_path / f"node{rank}" / "job.json").write_text(job.model_dump_json(indent=1))
        Path(job.job_dir).mkdir(parents=True)
        argv = launcher.worker_argv(sys.executable, str(tmp_path / f"node{rank}" / "job.json"), job.spec.train,
                                    launcher.Node(rank=rank, count=2, master=master, port=port))  # fmt: skip
        env = {**os.environ, **worker_env(), "GLOO_SOCKET_IFNAME": veth}
        log = open(Path(job.job_dir) / "worker.log", "wb")  # noqa: SIM115
        procs.append(subprocess.Popen(["ip", "netns", "exec", ns, *argv], cwd=REPO, env=env, stdout=log,
                                      stderr=subprocess.STDOUT))  # fmt: skip
        jobs.append(job)
    return procs, jobs, f"{master}:{port}"


def test_two_nodes_rendezvous_over_their_addresses(tmp_path, model_dir, data_dir, two_namespaces):
    steps = 8
    procs, jobs, _ = launch_two_nodes(tmp_path, model_dir, data_dir, two_namespaces, steps)
    codes = [p.wait(timeout=600) for p in procs]
    logs = [(Path(j.job_dir) / "worker.log").read_text()[-3000:] for j in jobs]
    assert codes == [0, 0], logs
    events = read_events(jobs[0].job_dir)
    started = next(e for e in events if isinstance(e, ev.Started))
    assert started.world_size == 2 and started.distributed == "ddp"
    assert sorted(losses(events)) == list(range(1, steps + 1))
    done = events[-1]
    assert isinstance(done, ev.Done) and done.steps == steps
    verify_manifest(done.adapter_path, done.manifest_sha256)
    assert read_events(jobs[1].job_dir) == [], "node 1 writes no events: rank 0 is on node 0"


def test_a_node_whose_node_0_vanishes_stops(tmp_path, model_dir, data_dir, two_namespaces):
    """Node 0's link goes down mid-run (its host unreachable: no connection is closed, so the ranks of
    node 1 would wait in their collective for gloo's 30 minutes): node 1 stops once node 0's rendezvous
    port has not answered for instance.node_timeout_s, with a NodeLost failure in its own job folder."""
    from remote_worker import nodewatch

    procs, jobs, rendezvous = launch_two_nodes(tmp_path, model_dir, data_dir, two_namespaces, 100000,
                                               node_timeout_s=10)
    deadline = time.monotonic() + 600
    while not any(isinstance(e, ev.Step) for e in read_events(jobs[0].job_dir)):
        assert time.monotonic() < deadline and procs[1].poll() is None, _log(jobs[1])
        time.sleep(0.5)
    ns0, veth0, _ = two_namespaces[0]
    subprocess.run(["ip", "-n", ns0, "link", "set", veth0, "down"], check=True, capture_output=True)
    try:
        code = procs[1].wait(timeout=300)
    except subprocess.TimeoutExpired:
        pytest.fail("node 1 still waits for the node 0 it cannot reach")
    assert code == nodewatch.EXIT_CODE, _log(jobs[1])
    failed = [e for e in read_events(jobs[1].job_dir) if isinstance(e, ev.Failed)]
    assert [e.error_class for e in failed] == ["NodeLost"], failed
    assert rendezvous in failed[0].message and "node 1 stopped its ranks" in failed[0].message
    assert f"autodl-run resume {jobs[1].job_id}" in failed[0].hint
    assert "NodeLost" not in (Path(jobs[0].job_dir) / "worker.log").read_text()


def _log(job) -> str:
    return (Path(job.job_dir) / "worker.log").read_text()[-3000:]
