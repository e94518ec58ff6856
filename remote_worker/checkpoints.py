"""Checkpoints on the instance: complete or absent, verified before a resume, and a full disk handled.

The Trainer writes `checkpoint-N/`; `finalize` turns it into `step-N/` (jobs.layout):
    1. `adapter/` gets hard links to the adapter's files (no extra space) and its own manifest,
       so the client can pull the adapter alone;
    2. `manifest.json` lists every file with its sha256;
    3. the folder is renamed to `step-N`: a `step-N` folder exists only once it is complete;
    4. the oldest beyond KEEP are removed, only after the new one is in place.
A crash at any point leaves a stray `checkpoint-N` (removed on the next start) and the older,
complete `step-*` folders untouched.

More than one process: rank 0 alone finalizes (remote_worker.callbacks; the other ranks wrote
their RNG state into `checkpoint-N` before the barrier). `batch_shape.json` also records the
number of processes and the micro-batches each takes per step, so a resume onto another number of
GPUs keeps the global batch, and with it the data order (remote_worker.data), or says why it cannot.

Standard library only (no torch).
"""

from __future__ import annotations

import errno
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

from jobs import packing
from jobs.layout import BATCH_SHAPE, CHECKPOINT_ADAPTER, MANIFEST, JobPaths, checkpoint_name, checkpoint_step
from jobs.manifest import ManifestError, verify_manifest, write_manifest
from jobs.protocol import BatchShape, ProtocolError, dump_model, read_model
from remote_worker import WorkerError

KEEP = 2
RESERVE_BYTES = 256 * 1024  # ballast freed when the disk fills: room to report it and stop cleanly
# What the Trainer writes next to the adapter to resume; everything else goes into adapter/.
TRAINING_STATE = ("optimizer.pt", "optimizer.bin", "scheduler.pt", "scaler.pt", "trainer_state.json",
                  "training_args.bin", BATCH_SHAPE)  # optimizer.bin: FSDP's  # fmt: skip


class DiskFull(WorkerError):
    """The disk holding the job folder is full."""


class ResumeMismatch(WorkerError):
    """A checkpoint's global batch cannot be split over this number of processes."""


@dataclass(frozen=True)
class Finalized:
    step: int
    path: Path
    manifest_sha256: str
    adapter_path: Path
    adapter_manifest_sha256: str
    bytes: int
    adapter_bytes: int


def write_batch_shape(
    checkpoint: Path, micro_batch_tokens: int, checkpointing: bool, world_size: int = 1, grad_accum: int = 0,
    layers: int | None = None, packer: str = packing.DEFAULT,
) -> None:
    """`layers`: with checkpointing, how many decoder layers recompute (partial checkpointing; None: all).
    `packer`: jobs.packing's packer of the run's micro-batches (a resume packs the same way)."""
    shape = BatchShape(micro_batch_tokens=micro_batch_tokens, gradient_checkpointing=checkpointing,
                       world_size=world_size, grad_accum=grad_accum,
                       checkpointed_layers=layers if checkpointing else None, packer=packer)  # fmt: skip
    (checkpoint / BATCH_SHAPE).write_text(dump_model(shape))


def read_saved_shape(checkpoint: Path) -> BatchShape | None:
    """Everything batch_shape.json holds; None for checkpoints from before it was saved."""
    try:
        return read_model(BatchShape, (checkpoint / BATCH_SHAPE).read_bytes(), str(checkpoint / BATCH_SHAPE))
    except (OSError, ProtocolError):
        return None


def saved_packer(checkpoint: Path | None) -> str:
    """The packer to resume from `checkpoint` with (its run's; next-fit before it was saved), or the
    default for a fresh run (None)."""
    if checkpoint is None:
        return packing.DEFAULT
    saved = read_saved_shape(checkpoint)
    return saved.packer if saved else "next_fit"


def resumed_grad_accum(checkpoint: Path, saved: BatchShape | None, single_accum: int, world_size: int) -> int:
    """The micro-batches per rank and step that keep the checkpoint's global batch on `world_size`
    processes. `single_accum`: what one process used before the world size was saved."""
    saved_world = saved.world_size if saved and saved.grad_accum else 1
    saved_accum = saved.grad_accum if saved and saved.grad_accum else single_accum
    total = saved_world * saved_accum
    if total % world_size:
        fits = [n for n in range(1, total + 1) if total % n == 0]
        raise ResumeMismatch(
            f"{checkpoint.name} was trained with {total} micro-batches a step ({saved_world} process(es) x "
            f"{saved_accum}); {world_size} processes cannot split that evenly, so the data order and the "
            "learning-rate schedule could not continue",
            hint=f"resume with train.gpus = one of {fits}",
        )
    return total // world_size


def read_batch_shape(checkpoint: Path) -> tuple[int, bool] | None:
    """(micro_batch_tokens, gradient checkpointing) saved with a checkpoint; None for older checkpoints."""
    saved = read_saved_shape(checkpoint)
    return None if saved is None else (saved.micro_batch_tokens, saved.gradient_checkpointing)


def step_of(path: Path) -> int:
    step = checkpoint_step(path.name)
    if step is None:
        raise ValueError(f"{path} is not a checkpoint folder")
    return step


def complete(root: Path) -> list[Path]:
    """The `step-N` folders under `root`, oldest first."""
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and checkpoint_step(p.name) is not None]
    return sorted(found, key=step_of)


def _is_training_state(name: str) -> bool:
    return name in TRAINING_STATE or (name.startswith("rng_state") and name.endswith(".pth"))


def finalize(written: Path, step: int) -> Finalized:
    """Give the Trainer's `checkpoint-N` its adapter folder and manifests, then rename it to `step-N`."""
    make_portable(written)
    adapter = written / CHECKPOINT_ADAPTER
    shutil.rmtree(adapter, ignore_errors=True)
    adapter.mkdir()
    for f in sorted(written.iterdir()):
        if f.is_file() and f.name != MANIFEST and not _is_training_state(f.name):
            try:
                os.link(f, adapter / f.name)
            except OSError:  # a filesystem without hard links
                shutil.copy2(f, adapter / f.name)
    adapter_sha = write_manifest(adapter)
    sha = write_manifest(written)
    _fsync_dir(written)
    final = written.with_name(checkpoint_name(step))
    old = None
    if final.exists():  # saved again at the same step (a resumed run stopped at once)
        old = final.with_name(f".{final.name}.old")
        shutil.rmtree(old, ignore_errors=True)
        final.rename(old)
    written.rename(final)
    _fsync_dir(final.parent)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    top = [f for f in final.iterdir() if f.is_file()]
    size = sum(f.stat().st_size for f in top)
    adapter_size = sum(f.stat().st_size for f in (final / CHECKPOINT_ADAPTER).iterdir() if f.is_file())
    return Finalized(step, final, sha, final / CHECKPOINT_ADAPTER, adapter_sha, size, adapter_size)


def rotate(root: Path, keep: int = KEEP) -> None:
    for p in complete(root)[:-keep]:
        shutil.rmtree(p, ignore_errors=True)


def remove_partials(root: Path) -> list[str]:
    """Remove what an interrupted save left: `checkpoint-N` (never finalized) and `.step-N.old`."""
    removed = []
    if root.is_dir():
        for p in root.iterdir():
            if p.is_dir() and (p.name.startswith("checkpoint-") or p.name.startswith(".step-")):
                shutil.rmtree(p, ignore_errors=True)
                removed.append(p.name)
    return removed


def latest_verified(root: Path, log=lambda msg: None) -> Path | None:
    """The newest `step-N` whose files match its manifest; a damaged one is reported and skipped."""
    for path in reversed(complete(root)):
        try:
            verify_manifest(path)
            return path
        except ManifestError as exc:
            log(f"{path.name} is damaged ({exc}); trying an older checkpoint")
    return None


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


# --- a full disk ---------------------------------------------------------------------------------


def make_reserve(job_dir: Path, size: int = RESERVE_BYTES) -> None:
    """Write the ballast file (real blocks, not a sparse file). Skipped silently where it does not fit."""
    path = Path(JobPaths(str(job_dir)).reserve)
    if path.is_file() and path.stat().st_size >= size:
        return
    try:
        with open(path, "wb") as f:
            f.write(b"\0" * size)
            f.flush()
            os.fsync(f.fileno())
    except OSError:
        path.unlink(missing_ok=True)


def release_reserve(job_dir: Path) -> None:
    try:
        (Path(JobPaths(str(job_dir)).reserve)).unlink()
    except OSError:
        pass


def free_bytes(path: Path) -> int | None:
    try:
        st = os.statvfs(path)
    except OSError:
        return None
    return st.f_bavail * st.f_frsize


FULL_BELOW = 16 * 2**20  # free bytes under which a failed write is put down to a full disk
# How writes fail without ENOSPC: torch.save ("[enforce fail at inline_container.cc:...] unexpected pos",
# "PytorchStreamWriter failed writing file"), safetensors, and the like.
IO_WORDS = ("write", "enforce fail", "inline_container", "stream", "i/o", "file", "serializ")


def is_disk_full(exc: BaseException, path: Path) -> bool:
    """ENOSPC anywhere in the chain, or an I/O-looking failure while the disk holding `path` is full."""
    seen = set()
    e: BaseException | None = exc
    io_like = False
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        text = str(e).lower()
        if "no space left" in text or "disk quota" in text:
            return True
        io_like = io_like or isinstance(e, OSError) or any(w in text for w in IO_WORDS)
        e = e.__cause__ or e.__context__
    free = free_bytes(path)
    return io_like and free is not None and free < FULL_BELOW


def disk_full_error(job_dir: Path, job_id: str, root: Path) -> DiskFull:
    """Free what a failed save left (partial checkpoint, ballast), and say what is intact and what to do."""
    removed = remove_partials(root)
    release_reserve(job_dir)
    good = complete(root)
    kept = f"the last good checkpoint {good[-1].name} is intact" if good else "no checkpoint was complete yet"
    free = free_bytes(job_dir)
    free_s = f" ({free / 2**20:.1f} MiB free now)" if free is not None else ""
    note = f"; removed the half-written {', '.join(removed)}" if removed else ""
    return DiskFull(
        f"the disk holding {job_dir} is full{free_s}: {kept}{note}",
        hint=f"free space on the instance (`df -h {job_dir}`, `du -sh {job_dir.parent}/*`), "
        f"then continue with `autodl-run resume {job_id}`",
    )


# --- a portable adapter ------------------------------------------------------------------------------


def portable_name(name_or_path: str, loaded_from: str = "") -> str:
    """A base name the laptop can resolve: the hub (or ModelScope) id the job named, or one read off a
    download's layout (HF cache `models--org--name/snapshots/...`; ModelScope `org/name`, with '.'
    written as '___'); else the path itself (the laptop then needs `--base`)."""
    import re

    if not name_or_path.startswith(("/", "./", "../", "~")):
        return name_or_path  # a hub id: resolves on the laptop as it did on the instance
    for path in (loaded_from, name_or_path):
        m = re.search(r"models--([\w.-]+?)--([\w.-]+)/snapshots/", path)
        if m:
            return f"{m.group(1)}/{m.group(2)}"
        m = re.search(r"(?:^|/)([\w.-]+)/([\w-]*___[\w.-]*)/?$", path) or re.search(
            r"modelscope/hub/(?:models/)?([\w.-]+)/([\w.-]+)/?$", path
        )
        if m:
            return f"{m.group(1)}/{m.group(2).replace('___', '.')}"
    return os.path.expanduser(name_or_path)


def make_portable(adapter: Path, name_or_path: str | None = None, instance_path: str | None = None,
                  revision: str | None = None) -> str:  # fmt: skip
    """Point adapter_config.json's base_model_name_or_path at a name the laptop resolves, and keep the
    instance's path in base_model.json (jobs.protocol.BaseModelRecord). Without arguments the base is
    the one the adapter was saved with. Returns the portable name."""
    import json

    from jobs.layout import BASE_MODEL
    from jobs.protocol import BaseModelRecord

    adapter = Path(adapter)
    config = adapter / "adapter_config.json"  # PEFT's file name
    data = json.loads(config.read_text()) if config.is_file() else {}
    loaded = data.get("base_model_name_or_path") or ""
    name_or_path = name_or_path or loaded
    if not name_or_path:
        return ""  # PEFT recorded no base: nothing to make portable
    instance_path = instance_path or loaded or name_or_path
    name = portable_name(name_or_path, instance_path)
    if data:
        data["base_model_name_or_path"] = name
        tmp = config.with_name(config.name + ".tmp")
        tmp.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
        tmp.replace(config)  # a new file: never writes through a hard link into an older checkpoint
    path = os.path.expanduser(instance_path)
    record = BaseModelRecord(name=name, instance_path=path if path.startswith("/") else "", revision=revision)
    (adapter / BASE_MODEL).write_text(dump_model(record))
    return name
