"""`recover` takes which jobs exist from the instance, and nothing the laptop acts on (found by the breaker).

A hostile instance's launch.json carries a spec that would have the laptop fetch into a folder of the
instance's choosing, and load a "tokenizer" with trust_remote_code (its Python running on the laptop)
when `resume` prepares data. Recovered, the job gets the laptop's own spec and job file; a record
launched under another name is skipped.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest
from jobfiles import CLI, write_toml

from client.ledger import Ledger
from jobs import events as ev
from jobs.manifest import write_manifest
from jobs.protocol import LaunchRecord, dump_model

pytestmark = pytest.mark.ssh
JOB = "mine-1"


def run_cli(*args: str, cwd: Path, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run([*CLI, *args], capture_output=True, text=True, timeout=timeout, env=os.environ.copy(),
                          cwd=cwd)  # fmt: skip


def test_recover_never_lets_the_instance_choose_laptop_paths_or_code(sshd, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    root, project = tmp_path / "instance-root", tmp_path / "project"
    project.mkdir()
    chosen, marker = tmp_path / "attacker-chosen", tmp_path / "PWNED"
    job_toml = write_toml(project / "job.toml", {"name": "mine"}, {
        "instance": {"host": sshd.host, "port": sshd.port, "user": sshd.user,
                     "identity_file": str(sshd.identity_file), "connect_timeout": 30.0,
                     "remote_root": str(root), "shutdown_after": "never"},
        "model": {"name_or_path": "m"}, "data": {"train": "t.jsonl"}, "quant": {"bits": 16}})  # fmt: skip
    adapter_on_laptop = chosen / JOB / "adapter"
    poisoned = {
        "name": "mine",
        "model": {"name_or_path": str(adapter_on_laptop), "trust_remote_code": True},
        "data": {"train": str(adapter_on_laptop / "train.jsonl")},
        "quant": {"bits": 16},
        "fetch": {"to": str(chosen)},
    }
    job = root / "jobs" / JOB
    adapter = job / "output" / "adapter"
    adapter.mkdir(parents=True)
    (adapter / "train.jsonl").write_text(json.dumps({"text": "hello world"}) + "\n")
    auto = {"AutoTokenizer": ["tokenization_evil.EvilTokenizer", None]}
    (adapter / "tokenizer_config.json").write_text(json.dumps({"auto_map": auto, "tokenizer_class": "EvilTokenizer"}))
    (adapter / "config.json").write_text(json.dumps({"model_type": "evil", "auto_map": auto}))
    (adapter / "tokenization_evil.py").write_text(f"import pathlib\npathlib.Path({str(marker)!r}).write_text('ran')\n")
    digest = write_manifest(adapter)
    (job / "state").write_text("done\n")
    (job / "exit_code").write_text("0\n")
    (job / "events.jsonl").write_text(ev.dumps(ev.Done(adapter_path=str(adapter), manifest_sha256=digest,
                                                       steps=3, total_steps=10, stopped="deadline")) + "\n")  # fmt: skip
    for job_id, name in ((JOB, "mine"), ("other-1", "other")):
        (root / "jobs" / job_id).mkdir(parents=True, exist_ok=True)
        (root / "jobs" / job_id / "launch.json").write_text(dump_model(LaunchRecord(
            job_id=job_id, name=name, submit_key="k" * 64, data_digest="0" * 64, bundle_digest="b" * 64,
            job_file=str(chosen / "job.toml"), spec_json=json.dumps(poisoned | {"name": name}))))  # fmt: skip

    r = run_cli("recover", str(job_toml), "--json", cwd=project)
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["added"] == [JOB] and any("other-1" in why and "another job file" in why for why in out["skipped"])
    rec = Ledger().get(JOB)
    assert rec.job_file == str(job_toml) and rec.spec.fetch.to == "runs" and not rec.spec.model.trust_remote_code
    assert rec.spec.model.name_or_path == "m"

    f = run_cli("fetch", JOB, cwd=project)
    assert f.returncode == 0, f.stderr
    assert (project / "runs" / JOB / "adapter" / "manifest.json").is_file() and not chosen.exists()
    run_cli("resume", JOB, cwd=project)  # whatever it makes of the job, it runs nothing of the instance's
    assert not marker.exists() and not chosen.exists()
