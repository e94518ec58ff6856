"""Setup on an AutoDL-like instance (tests/netns.py): pip with torch pinned, marker, mirrors, model pre-download.

The pip tests run the real pip of the instance's python against a "simple" index served from the
laptop side of the veth, with wheels built here (a fake torch 2.4.0+cu121 plays the instance's
CUDA build; the index also offers torch 9.0.0, to tempt pip). The model tests run the real
huggingface_hub against a stand-in of the hub API serving a tiny model made on the fly.
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import subprocess
import sys
import threading
import time
import zipfile
from collections.abc import Callable
from pathlib import Path

import pip
import pytest
from netns import _make_instance, _netns_ok, _serve, build_wheel, hub, login, pip_index, proxy  # noqa: F401
from tinymodel import make_model

from client.errors import RemoteEnvError
from client.remote.bundle import script, stage_bundle
from client.remote.prefetch import Prefetched, prefetch_model, read_result
from client.remote.setup import deps_key, ensure_worker_deps, remote_root
from client.transport import connect
from client.transport.local import LocalTransport
from jobs import events as ev
from jobs.layout import JobPaths, RemoteLayout
from jobs.protocol import EnvProbe, ModelDownload, SetupMarker, dump_model, read_model
from jobs.spec import JobSpec

pytestmark = pytest.mark.ssh
REPO_ROOT = Path(__file__).resolve().parents[1]  # holds `jobs`, which the download step imports there
DATA = "/root/autodl-tmp/autodl-run"


def _spec(model: str = "/root/model", **instance: object) -> JobSpec:
    return JobSpec.model_validate(
        {"name": "t", "instance": {"profile": "gpu1", "connect_timeout": 30, **instance},
         "model": {"name_or_path": model}, "data": {"train": "t.jsonl"}, "lora": {"r": 8}, "quant": {"bits": 16}}
    )  # fmt: skip


# -- pip -------------------------------------------------------------------------------------------


def _venv(inst, installed: dict[str, str], wheels: Path) -> str:
    """A bare venv at /root/venv on the instance, with pip importable and `installed` {name: version} in it."""
    venv = inst.root / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    site = next(venv.glob("lib/python3*/site-packages"))
    pip_src = inst.dir / "pip-src"
    pip_src.mkdir()
    (pip_src / "pip").symlink_to(Path(pip.__file__).parent)
    (site / "_pip.pth").write_text(f"{pip_src}\n")
    for name, version in installed.items():
        with zipfile.ZipFile(build_wheel(wheels / "preinstalled", name, version)) as z:
            z.extractall(site)
    return "/root/venv/bin/python"


def _index(folder: Path, peft_requires: tuple[str, ...] = ("torch>=2.0",)) -> Path:
    for name, version, requires in [
        ("torch", "9.0.0", ()),
        ("transformers", "5.0.0", ("torch>=2.0",)),
        ("peft", "0.17.0", peft_requires),
        ("accelerate", "1.0.0", ()),
        ("safetensors", "0.4.0", ()),
        ("numpy", "1.26.0", ()),
        ("pydantic", "2.11.0", ()),
    ]:
        build_wheel(folder, name, version, requires)
    return folder


def _installed(inst, name: str) -> str | None:
    site = next((inst.root / "venv").glob("lib/python3*/site-packages"))
    found = list(importlib.metadata.distributions(path=[str(site)]))
    return next((d.version for d in found if d.metadata["Name"] == name), None)


def test_missing_packages_are_installed_with_torch_pinned_through_turbo(
    make_instance, serve, tmp_path
) -> None:
    inst = make_instance()
    login(inst)
    index = serve(pip_index(inst.laptop_ip, _index(tmp_path / "index")))
    turbo = serve(proxy(inst.laptop_ip))
    inst.set_network_turbo(turbo.url)
    py = _venv(inst, {"torch": "2.4.0+cu121", "transformers": "4.40.0"}, tmp_path)
    spec = _spec(python=py, pip_index_url=index.url + "/simple", network_turbo=True)
    lines: list[str] = []
    with connect(spec.instance) as t:
        info = ensure_worker_deps(t, spec, log=lines.append)
        assert info.torch == "2.4.0+cu121" and info.missing == [] and info.outdated == {} and not info.from_marker
        assert any("installing on the instance from " + index.url in ln and "torch 2.4.0+cu121 pinned" in ln
                   for ln in lines), lines  # fmt: skip
        assert _installed(inst, "torch") == "2.4.0+cu121"  # never replaced, though the index has 9.0.0
        assert _installed(inst, "transformers") == "5.0.0" and _installed(inst, "peft") == "0.17.0"
        assert any("/simple/peft/" in r for r in turbo.requests)  # the download went through network_turbo
        marker = inst.root / "autodl-tmp" / "autodl-run" / ".setup" / f"deps-{deps_key(spec)}.json"
        assert json.loads(marker.read_text())["torch"] == "2.4.0+cu121"

        asked = len(index.requests)
        again = ensure_worker_deps(t, spec, log=lines.append)  # the marker: no probe, no pip
        assert again.from_marker and again.torch == "2.4.0+cu121" and len(index.requests) == asked
        assert "checked before" in lines[-1]


def test_a_package_needing_another_torch_is_refused_and_torch_is_kept(make_instance, serve, tmp_path) -> None:
    inst = make_instance()
    login(inst)
    index = serve(pip_index(inst.laptop_ip, _index(tmp_path / "index", peft_requires=("torch>=5",))))
    py = _venv(inst, {"torch": "2.4.0+cu121"}, tmp_path)
    spec = _spec(python=py, pip_index_url=index.url + "/simple")
    with connect(spec.instance) as t, pytest.raises(RemoteEnvError) as info:
        ensure_worker_deps(t, spec, log=lambda _m: None)
    assert "pip could not install" in str(info.value) and "another torch" in info.value.hint
    assert _installed(inst, "torch") == "2.4.0+cu121"
    assert not (inst.root / "autodl-tmp" / "autodl-run" / ".setup" / f"deps-{deps_key(spec)}.json").exists()


def test_without_install_deps_the_missing_packages_are_named(make_instance, tmp_path) -> None:
    inst = make_instance()
    login(inst)
    py = _venv(inst, {"torch": "2.4.0+cu121", "transformers": "4.40.0"}, tmp_path)
    spec = _spec(python=py, install_deps=False)
    with connect(spec.instance) as t, pytest.raises(RemoteEnvError) as info:
        ensure_worker_deps(t, spec)
    text = str(info.value)
    assert "lacks: peft" in text and "transformers (has 4.40.0)" in text and "pip install" in text


def test_a_python_that_is_not_there_points_at_conda(make_instance) -> None:
    inst = make_instance()
    login(inst)
    spec = _spec(python="/usr/bin/nope")
    with connect(spec.instance) as t, pytest.raises(RemoteEnvError) as info:
        ensure_worker_deps(t, spec)
    assert (
        "cannot run `/usr/bin/nope`" in str(info.value) and "/root/miniconda3/bin/python" in info.value.hint
    )


# -- the model -------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_model(tmp_path_factory.mktemp("model") / "tiny-qwen2")


def _events(path: Path) -> list:
    return [ev.parse(ln) for ln in path.read_text().splitlines() if ln.strip()]


def test_the_model_is_downloaded_before_launch_with_progress(make_instance, serve, tiny_model: Path) -> None:
    inst = make_instance()
    login(inst)
    hf = serve(hub(inst.laptop_ip, {"test-org/tiny-qwen2": tiny_model}))
    spec = _spec("test-org/tiny-qwen2", hf_endpoint=hf.url)
    layout = RemoteLayout(remote_root(spec))
    lines: list[str] = []
    with connect(spec.instance) as t:
        result = prefetch_model(t, spec, layout.job("job-1"), str(REPO_ROOT), lines.append,
                                poll_s=0.1, progress_every_s=0.1)  # fmt: skip
        got = result.download
        assert got is not None and got.ok and not got.cached and got.bytes > 0 and not result.skipped
        assert got.path.startswith(f"{DATA}/hf/hub/models--test-org--tiny-qwen2/snapshots/")
        job = inst.root / "autodl-tmp" / "autodl-run" / "jobs" / "job-1"
        phases = [e for e in _events(job / "events.jsonl") if isinstance(e, ev.Phase)]
        assert phases and all(p.phase == "download" for p in phases)
        assert "files to download" in phases[1].message and "downloaded" in phases[-1].message
        assert "[download] test-org/tiny-qwen2: downloaded" in (job / "worker.log").read_text()
        assert any("downloaded" in ln for ln in lines)  # shown by submit as it happens
        snapshot = inst.root / got.path.removeprefix("/root/")
        assert (snapshot / "model.safetensors").read_bytes() == (
            tiny_model / "model.safetensors"
        ).read_bytes()
        assert any(r.startswith("GET /test-org/tiny-qwen2/resolve/") and r.endswith("model.safetensors")
                   for r in hf.requests)  # fmt: skip

        fetched = len(hf.requests)
        again = prefetch_model(t, spec, layout.job("job-2"), str(REPO_ROOT), lines.append, poll_s=0.1)
        assert again.download is not None and again.download.cached and again.download.bytes == 0
        assert not any("/resolve/" in r for r in hf.requests[fetched:])  # nothing downloaded twice


def test_too_little_disk_is_refused_before_downloading(make_instance, serve, tiny_model: Path) -> None:
    inst = make_instance(data_disk="24m")
    login(inst)
    hf = serve(
        hub(inst.laptop_ip, {"test-org/big": tiny_model}, claimed_sizes={"model.safetensors": 3 * 10**9})
    )
    spec = _spec("test-org/big", hf_endpoint=hf.url)
    with connect(spec.instance) as t, pytest.raises(RemoteEnvError) as info:
        prefetch_model(t, spec, RemoteLayout(remote_root(spec)).job("job-1"), str(REPO_ROOT), poll_s=0.1)
    text = str(info.value)
    assert (
        "not enough disk for test-org/big on /root/autodl-tmp: needs 4.07 GB (3.00 GB of model files" in text
    )
    assert "for checkpoints, 3 x" in text and "MB free" in text and "数据盘扩容" in info.value.hint
    assert not any(r.startswith("GET") and r.endswith("model.safetensors") for r in hf.requests)


def test_a_download_failure_is_reported_as_one(make_instance, serve, tiny_model: Path) -> None:
    inst = make_instance()
    login(inst)
    hf = serve(hub(inst.laptop_ip, {"test-org/tiny-qwen2": tiny_model}))
    spec = _spec("test-org/no-such-model", hf_endpoint=hf.url)
    layout = RemoteLayout(remote_root(spec))
    with connect(spec.instance) as t, pytest.raises(RemoteEnvError) as info:
        prefetch_model(t, spec, layout.job("job-1"), str(REPO_ROOT), poll_s=0.1)
    assert f"downloading test-org/no-such-model failed: no model test-org/no-such-model on {hf.url}" in str(
        info.value
    )
    assert "model.name_or_path" in info.value.hint
    job = inst.root / "autodl-tmp" / "autodl-run" / "jobs" / "job-1"
    assert _events(job / "events.jsonl")[-1].message.startswith("failed: no model")
    assert "RepositoryNotFoundError" in (job / "worker.log").read_text()  # the traceback, for the curious

    spec = _spec("test-org/tiny-qwen2", hf_endpoint=f"http://{inst.laptop_ip}:9")  # nothing listens there
    with connect(spec.instance) as t, pytest.raises(RemoteEnvError) as info:
        prefetch_model(t, spec, layout.job("job-2"), str(REPO_ROOT), poll_s=0.1)
    assert "cannot download from" in str(info.value) and "instance.hf_endpoint" in info.value.hint


def test_a_model_folder_on_the_instance_is_not_downloaded(make_instance) -> None:
    inst = make_instance()
    login(inst)
    (inst.root / "autodl-tmp" / "models" / "mine").mkdir(parents=True)
    with connect(_spec().instance) as t:
        layout = RemoteLayout(DATA)
        spec = _spec("/root/autodl-tmp/models/mine")
        assert prefetch_model(t, spec, layout.job("j"), str(REPO_ROOT)) == Prefetched(
            skipped="a folder on the instance"
        )
        with pytest.raises(RemoteEnvError, match="model folder /root/autodl-tmp/models/gone does not exist"):
            prefetch_model(t, _spec("/root/autodl-tmp/models/gone"), layout.job("j"), str(REPO_ROOT))


def _until(seen: Callable[[], bool], thread: threading.Thread, outcome: list[object]) -> None:
    deadline = time.monotonic() + 300  # a hang guard
    while not seen():
        assert thread.is_alive() and time.monotonic() < deadline, outcome
        time.sleep(0.05)


def test_the_download_goes_on_when_the_connection_drops(make_instance, serve, tiny_model: Path) -> None:
    inst = make_instance()
    login(inst)
    weights = threading.Event()  # the weights are held until the connection was cut and is back
    hf = serve(hub(inst.laptop_ip, {"test-org/tiny-qwen2": tiny_model}, hold=weights))
    spec = _spec("test-org/tiny-qwen2", hf_endpoint=hf.url)
    lines: list[str] = []
    outcome: list[object] = []
    with connect(spec.instance) as t:

        def download() -> None:
            try:
                outcome.append(prefetch_model(t, spec, RemoteLayout(DATA).job("job-1"), str(REPO_ROOT), lines.append,
                                              poll_s=0.1, progress_every_s=0.2))  # fmt: skip
            except Exception as exc:  # handed to the test thread
                outcome.append(exc)

        thread = threading.Thread(target=download)
        thread.start()
        try:
            _until(lambda: any("files to download" in ln for ln in lines), thread, outcome)
            inst.stop_sshd()  # every connection drops; the download on the instance does not
            _until(lambda: any("connection lost" in ln for ln in lines), thread, outcome)  # the client saw it
            inst.start()
        finally:
            weights.set()  # now the download may end
        thread.join(timeout=600)  # a hang guard
    assert not thread.is_alive() and len(outcome) == 1
    done = outcome[0]
    assert isinstance(done, Prefetched) and done.download is not None and done.download.ok, outcome
    assert any("connection lost" in ln and "the download goes on" in ln for ln in lines), lines


# -- the programs the client runs on the instance, run here for real ---------------------------------


def _bundle(tmp_path: Path) -> Path:
    """The worker bundle as it is sent: the programs must run from it alone."""
    return stage_bundle(tmp_path / "bundles").dir


def test_the_shell_scripts_parse_and_travel_in_the_bundle(tmp_path: Path) -> None:
    scripts = sorted((REPO_ROOT / "jobs" / "scripts").glob("*.sh"))
    assert {s.name for s in scripts} >= {"setup_probe.sh", "doctor.sh"}
    for s in scripts:
        res = subprocess.run(["bash", "-n", str(s)], capture_output=True, text=True)
        assert res.returncode == 0, f"{s.name}: {res.stderr}"
        assert script(s.name) == s.read_text()
        assert (_bundle(tmp_path) / "jobs" / "scripts" / s.name).read_text() == s.read_text()


def test_the_env_probe_reports_this_python(tmp_path: Path) -> None:
    reqs = {"transformers": "transformers>=1.0", "peft": "peft>=999", "no_such_module_x": "no-such-module-x"}
    env = {**os.environ, "PYTHONPATH": str(_bundle(tmp_path))}
    argv = [sys.executable, "-m", "remote_worker.envprobe", "--requirements", json.dumps(reqs), "--torch"]
    out = subprocess.run(argv, capture_output=True, text=True, env=env, cwd=tmp_path, check=True).stdout
    probe = read_model(EnvProbe, out.strip().splitlines()[-1])
    assert probe.python == sys.version.split()[0] and probe.executable == sys.executable
    assert probe.missing == ["no_such_module_x"] and probe.outdated == {
        "peft": importlib.metadata.version("peft")
    }
    assert probe.packages["transformers"] == importlib.metadata.version("transformers")
    assert probe.torch == importlib.metadata.version("torch") and probe.torch_error is None
    assert probe.cuda_available is False and probe.gpus == []

    # Before set-up: a python with nothing installed (-S: no site-packages, so no pydantic either)
    argv = [
        sys.executable,
        "-S",
        "-m",
        "remote_worker.envprobe",
        "--requirements",
        json.dumps({"torch": "torch>=2.4"}),
    ]
    out = subprocess.run(argv, capture_output=True, text=True, env=env, cwd=tmp_path, check=True).stdout
    bare = read_model(EnvProbe, out)
    assert bare.missing == ["torch"] and bare.torch is None and bare.packages["transformers"] is None


def _download(bundle: Path, tmp_path: Path, endpoint: str, repo: str) -> tuple[int, Path]:
    job = tmp_path / "jobs" / "job-1"
    (job / "prefetch").mkdir(parents=True, exist_ok=True)
    args = {"repo": repo, "revision": None, "job_dir": str(job), "lora_r": 8, "targets": "all-linear",
            "keep_checkpoints": 2, "bytes_per_param": 16, "margin": 1 << 20, "every": 0.1}  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(bundle), "HF_HOME": str(tmp_path / "hf"), "HF_ENDPOINT": endpoint,
           "HF_HUB_DISABLE_PROGRESS_BARS": "1"}  # fmt: skip
    rc = subprocess.run(
        [sys.executable, "-m", "remote_worker.prefetch", json.dumps(args)], env=env, cwd=tmp_path, timeout=300
    ).returncode
    return rc, job


def test_the_download_module_runs_from_the_bundle(serve, tiny_model: Path, tmp_path: Path) -> None:
    hf = serve(hub("127.0.0.1", {"test-org/tiny-qwen2": tiny_model}))
    bundle = _bundle(tmp_path)
    rc, job = _download(bundle, tmp_path, hf.url, "test-org/tiny-qwen2")
    result = read_model(ModelDownload, (job / "prefetch" / "result.json").read_text())
    assert rc == 0 and result.ok and not result.cached and result.bytes > 0, (job / "worker.log").read_text()
    assert (Path(result.path) / "model.safetensors").read_bytes() == (
        tiny_model / "model.safetensors"
    ).read_bytes()
    phases = [e for e in _events(job / "events.jsonl") if isinstance(e, ev.Phase)]
    assert phases[0].phase == "download" and "downloaded" in phases[-1].message

    rc, job = _download(bundle, tmp_path, hf.url, "test-org/tiny-qwen2")
    assert rc == 0 and read_model(ModelDownload, (job / "prefetch" / "result.json").read_text()).cached

    rc, job = _download(bundle, tmp_path, hf.url, "test-org/none")
    failed = read_model(ModelDownload, (job / "prefetch" / "result.json").read_text())
    assert (
        rc == 3
        and not failed.ok
        and failed.kind == "not_found"
        and "no model test-org/none" in failed.message
    )


def test_a_malformed_download_result_is_a_clear_error(tmp_path: Path) -> None:
    paths = JobPaths(str(tmp_path / "job"))
    Path(paths.prefetch.dir).mkdir(parents=True)
    t = LocalTransport(use_rsync=False)
    Path(paths.prefetch_result).write_text('{"ok": "perhaps"}\n')
    with pytest.raises(RemoteEnvError, match="the model download's result is malformed: .*ok"):
        read_result(t, paths, "m")
    Path(paths.prefetch_result).write_text(dump_model(ModelDownload(ok=True, path="/x", bytes=3)))
    assert read_result(t, paths, "m").path == "/x"
    Path(paths.prefetch_result).unlink()
    with pytest.raises(RemoteEnvError, match="stopped without a result"):
        read_result(t, paths, "m")


def test_a_malformed_marker_means_probe_again(make_instance, tmp_path: Path) -> None:
    inst = make_instance()
    login(inst)
    spec = _spec(python="/root/miniconda3/bin/python")
    marker = inst.root / "autodl-tmp" / "autodl-run" / ".setup" / f"deps-{deps_key(spec)}.json"
    marker.parent.mkdir(parents=True)
    marker.write_text("{not json")
    with connect(spec.instance) as t:
        info = ensure_worker_deps(t, spec, log=lambda _m: None)
    assert not info.from_marker and info.python == sys.version.split()[0]
    assert read_model(SetupMarker, marker.read_text()).executable == sys.executable
