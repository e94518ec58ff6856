"""The model download before launch.

`prefetch_model` (the last step before launch) downloads a hub model onto the data disk (HF_HOME or
MODELSCOPE_CACHE, by `model.source`; the result names the folder the worker loads from), detached on the instance so a dropped laptop
connection does not stop it: it launches `remote_worker.prefetch` from the worker bundle (which
checks the disk space first), follows its progress (`phase` events in the job's events.jsonl, `tail`
shows them; those with byte counts become a client.activity bar: bytes and rate in a terminal, one
summary line when piped) and reads its result (jobs.protocol.ModelDownload). A failure is reported as a
download failure, before any training starts. A model that is a folder on the instance is not
downloaded.
"""

from __future__ import annotations

import json
import posixpath
import re
import time
from dataclasses import dataclass

from client import activity
from client.errors import RemoteEnvError
from client.remote import launcher
from client.remote.follow import Follower, Reconnecting
from client.remote.setup import Log, python_of, quiet, remote_root, turbo_prefix
from client.transport.base import Transport, sections
from client.transport.paths import shell_path
from client.views.text import shown
from jobs import autodl
from jobs import events as ev
from jobs.layout import JobPaths, RemoteLayout
from jobs.protocol import ModelDownload, ProtocolError, read_model
from jobs.spec import JobSpec

_PATHLIKE = ("/", "./", "../", "~")


def is_hub_id(name: str) -> bool:
    return not name.startswith(_PATHLIKE) and re.fullmatch(r"[\w.-]+(/[\w.-]+)?", name) is not None


@dataclass(frozen=True)
class Prefetched:
    """What `prefetch_model` did: downloaded (`download`, the instance's own result) or `skipped`, and why."""

    download: ModelDownload | None = None
    skipped: str = ""  # why nothing was downloaded
    wall_s: float = 0.0  # the whole step, as the laptop saw it


# remote_worker.checkpoints.KEEP: the worker keeps this many; one more is being written at times
KEEP_CHECKPOINTS = 2
BYTES_PER_LORA_PARAM = 16  # a checkpoint: the adapter (4) + AdamW's two moments (8) + slack
MARGIN_BYTES = 1 << 30  # logs, tokenized data, the final adapter's copy


def prefetch_model(
    transport: Transport,
    spec: JobSpec,
    paths: JobPaths,
    bundle_dir: str,
    log: Log = quiet,
    *,
    poll_s: float = 1.0,
    progress_every_s: float = 5.0,
    reconnect_timeout_s: float = 900.0,
) -> Prefetched:
    """Download a hub model into HF_HOME on the instance before the job starts; see the module docstring.

    Returns what happened: skipped (and why) or the download's result (path, bytes, seconds).
    Raises RemoteEnvError for a download that failed or would not fit on the disk.
    """
    name = spec.model.name_or_path
    if not is_hub_id(name):
        if name.startswith(("/", "~")) and not transport.run(f"test -e {shell_path(name)}", check=False).ok:
            raise RemoteEnvError(
                f"model folder {name} does not exist on {transport.where}",
                hint=f"set model.name_or_path to a folder on the instance (e.g. under {autodl.DATA_DISK}) or a hub id",
            )
        return Prefetched(skipped="a folder on the instance")
    t0 = time.monotonic()
    layout = RemoteLayout(remote_root(spec))
    pdir = paths.prefetch
    args = {
        "repo": name, "revision": spec.model.revision, "job_dir": paths.dir, "lora_r": spec.lora.r,
        "targets": spec.lora.target_modules, "keep_checkpoints": KEEP_CHECKPOINTS,
        "bytes_per_param": BYTES_PER_LORA_PARAM, "margin": MARGIN_BYTES, "every": progress_every_s,
        "source": spec.model.source, "network_turbo": spec.instance.network_turbo,
    }  # fmt: skip
    argv = [python_of(spec.instance), "-m", "remote_worker.prefetch", json.dumps(args)]
    if spec.instance.network_turbo:  # the proxy for this download only; the worker never sees it
        argv = ["bash", "-c", turbo_prefix() + 'exec "$@"', "network_turbo", *argv]
    env = {
        "HF_HOME": layout.hf_home(),  # on the data disk, where the worker looks
        "PYTHONPATH": bundle_dir,  # remote_worker.prefetch and jobs
        "PYTHONUNBUFFERED": "1",
        "HF_HUB_DISABLE_PROGRESS_BARS": "1",  # our own progress, as events
        "HF_HUB_DISABLE_XET": "1",  # Xet transfers do not go through mirrors
        "TQDM_DISABLE": "1",  # modelscope's bars (\r by the thousand in worker.log)
        "MODELSCOPE_CACHE": layout.modelscope_cache(),  # on the data disk too
    }
    if spec.instance.hf_endpoint:
        env["HF_ENDPOINT"] = spec.instance.hf_endpoint
    log(f"  downloading {name} on the instance (model.source = {spec.model.source})")
    launcher.launch(
        transport, pdir, argv, socket=spec.instance.tmux_socket,
        session=posixpath.basename(paths.dir) + "-prefetch", env=env, prefer_tmux=False,
    )  # fmt: skip
    bar = activity.Meter(f"download {name}", "bytes") if activity.watched() else None
    try:
        _follow(transport, pdir, log, poll_s, reconnect_timeout_s, bar)
        result = read_result(transport, paths, name)
    except BaseException:
        if bar is not None:
            bar.end(ok=False)
        raise
    if bar is not None:
        bar.end(ok=result.ok)
    if not result.ok:
        what = "" if result.kind == "disk" else f"downloading {name} failed: "
        raise RemoteEnvError(what + (result.message or "unknown error"), hint=result.hint)
    return Prefetched(download=result, wall_s=time.monotonic() - t0)


def read_result(transport: Transport, paths: JobPaths, name: str) -> ModelDownload:
    """The download's result file; RemoteEnvError when it is missing or malformed."""
    res = transport.run(f"echo @@result; cat {shell_path(paths.prefetch_result)}", check=False)
    text = "\n".join(sections(res.stdout).get("result", []))
    if not res.ok or not text.strip():
        tail = transport.run(["tail", "-n", "15", paths.log], check=False).stdout
        raise RemoteEnvError(
            f"downloading {name} on {transport.where} stopped without a result:\n"
            + "\n".join("  | " + ln for ln in tail.strip().splitlines()),
            hint=f"see {paths.log} there",
        )
    try:
        return read_model(ModelDownload, text, f"{paths.prefetch_result} on {transport.where}")
    except ProtocolError as exc:
        raise RemoteEnvError(
            f"the model download's result is malformed: {exc}",
            hint=f"see {paths.log} there; the bundle on the instance may be from another autodl-run version",
        ) from None


def _follow(
    transport: Transport, pdir: JobPaths, log: Log, poll_s: float, reconnect_timeout_s: float,
    bar: activity.Meter | None = None,
) -> None:
    """Print the download's phase events until it ends; ride out a dropped connection (client.remote.follow).
    Its byte counts go to `bar` (a bar in a terminal, the summary line piped), or as lines when none watches."""
    events = posixpath.relpath(JobPaths(posixpath.dirname(pdir.dir)).events, pdir.dir)
    follower = Follower(lambda: transport, pdir, events, poll_s=poll_s, reconnect_timeout_s=reconnect_timeout_s)
    for item in follower:
        if isinstance(item, Reconnecting):
            log(f"  connection lost ({shown(item.error)}); the download goes on, retrying in {item.wait_s:.0f}s")
        elif isinstance(item, list):
            for line in item:
                event = ev.parse_or_none(line)
                if not isinstance(event, ev.Phase) or event.phase != "download":
                    continue
                if bar is not None and event.bytes_total is not None:
                    bar.update(event.bytes_done, total=event.bytes_total or None, rate=event.bytes_per_s)
                else:
                    log(f"  {shown(event.message)}")
