"""End to end through the real CLI: submit, follow, fetch a LoRA adapter trained for real on the CPU.

Over a real sshd on 127.0.0.1 (rsync, tmux) and on the `local` target. The job runs the same worker
bundle the instance would get.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import sqlite3
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from jobfiles import CLI, cli, cli_here, ssh_instance, write_job
from test_faults import arm, events_of, instance, wait_for, wait_stopped
from tinymodel import make_model

from client.ledger import Ledger
from jobs import events as ev
from jobs.layout import EVAL_JSON, RemoteLayout
from jobs.manifest import verify_manifest
from jobs.protocol import EvalResult, FetchAck

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_model(tmp_path_factory.mktemp("model") / "tiny-qwen2")


def lora_weights_moved(adapter: Path, base: Path) -> float:
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), str(adapter))
    b = [p for n, p in model.named_parameters() if "lora_B" in n]
    assert b, "no LoRA weights in the adapter"
    return float(sum(torch.linalg.norm(p).item() for p in b))


@pytest.mark.ssh
def test_submit_follow_fetch_over_ssh(
    sshd, tmp_path: Path, tmux_socket: str, tiny_model: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Submit --follow, fetch, status, ls over ssh; then a second submit of the same job (nothing sent again)
    whose `tail` opens at most two SSH connections of its own; the spec is kept as written (a `~` root) and
    a ledger from before the resolved-root column still reads. (The last two were test_session's, with two
    jobs of their own: the same assertions on these two jobs, two worker runs less.)"""
    root = "~/placed-root"
    job = write_job(
        tmp_path / "job", model=tiny_model,
        instance={**ssh_instance(sshd, tmp_path / "unused", tmux_socket), "remote_root": root},
        train={"max_steps": 6, "save_steps": 2},
    )  # fmt: skip
    sub = cli("submit", str(job), "--follow", "--json")
    info = json.loads(sub.stdout[: sub.stdout.index("\n}") + 2])
    job_id = info["job_id"]
    assert info["data_sent"] and info["bundle_sent"]
    assert "step 6/6" in sub.stdout + sub.stderr

    # the spec as the user wrote it, the resolved root apart
    record = Ledger().get(job_id)
    assert record.spec.instance.remote_root == root, "the ledger changed the spec's remote_root"
    assert record.remote_root == str(sshd.home / "placed-root"), "the resolved root is not kept apart"
    assert (sshd.home / "placed-root" / "jobs" / job_id).is_dir()
    cli("tail", job_id, "--no-fetch")

    fetched = json.loads(cli("fetch", job_id, "--json").stdout)
    adapter = Path(fetched["adapter"])
    assert adapter == tmp_path / "job" / "runs" / job_id / "adapter" and fetched["verified"]
    assert (adapter / "adapter_model.safetensors").exists()
    assert lora_weights_moved(adapter, tiny_model) > 0  # LoRA B starts at zero: non-zero means it trained

    status = json.loads(cli("status", job_id, "--json").stdout)
    assert status["state"] == "done" and status["step"] == 6 and status["fetched_to"] == str(adapter)
    listed = json.loads(cli("ls", "--json").stdout)
    assert [j["id"] for j in listed] == [job_id]

    # The same dataset and worker are not sent again.
    again = json.loads(cli_here("submit", str(job), "--json").stdout)
    assert not again["data_sent"] and not again["bundle_sent"]
    again_id = again["job_id"]

    # `tail` of a job that checkpoints and finishes opens at most two SSH connections of its own (the
    # follower's session, reused for the final fetch and the guard; the auto-fetch's): counted in the sshd's
    # log, less the ones rsync's ssh opened (counted by an `ssh` on PATH that notes each run).
    tools = tmp_path / "tools"
    tools.mkdir()
    runs = tmp_path / "ssh-runs"
    (tools / "ssh").write_text(f'#!/bin/sh\necho x >> {runs}\nexec {shutil.which("ssh")} "$@"\n')
    (tools / "ssh").chmod(0o755)
    with monkeypatch.context() as m:
        m.setenv("PATH", f"{tools}:{os.environ['PATH']}")
        before = sshd.log().count("Accepted publickey")
        out = cli("tail", again_id)
        accepted = sshd.log().count("Accepted publickey") - before
    rsync_runs = len(runs.read_text().splitlines()) if runs.exists() else 0
    runs_dir = tmp_path / "job" / "runs" / again_id
    verify_manifest(runs_dir / "adapter")  # the final adapter came
    assert list((runs_dir / "checkpoints").glob("step-*/adapter/manifest.json")), "no checkpoint was fetched"
    assert rsync_runs >= 2, out.stderr  # a checkpoint's adapter and the final one, at least
    sessions = accepted - rsync_runs
    assert 1 <= sessions <= 2, f"{accepted} connections, {rsync_runs} of them rsync's\n{out.stderr}"

    # a ledger from before the remote_root column: its specs held the resolved root
    path = Path(Ledger().path)
    db = sqlite3.connect(path)
    for row_id, spec_json in db.execute("SELECT id, spec_json FROM jobs").fetchall():
        spec = json.loads(spec_json)
        spec["instance"]["remote_root"] = str(sshd.home / "placed-root")
        db.execute("UPDATE jobs SET spec_json = ? WHERE id = ?", (json.dumps(spec), row_id))
    db.execute("ALTER TABLE jobs DROP COLUMN remote_root")
    db.commit()
    db.close()
    status = json.loads(cli("status", job_id, "--json").stdout)
    assert status["state"] == "done" and status["step"] == 6, f"an old ledger's row no longer reads: {status}"
    assert Ledger().get(job_id).remote_root is None  # the column is back, empty for the old row


def test_submit_follow_fetch_on_the_local_target(
    tmp_path: Path, tmux_socket: str, tiny_model: Path, local_home: Path
) -> None:
    """The model given as `./base` on the local target, two bad rows skipped, `[eval] at_end = true`: the
    evaluation comes back with --follow, verified, and the snippet --follow prints loads the adapter; status,
    then cancel on it, done; then fetch. (The relative path, the skipped rows and the refused cancel were
    test_edges_jobs', the evaluation at the end test_post_commands', each with a job of their own: the same
    assertions on this job, two worker runs less.)"""
    inst = {
        "host": "local",
        "remote_root": str(tmp_path / "remote"),
        "tmux_socket": tmux_socket,
        "python": sys.executable,
    }
    folder = tmp_path / "job"
    shutil.copytree(tiny_model, folder / "base")
    job = write_job(folder, model="./base", instance=inst, data={"on_error": "skip", "eval_fraction": 0.25})
    job.write_text(job.read_text() + "\n[eval]\nmax_new_tokens = 8\nlimit = 3\nat_end = true\n")
    with open(folder / "train.jsonl", "a") as f:
        f.write("{not json\n" + json.dumps({"unrelated": 1}) + "\n")
    sub = cli("submit", str(job), "--follow", timeout=1800)
    job_id = sub.stdout.splitlines()[0].strip()
    said = sub.stdout + sub.stderr
    assert "2 invalid rows skipped" in sub.stderr, sub.stderr

    # `[eval] at_end`: evaluated on the instance, fetched and verified by --follow
    local = folder / "runs" / job_id
    assert (local / "eval" / "manifest.json").is_file(), said[-3000:]
    digest = verify_manifest(local / "eval")
    result = EvalResult.model_validate_json((local / "eval" / EVAL_JSON).read_text())
    assert result.samples and all(s.base is not None and s.tuned is not None for s in result.samples), result
    paths = RemoteLayout(str(tmp_path / "remote")).job(job_id)
    assert FetchAck.model_validate_json(Path(paths.post("eval").fetched).read_text()).manifest_sha256 == digest
    # The snippet, printed at the end of --follow, loads the adapter as printed.
    code = said[said.index("Load it with:") + len("Load it with:"):].strip()
    code = "\n".join(code.splitlines()[:4])
    res = subprocess.run([sys.executable, "-c", code + "\nprint(type(model).__name__)"], capture_output=True,
                         text=True, timeout=600, cwd=folder, env={**os.environ, "HF_HUB_OFFLINE": "1"})  # fmt: skip
    assert res.returncode == 0 and res.stdout.split()[-1] == "PeftModelForCausalLM", res.stderr[-2000:]

    assert (tmp_path / "remote" / "jobs" / job_id / "events.jsonl").exists()
    status = json.loads(cli("status", job_id, "--json").stdout)
    assert status["state"] == "done" and status["step"] == 6, status
    # piped, each step has an ETA, and the time `done` took is the elapsed time `status` shows
    assert all(" ETA " in ln for ln in sub.stdout.splitlines() if ln.startswith("step ")), sub.stdout
    from client.views.render import fmt_duration

    assert f"done: 6 steps in {fmt_duration(status['elapsed_s'])}" in sub.stdout, sub.stdout
    assert re.search(rf"^elapsed +{fmt_duration(status['elapsed_s'])}$", cli("status", job_id).stdout, re.M)

    res = cli("cancel", job_id, check=False)
    assert res.returncode == 6 and "already ended (done)" in res.stderr, res.stderr
    assert "cancelled" not in res.stdout
    assert [j["state"] for j in json.loads(cli("ls", "--json").stdout)] == ["done"]
    res = cli("tail", job_id)
    assert "no final adapter" not in res.stdout + res.stderr

    fetched = json.loads(cli("fetch", "--json").stdout)
    assert lora_weights_moved(Path(fetched["adapter"]), folder / "base") > 0
    out = cli("fetch").stdout
    assert "PeftModel.from_pretrained" in out


@pytest.mark.ssh
def test_tail_survives_a_cut_connection(sshd, tmp_path: Path, tmux_socket: str, tiny_model: Path) -> None:
    """sshd is killed (every connection with it) mid-training; the job trains on while tail cannot reach it;
    tail reconnects, no event lost or repeated. The worker freezes itself once its step-10 checkpoint is
    complete (tests/stophook), so the cut comes mid-run however fast or slow this machine is."""
    steps_in_all, held = 40, 10
    stops = tmp_path / "stops"
    arm(stops, "after", held)
    job = write_job(
        tmp_path / "job",
        model=tiny_model,
        instance=instance(sshd, tmp_path / "remote", tmux_socket, stops),
        train={"max_steps": steps_in_all, "save_steps": held},
        rows=64,
    )
    job_id = cli_here("submit", str(job)).stdout.strip()
    job_dir = tmp_path / "remote" / "jobs" / job_id

    tail = subprocess.Popen([*CLI, "tail", job_id, "--json"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    lines: list[str] = []
    said: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(tail.stdout), daemon=True)
    reader.start()
    threading.Thread(target=lambda: said.extend(tail.stderr), daemon=True).start()
    worker = wait_stopped(stops, "after", held, job_dir)
    try:
        held_at = len(events_of(job_dir))
        wait_for(lambda: sum('"type":"step"' in ln for ln in lines) >= held, timeout=600)  # tail has caught up
        sshd.kill()  # every connection drops with it
    finally:
        os.kill(worker, signal.SIGCONT)  # the job trains on while tail cannot reach it
    wait_for(lambda: any("reconnecting" in ln for ln in said), timeout=600)
    wait_for(lambda: len(events_of(job_dir)) > held_at + 2, timeout=600)  # events written while cut off
    sshd.start()
    assert tail.wait(timeout=900) == 0, "".join(said)  # a hang guard
    reader.join(timeout=60)
    got = [ev.parse(ln) for ln in lines]
    steps = [e.step for e in got if isinstance(e, ev.Step)]
    assert steps == list(range(1, steps_in_all + 1))
    assert isinstance(got[-1], ev.Done)
    assert events_of(job_dir) == got


@pytest.mark.ssh
def test_unreachable_host_is_reported_with_host_and_port(tmp_path: Path, tiny_model: Path) -> None:
    from sshd import free_port

    port = free_port()
    job = write_job(
        tmp_path / "job",
        model=tiny_model,
        instance={"host": "127.0.0.1", "port": port, "connect_timeout": 3.0},
    )
    res = cli_here("submit", str(job), check=False)  # (cli_here's timeout catches a submit that keeps retrying)
    assert res.returncode == 4
    assert f"127.0.0.1 port {port}" in res.stderr
    assert json.loads(cli("ls", "--json").stdout) == []  # nothing launched, nothing recorded


@pytest.mark.ssh
def test_failed_authentication(sshd, tmp_path: Path, tiny_model: Path) -> None:
    from sshd import keygen

    wrong = keygen(tmp_path / "wrong_key")
    inst = {
        "host": sshd.host,
        "port": sshd.port,
        "user": sshd.user,
        "identity_file": str(wrong),
        "connect_timeout": 30.0,
    }
    job = write_job(tmp_path / "job", model=tiny_model, instance=inst)
    res = cli_here("submit", str(job), check=False)
    assert res.returncode == 4
    assert "auth" in res.stderr.lower()


@pytest.mark.ssh
def test_remote_python_lacking_a_package_is_named(
    sshd, tmp_path: Path, tiny_model: Path, tmux_socket
) -> None:
    # A python on the instance that has torch but no peft: sys.modules['peft'] = None hides it.
    hide = tmp_path / "hide"
    hide.mkdir()
    (hide / "sitecustomize.py").write_text("import sys\nsys.modules['peft'] = None\n")
    py = tmp_path / "python-without-peft"
    py.write_text(f'#!/bin/sh\nPYTHONPATH={hide} exec {sys.executable} "$@"\n')
    py.chmod(0o755)
    inst = ssh_instance(sshd, tmp_path / "remote", tmux_socket, python=str(py), install_deps=False)
    job = write_job(tmp_path / "job", model=tiny_model, instance=inst)
    res = cli_here("submit", str(job), check=False)
    assert res.returncode == 5, res.stderr
    assert "lacks: peft" in res.stderr and "pip install peft" in res.stderr
    assert not (tmp_path / "remote" / "jobs").exists()  # nothing launched


def test_bad_inputs_fail_before_anything_is_uploaded(tmp_path: Path, tiny_model: Path) -> None:
    inst = {"host": "local", "remote_root": str(tmp_path / "remote")}
    job = write_job(tmp_path / "job", model=tiny_model, instance=inst)
    # invalid JSON at line 3
    rows = (tmp_path / "job" / "train.jsonl").read_text().splitlines()
    rows[2] = '{"instruction": "broken", '
    (tmp_path / "job" / "train.jsonl").write_text("\n".join(rows) + "\n")
    res = cli_here("submit", str(job), check=False)
    assert res.returncode == 3
    assert "train.jsonl:3" in res.stderr
    # a missing dataset
    (tmp_path / "job" / "train.jsonl").unlink()
    res = cli_here("check", str(job), check=False)
    assert res.returncode == 3 and "train.jsonl" in res.stderr
    # a spec error
    (tmp_path / "job" / "job.toml").write_text(
        'name = "x"\n[model]\nname_or_path = "m"\n[data]\ntrain = "t"\nbogus = 1\n'
    )
    res = cli_here("check", str(job), check=False)
    assert res.returncode == 2 and "job.toml:6: data.bogus: unknown key" in res.stderr
    assert not (tmp_path / "remote").exists()
