"""A fresh AutoDL-like instance, end to end through the real CLI (tests/netns.py has the instance).

The instance: its own network namespace and address, root with a password only, conda's python
only in login shells, no tmux and no rsync on PATH, apt-get that fails, /etc/network_turbo pointing
at a proxy, a Hugging Face mirror. From the pasted login command to a verified adapter, then a
power cycle that changes the port.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
from jobfiles import write_job
from netns import PASSWORD, _make_instance, _netns_ok, _serve, cli, hub, proxy  # noqa: F401
from tinymodel import make_model

pytestmark = [pytest.mark.ssh, pytest.mark.slow]
REPO = "test-org/tiny-qwen2"


def _grep(root: Path, needle: bytes) -> list[str]:
    hits = []
    for p in root.rglob("*"):
        if p.is_file() and not p.is_symlink():
            try:
                if needle in p.read_bytes():
                    hits.append(str(p))
            except OSError:
                pass
    return hits


def test_from_a_pasted_login_command_to_a_verified_adapter(
    make_instance, serve, tmp_path: Path, autodl_home: Path
) -> None:
    inst = make_instance(hide=("tmux", "rsync"))
    hf = serve(hub(inst.laptop_ip, {REPO: make_model(tmp_path / "model" / "tiny-qwen2")}))
    turbo = serve(proxy(inst.laptop_ip))
    inst.set_network_turbo(turbo.url)
    outputs: list[subprocess.CompletedProcess] = []

    def run(*args: str, **kw) -> subprocess.CompletedProcess:
        res = cli(*args, **kw)
        outputs.append(res)
        return res

    run("login", inst.login_command(), "--name", "gpu1", password=PASSWORD)
    doc = json.loads(run("doctor", "gpu1", "--json", check=False).stdout)
    assert (
        doc["python"]["conda"]
        and doc["tools"]["tmux"]["path"] is None
        and doc["tools"]["rsync"]["path"] is None
    )

    job = write_job(tmp_path / "job", model=REPO, instance={
        "profile": "gpu1", "hf_endpoint": hf.url, "network_turbo": True, "connect_timeout": 30,
    })  # fmt: skip
    sub = run("submit", str(job), "--follow")
    job_id = sub.stdout.splitlines()[0].strip()
    said = sub.stdout + sub.stderr
    assert "step 6/6" in said
    assert (
        f"[download] {REPO}: downloaded" in said or f"{REPO}: downloaded" in said
    )  # before training, in tail
    assert "setsid nohup" in said and "SFTP" in said

    # What the instance went through.
    assert "tmux" in inst.apt_log.read_text()  # apt was tried, then setsid
    assert "subsystem 'sftp'" in inst.log()  # no rsync there: files went over SFTP
    runs = [ln.split("|", 1) for ln in inst.python_log.read_text().splitlines()]
    prefetch = [proxy_url for proxy_url, argv in runs if argv.split()[:2] == ["-m", "remote_worker.prefetch"]]
    worker = [proxy_url for proxy_url, argv in runs if argv.split()[:2] == ["-m", "remote_worker"]]
    assert prefetch == [turbo.url] and worker == [""]  # network_turbo for the download only
    assert any("/api/models/" + REPO in r for r in turbo.requests)
    events = (inst.root / "autodl-tmp" / "autodl-run" / "jobs" / job_id / "events.jsonl").read_text()
    first = [json.loads(ln) for ln in events.splitlines()[:3]]
    assert all(e["type"] == "phase" and e["phase"] == "download" for e in first)
    assert (inst.root / "autodl-tmp" / "autodl-run" / "hf" / "hub" / "models--test-org--tiny-qwen2").is_dir()

    fetched = json.loads(run("fetch", job_id, "--json").stdout)
    assert fetched["verified"] and (Path(fetched["adapter"]) / "adapter_model.safetensors").is_file()

    # A power cycle: the port changes. Commands say how to recover; a new login does; the job is kept.
    inst.start(port=2222)
    res = run("status", job_id, check=False)  # an ended job with its record on the laptop: answered offline
    assert res.returncode == 0 and "the instance was not asked" in res.stdout, res.stdout + res.stderr
    res = run("fetch", job_id, "--to", str(tmp_path / "moved"), check=False)
    assert res.returncode == 4 and "--name gpu1" in res.stderr
    run("login", f"ssh -p 2222 root@{inst.ip}", "--name", "gpu1")  # the key still works: no password
    status = json.loads(run("status", job_id, "--json").stdout)
    assert status["state"] == "done" and status["step"] == 6
    again = json.loads(run("fetch", job_id, "--to", str(tmp_path / "again"), "--json").stdout)
    assert again["verified"] and again["manifest_sha256"] == fetched["manifest_sha256"]

    # The password was never printed, logged or stored: not in any output, the home folder (ledger,
    # profiles, keys), sshd's log, or anything on the instance.
    secret = PASSWORD.encode()
    for res in outputs:
        assert PASSWORD not in res.stdout + res.stderr
    assert _grep(autodl_home, secret) == []
    assert secret not in inst.log().encode()
    assert _grep(inst.dir, secret) == []
