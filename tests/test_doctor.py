"""`autodl-run doctor` against an AutoDL-like instance (tests/netns.py): one round trip, asserted fields."""

from __future__ import annotations

import importlib.metadata
import io
import json
import sys
from pathlib import Path

import pytest
from jobfiles import write_toml
from netns import _make_instance, _netns_ok, _serve, cli, hub, login, pip_index, proxy  # noqa: F401
from rich.console import Console

from client.instances.doctor import doctor
from client.views.doctor import render

pytestmark = pytest.mark.ssh


def _job(folder: Path, **instance: object) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    return write_toml(folder / "job.toml", {"name": "d"}, {
        "instance": instance, "model": {"name_or_path": "m"}, "data": {"train": "t.jsonl"},
    })  # fmt: skip


def _checks(report: dict) -> dict[str, dict]:
    return {c["name"]: c for c in report["checks"]}


def test_doctor_json_reports_the_instance(make_instance, serve, tmp_path: Path) -> None:
    inst = make_instance(hide=("tmux",))
    login(inst)
    index = serve(pip_index(inst.laptop_ip, tmp_path))
    hf = serve(hub(inst.laptop_ip, {}))
    job = _job(tmp_path / "job", profile="gpu1", pip_index_url=index.url + "/simple", hf_endpoint=hf.url)
    res = cli("doctor", str(job), "--json", check=False)
    assert res.returncode == 5, res.stderr  # no GPU here: a failed check
    r = json.loads(res.stdout)
    assert r["target"] == str(job) and r["where"] == f"root@{inst.ip}:22" and r["ok"] is False
    assert r["os"]["name"] and r["os"]["kernel"].startswith("Linux")
    assert r["python"]["path"] == "/root/miniconda3/bin/python3"  # found by the login shell, as on AutoDL
    assert r["python"]["conda"] is True and r["python"]["conda_env"] == "base"
    assert r["python"]["version"] == sys.version.split()[0]  # remote_worker.envprobe, from the bundle it sent
    assert r["bundle"]["error"] is None and r["bundle"]["dir"].startswith(
        "/root/autodl-tmp/autodl-run/bundles/"
    )
    assert (inst.root / r["bundle"]["dir"].removeprefix("/root/") / "remote_worker" / "envprobe.py").is_file()
    assert (
        r["torch"]["version"] == importlib.metadata.version("torch") and r["torch"]["cuda_available"] is False
    )
    assert r["gpu"] == {"count": 0, "gpus": [], "driver": None, "torch_gpus": []}
    for name in ("transformers", "peft", "bitsandbytes", "accelerate"):
        assert r["packages"][name] == importlib.metadata.version(name)
    assert r["flash_attn"] is False
    assert set(r["disks"]) >= {"/", "/root/autodl-tmp", "/root/autodl-fs"}
    for d in r["disks"].values():
        assert d["free_bytes"] > 0 and d["total_bytes"] >= d["free_bytes"] and d["inodes_free"] > 0
    assert r["tools"]["tmux"]["path"] is None and r["tools"]["rsync"]["path"] == "/root/.bin/rsync"
    assert r["pip_index"]["url"] == index.url + "/simple" and r["pip_index"]["reachable"] is True
    assert r["hf_endpoint"]["url"] == hf.url and r["hf_endpoint"]["reachable"] is True
    assert abs(r["clock"]["skew_s"]) < 2

    checks = _checks(r)
    assert checks["python"]["status"] == "ok" and "conda env base" in checks["python"]["detail"]
    assert checks["gpu"]["status"] == "fail" and "无卡模式" in checks["gpu"]["hint"]
    assert checks["cuda"]["status"] == "fail"
    assert checks["tmux"]["status"] == "warn" and "setsid" in checks["tmux"]["hint"]
    assert checks["pip index"]["status"] == "ok" and checks["hf endpoint"]["status"] == "ok"
    assert checks["data disk"]["status"] == "ok" and checks["clock"]["status"] == "ok"
    assert all(c["hint"] for c in r["checks"] if c["status"] == "fail")  # every ✗ says what to do
    assert any(r == "GET /simple/pip/" for r in index.requests)


def test_doctor_finds_what_network_turbo_would_fix(make_instance, serve, tmp_path: Path) -> None:
    """An index the instance reaches only through /etc/network_turbo: ✗, and the hint says to turn it on."""
    inst = make_instance()
    login(inst)
    index = serve(
        pip_index("127.0.0.1", tmp_path)
    )  # this machine's loopback: not reachable from the instance
    inst.set_network_turbo(serve(proxy(inst.laptop_ip)).url)
    job = _job(tmp_path / "job", profile="gpu1", pip_index_url=index.url + "/simple")
    report = doctor(str(job)).as_dict()  # the keys `--json` prints
    pip_check = _checks(report)["pip index"]
    assert report["network_turbo_available"] is True
    assert (
        report["pip_index"]["reachable"] is False
        and report["pip_index"]["through_turbo"]["reachable"] is True
    )
    assert pip_check["status"] == "fail" and "instance.network_turbo = true" in pip_check["hint"]

    job = _job(tmp_path / "job2", profile="gpu1", pip_index_url=index.url + "/simple", network_turbo=True)
    typed = doctor(str(job))
    report = typed.as_dict()
    assert _checks(report)["pip index"]["status"] == "ok"
    assert "through /etc/network_turbo" in _checks(report)["pip index"]["detail"]
    assert [c.name for c in typed.failed] == [c["name"] for c in report["checks"] if c["status"] == "fail"]

    out = io.StringIO()
    render(typed, Console(file=out, width=160))
    text = out.getvalue()
    assert "✓" in text and "✗" in text and "!" not in text.split("pip index")[1].split("\n")[0]
    assert "无卡模式" in text and "problem" in text


def test_doctor_without_a_profile_uses_the_last_login(make_instance, tmp_path: Path) -> None:
    res = cli("doctor", check=False)
    assert res.returncode == 2 and "autodl-run login" in res.stderr
    inst = make_instance()
    login(inst, "first")
    report = json.loads(cli("doctor", "--json", check=False).stdout)
    assert report["target"] == "first" and report["python"]["conda"] is True
    assert report["pip_index"]["url"] == "https://pypi.org/simple"  # what pip there would use
