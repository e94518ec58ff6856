"""`submit` plans the job for the instance's card and stops before anything is uploaded or downloaded when
it cannot fit. The instance's GPU comes from nvidia-smi, as on a real instance: here the sshd's login shell
finds a fake one that reports an RTX 3090 (24 GB), and the model is a folder on the instance holding only a
72B config.json, so nothing could be downloaded or loaded if submit went on."""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import pytest
from jobfiles import ssh_instance, write_job

from client.ledger import Ledger
from client.lifecycle.pipeline import StepResult
from client.lifecycle.submit import submit
from client.plan import DoesNotFit

CONFIGS = Path(__file__).parent / "fixtures" / "configs"


def model_folder(where: Path, name: str) -> Path:
    folder = where / name
    folder.mkdir(parents=True)
    shutil.copy(CONFIGS / f"{name}.json", folder / "config.json")
    return folder


@pytest.fixture
def gpu_sshd(sshd_factory):
    """An sshd whose sessions' PATH starts with a fake nvidia-smi reporting one RTX 3090."""
    server = sshd_factory()
    fake = server.home / "fakebin"
    fake.mkdir()
    smi = fake / "nvidia-smi"
    smi.write_text('#!/bin/sh\necho "NVIDIA GeForce RTX 3090, 24576"\n')
    smi.chmod(0o755)
    (server.home / ".profile").write_text(f'export PATH="{fake}:$PATH"\n')
    return server


@pytest.mark.ssh
def test_submit_stops_before_the_upload_and_the_download_when_the_card_is_too_small(
    gpu_sshd, tmp_path: Path, tmux_socket: str
) -> None:
    remote = tmp_path / "remote"
    model = model_folder(tmp_path / "on-the-instance", "qwen2.5-72b")
    job = write_job(tmp_path / "job", model=model, instance=ssh_instance(gpu_sshd, remote, tmux_socket), bits=4)
    steps: list[StepResult] = []
    ledger = Ledger()
    with pytest.raises(DoesNotFit) as caught:
        submit(job, ledger=ledger, log=lambda _: None, report=steps.append)
    assert "RTX 3090" in str(caught.value) and "does not fit" in str(caught.value)
    assert "a card with more memory" in caught.value.hint
    assert [s.name for s in steps] == ["check", "prepare", "connect"]  # no sync, setup, model or launch
    assert not (remote / "jobs").exists() and not (remote / "data").exists()
    assert ledger.all() == []


@pytest.mark.ssh
def test_a_card_that_fits_passes_the_plan_step(gpu_sshd, tmp_path: Path, tmux_socket: str) -> None:
    from client.lifecycle import steps as lifecycle_steps
    from client.session import open_session
    from client.specfile import load_spec

    model = model_folder(tmp_path / "on-the-instance", "qwen2.5-0.5b")
    job = write_job(tmp_path / "job", model=model, instance=ssh_instance(gpu_sshd, tmp_path / "remote", tmux_socket))
    spec = load_spec(job)
    with open_session(spec) as session:
        planned = lifecycle_steps.plan(session, spec, {"train_records": 16, "records_out": 16})
    assert planned.card == "RTX 3090" and planned.plan is not None
    assert "RTX 3090" in planned.describe()


def test_submit_gpu_plans_for_the_named_card_on_a_local_target(tmp_path: Path, tmux_socket: str) -> None:
    """`submit --gpu NAME` plans for that card where the instance reports none (the local target here)."""
    model = model_folder(tmp_path / "models", "qwen2.5-32b")
    instance = {"host": "local", "remote_root": str(tmp_path / "remote"), "tmux_socket": tmux_socket,
                "python": sys.executable}  # fmt: skip
    job = write_job(tmp_path / "job", model=model, instance=instance, bits=16)
    steps: list[StepResult] = []
    with pytest.raises(DoesNotFit, match="--gpu RTX 4090"):
        submit(job, ledger=Ledger(), log=lambda _: None, report=steps.append, gpu="RTX 4090")
    assert [s.name for s in steps] == ["check", "prepare", "connect"]
    assert not (tmp_path / "remote" / "jobs").exists()
