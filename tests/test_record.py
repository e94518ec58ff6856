"""The whole record on the laptop (issue 13): events, log, trainer state, evaluations and TensorBoard
files come back with the fetch, a run report is written from them, and `tail`, `status` of an ended
job answer from them with the instance gone. What the instance sends is bounded and checked.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from jobfiles import cli, ssh_instance, write_job
from tinymodel import make_model

from client import record as job_record
from client.ledger import JobRecord
from client.session import Session
from jobs.layout import JobPaths, LocalCopy, Placement
from jobs.spec import JobSpec

pytestmark = pytest.mark.ssh


def _record(sshd, root: Path, tmux_socket: str = "t") -> JobRecord:
    spec = JobSpec.model_validate(
        {"name": "r", "instance": ssh_instance(sshd, root, tmux_socket), "model": {"name_or_path": "m"},
         "data": {"train": "t.jsonl"}}
    )  # fmt: skip
    return JobRecord("r-1", "r", str(root / "job.toml"), spec, "d", "b", time.time(), "running", None, None,
                     str(root))  # fmt: skip


def _step(i: int) -> str:
    return json.dumps({"type": "step", "step": i, "total_steps": 9, "epoch": 0.1, "loss": 2.0 / i, "lr": 1e-3,
                       "tokens": 100 * i, "tokens_per_s": 50.0, "t": 1000.0 + i}) + "\n"  # fmt: skip


@pytest.fixture
def job(sshd, ssh_transport, tmp_path: Path):
    root = tmp_path / "remote"
    paths = JobPaths(str(root / "jobs" / "r-1"))
    Path(paths.dir).mkdir(parents=True)
    record = _record(sshd, root)
    session = Session(ssh_transport, Placement(str(root)))
    copy = LocalCopy(tmp_path / "laptop" / "r-1")
    return record, session, copy, paths


def test_the_record_is_pulled_incrementally_and_only_whole_event_lines(job) -> None:
    record, session, copy, paths = job
    Path(paths.events).write_text(_step(1) + _step(2) + '{"type": "step", "st')  # the worker mid-write
    Path(paths.log).write_text("line one\n")
    job_record.pull(record, session, copy)
    assert copy.record_file("events").read_text() == _step(1) + _step(2)
    with open(paths.events, "a") as f:
        f.write('ep"}\n' + _step(3))
    Path(paths.log).write_text("line one\nline two\n")
    job_record.pull(record, session, copy)
    assert copy.record_file("events").read_bytes() == Path(paths.events).read_bytes()
    assert copy.record_file("log").read_text() == "line one\nline two\n"
    Path(paths.log).write_text("new\n")  # rewritten shorter on the instance: read again from the start
    out = job_record.pull(record, session, copy, final="failed")
    assert copy.record_file("log").read_text() == "new\n"
    assert job_record.is_final(copy, "failed") and not job_record.is_final(copy, "done")
    assert out.report == copy.report
    job_record.pull(record, session, copy)  # resumed, running again: the laptop's copy is no longer the end
    assert not job_record.is_final(copy, "failed")
    report = copy.report.read_text()
    assert "| steps | 3 of 9 |" in report and "skipped 1 unreadable event line" in report
    assert (copy.plots / "loss.png").read_bytes()[:4] == b"\x89PNG"


def test_a_huge_events_file_is_cut_at_its_cap(job, monkeypatch) -> None:
    record, session, copy, paths = job
    monkeypatch.setitem(job_record.CAPS, "events", 1 << 20)
    monkeypatch.setattr(job_record, "CHUNK", 256 << 10)
    with open(paths.events, "w") as f:
        for i in range(1, 60_000):  # about 8 MiB
            f.write(_step(i))
    out = job_record.pull(record, session, copy)
    held = copy.record_file("events").stat().st_size
    assert 0 < held <= 1 << 20 and copy.record_file("events").read_bytes().endswith(b"\n")
    assert any("cap" in n for n in out.notes), out.notes
    again = job_record.pull(record, session, copy)  # and stays there
    assert copy.record_file("events").stat().st_size == held and any("cap" in n for n in again.notes)


def test_what_is_not_a_regular_file_or_does_not_parse_is_not_kept(job) -> None:
    record, session, copy, paths = job
    secret = Path(paths.dir).parent.parent / "secret.txt"
    secret.write_text("do not copy me\n")
    os.symlink(secret, paths.log)
    os.mkfifo(paths.trainer_state)  # reading it would block forever
    Path(paths.eval_results).write_text('{"results": "not a list"}')
    tb = Path(paths.dir) / "tensorboard"
    tb.mkdir()
    (tb / "events.out.tfevents.1.host").write_bytes(b"\x00" * 10)
    (tb / "not-a-tf-file").write_bytes(b"x")
    os.symlink(secret, tb / "events.out.tfevents.2.link")
    out = job_record.pull(record, session, copy)
    assert not copy.record_file("log").exists() and not copy.record_file("trainer_state").exists()
    assert not copy.record_file("eval_results").exists() and any("does not parse" in n for n in out.notes)
    assert sorted(p.name for p in copy.tensorboard.iterdir()) == ["events.out.tfevents.1.host"]
    assert not any(p.is_symlink() for p in copy.record.rglob("*"))


SWAN_RUN = """
import sys, swanlab
swanlab.init(project="p", name="r-1", mode="local", log_dir=sys.argv[1])
for i in range(3):
    swanlab.log({"loss": 1.0 / (i + 1)}, step=i)
swanlab.finish()
"""


def _tree(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


def test_swanlab_s_folder_comes_back_checked_and_bounded(sshd, job, monkeypatch, tmp_path: Path) -> None:
    record, session, copy, paths = job
    record = record.__class__(**{**record.__dict__, "spec": record.spec.model_copy(update={
        "track": record.spec.track.model_copy(update={"report_to": ["swanlab"], "swanlab_mode": "local"})})})
    swan = Path(paths.swanlog)
    run = subprocess.run([sys.executable, "-c", SWAN_RUN, str(swan)], cwd=tmp_path, capture_output=True,
                         text=True, timeout=120)  # fmt: skip
    assert run.returncode == 0, run.stderr[-2000:]
    assert not (tmp_path / "swanlog").exists()
    written = _tree(swan)
    assert any(name.endswith(".swanlab") for name in written), written
    secret = tmp_path / "secret.txt"
    secret.write_text("do not copy me\n")
    os.symlink(secret, swan / "linked.txt")
    os.symlink(tmp_path, swan / "linked-dir")
    (swan / "bad\nname").write_text("x")

    out = job_record.pull(record, session, copy)
    assert _tree(copy.swanlog) == written  # every regular file, nested folders included, byte for byte
    assert not any(p.is_symlink() for p in copy.record.rglob("*"))
    assert any("bad\\nname" in n for n in out.notes), out.notes
    assert any(name.startswith("swanlog/") for name in out.files)

    log = next(p for p in swan.rglob("*.log") if "console" in p.parts)
    with open(log, "a") as f:
        f.write("one more line\n")
    job_record.pull(record, session, copy)
    assert (copy.swanlog / log.relative_to(swan)).read_bytes() == log.read_bytes()

    monkeypatch.setattr(job_record, "SWAN_CAP", 1000)
    big = swan / "big.bin"
    big.write_bytes(os.urandom(5000))
    capped = job_record.pull(record, session, copy)
    assert not (copy.swanlog / "big.bin").exists()
    assert any("swanlog/big.bin" in n and "cap" in n for n in capped.notes), capped.notes


# --- end to end: over SSH, then with the instance gone ----------------------------------------------------


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_model(tmp_path_factory.mktemp("model") / "tiny-qwen2")


@pytest.mark.slow
def test_the_record_comes_back_and_answers_with_the_instance_gone(
    sshd_factory, tmp_path: Path, tmux_socket: str, tiny_model: Path
) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    server = sshd_factory()  # our own: it is stopped below
    instance = ssh_instance(server, tmp_path / "remote", tmux_socket)
    job = write_job(tmp_path / "job", model=tiny_model, instance=instance, train={"save_steps": 3},
                    data={"eval_fraction": 0.25})  # fmt: skip
    sub = cli("submit", str(job), "--follow", "--json")
    job_id = json.loads(sub.stdout[: sub.stdout.index("\n}") + 2])["job_id"]
    record = tmp_path / "job" / "runs" / job_id / "record"
    assert "record and run report" in sub.stderr, sub.stderr[-2000:]

    events = [json.loads(ln) for ln in (record / "events.jsonl").read_text().splitlines()]
    assert events[-1]["type"] == "done" and [e["step"] for e in events if e["type"] == "step"] == list(range(1, 7))
    log_lines = [ln for ln in (record / "worker.log").read_bytes().decode().split("\n") if ln.strip()]
    assert log_lines
    state = json.loads((record / "trainer_state.json").read_text())
    assert state["global_step"] == 6 and any("loss" in h for h in state["log_history"])
    evals = json.loads((record / "eval_results.json").read_text())["results"]
    assert evals and "eval_loss" in evals[-1]["metrics"]

    tb_files = list((record / "tensorboard").glob("events.out.tfevents.*"))
    assert tb_files
    acc = EventAccumulator(str(record / "tensorboard"))
    acc.Reload()
    losses = acc.Scalars("train/loss")
    assert [s.step for s in losses] == list(range(1, 7))

    fetched = json.loads(cli("fetch", job_id, "--json").stdout)
    assert fetched["report"] == str(record / "report.md") and fetched["verified"]
    report = (record / "report.md").read_text()
    assert "| steps | 6 of 6 |" in report and "![loss](plots/loss.png)" in report
    for png in ("loss.png", "lr.png", "tokens_per_s.png"):
        assert (record / "plots" / png).read_bytes()[:4] == b"\x89PNG"

    server.stop()  # the instance is gone: every answer below comes from the laptop
    status = json.loads(cli("status", job_id, "--json", timeout=120).stdout)
    assert status["from_laptop"] and status["state"] == "done" and status["step"] == 6
    assert status["report"] == str(record / "report.md")
    raw = cli("tail", job_id, "--raw", timeout=120)  # before: retried the connection for 15 minutes
    assert raw.stdout.count("\n") == len(log_lines) and log_lines[-1][:20] in raw.stdout
    plain = cli("tail", job_id, timeout=120)
    assert "step 6/6" in plain.stdout and "laptop's record" in plain.stderr
    as_json = cli("tail", job_id, "--json", timeout=120)
    assert [json.loads(ln)["type"] for ln in as_json.stdout.splitlines()][-1] == "done"
    human = cli("status", job_id, timeout=120)
    assert "report" in human.stdout and "cannot reach" not in human.stdout + human.stderr
