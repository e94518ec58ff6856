"""`autodl-run eval` and `chat` against a real sshd, on a job whose adapter was trained for real on one fact.

The job folder on the "instance" is laid out as the worker leaves it (jobs.layout); the commands run as
a user runs them: eval in a subprocess, chat in a real terminal (a tmux pane, keys sent with send-keys)
over the system `ssh -t`.
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
from jobfiles import cli, cli_here, ssh_instance, write_job

from client.ledger import Ledger
from client.specfile import load_spec
from jobs.layout import EVAL_JSON, JobPaths, Placement, RemoteLayout
from jobs.manifest import verify_manifest, write_manifest
from jobs.protocol import EvalResult, FetchAck
from tests.tinyadapter import ANSWER, QUESTION, train_fact

ROOT = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.skipif(shutil.which("tmux") is None, reason="tmux is not installed")


@pytest.fixture(scope="module")
def fact(tmp_path_factory) -> tuple[Path, Path]:
    return train_fact(tmp_path_factory.mktemp("fact"))


def finished_job(tmp_path: Path, sshd, tmux_socket: str, fact) -> tuple[str, Path, JobPaths]:
    """A done job on the sshd's machine: its adapter and its prepared eval split, as the worker left them."""
    base, adapter = fact
    remote = tmp_path / "remote"
    job_file = write_job(tmp_path / "job", model=base, instance=ssh_instance(sshd, remote, tmux_socket))
    spec = load_spec(job_file)
    layout = RemoteLayout(str(remote))
    job_id, digest = "t-job-1", "d" * 64
    paths = layout.job(job_id)
    shutil.copytree(adapter, paths.adapter)
    write_manifest(paths.adapter)
    Path(paths.state).write_text("done\n")
    Path(paths.exit_code).write_text("0\n")
    data = Path(layout.data_dir(digest))
    data.mkdir(parents=True)
    rows = [(QUESTION, ANSWER), ("hi", "你好。")]
    (data / "eval.jsonl").write_text("".join(
        json.dumps({"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]}) + "\n"
        for q, a in rows))  # fmt: skip
    led = Ledger()
    led.add(job_id, spec, job_file, digest, "b" * 64, state="done",
            placement=Placement(str(remote), home=str(Path.home()), python=sys.executable))  # fmt: skip
    led.close()
    return job_id, job_file.parent, paths


def test_eval_runs_on_the_instance_and_comes_back_verified_with_both_columns(tmp_path, sshd, tmux_socket, fact):
    job_id, folder, paths = finished_job(tmp_path, sshd, tmux_socket, fact)
    res = cli("eval", job_id, "--max-new-tokens", "16", "--json", timeout=1200)
    out = json.loads(res.stdout)
    local = Path(out["folder"])
    assert local == (folder / "runs" / job_id / "eval").resolve() and out["where"] == "instance"
    digest = verify_manifest(local)
    result = EvalResult.model_validate_json((local / EVAL_JSON).read_text())
    first = result.samples[0]
    assert (first.prompt, first.reference, first.tuned) == (QUESTION, ANSWER, ANSWER)
    assert first.base != ANSWER and result.tuned.exact_match > result.base.exact_match
    assert result.base.loss is not None and result.tuned.loss < result.base.loss
    ack = FetchAck.model_validate_json(Path(paths.post("eval").fetched).read_text())  # the guard's signal
    assert (ack.what, ack.manifest_sha256) == ("eval", digest)


def _screen(socket: str) -> str:
    return subprocess.run(["tmux", "-L", socket, "capture-pane", "-p", "-J", "-t", "t", "-S", "-200"],
                          capture_output=True, text=True).stdout  # fmt: skip


def _wait(cond, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.2)


def test_chat_in_a_real_terminal_answers_with_the_trained_fact(tmp_path, sshd, tmux_socket, fact, autodl_home):
    job_id, _, _ = finished_job(tmp_path, sshd, tmux_socket, fact)
    term = f"{tmux_socket}-chat"
    rc = tmp_path / "rc"
    env = {"AUTODL_RUN_HOME": str(autodl_home), "PYTHONPATH": str(ROOT), "PATH": os.environ["PATH"],
           "TERM": "xterm-256color", "HOME": os.environ.get("HOME", "/root")}  # fmt: skip
    exports = " ".join(f"{k}={shlex.quote(v)}" for k, v in env.items())
    cmd = shlex.join([sys.executable, "-m", "client.cli", "chat", job_id, "--max-new-tokens", "24"])
    subprocess.run(["tmux", "-L", term, "-f", "/dev/null", "new-session", "-d", "-s", "t", "-x", "200", "-y", "50",
                    f"cd {shlex.quote(str(ROOT))} && env {exports} {cmd}; echo $? > {rc}; sleep 600"], check=True)  # fmt: skip
    try:
        _wait(lambda: "you> " in _screen(term), 900, "the chat prompt")
        subprocess.run(["tmux", "-L", term, "send-keys", "-t", "t", "-l", QUESTION], check=True)
        subprocess.run(["tmux", "-L", term, "send-keys", "-t", "t", "Enter"], check=True)
        _wait(lambda: f"model> {ANSWER}" in _screen(term), 300, "the trained answer")
        _wait(lambda: _screen(term).count("you> ") >= 2, 300, "the next prompt")
        subprocess.run(["tmux", "-L", term, "send-keys", "-t", "t", "-l", "/exit"], check=True)
        subprocess.run(["tmux", "-L", term, "send-keys", "-t", "t", "Enter"], check=True)
        _wait(lambda: rc.exists() and rc.read_text().strip(), 120, "chat to exit")
        assert rc.read_text().strip() == "0", _screen(term)
    finally:
        subprocess.run(["tmux", "-L", term, "kill-server"], capture_output=True)


# `[eval] at_end` in a real (tiny) training run on the local target, fetched by --follow, with the snippet
# it prints: test_e2e's test_submit_follow_fetch_on_the_local_target (its job evaluates at the end).


def test_export_on_the_instance_and_here_come_back_verified(tmp_path, sshd, tmux_socket, fact):
    job_id, folder, paths = finished_job(tmp_path, sshd, tmux_socket, fact)
    out = json.loads(cli("export", job_id, "--ollama", "q8_0", "--json", timeout=1200).stdout)
    local = Path(out["folder"])
    assert local == (folder / "runs" / job_id / "export" / "export-ollama-q8_0").resolve()
    digest = verify_manifest(local)
    assert {"model-q8_0.gguf", "Modelfile", "export.json"} <= {p.name for p in local.iterdir()}
    assert out["export"]["merge_check"]["passed"] and out["export"]["gguf_check"]["passed"]
    ack = FetchAck.model_validate_json(Path(paths.post("export-ollama-q8_0").fetched).read_text())
    assert (ack.what, ack.manifest_sha256) == ("export", digest)
    # --here: from the fetched adapter, on this machine
    shutil.copytree(paths.adapter, folder / "runs" / job_id / "adapter")
    here = json.loads(cli_here("export", job_id, "--merged", "--here", "--json", timeout=1200).stdout)
    assert here["where"] == "here" and "model.safetensors" in here["export"]["files"]
    verify_manifest(Path(here["folder"]))
    bad = cli("export", job_id, "--gguf", "q3_k", check=False)
    assert bad.returncode == 2 and "unknown GGUF type" in bad.stderr
    assert "llama-quantize model-f16.gguf model-Q3_K.gguf Q3_K" in " ".join(bad.stderr.split())
