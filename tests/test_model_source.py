"""model.source: ModelScope for the orgs it mirrors, a Hugging Face mirror otherwise, the worker loading from
where the model landed. Offline: stand-ins of both hubs on loopback (tests/fakehubs.py, netns.hub) serve a
tiny model made on the fly; the real modelscope and huggingface_hub libraries download from them."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from fakehubs import modelscope
from netns import hub
from tinymodel import make_model

from jobs import events as ev
from jobs.layout import JobPaths, RemoteLayout
from jobs.modelsource import candidates, uses_modelscope
from jobs.protocol import ModelDownload, read_model
from jobs.requirements import requirements_for
from remote_worker.prefetch import hf_endpoint

REPO = Path(__file__).resolve().parent.parent
WEIGHTS = "model.safetensors"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_model(tmp_path_factory.mktemp("model") / "tiny-qwen2")


@pytest.fixture
def hubs(tiny: Path):
    ms = modelscope("127.0.0.1", {"Qwen/tiny-qwen2": tiny, "ZhipuAI/tiny-glm": tiny, "someone/tiny": tiny})
    hf = hub("127.0.0.1", {"Qwen/only-on-hf": tiny, "Qwen/tiny-qwen2": tiny, "other/tiny": tiny})
    yield ms, hf
    ms.stop()
    hf.stop()


def prefetch(
    tmp_path: Path, ms, hf, repo: str, source: str = "auto", job: str = "job-1"
) -> tuple[ModelDownload, list]:
    """`python -m remote_worker.prefetch` as client.remote.prefetch launches it, against the stand-ins."""
    layout = RemoteLayout(str(tmp_path / "root"))
    paths = layout.job(job)
    Path(paths.prefetch.dir).mkdir(parents=True)  # the launcher makes it
    args = {"repo": repo, "revision": None, "job_dir": paths.dir, "lora_r": 8, "targets": "all-linear",
            "keep_checkpoints": 2, "bytes_per_param": 16, "margin": 1 << 20, "every": 0.1, "source": source,
            "network_turbo": False}  # fmt: skip
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith(("HF_", "MODELSCOPE", "AutoDL"))},
        "HF_HOME": layout.hf_home(), "MODELSCOPE_CACHE": layout.modelscope_cache(), "PYTHONPATH": str(REPO),
        "HF_ENDPOINT": hf.url, "MODELSCOPE_ENDPOINT": ms.url, "MODELSCOPE_DOMAIN": ms.url,
        "HF_HUB_DISABLE_PROGRESS_BARS": "1", "NO_PROXY": "127.0.0.1", "no_proxy": "127.0.0.1",
    }  # fmt: skip
    subprocess.run([sys.executable, "-m", "remote_worker.prefetch", json.dumps(args)], env=env, timeout=300,
                   check=False, cwd=tmp_path)  # fmt: skip
    result = read_model(ModelDownload, Path(paths.prefetch_result).read_text(), "result")
    events = [ev.parse(ln) for ln in Path(paths.events).read_text().splitlines() if ln.strip()]
    return result, [e.message for e in events if isinstance(e, ev.Phase)]


def same_files(folder: str, tiny: Path) -> None:
    for name in ("config.json", WEIGHTS, "tokenizer.json"):
        assert (Path(folder) / name).read_bytes() == (tiny / name).read_bytes(), name


def downloads(server) -> list[str]:
    return [r for r in server.requests if "FilePath=" in r or "/resolve/" in r]


def test_auto_takes_a_qwen_model_from_modelscope_into_its_cache(tmp_path, hubs, tiny) -> None:
    ms, hf = hubs
    result, messages = prefetch(tmp_path, ms, hf, "Qwen/tiny-qwen2")
    assert result.ok and result.source == "modelscope" and result.repo == "Qwen/tiny-qwen2", result
    assert result.endpoint == ms.url and result.bytes > 0 and not result.cached
    assert result.path.startswith(str(tmp_path / "root" / "modelscope") + "/")
    same_files(result.path, tiny)
    assert any(WEIGHTS in r for r in downloads(ms)) and hf.requests == []  # Hugging Face never asked
    assert any("files to download from " + ms.url in m for m in messages) and "downloaded" in messages[-1]

    asked = len(downloads(ms))  # a second job: the cache answers, nothing is downloaded again
    again, messages = prefetch(tmp_path, ms, hf, "Qwen/tiny-qwen2", job="job-2")
    assert again.ok and again.cached and again.path == result.path and len(downloads(ms)) == asked
    assert "already on the instance" in messages[-1]


def test_auto_maps_a_glm_org_to_its_modelscope_namespace(tmp_path, hubs, tiny) -> None:
    ms, hf = hubs
    result, _ = prefetch(tmp_path, ms, hf, "THUDM/tiny-glm")
    assert result.ok and result.source == "modelscope" and result.repo == "ZhipuAI/tiny-glm"
    same_files(result.path, tiny)


def test_auto_falls_back_to_the_hugging_face_mirror_when_modelscope_lacks_it(tmp_path, hubs, tiny) -> None:
    ms, hf = hubs
    result, messages = prefetch(tmp_path, ms, hf, "Qwen/only-on-hf")
    assert result.ok and result.source == "hf" and result.endpoint == hf.url, result
    assert result.path.startswith(str(tmp_path / "root" / "hf" / "hub" / "models--Qwen--only-on-hf") + "/")
    same_files(result.path, tiny)
    assert any("/api/v1/models/Qwen/only-on-hf/" in r for r in ms.requests)  # asked first
    assert any("no model Qwen/only-on-hf on " + ms.url in m and "trying hf next" in m for m in messages)
    assert any("/resolve/" in r and WEIGHTS in r for r in hf.requests)


def test_an_org_modelscope_does_not_mirror_goes_straight_to_hugging_face(tmp_path, hubs, tiny) -> None:
    ms, hf = hubs
    result, _ = prefetch(tmp_path, ms, hf, "other/tiny")
    assert result.ok and result.source == "hf" and ms.requests == []
    same_files(result.path, tiny)


def test_source_hf_and_source_modelscope_ask_one_hub_only(tmp_path, hubs, tiny) -> None:
    ms, hf = hubs
    result, _ = prefetch(tmp_path, ms, hf, "Qwen/tiny-qwen2", source="hf")
    assert result.ok and result.source == "hf" and ms.requests == []
    result, _ = prefetch(tmp_path, ms, hf, "someone/tiny", source="modelscope", job="job-2")
    assert result.ok and result.source == "modelscope" and result.repo == "someone/tiny"
    same_files(result.path, tiny)
    before = len(hf.requests)
    result, messages = prefetch(tmp_path, ms, hf, "other/tiny", source="modelscope", job="job-3")
    assert not result.ok and result.kind == "not_found" and len(hf.requests) == before  # no fallback
    assert f"no model other/tiny on {ms.url}" == result.message and 'model.source = "hf"' in result.hint
    assert messages[-1].startswith("failed: no model")


def test_the_worker_trains_from_where_the_model_was_downloaded(tmp_path, hubs, tiny, monkeypatch) -> None:
    """Also SwanLab in local mode, logging inside the job folder (test_trackers' own worker run before: the
    same assertions on this run, one worker launch less)."""
    pytest.importorskip("peft")
    from test_worker_run import _swanlog_in_cwd, make_job, read_events, run_worker

    monkeypatch.delenv("SWANLAB_LOGDIR", raising=False)
    monkeypatch.setenv("SWANLAB_SAVE_DIR", str(tmp_path / "swan"))
    ms, hf = hubs
    job = make_job(tmp_path, "Qwen/tiny-qwen2", train={"max_steps": 2})
    track = job.spec.track.model_copy(update={"report_to": ["swanlab"], "swanlab_mode": "local"})
    job = job.model_copy(update={"spec": job.spec.model_copy(update={"track": track})})
    (tmp_path / "job.json").write_text(job.model_dump_json(indent=1))
    layout_root = tmp_path / "root"
    result, _ = prefetch(tmp_path, ms, hf, "Qwen/tiny-qwen2")
    assert result.ok
    # the job's own prefetch folder holds the result the worker reads
    jp = JobPaths(job.job_dir)
    Path(jp.prefetch_result).parent.mkdir(parents=True)
    Path(jp.prefetch_result).write_text(
        Path(RemoteLayout(str(layout_root)).job("job-1").prefetch_result).read_text()
    )
    before = _swanlog_in_cwd()
    proc = run_worker(tmp_path / "job.json")  # offline: a hub id alone could not be loaded
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert (Path(job.job_dir) / "output" / "adapter" / "adapter_model.safetensors").exists()
    events = read_events(job.job_dir)
    assert events[-1].type == "done" and not [e for e in events if e.type == "warning"], events
    runs = list((Path(job.job_dir) / "swanlog").glob("run-*/*.swanlab"))
    assert runs and runs[0].stat().st_size > 0, list((Path(job.job_dir)).rglob("*"))
    assert _swanlog_in_cwd() == before, "SwanLab wrote a swanlog/ into the worker's cwd"


def test_the_mirror_and_the_requirements_follow_the_source() -> None:
    assert hf_endpoint({}, network_turbo=False, autodl_here=True) == "https://hf-mirror.com"
    assert hf_endpoint({}, network_turbo=True, autodl_here=True) is None  # the proxy reaches huggingface.co
    assert hf_endpoint({}, network_turbo=False, autodl_here=False) is None
    assert hf_endpoint({"HF_ENDPOINT": "http://m"}, network_turbo=False, autodl_here=True) == "http://m"
    assert candidates("auto", "meta-llama/Meta-Llama-3-8B") == [
        ("modelscope", "LLM-Research/Meta-Llama-3-8B"),
        ("hf", "meta-llama/Meta-Llama-3-8B"),
    ]
    assert candidates("auto", "Qwen/Qwen2.5-7B", revision="abc123") == [("hf", "Qwen/Qwen2.5-7B")]
    assert "modelscope" in requirements_for(4, modelscope=uses_modelscope("auto", "Qwen/Qwen2.5-7B"))
    assert "modelscope" not in requirements_for(4, modelscope=uses_modelscope("auto", "mistralai/Mistral-7B"))
    assert "modelscope" not in requirements_for(4, modelscope=uses_modelscope("hf", "Qwen/Qwen2.5-7B"))


def test_submit_s_model_step_downloads_from_modelscope_into_the_data_disk_cache(
    tmp_path, hubs, tiny, monkeypatch
) -> None:
    from client.remote.prefetch import prefetch_model
    from client.transport.local import LocalTransport
    from jobs.spec import JobSpec

    ms, hf = hubs
    monkeypatch.setenv("MODELSCOPE_ENDPOINT", ms.url)  # what the instance would reach as modelscope.cn
    spec = JobSpec.model_validate(
        {"name": "t", "instance": {"host": "local", "remote_root": str(tmp_path / "root"), "hf_endpoint": hf.url},
         "model": {"name_or_path": "THUDM/tiny-glm"}, "data": {"train": "t.jsonl"}, "lora": {"r": 8}}
    )  # fmt: skip
    layout = RemoteLayout(str(tmp_path / "root"))
    lines: list[str] = []
    got = prefetch_model(LocalTransport(), spec, layout.job("job-1"), str(REPO), lines.append, poll_s=0.1)
    d = got.download
    assert d is not None and d.ok and d.source == "modelscope" and d.repo == "ZhipuAI/tiny-glm"
    assert d.path.startswith(layout.modelscope_cache() + "/") and hf.requests == []
    same_files(d.path, tiny)
    assert any("downloaded" in ln for ln in lines) and "model.source = auto" in lines[0]
