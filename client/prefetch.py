"""The model download before launch.

`prefetch_model` (the last step before launch) downloads a hub model into HF_HOME on the data disk
(`{remote_root}/hf`, where the worker looks), detached on the instance so a dropped laptop
connection does not stop it. Before anything is downloaded it compares the free space with the
model's size plus room for checkpoints, and refuses with the numbers when it does not fit. Its
progress goes to the job's events.jsonl (`phase` events: `tail` shows them) and worker.log, and
a failure is reported as a download failure, before any training starts. A model that is a
folder on the instance is not downloaded.
"""

from __future__ import annotations

import json
import posixpath
import re
import time

from client import launcher
from client.errors import ConnectError, RemoteEnvError
from client.follow import poll_once
from client.setup import Log, remote_root, turbo_prefix
from client.transport.base import Transport
from client.transport.paths import shell_path
from jobs import events as ev
from jobs.layout import JobPaths, RemoteLayout
from jobs.spec import JobSpec

_PATHLIKE = ("/", "./", "../", "~")


def is_hub_id(name: str) -> bool:
    return not name.startswith(_PATHLIKE) and re.fullmatch(r"[\w.-]+(/[\w.-]+)?", name) is not None


KEEP_CHECKPOINTS = 2  # remote_worker.checkpoints.KEEP: the worker keeps this many; one more is being written at times
BYTES_PER_LORA_PARAM = 16  # a checkpoint: the adapter (4) + AdamW's two moments (8) + slack
MARGIN_BYTES = 1 << 30  # logs, tokenized data, the final adapter's copy

# Runs on the instance, detached, in the job folder's prefetch/ (see prefetch_model).
_PREFETCH_PY = r"""# autodl-run: model download before launch (client/prefetch.py)
import errno, json, os, sys, threading, time, traceback
A = json.loads(sys.argv[1])
repo, job_dir, hf_home = A["repo"], A["job_dir"], os.environ["HF_HOME"]
endpoint = (os.environ.get("HF_ENDPOINT") or "https://huggingface.co").rstrip("/")
log = open(os.path.join(job_dir, "worker.log"), "a", buffering=1)
os.dup2(log.fileno(), 1)
os.dup2(log.fileno(), 2)
# HF_HOME moved to the data disk: keep a token saved by `huggingface-cli login` under the default home
default_token = os.path.expanduser("~/.cache/huggingface/token")
if not os.environ.get("HF_TOKEN") and not os.path.exists(os.path.join(hf_home, "token")) and os.path.exists(default_token):
    os.environ["HF_TOKEN_PATH"] = default_token
from jobs.events import EventWriter, Phase
events = EventWriter(os.path.join(job_dir, "events.jsonl"))


def size(n):
    return f"{n / 1e9:.2f} GB" if n >= 1e8 else f"{n / 1e6:.1f} MB"


def say(msg):
    events.emit(Phase(phase="download", message=msg))
    print("[download] " + msg, flush=True)


def finish(**result):
    tmp = A["result"] + ".tmp"
    with open(tmp, "w") as f:
        json.dump(result, f)
    os.replace(tmp, A["result"])
    events.close()
    sys.exit(0 if result.get("ok") else 3)


def choose(files):
    top = {f: n for f, n in files.items() if "/" not in f}
    small = ((".json", ".txt", ".model", ".tiktoken", ".py", ".jinja", ".vocab", ".spm"))
    out = {f: n for f, n in top.items() if f.endswith(small) or f.startswith("tokenizer")}
    weights = {f: n for f, n in top.items() if f.endswith(".safetensors")}
    if not weights:
        weights = {f: n for f, n in top.items() if f.endswith(".bin") and f.startswith(("pytorch_model", "model"))}
    return {**out, **weights}


def lora_params(cfg, model_bytes):
    r, targets = A["lora_r"], A["targets"]
    try:
        c = cfg.get("text_config") or cfg
        h, layers, inter = c["hidden_size"], c["num_hidden_layers"], c["intermediate_size"]
        heads = c["num_attention_heads"]
        hd = c.get("head_dim") or h // heads
        kv = (c.get("num_key_value_heads") or heads) * hd
        mods = {"q_proj": (h, heads * hd), "k_proj": (h, kv), "v_proj": (h, kv), "o_proj": (heads * hd, h),
                "gate_proj": (h, inter), "up_proj": (h, inter), "down_proj": (inter, h)}
        chosen = mods.values() if targets == "all-linear" else [mods[m] for m in targets if m in mods]
        return layers * r * sum(a + b for a, b in chosen)
    except Exception:
        return int(model_bytes / 2 * 0.005 * r / 16)


def free_space(path):
    while not os.path.exists(path):
        path = os.path.dirname(path) or "/"
    st, dev = os.statvfs(path), os.stat(path).st_dev
    mount = path
    while mount != "/" and os.stat(os.path.dirname(mount)).st_dev == dev:
        mount = os.path.dirname(mount)
    return st.f_bavail * st.f_frsize, dev, mount


def causes(exc):
    seen = []
    while exc is not None and exc not in seen:
        seen.append(exc)
        exc = exc.__cause__ or exc.__context__
    return seen


def classify(exc):
    chain = causes(exc)
    names = {c.__name__ for e in chain for c in type(e).__mro__}
    text = str(exc).strip().splitlines()[0][:300] if str(exc).strip() else type(exc).__name__
    if "GatedRepoError" in names:
        return "gated", f"{repo} is gated on {endpoint}", "accept its license on the model page, then set HF_TOKEN on the instance (or huggingface-cli login there)"
    if "RepositoryNotFoundError" in names:
        return "not_found", f"no model {repo} on {endpoint}", "check model.name_or_path (org/name); a private model needs HF_TOKEN on the instance"
    if "RevisionNotFoundError" in names:
        return "not_found", f"{repo} has no revision {A['revision']}", "check model.revision"
    if any(isinstance(e, OSError) and e.errno == errno.ENOSPC for e in chain):
        return "disk", f"the disk filled up: {text}", f"free space on the data disk (df -h {hf_home})"
    network = {"ConnectError", "ConnectTimeout", "ReadTimeout", "TimeoutException", "NetworkError", "ProxyError",
               "ConnectionError", "Timeout", "LocalEntryNotFoundError", "TimeoutError", "ConnectionRefusedError"}
    if names & network:
        if "huggingface.co" in endpoint:
            hint = 'huggingface.co is not reachable from the instance: set instance.hf_endpoint = "https://hf-mirror.com", or instance.network_turbo = true on AutoDL'
        else:
            hint = f"{endpoint} is not reachable from the instance: check instance.hf_endpoint (autodl-run doctor tests it), or try network_turbo = true"
        return "network", f"cannot download from {endpoint}: {text}", hint
    return "error", f"{type(exc).__name__}: {text}", "see the job's worker.log for the traceback"


try:
    from huggingface_hub import HfApi, hf_hub_download, snapshot_download, try_to_load_from_cache

    say(f"{repo}: asking {endpoint} for its files")
    info = HfApi(endpoint=endpoint).model_info(repo, revision=A["revision"], files_metadata=True)
    files = choose({s.rfilename: (s.size or 0) for s in (info.siblings or [])})

    def cached(f):
        p = try_to_load_from_cache(repo, f, revision=info.sha)
        return isinstance(p, str) and os.path.exists(p)

    todo = {f: n for f, n in files.items() if not cached(f)}
    model_bytes = sum(files.values())
    to_fetch = sum(todo.values())
    cfg = {}
    if "config.json" in files:
        with open(hf_hub_download(repo, "config.json", revision=info.sha)) as f:
            cfg = json.load(f)
    ckpt = lora_params(cfg, model_bytes) * A["bytes_per_param"]
    reserve = ckpt * (A["keep_checkpoints"] + 1) + A["margin"]
    free_model, dev_model, mount_model = free_space(hf_home)
    free_job, dev_job, mount_job = free_space(job_dir)
    shortages = []
    if dev_model == dev_job:
        if free_model < to_fetch + reserve:
            shortages.append((mount_model, to_fetch + reserve, free_model))
    else:
        if free_model < to_fetch + A["margin"]:
            shortages.append((mount_model, to_fetch + A["margin"], free_model))
        if free_job < reserve:
            shortages.append((mount_job, reserve, free_job))
    if shortages:
        mount, need, free = shortages[0]
        msg = (f"not enough disk for {repo} on {mount}: needs {size(need)} ({size(to_fetch)} of model files "
               f"to download + {size(reserve)} for checkpoints, {A['keep_checkpoints'] + 1} x {size(ckpt)}, "
               f"and a {size(A['margin'])} margin), {size(free)} free")
        say("refused: " + msg)
        finish(ok=False, kind="disk", message=msg, needed_bytes=need, free_bytes=free, mount=mount,
               model_bytes=to_fetch, reserve_bytes=reserve,
               hint=f"free space on {mount} (du -sh {mount}/*; cached models are in {hf_home}/hub), "
                    "or expand the data disk (AutoDL console: 数据盘扩容)")
    if not todo:
        say(f"{repo}: all {len(files)} files already in {hf_home} ({size(model_bytes)})")
        path = snapshot_download(repo, revision=info.sha, allow_patterns=sorted(files), local_files_only=True)
        finish(ok=True, path=path, bytes=0, model_bytes=model_bytes, seconds=0.0, cached=True)
    say(f"{repo}: {len(todo)} of {len(files)} files to download, {size(to_fetch)} "
        f"({size(free_model)} free on {mount_model})")
    blobs = os.path.join(hf_home, "hub", "models--" + repo.replace("/", "--"), "blobs")

    def on_disk():
        try:
            return sum(e.stat().st_size for e in os.scandir(blobs) if e.is_file())
        except OSError:
            return 0

    start_bytes, t0, stop = on_disk(), time.monotonic(), threading.Event()

    def progress():
        last = -1
        while not stop.wait(A["every"]):
            done = min(max(on_disk() - start_bytes, 0), to_fetch)
            if done == last:
                continue
            last, rate = done, done / max(time.monotonic() - t0, 1e-6)
            eta = f", about {int((to_fetch - done) / rate)} s left" if rate > 0 else ""
            say(f"{repo}: {size(done)} of {size(to_fetch)} ({100 * done / max(to_fetch, 1):.0f}%), "
                f"{rate / 1e6:.1f} MB/s{eta}")

    threading.Thread(target=progress, daemon=True).start()
    path = snapshot_download(repo, revision=info.sha, allow_patterns=sorted(files), max_workers=8)
    stop.set()
    seconds = time.monotonic() - t0
    say(f"{repo}: downloaded {size(to_fetch)} in {seconds:.0f} s into {path}")
    finish(ok=True, path=path, bytes=to_fetch, model_bytes=model_bytes, seconds=seconds, cached=False)
except Exception as exc:
    traceback.print_exc()
    kind, message, hint = classify(exc)
    say("failed: " + message)
    finish(ok=False, kind=kind, message=message, hint=hint)
"""


def prefetch_model(
    transport: Transport,
    spec: JobSpec,
    paths: JobPaths,
    bundle_dir: str,
    log: Log = print,
    *,
    poll_s: float = 1.0,
    progress_every_s: float = 5.0,
    reconnect_timeout_s: float = 900.0,
) -> dict:
    """Download a hub model into HF_HOME on the instance before the job starts; see the module docstring.

    Returns what happened: {"skipped": reason} or the download's result (path, bytes, seconds).
    Raises RemoteEnvError for a download that failed or would not fit on the disk.
    """
    name = spec.model.name_or_path
    if not is_hub_id(name):
        if name.startswith(("/", "~")) and not transport.run(f"test -e {shell_path(name)}", check=False).ok:
            raise RemoteEnvError(
                f"model folder {name} does not exist on {transport.where}",
                hint="set model.name_or_path to a folder on the instance (e.g. under /root/autodl-tmp) or a hub id",
            )
        return {"skipped": "a folder on the instance"}
    t0 = time.monotonic()
    layout = RemoteLayout(remote_root(spec))
    pdir = JobPaths(posixpath.join(paths.dir, "prefetch"))
    args = {
        "repo": name, "revision": spec.model.revision, "job_dir": paths.dir,
        "result": posixpath.join(pdir.dir, "result.json"), "lora_r": spec.lora.r,
        "targets": spec.lora.target_modules, "keep_checkpoints": KEEP_CHECKPOINTS,
        "bytes_per_param": BYTES_PER_LORA_PARAM, "margin": MARGIN_BYTES, "every": progress_every_s,
    }  # fmt: skip
    argv = [spec.instance.python, "-c", _PREFETCH_PY, json.dumps(args)]
    if spec.instance.network_turbo:  # the proxy for this download only; the worker never sees it
        argv = ["bash", "-c", turbo_prefix() + 'exec "$@"', "network_turbo", *argv]
    env = {
        "HF_HOME": layout.hf_home(),  # on the data disk, where the worker looks
        "PYTHONPATH": bundle_dir,  # jobs.events, to write the phase events
        "PYTHONUNBUFFERED": "1",
        "HF_HUB_DISABLE_PROGRESS_BARS": "1",  # our own progress, as events
    }
    if spec.instance.hf_endpoint:
        env["HF_ENDPOINT"] = spec.instance.hf_endpoint
    log(f"  downloading {name} on the instance into {layout.hf_home()}")
    launcher.launch(
        transport, pdir, argv, socket=spec.instance.tmux_socket,
        session=posixpath.basename(paths.dir) + "-prefetch", env=env, prefer_tmux=False,
    )  # fmt: skip
    _follow(transport, pdir, log, poll_s, reconnect_timeout_s)
    res = transport.run(["cat", posixpath.join(pdir.dir, "result.json")], check=False)
    if not res.ok:
        tail = transport.run(["tail", "-n", "15", paths.log], check=False).stdout
        raise RemoteEnvError(
            f"downloading {name} on {transport.where} stopped without a result:\n"
            + "\n".join("  | " + ln for ln in tail.strip().splitlines()),
            hint=f"see {paths.log} there",
        )
    result = json.loads(next(ln for ln in reversed(res.stdout.splitlines()) if ln.startswith("{")))
    if not result.get("ok"):
        what = "" if result.get("kind") == "disk" else f"downloading {name} failed: "
        raise RemoteEnvError(what + result.get("message", "unknown error"), hint=result.get("hint", ""))
    result["wall_s"] = time.monotonic() - t0
    return result


def _follow(
    transport: Transport, pdir: JobPaths, log: Log, poll_s: float, reconnect_timeout_s: float
) -> None:
    """Print the download's phase events until it ends; ride out a dropped connection."""
    offset, down_since, wait = 0, None, poll_s
    while True:
        try:
            poll, offset = poll_once(transport, pdir, "../events.jsonl", offset)
            down_since, wait = None, poll_s
        except ConnectError as exc:  # the link dropped: the download goes on there
            now = time.monotonic()
            down_since = down_since or now
            if now - down_since > reconnect_timeout_s:
                raise
            log(
                f"  connection lost ({exc.message.splitlines()[0]}); the download goes on, retrying in {wait:.0f}s"
            )
            time.sleep(wait)
            wait = min(wait * 2, 30)
            continue
        for line in poll.lines:
            try:
                event = ev.parse(line)
            except ValueError:
                continue
            if isinstance(event, ev.Phase) and event.phase == "download":
                log(f"  {event.message}")
        if poll.state.finished and not poll.more:
            return
        time.sleep(poll_s)
