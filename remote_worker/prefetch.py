"""The model download before launch: `python -m remote_worker.prefetch ARGS_JSON`.

client.remote.prefetch launches it detached in the job's `prefetch/` folder, with HF_HOME on the data disk.
Before anything is downloaded it compares the free space with the model's size plus room for
checkpoints, and refuses with the numbers when it does not fit. Its progress goes to the job's
events.jsonl (`phase` events) and worker.log; what happened goes to `prefetch/result.json`
(jobs.protocol.ModelDownload), which the client reads. Exit 0 when the model is there, 3 when not.

Where from is `model.source` (jobs.modelsource): ModelScope's snapshot_download into MODELSCOPE_CACHE
for the orgs it mirrors, else (or when ModelScope does not have it, under "auto") huggingface_hub's
into HF_HOME, from HF_ENDPOINT (AutoDL's mirror by default on AutoDL without its proxy), with Xet off.
The result names the folder the model landed in; the worker loads from it (`downloaded_model`).

Standard library, huggingface_hub or modelscope (imported once the log is set up) and jobs only.
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
from jobs.modelsource import HF, MODELSCOPE, candidates
from jobs.protocol import ModelDownload, ProtocolError, dump_model, read_model

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
    exc: BaseException, repo: str, revision: str | None, endpoint: str, hf_home: str, hub: str = HF
) -> tuple[str, str, str]:
    """(kind, message, hint) of a failed download."""
    chain = _causes(exc)
    names = {c.__name__ for e in chain for c in type(e).__mro__}
    text = str(exc).strip().splitlines()[0][:300] if str(exc).strip() else type(exc).__name__
    if hub == MODELSCOPE and names & {"ModuleNotFoundError", "ImportError"}:
        return (
            "missing",
            "the modelscope library is not installed on the instance",
            (
                'set instance.install_deps = true (set-up installs it), pip install modelscope there, or model.source = "hf"'
            ),
        )
    if "GatedRepoError" in names:
        return (
            "gated",
            f"{repo} is gated on {endpoint}",
            "accept its license on the model page, then set HF_TOKEN on the instance (or huggingface-cli login there)",
        )
    if (
        "RepositoryNotFoundError" in names
        or "NotExistError" in names
        or (hub == MODELSCOPE and "404" in text)
    ):
        return (
            "not_found",
            f"no model {repo} on {endpoint}",
            "check model.name_or_path (org/name); a private model needs HF_TOKEN on the instance"
            if hub == HF
            else 'check model.name_or_path (its id on modelscope.cn), or set model.source = "hf"',
        )
    if "RevisionNotFoundError" in names:
        return "not_found", f"{repo} has no revision {revision}", "check model.revision"
    if any(isinstance(e, OSError) and e.errno == errno.ENOSPC for e in chain):
        return "disk", f"the disk filled up: {text}", f"free space on the data disk (df -h {hf_home})"
    if names & NETWORK_ERRORS:
        if hub == MODELSCOPE:
            hint = f'{endpoint} is not reachable from the instance: set model.source = "hf" (a Hugging Face mirror)'
        elif "huggingface.co" in endpoint:
            hint = f'huggingface.co is not reachable from the instance: set instance.hf_endpoint = "{autodl.HF_MIRROR}", or instance.network_turbo = true on AutoDL'
        else:
            hint = f"{endpoint} is not reachable from the instance: check instance.hf_endpoint (autodl-run doctor tests it), or try network_turbo = true"
        return "network", f"cannot download from {endpoint}: {text}", hint
    return (
        "error",
        f"{type(exc).__name__}: {text}",
        "see the job's log (autodl-run tail JOB --raw) for the traceback",
    )


# what makes "auto" try the next hub instead of failing
FALL_BACK_ON = ("not_found", "network", "missing")


class HfHub:
    """A Hugging Face endpoint (huggingface.co or a mirror: HF_ENDPOINT), into HF_HOME."""

    hub = HF

    def __init__(self, repo: str, revision: str | None, hf_home: str) -> None:
        from huggingface_hub import HfApi

        self.repo, self.revision, self.hf_home = repo, revision, hf_home
        self.endpoint = (os.environ.get("HF_ENDPOINT") or "https://huggingface.co").rstrip("/")
        self.api = HfApi(endpoint=self.endpoint)
        self.sha = revision or ""
        self.progress_dir = os.path.join(hf_home, "hub", "models--" + repo.replace("/", "--"), "blobs")

    def files(self) -> dict[str, int]:
        info = self.api.model_info(self.repo, revision=self.revision, files_metadata=True)
        self.sha = info.sha or self.sha
        return {s.rfilename: (s.size or 0) for s in (info.siblings or [])}

    def present(self, files: dict[str, int]) -> set[str]:
        from huggingface_hub import try_to_load_from_cache

        def cached(f: str) -> bool:
            p = try_to_load_from_cache(self.repo, f, revision=self.sha)
            return isinstance(p, str) and os.path.exists(p)

        return {f for f in files if cached(f)}

    def config(self) -> dict:
        from huggingface_hub import hf_hub_download

        with open(hf_hub_download(self.repo, "config.json", revision=self.sha)) as f:
            return json.load(f)

    def fetch(self, files: dict[str, int], local_only: bool = False) -> str:
        from huggingface_hub import snapshot_download

        kw = {"local_files_only": True} if local_only else {"max_workers": 8}
        return snapshot_download(self.repo, revision=self.sha, allow_patterns=sorted(files), **kw)


class ModelScopeHub:
    """ModelScope (modelscope.cn, or MODELSCOPE_ENDPOINT), into MODELSCOPE_CACHE on the data disk."""

    hub = MODELSCOPE

    def __init__(self, repo: str, revision: str | None, hf_home: str) -> None:
        import modelscope  # noqa: F401 (an instance without it falls back, under "auto")

        self.repo, self.revision = repo, revision
        self.cache = os.environ.get("MODELSCOPE_CACHE") or None
        domain = os.environ.get("MODELSCOPE_DOMAIN", "")
        self.endpoint = (
            os.environ.get("MODELSCOPE_ENDPOINT")
            or (domain if "://" in domain else "https://" + (domain or "www.modelscope.cn"))
        ).rstrip("/")
        self.sha = revision or "master"
        self.progress_dir = self.cache or os.path.expanduser("~/.cache/modelscope")

    def files(self) -> dict[str, int]:
        from modelscope.hub.api import HubApi

        listing = HubApi().get_model_files(self.repo, revision=self.sha, recursive=True)
        return {
            f["Path"]: int(f.get("Size") or 0) for f in listing if f.get("Type") != "tree" and f.get("Path")
        }

    def _snapshot(self, files: list[str], **kw) -> str:
        from modelscope import snapshot_download

        return snapshot_download(
            self.repo, revision=self.sha, cache_dir=self.cache, allow_patterns=files, **kw
        )

    def present(self, files: dict[str, int]) -> set[str]:
        try:
            path = self._snapshot(sorted(files), local_files_only=True)
        except Exception:  # nothing cached yet: the library says so in its own ways
            return set()
        return {
            f
            for f, n in files.items()
            if os.path.isfile(p := os.path.join(path, f)) and os.path.getsize(p) == n
        }

    def config(self) -> dict:
        with open(os.path.join(self._snapshot(["config.json"]), "config.json")) as f:
            return json.load(f)

    def fetch(self, files: dict[str, int], local_only: bool = False) -> str:
        return self._snapshot(
            sorted(files), **({"local_files_only": True} if local_only else {"max_workers": 8})
        )


HUBS: dict[str, type[HfHub] | type[ModelScopeHub]] = {HF: HfHub, MODELSCOPE: ModelScopeHub}


def _walk_size(folder: str) -> int:
    total = 0
    for dirpath, _dirs, names in os.walk(folder):
        for n in names:
            try:
                total += os.lstat(os.path.join(dirpath, n)).st_size
            except OSError:
                pass
    return total


class Download:
    """One download, its events and its result file."""

    def __init__(self, args: dict) -> None:
        self.a = args
        self.repo, self.revision = args["repo"], args.get("revision")
        self.job = JobPaths(args["job_dir"])
        self.hf_home = os.environ["HF_HOME"]
        self.events = EventWriter(self.job.events)

    def say(self, msg: str, **progress: float) -> None:
        """A line of the download's story; with bytes_done/bytes_total/bytes_per_s, a progress event (a bar)."""
        self.events.emit(Phase(phase="download", message=msg, **progress))
        print("[download] " + msg, flush=True)

    def bytes(self, repo: str, done: int, total: int, seconds: float) -> None:
        rate = done / max(seconds, 1e-6)
        eta = f", about {int((total - done) / rate)} s left" if rate > 0 and done < total else ""
        self.say(f"{repo}: {size(done)} of {size(total)} ({100 * done / max(total, 1):.0f}%), "
                 f"{rate / 1e6:.1f} MB/s{eta}", bytes_done=done, bytes_total=total, bytes_per_s=rate)  # fmt: skip

    def finish(self, result: ModelDownload) -> NoReturn:
        path = self.job.prefetch_result
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path + ".tmp", "w") as f:
            f.write(dump_model(result))
        os.replace(path + ".tmp", path)
        self.events.close()
        sys.exit(0 if result.ok else 3)

    def run(self) -> NoReturn:
        tries = candidates(self.a.get("source", "auto"), self.repo, self.revision)
        for i, (hub, repo) in enumerate(tries):
            endpoint = hub
            try:
                source = HUBS[hub](
                    repo, self.revision if hub == HF or len(tries) == 1 else None, self.hf_home
                )
                endpoint = source.endpoint
                self._download(source)
            except Exception as exc:
                traceback.print_exc()
                kind, message, hint = classify(exc, repo, self.revision, endpoint, self.hf_home, hub)
                if i + 1 < len(tries) and kind in FALL_BACK_ON:
                    self.say(f"{message}; trying {tries[i + 1][0]} next")
                    continue
                self.say("failed: " + message)
                self.finish(ModelDownload(ok=False, kind=kind, message=message, hint=hint, source=hub, repo=repo,
                                          endpoint=endpoint))  # fmt: skip
        raise AssertionError("unreachable: every try finishes")

    def _download(self, src: HfHub | ModelScopeHub) -> NoReturn:
        a, repo, hf_home = self.a, src.repo, self.hf_home
        self.say(f"{repo}: asking {src.endpoint} for its files")
        files = choose(src.files())
        have = src.present(files)
        todo = {f: n for f, n in files.items() if f not in have}
        model_bytes, to_fetch = sum(files.values()), sum(todo.values())
        cfg = src.config() if "config.json" in files else {}
        ckpt = lora_params(cfg, model_bytes, a["lora_r"], a["targets"]) * a["bytes_per_param"]
        reserve = ckpt * (a["keep_checkpoints"] + 1) + a["margin"]
        cache = src.progress_dir
        free_model, dev_model, mount_model = free_space(cache)
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
            self.finish(ModelDownload(ok=False, kind="disk", message=msg, hint=hint, model_bytes=to_fetch,
                                      source=src.hub, repo=repo, endpoint=src.endpoint))  # fmt: skip
        done = ModelDownload(
            ok=True, model_bytes=model_bytes, source=src.hub, repo=repo, endpoint=src.endpoint
        )
        if not todo:
            self.say(f"{repo}: all {len(files)} files already on the instance ({size(model_bytes)})")
            done.path = src.fetch(files, local_only=True)
            done.cached, done.revision = True, src.sha
            self.finish(done)
        self.say(f"{repo}: {len(todo)} of {len(files)} files to download from {src.endpoint}, {size(to_fetch)} "
                 f"({size(free_model)} free on {mount_model})")  # fmt: skip
        stop = threading.Event()
        t0 = time.monotonic()
        self.bytes(repo, 0, to_fetch, 0.0)
        progress = threading.Thread(target=self._progress, args=(repo, cache, to_fetch, stop, t0), daemon=True)
        progress.start()
        done.path = src.fetch(files)
        stop.set()
        progress.join(timeout=30)  # its last event before the one that ends the bar
        done.seconds, done.bytes, done.revision = time.monotonic() - t0, to_fetch, src.sha
        self.bytes(repo, to_fetch, to_fetch, done.seconds)
        self.say(f"{repo}: downloaded {size(to_fetch)} in {done.seconds:.0f} s into {done.path}")
        self.finish(done)

    def _progress(self, repo: str, folder: str, to_fetch: int, stop: threading.Event, t0: float) -> None:
        start_bytes, last = _walk_size(folder), 0
        while not stop.wait(self.a["every"]):
            done = min(max(_walk_size(folder) - start_bytes, 0), to_fetch)
            if done != last and not stop.is_set():
                last = done
                self.bytes(repo, done, to_fetch, time.monotonic() - t0)


def downloaded_model(job_dir: str) -> str | None:
    """Where this job's model download put the model (its result file), when it is there; else None.

    The worker loads from this folder, whichever hub it came from, without asking a hub again."""
    try:
        with open(JobPaths(job_dir).prefetch_result) as f:
            result = read_model(ModelDownload, f.read(), "prefetch result")
    except (OSError, ProtocolError):
        return None
    return result.path if result.ok and result.path and os.path.isdir(result.path) else None


def on_autodl() -> bool:
    return any(os.path.exists(p) for p in autodl.MARKER_FILES) or any(
        v in os.environ for v in autodl.ENV_VARS
    )


def hf_endpoint(environ: dict[str, str], network_turbo: bool, autodl_here: bool) -> str | None:
    """HF_ENDPOINT for the download: the configured one; on AutoDL without its proxy, the mirror that answers there."""
    if environ.get("HF_ENDPOINT"):
        return environ["HF_ENDPOINT"]
    return autodl.HF_MIRROR if autodl_here and not network_turbo else None


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
    # Xet transfers bypass HF_ENDPOINT (mirrors serve plain files only); both read when huggingface_hub is imported
    os.environ.setdefault("HF_HUB_DISABLE_XET", "1")
    endpoint = hf_endpoint(dict(os.environ), bool(args.get("network_turbo")), on_autodl())
    if endpoint:
        os.environ["HF_ENDPOINT"] = endpoint
    Download(args).run()


if __name__ == "__main__":
    main(sys.argv[1:])
