"""Fault injection through the real CLI, a real sshd, rsync and tmux, training the tiny model: nothing is lost.

- sshd killed in the middle of an upload: a rerun finishes, sending only what was missing;
- the worker killed with SIGKILL mid-epoch: `resume` finishes from the last checkpoint (and the
  same job submitted again while it runs is reattached to, and `tail` fetched the newest checkpoint);
- the remote disk fills up (a tmpfs as remote_root): a clear error, the last good checkpoint intact,
  and the job continues on another instance from it;
- a deadline reached: the adapter is saved, fetched and verified, then the guard shuts down;
- no laptop at all: the guard copies the adapter to autodl-fs and shuts down after the grace.
(A connection cut during `tail`: tests/test_e2e.py::test_tail_survives_a_cut_connection.)

The guard's shutdown command is always `touch FILE`. A submit that only sets a scenario up runs the CLI's main()
in this process (jobfiles.cli_here: it saves a new interpreter importing torch for the tokenizer); the verbs
a fault is tried against (tail, resume --follow, a submit cut mid-upload) run as a user runs them, in a subprocess.
Where a fault must meet the worker at a given point (killed mid-save, the disk filled after the first checkpoint,
a second submit while it runs), the worker freezes itself there (tests/stophook): no test races the training.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from jobfiles import CLI, cli, cli_here, ssh_instance, write_job, write_toml
from tinymodel import make_model

from jobs import events as ev
from jobs.manifest import sha256_file, verify_manifest

pytestmark = [pytest.mark.slow, pytest.mark.ssh]


def first_json(out: str) -> dict:
    return json.loads(out[: out.index("\n}") + 2])


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_model(tmp_path_factory.mktemp("model") / "tiny-qwen2")


STOPHOOK = Path(__file__).parent / "stophook"


def worker_python(folder: Path, stops: Path | None = None, **env: str) -> str:
    """The instance's python, for the tiny model: one torch thread (on a busy 2-core machine two threads
    spin against each other and train 5-10x slower), plus `env`; with `stops`, a worker freezes where a
    test armed it (tests/stophook: `arm`, `wait_stopped`)."""
    folder.mkdir(parents=True, exist_ok=True)
    py = folder / "python"
    if stops is not None:
        env = {
            "AUTODL_TEST_STOPS": str(stops),
            "PYTHONPATH": f'"{STOPHOOK}${{PYTHONPATH:+:$PYTHONPATH}}"',
            **env,
        }
    exports = "".join(f"{k}={v} " for k, v in {"OMP_NUM_THREADS": "1", **env}.items())
    py.write_text(f'#!/bin/sh\n{exports}exec {sys.executable} "$@"\n')
    py.chmod(0o755)
    return str(py)


def instance(sshd, root: Path, tmux_socket: str, stops: Path | None = None, **extra) -> dict:
    return ssh_instance(
        sshd, root, tmux_socket, **{"python": worker_python(root.parent / "bin", stops), **extra}
    )


def arm(stops: Path, when: str, step: int) -> None:
    """The next worker to save checkpoint `step` freezes `when` ("before": written, not yet renamed to
    step-N; "after": step-N complete) until the test kills or continues it: no race with its training."""
    stops.mkdir(exist_ok=True)
    (stops / f"{when}-step-{step}").touch()


def wait_stopped(stops: Path, when: str, step: int, job_dir: Path | None = None, timeout: float = 600) -> int:
    """The pid of the worker frozen by `arm(stops, when, step)`, once it is stopped. With `job_dir`, a job
    that ends (done or failed) without freezing there fails the test at once instead of at the timeout."""
    pidfile = stops / f"stopped-{when}-step-{step}"

    def frozen():
        if not pidfile.exists():
            ended = job_dir is not None and any(isinstance(e, (ev.Done, ev.Failed)) for e in events_of(job_dir))
            assert not ended, f"the job in {job_dir} ended without freezing {when} saving step-{step}"
            return None
        pid = int(pidfile.read_text())
        state = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0]
        return pid if state in ("T", "t") else None

    frozen.__doc__ = f"a worker frozen {when} saving step-{step}"
    return wait_for(frozen, timeout=timeout)


def stop_signal_pending(pid: int) -> bool:
    """SIGINT or SIGTERM (cancel's, or torchrun's passing it on) waits on the frozen process `pid`."""
    status = Path(f"/proc/{pid}/status").read_text()
    pending = 0
    for line in status.splitlines():
        if line.startswith(("SigPnd:", "ShdPnd:")):
            pending |= int(line.split()[1], 16)
    return bool(pending & ((1 << (signal.SIGINT - 1)) | (1 << (signal.SIGTERM - 1))))


def cancel_frozen(job_id: str, frozen: int) -> None:
    """`cancel` the job whose worker `frozen` is stopped (tests/stophook): it goes on once the signal waits
    on it, so the cancel lands mid-run whatever the machine's speed."""
    cancel = subprocess.Popen([*CLI, "cancel", job_id], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        wait_for(lambda: stop_signal_pending(frozen) or cancel.poll() is not None, timeout=600)
    finally:
        os.kill(frozen, signal.SIGCONT)
    out, err = cancel.communicate(timeout=600)  # a hang guard
    assert cancel.returncode == 0, out + err


def events_of(job_dir: Path) -> list:
    path = job_dir / "events.jsonl"
    if not path.exists():
        return []
    whole = path.read_text().split("\n")[:-1]  # complete lines only: the last may be half written
    return [ev.parse(ln) for ln in whole if ln.strip()]


def wait_for(what, timeout: float = 120, every: float = 0.05):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        got = what()
        if got:
            return got
        time.sleep(every)
    raise AssertionError(f"timed out waiting for {what.__doc__ or what}")


def steps_on_disk(job_dir: Path) -> list[int]:
    folder = job_dir / "output" / "checkpoints"
    if not folder.is_dir():
        return []
    return sorted(
        int(p.name[5:]) for p in folder.iterdir() if p.name.startswith("step-") and p.name[5:].isdigit()
    )


def worker_pid(job_dir: Path) -> int:
    """The python worker: the child of the job's wrapper (whose pid is in `pid`)."""
    wrapper = int((job_dir / "pid").read_text())
    children = Path(f"/proc/{wrapper}/task/{wrapper}/children").read_text().split()
    assert children, "the worker is not running"
    return int(children[0])


# --- sshd killed mid-upload ------------------------------------------------------------------------

RELAY = r"""
import os, subprocess, sys, threading, time
log, hold_file, argv = sys.argv[1], sys.argv[2], sys.argv[3:]
child = subprocess.Popen(argv, stdin=subprocess.PIPE)


def pump():
    total = 0
    while True:
        chunk = os.read(0, 16384)
        if not chunk:
            break
        try:
            child.stdin.write(chunk)
            child.stdin.flush()
        except (BrokenPipeError, ValueError):
            break
        total += len(chunk)
        with open(log, "w") as f:
            f.write(f"{total} {argv[-1]}\n")
        while "/data/" in argv[-1] and 0 < int(open(hold_file).read() or 0) <= total:
            time.sleep(0.05)  # held: the dataset's upload waits here until the test lets it go on
    try:
        child.stdin.close()
    except (BrokenPipeError, ValueError):
        pass


threading.Thread(target=pump, daemon=True).start()
code = child.wait()
open(log.replace("bytes.", "done."), "w").close()
os._exit(code)  # when rsync is done, so is the channel (the sender waits for that, not for our EOF)
"""


@pytest.fixture
def metered_rsync(sshd, tmp_path: Path):
    """On the 'instance', the receiving rsync reads through a relay that counts bytes, and holds the dataset's
    upload once `hold` bytes of it arrived (0: never): the test acts mid-upload without racing its end."""
    d = tmp_path / "meter"
    d.mkdir()
    (d / "relay.py").write_text(RELAY)
    (d / "hold").write_text("0")
    real = subprocess.run(["bash", "-c", "command -v rsync"], capture_output=True, text=True).stdout.strip()
    wrapper = d / "bin" / "rsync"
    wrapper.parent.mkdir()
    wrapper.write_text(
        "#!/bin/sh\n"
        'case " $* " in *" --server "*) case " $* " in *" --sender "*) ;; *)\n'
        f'  exec {sys.executable} {d / "relay.py"} "{d}/bytes.$$" {d / "hold"} {real} "$@";; esac;; esac\n'
        f'exec {real} "$@"\n'
    )
    wrapper.chmod(0o755)
    bashrc = sshd.home / ".bashrc"
    assert not bashrc.exists()
    bashrc.write_text(f'export PATH="{wrapper.parent}:$PATH"\n')  # bash reads it for ssh commands
    try:
        yield d
    finally:
        bashrc.unlink()


def data_bytes(meter: Path) -> int:
    """Bytes the instance received for the dataset (not the worker bundle)."""
    total = 0
    for f in meter.glob("bytes.*"):
        n, _, dest = f.read_text().partition(" ")
        if "/data/" in dest:
            total += int(n)
    return total


def test_an_upload_cut_by_a_dead_sshd_is_finished_by_a_rerun_sending_only_the_rest(
    sshd, tmp_path: Path, tmux_socket: str, tiny_model: Path, metered_rsync: Path
) -> None:
    import random
    import string

    remote = tmp_path / "remote"
    job = write_job(
        tmp_path / "job", model=tiny_model, instance=instance(sshd, remote, tmux_socket),
        train={"max_steps": 2}, data={"overlong": "truncate"},
    )  # fmt: skip
    rng = random.Random(0)
    with open(tmp_path / "job" / "train.jsonl", "w") as f:  # ~3 MB of incompressible text
        for i in range(1500):
            answer = "".join(rng.choices(string.ascii_letters + " ", k=2000))
            f.write(json.dumps({"instruction": f"Question {i}?", "input": "", "output": answer}) + "\n")
    size = (tmp_path / "job" / "train.jsonl").stat().st_size

    (metered_rsync / "hold").write_text(str(size // 2 + 1))  # the upload stops halfway until sshd is dead
    first = subprocess.Popen(
        [*CLI, "submit", str(job)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    # (a submit preparing 3 MB on a busy 2-core machine once took over 120 s to start the upload)
    wait_for(lambda: data_bytes(metered_rsync) > size // 2, timeout=600)
    sshd.kill()  # mid-upload: every connection drops
    (metered_rsync / "hold").write_text("0")  # the relay passes on what it has left, then sees the end
    out, err = first.communicate(timeout=600)
    assert first.returncode == 4, out + err

    def receivers_ended():
        """every receiving rsync ended (it keeps what arrived as it ends)"""
        return all(
            (metered_rsync / f.name.replace("bytes.", "done.")).exists()
            for f in metered_rsync.glob("bytes.*")
        )

    wait_for(receivers_ended, timeout=120)
    partial = [p for p in (remote / "data").iterdir() if p.name.endswith(".partial")]
    assert partial, "nothing was kept of the interrupted upload"
    # what arrived whole, or was kept as a partial file (rsync --partial); not rsync's hidden temp files
    kept = sum(f.stat().st_size for f in partial[0].rglob("*") if f.is_file() and not f.name.startswith("."))
    assert 0 < kept < size
    sent_before = data_bytes(metered_rsync)

    sshd.start()
    for f in metered_rsync.glob("bytes.*"):
        f.unlink()
    again = first_json(cli_here("submit", str(job), "--json").stdout)
    assert again["data_sent"]
    resent = data_bytes(metered_rsync)
    local = Path(os.environ["AUTODL_RUN_HOME"]) / "prepared" / again["data_digest"]
    whole = sum(f.stat().st_size for f in local.rglob("*") if f.is_file())
    # only what was missing (plus rsync's bookkeeping), not everything again
    assert resent <= whole - kept + 64 * 1024 and resent < 0.8 * whole, (resent, whole, kept, sent_before)
    data_dir = remote / "data" / again["data_digest"]
    for f in local.rglob("*"):
        if f.is_file():
            assert sha256_file(f) == sha256_file(data_dir / f.relative_to(local)), f
    assert not list((remote / "data").glob("*.partial"))
    cli("tail", again["job_id"], "--no-fetch")  # the job trains on the data that arrived


# --- SIGKILL mid-epoch, resume -------------------------------------------------------------------------


def test_a_worker_killed_mid_epoch_resumes_from_its_last_checkpoint(
    sshd, tmp_path: Path, tmux_socket: str, tiny_model: Path
) -> None:
    # 35 micro-batches an epoch: killed in the first (while saving step 20, frozen there by the stop hook,
    # so the kill never races the job's end), the resumed run goes on into the second
    total, every = 40, 10
    stops = tmp_path / "stops"
    arm(stops, "before", 2 * every)
    job = write_job(
        tmp_path / "job", model=tiny_model, instance=instance(sshd, tmp_path / "remote", tmux_socket, stops),
        train={"max_steps": total, "save_steps": every}, rows=64,
    )  # fmt: skip
    job_id = first_json(cli_here("submit", str(job), "--json").stdout)["job_id"]
    job_dir = tmp_path / "remote" / "jobs" / job_id
    tail = subprocess.Popen(
        [*CLI, "tail", job_id, "--json"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    frozen = wait_stopped(stops, "before", 2 * every, job_dir)
    assert frozen == worker_pid(job_dir), "the stop hook froze another process than the worker"
    assert (job_dir / "output" / "checkpoints" / f"checkpoint-{2 * every}").is_dir()  # a save cut halfway
    os.kill(frozen, signal.SIGKILL)
    killed_at = max(e.step for e in events_of(job_dir) if isinstance(e, ev.Step))
    assert killed_at == 2 * every  # frozen while saving it: no step after it
    _, stderr = tail.communicate(timeout=120)
    assert tail.returncode == 6, stderr
    assert "exit code 137" in stderr and f"autodl-run resume {job_id}" in stderr
    last = steps_on_disk(job_dir)[-1]
    assert last < killed_at, (last, killed_at)
    # auto-fetch: the laptop holds the newest checkpoint's adapter (only that one), verified
    held = tmp_path / "job" / "runs" / job_id / "checkpoints" / f"step-{last}" / "adapter"
    remote_manifest = job_dir / "output" / "checkpoints" / f"step-{last}" / "adapter" / "manifest.json"
    assert verify_manifest(held) == sha256_file(remote_manifest)
    assert [p.name for p in held.parent.parent.iterdir()] == [f"step-{last}"]

    before = len(events_of(job_dir))
    arm(stops, "before", 3 * every)  # the resumed run waits there while the same job is submitted again
    assert cli_here("resume", job_id).stdout.splitlines()[0].strip() == job_id
    running = wait_stopped(stops, "before", 3 * every, job_dir)
    again = first_json(cli_here("submit", str(job), "--json").stdout)  # the same job, while it runs again
    assert again["reattached"] and again["job_id"] == job_id
    os.kill(running, signal.SIGCONT)
    cli("tail", job_id)
    second = events_of(job_dir)[before:]
    started = next(e for e in second if isinstance(e, ev.Started))
    assert started.resumed_from_step == last  # the newest complete checkpoint, not the step it died at
    steps = [e.step for e in second if isinstance(e, ev.Step)]
    assert steps == list(range(last + 1, total + 1))
    done = second[-1]
    assert isinstance(done, ev.Done) and done.steps == total and not done.stopped
    adapter = tmp_path / "job" / "runs" / job_id / "adapter"
    assert verify_manifest(adapter, done.manifest_sha256) == done.manifest_sha256  # fetched by tail
    assert not list((job_dir / "output" / "checkpoints").glob("checkpoint-*"))
    status = json.loads(cli("status", job_id, "--json").stdout)
    assert status["state"] == "done" and status["step"] == total and status["runs"] == 2
    res = cli("resume", job_id, check=False)
    assert res.returncode == 6 and "nothing to resume" in res.stderr


# --- the remote disk fills up ---------------------------------------------------------------------------


@pytest.fixture
def small_disk(tmpfs) -> Path:
    return tmpfs("8m")


def used_bytes(folder: Path) -> int:
    return sum(f.stat().st_blocks * 512 for f in folder.rglob("*") if f.is_file())


def test_a_full_remote_disk_is_a_clear_error_and_the_last_checkpoint_survives(
    sshd, tmp_path: Path, tmux_socket: str, tiny_model: Path, small_disk: Path
) -> None:
    total, every = 30, 10
    stops = tmp_path / "stops"
    arm(stops, "after", every)  # frozen once its first checkpoint is complete, until the disk is full
    job = write_job(
        tmp_path / "job", model=tiny_model,
        instance=instance(sshd, small_disk / "autodl-run", tmux_socket, stops),
        train={"max_steps": total, "save_steps": every},
    )  # fmt: skip
    job_id = first_json(cli_here("submit", str(job), "--json").stdout)["job_id"]
    job_dir = small_disk / "autodl-run" / "jobs" / job_id
    frozen = wait_stopped(stops, "after", every, job_dir)
    assert steps_on_disk(job_dir) == [every]
    size = used_bytes(job_dir / "output" / "checkpoints" / f"step-{every}")
    st = os.statvfs(small_disk)
    free = st.f_bavail * st.f_frsize
    with open(small_disk / "filler", "wb") as f:  # leave half a checkpoint: the next save cannot fit
        f.write(b"\0" * max(0, free - size // 2))
    os.kill(frozen, signal.SIGCONT)

    res = cli("tail", job_id, check=False)
    assert res.returncode == 6, res.stdout + res.stderr
    failed = events_of(job_dir)[-1]
    assert isinstance(failed, ev.Failed) and failed.error_class == "DiskFull", (
        failed.message,
        (job_dir / "worker.log").read_text()[-3000:],
    )
    assert f"the disk holding {job_dir} is full" in failed.message and "is intact" in failed.message
    assert "DiskFull" in res.stderr and f"autodl-run resume {job_id}" in res.stderr
    good = Path(failed.checkpoint)
    assert (
        good.parent == job_dir / "output" / "checkpoints"
        and good.name == f"step-{steps_on_disk(job_dir)[-1]}"
    )
    verify_manifest(good)  # the last good checkpoint: complete and intact
    assert not list(good.parent.glob("checkpoint-*")) and not (job_dir / "output" / "adapter.tmp").exists()
    assert (job_dir / "state").read_text().strip() == "failed"

    # It continues on another instance (another root on the same sshd), from that very checkpoint.
    other = write_toml(
        tmp_path / "other.toml", {}, {"instance": instance(sshd, tmp_path / "remote2", tmux_socket)}
    )
    out = cli("resume", job_id, "--instance-from", str(other), "--follow", "--json")
    moved = first_json(out.stdout)
    assert moved["moved"] and moved["from_step"] == int(good.name[5:]) and moved["job_id"] != job_id
    new_dir = tmp_path / "remote2" / "jobs" / moved["job_id"]
    evs = events_of(new_dir)
    assert next(e for e in evs if isinstance(e, ev.Started)).resumed_from_step == moved["from_step"]
    assert isinstance(evs[-1], ev.Done) and evs[-1].steps == total
    verify_manifest(tmp_path / "job" / "runs" / moved["job_id"] / "adapter", evs[-1].manifest_sha256)


# --- a deadline ------------------------------------------------------------------------------------------


def test_a_deadline_saves_fetches_and_verifies_then_the_guard_shuts_down(
    sshd, tmp_path: Path, tmux_socket: str, tiny_model: Path
) -> None:
    # the instance's python, with a small safety margin before the deadline (the default is 60 s)
    py = worker_python(tmp_path / "deadline-bin", AUTODL_RUN_DEADLINE_SAFETY_S="3")
    ran = tmp_path / "shutdown-ran"
    inst = instance(
        sshd, tmp_path / "remote", tmux_socket, python=str(py), shutdown_after="fetched",
        shutdown_command=f"touch {ran}", idle_grace_minutes=30,
    )  # fmt: skip
    job = write_job(tmp_path / "job", model=tiny_model, instance=inst, train={"max_steps": 100_000}, rows=64)
    res = cli("submit", str(job), "--deadline", "15s", "--follow", "--json")
    job_id = first_json(res.stdout)["job_id"]
    job_dir = tmp_path / "remote" / "jobs" / job_id
    done = events_of(job_dir)[-1]
    assert isinstance(done, ev.Done) and done.stopped == "deadline" and done.steps < 100_000
    # When the steps, the save and the fetch happen relative to the wall-clock deadline depends on this
    # machine's load, so no time is asserted (no test may depend on wall-clock speed): on a busy 2-core
    # machine submit and launch alone took longer than 25 s, and the worker then stopped after one
    # step, saved and was fetched, which is what the assertions here hold.
    assert any(isinstance(e, ev.Checkpoint) and e.reason == "deadline" for e in events_of(job_dir))

    runs = tmp_path / "job" / "runs" / job_id
    assert verify_manifest(runs / "adapter", done.manifest_sha256) == done.manifest_sha256
    whole = runs / "checkpoints" / f"step-{done.steps}"
    verify_manifest(whole)  # and the whole checkpoint, to resume elsewhere once this instance is gone
    assert (whole / "optimizer.pt").is_file()
    ack = json.loads((job_dir / "fetched.json").read_text())
    assert ack["manifest_sha256"] == done.manifest_sha256  # the verified fetch the guard waits for
    assert "guard: " in res.stderr

    wait_for(lambda: ran.exists(), timeout=600)  # the guard acts on the verified fetch (a hang guard)
    assert ran.stat().st_mtime >= ack["at"] - 1
    guard = json.loads((job_dir / "guard" / "status.json").read_text())
    assert (guard["phase"], guard["reason"]) == ("shut down", "fetched")
    assert not list(job_dir.glob("fetching*"))  # every lease released


# --- no laptop: the guard's grace ------------------------------------------------------------------------


def test_without_a_fetch_the_guard_keeps_the_adapter_on_autodl_fs_and_shuts_down_after_the_grace(
    sshd, tmp_path: Path, tmux_socket: str, tiny_model: Path
) -> None:
    fs = sshd.home / "autodl-fs"  # AutoDL's network disk, as the instance's user sees it (~/autodl-fs)
    fs.mkdir(exist_ok=True)
    ran = tmp_path / "shutdown-ran"
    inst = instance(
        sshd, tmp_path / "remote", tmux_socket, shutdown_after="fetched", shutdown_command=f"touch {ran}",
        idle_grace_minutes=0.1, price_per_hour=3.6,
    )  # fmt: skip
    job = write_job(tmp_path / "job", model=tiny_model, instance=inst)
    job_id = first_json(cli_here("submit", str(job), "--json").stdout)["job_id"]
    job_dir = tmp_path / "remote" / "jobs" / job_id
    try:
        wait_for(lambda: ran.exists(), timeout=600, every=0.2)  # a hang guard: training, then the grace
        done = next(e for e in events_of(job_dir) if isinstance(e, ev.Done))
        assert ran.stat().st_mtime - done.t >= 6  # only after the grace (0.1 min)
        copied = fs / "autodl-run" / job_id / "adapter"
        assert verify_manifest(copied, done.manifest_sha256)
        assert not (job_dir / "fetched.json").exists()

        status = json.loads(cli("status", job_id, "--json").stdout)
        assert status["state"] == "done" and status["spent"] > 0 and status["projected"] == status["spent"]
        assert str(copied) in status["guard"]
        text = cli("status", job_id).stdout
        assert "spend" in text and "CNY" in text and "shut down" in text
    finally:
        shutil.rmtree(fs, ignore_errors=True)
