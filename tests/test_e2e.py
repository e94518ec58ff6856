"""End to end through the real CLI: submit, follow, fetch a LoRA adapter trained for real on the CPU.

Over a real sshd on 127.0.0.1 (rsync, tmux) and on the `local` target. The job runs the same worker
bundle the instance would get.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from jobfiles import CLI, cli, cli_here, ssh_instance, write_job
from tinymodel import make_model

from jobs import events as ev

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
def test_submit_follow_fetch_over_ssh(sshd, tmp_path: Path, tmux_socket: str, tiny_model: Path) -> None:
    job = write_job(tmp_path / "job", model=tiny_model, instance=ssh_instance(sshd, tmp_path / "remote", tmux_socket))
    sub = cli("submit", str(job), "--follow", "--json")
    info = json.loads(sub.stdout[: sub.stdout.index("\n}") + 2])
    job_id = info["job_id"]
    assert info["data_sent"] and info["bundle_sent"]
    assert "step 6/6" in sub.stdout + sub.stderr

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
    cli("tail", again["job_id"])


def test_submit_follow_fetch_on_the_local_target(tmp_path: Path, tmux_socket: str, tiny_model: Path) -> None:
    inst = {
        "host": "local",
        "remote_root": str(tmp_path / "remote"),
        "tmux_socket": tmux_socket,
        "python": sys.executable,
    }
    job = write_job(tmp_path / "job", model=tiny_model, instance=inst)
    sub = cli("submit", str(job), "--follow")
    job_id = sub.stdout.splitlines()[0].strip()
    assert (tmp_path / "remote" / "jobs" / job_id / "events.jsonl").exists()
    fetched = json.loads(cli("fetch", "--json").stdout)
    assert lora_weights_moved(Path(fetched["adapter"]), tiny_model) > 0
    out = cli("fetch").stdout
    assert "PeftModel.from_pretrained" in out


@pytest.mark.ssh
def test_tail_survives_a_cut_connection(sshd, tmp_path: Path, tmux_socket: str, tiny_model: Path) -> None:
    """sshd is killed (every connection with it) mid-training; the job trains on while tail cannot reach it;
    tail reconnects, no event lost or repeated."""
    steps_in_all = 200  # a second or two of training here: the job is held below before it can end
    job = write_job(
        tmp_path / "job",
        model=tiny_model,
        instance=ssh_instance(sshd, tmp_path / "remote", tmux_socket),
        train={"max_steps": steps_in_all},
        rows=64,
    )
    job_id = cli_here("submit", str(job)).stdout.strip()
    job_dir = tmp_path / "remote" / "jobs" / job_id
    events_file = job_dir / "events.jsonl"

    def written() -> list[str]:
        return events_file.read_text().splitlines() if events_file.exists() else []

    def wait_for(what: str, condition) -> None:  # generous: a loaded machine trains slowly
        deadline = time.monotonic() + 600
        while not condition():
            assert time.monotonic() < deadline, f"gave up waiting for {what}"
            time.sleep(0.02)

    tail = subprocess.Popen([*CLI, "tail", job_id, "--json"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    lines: list[str] = []
    said: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(tail.stdout), daemon=True)
    reader.start()
    threading.Thread(target=lambda: said.extend(tail.stderr), daemon=True).start()
    wait_for("the job's third step", lambda: sum('"type":"step"' in ln for ln in written()) >= 3)
    group = int((job_dir / "pid").read_text())  # the wrapper leads the job's process group
    os.killpg(group, signal.SIGSTOP)  # held still, so the cut comes mid-run however fast this machine is
    try:
        held_at = len(written())
        assert not any('"type":"done"' in ln for ln in written()), "the job ended before it was held: make it longer"
        wait_for("tail to show 3 steps", lambda: sum('"type":"step"' in ln for ln in lines) >= 3)
        sshd.kill()  # every connection drops with it
    finally:
        os.killpg(group, signal.SIGCONT)  # the job trains on while tail cannot reach it
    wait_for("tail to say it reconnects", lambda: any("reconnecting" in ln for ln in said))
    wait_for("events written while cut off", lambda: len(written()) > held_at + 2)
    sshd.start()
    assert tail.wait(timeout=900) == 0, "".join(said)  # a hang guard
    reader.join(timeout=5)
    got = [ev.parse(ln) for ln in lines]
    steps = [e.step for e in got if isinstance(e, ev.Step)]
    assert steps == list(range(1, steps_in_all + 1))
    assert isinstance(got[-1], ev.Done)
    assert [ev.parse(ln) for ln in events_file.read_text().splitlines()] == got


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
        "connect_timeout": 5.0,
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
