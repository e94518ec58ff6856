"""The model download before launch: `python -m remote_worker.prefetch ARGS_JSON`.

client.remote.prefetch launches it detached in the job's `prefetch/` folder, with HF_HOME on the data disk.
Before anything is downloaded it compares the free space with the model's size plus room for
checkpoints, and refuses with the numbers when it does not fit. Its progress goes to the job's
events.jsonl (`phase` events) and worker.log; what happened goes to `prefetch/result.json`
(jobs.protocol.ModelDownload), which the client reads. Exit 0 when the model is there, 3 when not.

Standard library, huggingface_hub (imported once the log is set up) and jobs only.
"""

from __future__ import annotations

import errno
import json
import os
import sys
import threading
import time
import traceback
from typing import NoReturn

from jobs import autodl
from jobs.events import EventWriter, Phase
from jobs.layout import JobPaths
from jobs.protocol import ModelDownload, dump_model

SMALL_FILES = (".json", ".txt", ".model", ".tiktoken", ".py", ".jinja", ".vocab", ".spm")
NETWORK_ERRORS = {
    "ConnectError", "ConnectTimeout", "ReadTimeout", "TimeoutException", "NetworkError", "ProxyError",
    "ConnectionError", "Timeout", "LocalEntryNotFoundError", "TimeoutError", "ConnectionRefusedError",
}  # fmt: skip


def size(n: float) -> str:
    return f"{n / 1e9:.2f} GB" if n >= 1e8 else f"{n / 1e6:.1f} MB"


def choose(files: dict[str, int]) -> dict[str, int]:
    """The files the worker loads: top-level config and tokenizer files, and one format of weights."""
    top = {f: n for f, n in files.items() if "/" not in f}
    out = {f: n for f, n in top.items() if f.endswith(SMALL_FILES) or f.startswith("tokenizer")}
    weights = {f: n for f, n in top.items() if f.endswith(".safetensors")}
    if not weights:
        weights = {
            f: n for f, n in top.items() if f.endswith(".bin") and f.startswith(("pytorch_model", "model"))
        }
    return {**out, **weights}


def lora_params(cfg: dict, model_bytes: int, r: int, targets: str | list[str]) -> int:
    """The adapter's parameter count from the model's config (a rough share of the model without one)."""
    try:
        c = cfg.get("text_config") or cfg
        h, layers, inter = c["hidden_size"], c["num_hidden_layers"], c["intermediate_size"]
        heads = c["num_attention_heads"]
        hd = c.get("head_dim") or h // heads
        kv = (c.get("num_key_value_heads") or heads) * hd
        mods = {"q_proj": (h, heads * hd), "k_proj": (h, kv), "v_proj": (h, kv), "o_proj": (heads * hd, h),
                "gate_proj": (h, inter), "up_proj": (h, inter), "down_proj": (inter, h)}  # fmt: skip
        chosen = mods.values() if targets == "all-linear" else [mods[m] for m in targets if m in mods]
        return layers * r * sum(a + b for a, b in chosen)
    except Exception:
        return int(model_bytes / 2 * 0.005 * r / 16)


def free_space(path: str) -> tuple[int, int, str]:
    """(free bytes, device, mount point) of the disk that holds `path` (or would)."""
    while not os.path.exists(path):
        path = os.path.dirname(path) or "/"
    st, dev = os.statvfs(path), os.stat(path).st_dev
    mount = path
    while mount != "/" and os.stat(os.path.dirname(mount)).st_dev == dev:
        mount = os.path.dirname(mount)
    return st.f_bavail * st.f_frsize, dev, mount


def _causes(exc: BaseException) -> list[BaseException]:
    seen: list[BaseException] = []
    e: BaseException | None = exc
    while e is not None and e not in seen:
        seen.append(e)
        e = e.__cause__ or e.__context__
    return seen


def classify(
    exc: BaseException, repo: str, revision: str | None, endpoint: str, hf_home: str
) -> tuple[str, str, str]:
    """(kind, message, hint) of a failed download."""
    chain = _causes(exc)
    names = {c.__name__ for e in chain for c in type(e).__mro__}
    text = str(exc).strip().splitlines()[0][:300] if str(exc).strip() else type(exc).__name__
    if "GatedRepoError" in names:
        return (
            "gated",
            f"{repo} is gated on {endpoint}",
            "accept its license on the model page, then set HF_TOKEN on the instance (or huggingface-cli login there)",
        )
    if "RepositoryNotFoundError" in names:
        return (
            "not_found",
            f"no model {repo} on {endpoint}",
            "check model.name_or_path (org/name); a private model needs HF_TOKEN on the instance",
        )
    if "RevisionNotFoundError" in names:
        return "not_found", f"{repo} has no revision {revision}", "check model.revision"
    if any(isinstance(e, OSError) and e.errno == errno.ENOSPC for e in chain):
        return "disk", f"the disk filled up: {text}", f"free space on the data disk (df -h {hf_home})"
    if names & NETWORK_ERRORS:
        if "huggingface.co" in endpoint:
            hint = f'huggingface.co is not reachable from the instance: set instance.hf_endpoint = "{autodl.HF_MIRROR}", or instance.network_turbo = true on AutoDL'
        else:
            hint = f"{endpoint} is not reachable from the instance: check instance.hf_endpoint (autodl-run doctor tests it), or try network_turbo = true"
        return "network", f"cannot download from {endpoint}: {text}", hint
    return "error", f"{type(exc).__name__}: {text}", "see the job's log (autodl-run tail JOB --raw) for the traceback"


class Download:
    """One download, its events and its result file."""

    def __init__(self, args: dict) -> None:
        self.a = args
        self.repo, self.revision = args["repo"], args.get("revision")
        self.job = JobPaths(args["job_dir"])
        self.hf_home = os.environ["HF_HOME"]
        self.endpoint = (os.environ.get("HF_ENDPOINT") or "https://huggingface.co").rstrip("/")
        self.events = EventWriter(self.job.events)

    def say(self, msg: str) -> None:
        self.events.emit(Phase(phase="download", message=msg))
        print("[download] " + msg, flush=True)

    def finish(self, result: ModelDownload) -> NoReturn:
        path = self.job.prefetch_result
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path + ".tmp", "w") as f:
            f.write(dump_model(result))
        os.replace(path + ".tmp", path)
        self.events.close()
        sys.exit(0 if result.ok else 3)

    def run(self) -> NoReturn:
        try:
            self._download()
        except Exception as exc:
            traceback.print_exc()
            kind, message, hint = classify(exc, self.repo, self.revision, self.endpoint, self.hf_home)
            self.say("failed: " + message)
            self.finish(ModelDownload(ok=False, kind=kind, message=message, hint=hint))

    def _download(self) -> NoReturn:
        from huggingface_hub import HfApi, hf_hub_download, snapshot_download, try_to_load_from_cache

        a, repo, hf_home = self.a, self.repo, self.hf_home
        self.say(f"{repo}: asking {self.endpoint} for its files")
        info = HfApi(endpoint=self.endpoint).model_info(repo, revision=self.revision, files_metadata=True)
        files = choose({s.rfilename: (s.size or 0) for s in (info.siblings or [])})

        def cached(f: str) -> bool:
            p = try_to_load_from_cache(repo, f, revision=info.sha)
            return isinstance(p, str) and os.path.exists(p)

        todo = {f: n for f, n in files.items() if not cached(f)}
        model_bytes, to_fetch = sum(files.values()), sum(todo.values())
        cfg = {}
        if "config.json" in files:
            with open(hf_hub_download(repo, "config.json", revision=info.sha)) as f:
                cfg = json.load(f)
        ckpt = lora_params(cfg, model_bytes, a["lora_r"], a["targets"]) * a["bytes_per_param"]
        reserve = ckpt * (a["keep_checkpoints"] + 1) + a["margin"]
        free_model, dev_model, mount_model = free_space(hf_home)
        free_job, dev_job, mount_job = free_space(self.job.dir)
        shortages = []
        if dev_model == dev_job:
            if free_model < to_fetch + reserve:
                shortages.append((mount_model, to_fetch + reserve, free_model))
        else:
            if free_model < to_fetch + a["margin"]:
                shortages.append((mount_model, to_fetch + a["margin"], free_model))
            if free_job < reserve:
                shortages.append((mount_job, reserve, free_job))
        if shortages:
            mount, need, free = shortages[0]
            msg = (f"not enough disk for {repo} on {mount}: needs {size(need)} ({size(to_fetch)} of model files "
                   f"to download + {size(reserve)} for checkpoints, {a['keep_checkpoints'] + 1} x {size(ckpt)}, "
                   f"and a {size(a['margin'])} margin), {size(free)} free")  # fmt: skip
            self.say("refused: " + msg)
            hint = (f"free space on {mount} (du -sh {mount}/*; cached models are in {hf_home}/hub), "
                    "or expand the data disk (AutoDL console: 数据盘扩容)")  # fmt: skip
            self.finish(ModelDownload(ok=False, kind="disk", message=msg, hint=hint, model_bytes=to_fetch))
        done = ModelDownload(ok=True, model_bytes=model_bytes, revision=info.sha or "")
        if not todo:
            self.say(f"{repo}: all {len(files)} files already in {hf_home} ({size(model_bytes)})")
            done.path = snapshot_download(
                repo, revision=info.sha, allow_patterns=sorted(files), local_files_only=True
            )
            done.cached = True
            self.finish(done)
        self.say(f"{repo}: {len(todo)} of {len(files)} files to download, {size(to_fetch)} "
                 f"({size(free_model)} free on {mount_model})")  # fmt: skip
        blobs = os.path.join(hf_home, "hub", "models--" + repo.replace("/", "--"), "blobs")
        stop = threading.Event()
        threading.Thread(target=self._progress, args=(blobs, to_fetch, stop), daemon=True).start()
        t0 = time.monotonic()
        done.path = snapshot_download(repo, revision=info.sha, allow_patterns=sorted(files), max_workers=8)
        stop.set()
        done.seconds, done.bytes = time.monotonic() - t0, to_fetch
        self.say(f"{repo}: downloaded {size(to_fetch)} in {done.seconds:.0f} s into {done.path}")
        self.finish(done)

    def _progress(self, blobs: str, to_fetch: int, stop: threading.Event) -> None:
        def on_disk() -> int:
            try:
                return sum(e.stat().st_size for e in os.scandir(blobs) if e.is_file())
            except OSError:
                return 0

        start_bytes, t0, last = on_disk(), time.monotonic(), -1
        while not stop.wait(self.a["every"]):
            done = min(max(on_disk() - start_bytes, 0), to_fetch)
            if done == last:
                continue
            last, rate = done, done / max(time.monotonic() - t0, 1e-6)
            eta = f", about {int((to_fetch - done) / rate)} s left" if rate > 0 else ""
            self.say(f"{self.repo}: {size(done)} of {size(to_fetch)} ({100 * done / max(to_fetch, 1):.0f}%), "
                     f"{rate / 1e6:.1f} MB/s{eta}")  # fmt: skip


def main(argv: list[str]) -> NoReturn:
    args = json.loads(argv[0])
    job = JobPaths(args["job_dir"])
    log = open(job.log, "a", buffering=1)  # noqa: SIM115 (stdout and stderr for the whole run)
    os.dup2(log.fileno(), 1)
    os.dup2(log.fileno(), 2)
    # HF_HOME moved to the data disk: keep a token saved by `huggingface-cli login` under the default home
    default_token = os.path.expanduser("~/.cache/huggingface/token")
    hf_home = os.environ["HF_HOME"]
    if (
        not os.environ.get("HF_TOKEN")
        and not os.path.exists(os.path.join(hf_home, "token"))
        and os.path.exists(default_token)
    ):
        os.environ["HF_TOKEN_PATH"] = default_token
    Download(args).run()


if __name__ == "__main__":
    main(sys.argv[1:])
