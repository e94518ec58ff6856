"""One job, exactly once: a cut link, two submits at once, a damaged ledger, recovery from the instance.

Real sshd, real tmux, the real worker training a tiny model on the CPU (long enough to still run
while the test looks; the tmux server is killed afterwards). The duplicate is looked for on the
instance: job folders whose wrapper wrote a pid were launched.
"""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest
from jobfiles import CLI, cli, cli_here, ssh_instance, write_job
from tinymodel import make_model

from client.errors import ConnectError, JobError, LedgerError
from client.ledger import Ledger
from client.lifecycle.submit import submit
from client.remote import launcher
from client.specfile import load_spec
from client.transport.local import LocalTransport
from jobs.layout import JobPaths
from jobs.protocol import JobState, LaunchRecord, dump_model

LONG = {"max_steps": 100000}  # still training whenever the test looks


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_model(tmp_path_factory.mktemp("model") / "tiny-qwen2")


def launched(remote: Path) -> list[str]:
    jobs = remote / "jobs"
    return sorted(d.name for d in jobs.iterdir() if (d / "pid").exists()) if jobs.is_dir() else []


def local_instance(remote: Path, tmux_socket: str) -> dict:
    return {"host": "local", "remote_root": str(remote), "tmux_socket": tmux_socket, "python": sys.executable}


def first_json(out: str) -> dict:
    return json.loads(out[: out.index("\n}") + 2])


@pytest.mark.ssh
@pytest.mark.slow
def test_a_link_cut_right_after_launch_then_submit_again_reattaches(
    sshd, tmp_path: Path, tmux_socket: str, tiny_model: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    remote = tmp_path / "remote"
    job = write_job(tmp_path / "job", model=tiny_model, instance=ssh_instance(sshd, remote, tmux_socket), train=LONG)
    real_launch = launcher.launch

    def launch_then_cut(transport, paths, argv, **kw):
        real_launch(transport, paths, argv, **kw)
        sshd.kill()  # the worker runs; the laptop never hears back
        raise ConnectError(f"connection to {transport.where} lost")

    monkeypatch.setattr(launcher, "launch", launch_then_cut)
    with pytest.raises(ConnectError):
        submit(job, ledger=Ledger(), log=lambda _: None)
    monkeypatch.setattr(launcher, "launch", real_launch)
    [job_id] = launched(remote)
    [row] = Ledger().all()
    assert (row.id, row.state) == (job_id, "launching")  # recorded before anything was launched
    assert (remote / "jobs" / job_id / "launch.json").exists()

    sshd.start()
    again = first_json(cli_here("submit", str(job), "--json").stdout)
    assert again["reattached"] and again["job_id"] == job_id
    assert launched(remote) == [job_id]
    assert Ledger().get(job_id).state == "running"

    # Another laptop (a ledger of its own) knows nothing of it: its submit asks the instance and reattaches,
    # and `recover` rebuilds the row from the instance's launch.json.
    other = tmp_path / "other-laptop"
    other.mkdir()
    monkeypatch.setenv("AUTODL_RUN_HOME", str(other))
    rec = json.loads(cli("recover", str(job), "--json").stdout)
    assert rec["added"] == [job_id] and rec["skipped"] == []
    assert Ledger().get(job_id).state == "running"
    again = first_json(cli_here("submit", str(job), "--json").stdout)
    assert again["reattached"] and again["job_id"] == job_id
    assert launched(remote) == [job_id]


@pytest.mark.slow
def test_two_submits_at_once_launch_one_worker(tmp_path: Path, tmux_socket: str, tiny_model: Path) -> None:
    remote = tmp_path / "remote"
    job = write_job(tmp_path / "job", model=tiny_model, instance=local_instance(remote, tmux_socket), train=LONG)
    procs = []
    for n in (1, 2):  # two laptops: two ledgers, so only the instance can tell
        home = tmp_path / f"laptop-{n}"
        home.mkdir()
        env = {**os.environ, "AUTODL_RUN_HOME": str(home)}
        procs.append(subprocess.Popen([*CLI, "submit", str(job), "--json"], env=env, text=True,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE))  # fmt: skip
    results = []
    for p in procs:
        out, err = p.communicate(timeout=600)
        assert p.returncode == 0, err
        results.append(first_json(out))
    assert results[0]["job_id"] == results[1]["job_id"]
    assert sorted(r["reattached"] for r in results) == [False, True]
    assert launched(remote) == [results[0]["job_id"]]

    # A finished job does not block the same spec: cancel it, submit again -> a new job.
    first = results[0]["job_id"]
    launcher.cancel(LocalTransport(), JobPaths(str(remote / "jobs" / first)), socket=tmux_socket, session=first,
                    grace=30)  # fmt: skip
    new = first_json(cli_here("submit", str(job), "--json").stdout)
    assert not new["reattached"] and new["job_id"] != first
    assert launched(remote) == sorted([first, new["job_id"]])


def _damage_index(path: Path) -> None:
    db = sqlite3.connect(path)
    page = db.execute("PRAGMA page_size").fetchone()[0]
    root = db.execute("SELECT rootpage FROM sqlite_master WHERE type = 'index'").fetchone()[0]
    db.close()
    with open(path, "r+b") as f:
        f.seek(page * (root - 1))
        f.write(b"\xff" * page)


@pytest.mark.parametrize("damage", ["garbage", "index"])
def test_a_damaged_ledger_is_a_clear_error_before_anything_is_launched(
    tmp_path: Path, tmux_socket: str, autodl_home: Path, damage: str
) -> None:
    remote = tmp_path / "remote"
    job = write_job(tmp_path / "job", model="no-model-needed", instance=local_instance(remote, tmux_socket))
    ledger_file = autodl_home / "ledger.sqlite"
    if damage == "garbage":
        ledger_file.write_bytes(os.urandom(8192))
    else:
        spec = load_spec(job)
        spec.instance.remote_root = str(remote)
        led = Ledger()
        for n in range(40):
            led.add(f"old-{n}", spec, job, "d" * 64, "b" * 64, state="done")
        led.close()
        _damage_index(ledger_file)

    res = cli_here("submit", str(job), check=False)
    assert res.returncode == 8, res.stderr
    assert str(ledger_file) in res.stderr and "autodl-run ledger repair" in res.stderr
    assert "Traceback" not in res.stderr
    assert not (remote / "jobs").exists()  # nothing launched, nothing uploaded
    for args in (["ls"], ["status"], ["fetch"], ["cancel", "old-1"]):
        other = cli_here(*args, check=False)
        assert "Traceback" not in other.stderr, (args, other.stderr)
        # what only reads may still work around a damaged index; a file that is not a database never does
        assert other.returncode == 8 or damage == "index", (args, other.stderr)

    fixed = cli_here("ledger", "repair")
    assert "recover" in fixed.stdout
    assert list(autodl_home.glob("ledger.sqlite.damaged-*"))
    cli_here("ls")
    Ledger().check()


def test_recover_reads_the_instances_records_and_skips_bad_ones(
    tmp_path: Path, tmux_socket: str, local_home: Path
) -> None:
    remote = tmp_path / "remote"
    job = write_job(tmp_path / "job", model="m", instance=local_instance(remote, tmux_socket))
    spec = load_spec(job)
    spec.instance.remote_root = str(remote)
    good = remote / "jobs" / "t-job-1"
    good.mkdir(parents=True)
    (good / "launch.json").write_text(dump_model(LaunchRecord(
        job_id="t-job-1", name="t-job", submit_key="k", data_digest="d", bundle_digest="b",
        job_file=str(job), spec_json=spec.model_dump_json(),
    )))  # fmt: skip
    for name, text in {
        "t-job-2": "{not json",
        "t-job-3": json.dumps({"job_id": "t-job-3"}),  # fields missing
        "t-job-4": dump_model(LaunchRecord(job_id="../../etc", name="x", submit_key="k", data_digest="d",
                                           bundle_digest="b", spec_json=spec.model_dump_json())),  # fmt: skip
        "t-job-5": dump_model(LaunchRecord(job_id="t-job-5", name="x", submit_key="k", data_digest="d",
                                           bundle_digest="b", spec_json='{"name": 1}')),  # fmt: skip
    }.items():
        (remote / "jobs" / name).mkdir()
        (remote / "jobs" / name / "launch.json").write_text(text)

    res = cli("recover", str(job), "--json")
    out = json.loads(res.stdout)
    assert out["added"] == ["t-job-1"]
    assert len(out["skipped"]) == 4 and all("launch.json" in s for s in out["skipped"]), out["skipped"]
    assert "Traceback" not in res.stderr
    assert Ledger().get("t-job-1").state == "launching"
    assert json.loads(cli("recover", str(job), "--json").stdout)["known"] == ["t-job-1"]


def test_a_prefix_with_an_underscore_is_not_a_wildcard(tmp_path: Path) -> None:
    job = write_job(tmp_path / "job", model="m", instance={"host": "local", "remote_root": str(tmp_path)})
    spec = load_spec(job)
    led = Ledger()
    led.add("a_b-1", spec, job, "d", "b")
    led.add("axb-2", spec, job, "d", "b")
    assert led.get("a_b").id == "a_b-1"
    with pytest.raises(JobError, match="no job"):
        led.get("a%")


def test_cancel_of_a_finished_job_leaves_it_as_it_ended(tmp_path: Path, tmux_socket: str, local_home: Path) -> None:
    remote = tmp_path / "remote"
    job = write_job(tmp_path / "job", model="m", instance=local_instance(remote, tmux_socket))
    spec = load_spec(job)
    spec.instance.remote_root = str(remote)
    paths = JobPaths(str(remote / "jobs" / "t-job-9"))
    t = LocalTransport()
    launcher.launch(t, paths, ["true"], socket=tmux_socket, session="t-job-9", env={})
    status = launcher.job_status(t, paths)
    while status.active:
        time.sleep(0.05)
        status = launcher.job_status(t, paths)
    assert status.state is JobState.DONE
    Ledger().add("t-job-9", spec, job, "d", "b", state="done")

    res = cli("cancel", "t-job-9", check=False)
    assert res.returncode == 6 and "already ended (done)" in res.stderr, res.stderr
    assert Ledger().get("t-job-9").state == "done"
    assert launcher.job_status(t, paths).state is JobState.DONE


def test_ledger_error_is_an_autodl_run_error() -> None:
    assert issubclass(LedgerError, Exception) and LedgerError.exit_code == 8
