"""`fetch`: pull the final adapter (and checkpoints) back and verify them against the worker's manifests.

On the laptop, under `<fetch.to>/<job id>/`:
    adapter/                 the final adapter, verified
    checkpoints/step-N/      the newest checkpoint: `adapter/` only (auto-fetch), or whole with the
                             optimizer state (`fetch --checkpoints`, what resuming elsewhere needs)

A new copy is built in `<dest>.partial` (seeded with hard links to what is already here, so rsync
sends only what differs; rsync writes each new file under a temporary name and renames it, so the
links never let it write into the verified copy), checked, and only then swapped in: `dest` is
renamed aside, the partial into place, the old copy removed. A fetched folder is always a verified
one, and a fetch cut at any point leaves the copy verified before as it was.

What the instance sends is untrusted: only regular files and folders are fetched (rsync
`--no-links --no-devices --no-specials`, the same in SFTP), anything else found in the copy is
refused, and every manifest path is checked by jobs.safepath before it is opened (jobs.manifest).

While it transfers, the client holds a lease on the instance (`fetching.<token>`, touched every
LEASE_REFRESH_S), so the guard never shuts the instance down mid-fetch. Once the final adapter is
verified, the client writes its acknowledgement (`fetched.json`, jobs.protocol.FetchAck: what, the
manifest's sha256, the step; nothing about the laptop); the guard shuts the instance down only on an
acknowledgement naming that very adapter. Before it, the job's record comes too (client.record:
events, log, trainer state, evaluations, TensorBoard files, into `<job id>/record/` with a run report),
so nothing but the adapter is lost when the instance goes; a failed or cancelled job's `fetch` brings
its record alone. Each fetch also reports its speed (`transfer.json`,
jobs.protocol.TransferSpeed): the worker sizes its deadline margin by it.
"""

from __future__ import annotations

import os
import secrets
import shutil
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from pydantic import BaseModel

from client import record as job_record
from client.errors import AutodlRunError, JobError, TransportError, VerifyError
from client.ledger import JobRecord, Ledger
from client.remote import launcher
from client.session import Session, open_session
from client.transport.base import Transport
from client.transport.paths import shell_path
from jobs.layout import CHECKPOINT_ADAPTER, MANIFEST, JobPaths, LocalCopy, checkpoint_step
from jobs.manifest import ManifestError, entries, load_manifest, shown, verify_manifest
from jobs.protocol import FetchAck, JobState, TransferSpeed, dump_model

LOAD_SNIPPET = """from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer
tokenizer = AutoTokenizer.from_pretrained({adapter!r})  # the chat template and stop tokens of training
model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained({base!r}), {adapter!r})"""


def load_snippet(adapter: Path, base: str) -> str:
    """The Python that loads the fetched adapter, working as printed: the base as the adapter names it
    (remote_worker.checkpoints makes that a hub id where the job used one), `~` expanded, strings quoted
    as Python literals. A base that is a path missing on this laptop gets a comment saying so."""
    import json

    try:
        named = json.loads((Path(adapter) / "adapter_config.json").read_text())["base_model_name_or_path"]
        base = named if isinstance(named, str) and named else base
    except (OSError, ValueError, KeyError, TypeError):
        pass
    base = os.path.expanduser(base)
    code = LOAD_SNIPPET.format(base=base, adapter=str(Path(adapter).expanduser().resolve()))
    if base.startswith(("/", ".")) and not Path(base).exists():
        code = f"# {base} is where the base model was on the instance: put your copy's folder (or its hub id) there\n" + code
    return code
LEASE_REFRESH_S = 15.0


def local_copy(record: JobRecord, to: Path | None = None) -> LocalCopy:
    """`<fetch.to>/<job id>` on the laptop (fetch.to relative to the job file), or `<to>/<job id>`."""
    if to is not None:
        return LocalCopy((Path(to).expanduser() / record.id).resolve())
    base = Path(record.spec.fetch.to).expanduser()
    if not base.is_absolute():
        base = Path(record.job_file).parent / base
    return LocalCopy((base / record.id).resolve())


def job_root(record: JobRecord, to: Path | None = None) -> Path:
    return local_copy(record, to).root


@contextmanager
def _session(record: JobRecord, session: Session | None) -> Iterator[Session]:
    """The caller's session (left open), or one of our own for the duration."""
    if session is not None:
        yield session
        return
    with open_session(record) as own:
        yield own


# --- on the instance: lease, acknowledgement, speed ---------------------------------------------


class Lease:
    """`fetching.<token>` in the job folder, touched until the fetch ends: the guard waits meanwhile."""

    def __init__(self, transport: Transport, paths: JobPaths, refresh_s: float = LEASE_REFRESH_S):
        self.transport, self.refresh_s = transport, refresh_s
        self.path = paths.lease(secrets.token_hex(4))
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _touch(self) -> None:
        try:
            self.transport.run(f"touch -- {shell_path(self.path)}", check=False, timeout=30)
        except TransportError:
            pass  # the fetch itself will report a dead link

    def __enter__(self) -> Lease:
        self._touch()
        self._thread = threading.Thread(target=self._refresh, name="fetch-lease", daemon=True)
        self._thread.start()
        return self

    def _refresh(self) -> None:
        while not self._stop.wait(self.refresh_s):
            self._touch()

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=self.refresh_s + 5)
        try:
            self.transport.run(f"rm -f -- {shell_path(self.path)}", check=False, timeout=30)
        except TransportError:
            pass  # left behind, it goes stale in a minute


def _write_remote(transport: Transport, path: str, model: BaseModel) -> None:
    q = shell_path(path)
    transport.run(f"cat > {q}.tmp && mv -f -- {q}.tmp {q}", input=dump_model(model))


def acknowledge(
    transport: Transport,
    paths: JobPaths,
    *,
    manifest_sha256: str,
    what: str = "adapter",
    step: int | None = None,
) -> FetchAck:
    """Tell the instance (and its guard) that the laptop holds this adapter, verified. Call it only after
    the whole folder verified; it says nothing about the laptop (no path, no host name)."""
    ack = FetchAck(what=what, manifest_sha256=manifest_sha256, step=step)
    _write_remote(transport, paths.fetched, ack)
    return ack


def report_speed(transport: Transport, paths: JobPaths, nbytes: int, seconds: float) -> float | None:
    """Write the measured download speed for the worker's deadline margin; returns bytes/s."""
    if nbytes <= 0 or seconds <= 0:
        return None
    bps = nbytes / seconds
    try:
        _write_remote(
            transport, paths.transfer, TransferSpeed(bytes_per_s=bps, bytes=nbytes, seconds=seconds)
        )
    except TransportError:
        pass
    return bps


# --- pulling a verified folder ----------------------------------------------------------------------


def _beside(dest: Path, suffix: str) -> Path:
    return dest.with_name(dest.name + suffix)


def pull_verified(
    transport: Transport, remote: str, dest: Path, expected_sha256: str | None = None
) -> tuple[str, int]:
    """Copy `remote` into `dest` through `dest.partial`, verify it against its manifest; (sha256, bytes).

    `dest` is replaced only by a copy that verified; until then (a failure, Ctrl-C) it stays as it was.
    """
    partial, old = _beside(dest, ".partial"), _beside(dest, ".old")
    if old.exists():  # a swap cut between its two renames
        if dest.exists():
            shutil.rmtree(old)
        else:
            old.rename(dest)
    if partial.exists():
        _drop_special(partial)  # a cut earlier fetch: keep its progress, not what cannot be verified
    elif dest.is_dir():
        _seed(dest, partial)
    partial.parent.mkdir(parents=True, exist_ok=True)
    transport.get(remote, partial)
    _refuse_special(partial, transport, remote)
    try:
        manifest, _ = load_manifest(partial)
        _drop_unlisted(partial, {e.path for e in manifest.files})
        digest = verify_manifest(partial, expected_sha256)
    except ManifestError as exc:
        raise VerifyError(
            f"the files fetched from {transport.where}:{remote} into {partial} do not match the worker's "
            f"manifest: {exc}",
            hint="fetch again: only the differing files are sent again; if it fails the same way, the "
            "instance's folder is not what its worker wrote: do not use it",
        ) from None
    size = sum(e.size for e in manifest.files)
    _plain_modes(partial)
    if dest.exists():
        dest.rename(old)
    partial.rename(dest)
    shutil.rmtree(old, ignore_errors=True)
    return digest, size


def _plain_modes(folder: Path) -> None:
    """The instance chose the modes: give folders 0755 and files 0644 (no setuid, nothing world-writable)."""
    folder.chmod(0o755)
    for p in folder.rglob("*"):
        p.chmod(0o755 if p.is_dir() else 0o644)


def _seed(dest: Path, partial: Path) -> None:
    """`partial` as a copy of `dest` made of hard links (a plain copy where links are refused)."""

    def link(src: str, dst: str) -> None:
        try:
            os.link(src, dst)
        except OSError:
            shutil.copy2(src, dst)

    shutil.copytree(dest, partial, symlinks=True, copy_function=link)
    _drop_special(partial)


def _drop_special(folder: Path) -> None:
    for rel, _ in entries(folder)[1]:
        (folder / rel).unlink(missing_ok=True)


def _refuse_special(folder: Path, transport: Transport, remote: str) -> None:
    """Only regular files and folders may come: anything else is removed and refused (VerifyError)."""
    other = entries(folder)[1]
    if not other:
        return
    _drop_special(folder)
    names = ", ".join(f"{shown(rel)!r} ({kind})" for rel, kind in other[:5])
    raise VerifyError(
        f"refused what {transport.where}:{remote} sent: {names}{' and more' if len(other) > 5 else ''}; "
        "only regular files and folders are fetched",
        hint="an adapter holds regular files only: remove the symlink, device or FIFO from that folder on the "
        "instance, then fetch again",
    )


def _drop_unlisted(folder: Path, listed: set[str]) -> None:
    """Remove files a seeding copy had that the new manifest does not list (rsync adds, never deletes here).

    The names come from walking the laptop's folder, never from the instance."""
    files, _ = entries(folder)
    for rel in files:
        if rel != MANIFEST and rel not in listed:
            (folder / rel).unlink()
    for dirpath, _dirs, _files in sorted(os.walk(folder), reverse=True):
        if Path(dirpath) != folder and not os.listdir(dirpath):
            os.rmdir(dirpath)


# --- the final adapter --------------------------------------------------------------------------------


def fetch(
    record: JobRecord,
    ledger: Ledger,
    to: Path | None = None,
    *,
    expected_sha256: str | None = None,
    session: Session | None = None,
) -> tuple[Path, str]:
    """Pull and verify the final adapter, acknowledge it on the instance. Returns (folder, manifest sha256)."""
    if record.state in ("failed", "cancelled", "lost"):
        raise JobError(
            f"job {record.id} ended as {record.state}: it has no final adapter", hint=_no_adapter_hint(record, session)
        )
    dest = local_copy(record, to).adapter
    with _session(record, session) as s:
        transport, paths = s.transport, s.layout.job(record.id)
        if not transport.run(["test", "-f", paths.adapter + "/" + MANIFEST], check=False).ok:
            raise JobError(
                f"job {record.id} has no final adapter yet on {transport.where}",
                hint=f"wait for it to finish (`autodl-run tail {record.id}`), or take its newest checkpoint: "
                f"`autodl-run fetch {record.id} --checkpoints`",
            )
        with Lease(transport, paths):
            t = time.monotonic()
            digest, size = pull_verified(transport, paths.adapter, dest, expected_sha256)
            seconds = time.monotonic() - t
            pull_record(record, s, to, final="done")  # before the acknowledgement: the guard may shut down after it
            acknowledge(transport, paths, manifest_sha256=digest)
        report_speed(transport, paths, size, seconds)
    if record.state in ("running", "launching", "starting"):  # a final adapter exists: the worker is done
        ledger.update(record.id, state="done", finished_at=time.time())
        record.state = "done"
    ledger.update(record.id, fetched_to=str(dest))
    return dest, digest


def pull_record(
    record: JobRecord,
    session: Session,
    to: Path | None = None,
    *,
    final: str | None = None,
    log: Callable[[str], None] | None = None,
) -> job_record.RecordResult | None:
    """The job's record into `<job id>/record/` (client.record); a failure is a note (`log`, default
    stderr), never the fetch's failure (the adapter is what must come back)."""
    try:
        return job_record.pull(record, session, local_copy(record, to), final=final)
    except (AutodlRunError, OSError) as exc:
        message = exc.message if isinstance(exc, AutodlRunError) else str(exc)
        note = f"could not fetch the record of {record.id}: {(message.splitlines() or [''])[0]}"
        if log is not None:
            log(note)
        else:
            print(note, file=sys.stderr, flush=True)
        return None
def _no_adapter_hint(record: JobRecord, session: Session | None) -> str:
    """What helps after a job ended without an adapter: its checkpoint, if it left one; else a new submit."""
    try:
        with _session(record, session) as s:
            steps = remote_steps(s.transport, s.layout.job(record.id))
    except AutodlRunError:
        return f"`autodl-run status {record.id}` says why it ended and whether it left a checkpoint"
    if steps:
        return (f"its newest checkpoint: `autodl-run fetch {record.id} --checkpoints`; "
                f"continue it: `autodl-run resume {record.id}`")  # fmt: skip
    return _no_checkpoint_hint(record)


def _no_checkpoint_hint(record: JobRecord) -> str:
    return (
        f"it left no checkpoint, so there is nothing to fetch or resume: `autodl-run status {record.id}` says why "
        f"it ended; fix that, then submit it again: autodl-run submit {record.job_file}"
    )


# --- checkpoints ------------------------------------------------------------------------------------------


@dataclass
class FetchedCheckpoint:
    step: int
    path: Path  # checkpoints/step-N on the laptop (its adapter in path/adapter)
    manifest_sha256: str  # of what was verified: the whole checkpoint (full) or its adapter
    full: bool  # optimizer state included: enough to resume elsewhere
    bytes: int
    seconds: float

    @property
    def adapter(self) -> Path:
        return self.path / CHECKPOINT_ADAPTER

    def as_dict(self) -> dict:
        return {
            "step": self.step,
            "path": str(self.path),
            "adapter": str(self.adapter),
            "manifest_sha256": self.manifest_sha256,
            "full": self.full,
            "bytes": self.bytes,
        }


def remote_steps(transport: Transport, paths: JobPaths) -> list[int]:
    """The complete checkpoints (step numbers) on the instance, oldest first."""
    res = transport.run(f"cd -- {shell_path(paths.checkpoints)} 2>/dev/null && ls -1", check=False)
    return sorted({n for ln in res.stdout.split("\n") if (n := checkpoint_step(ln)) is not None})


def local_checkpoints(copy: LocalCopy) -> list[tuple[int, Path, bool]]:
    """(step, folder, full) for each checkpoint of the laptop's copy, oldest first."""
    found = []
    folder = copy.checkpoints
    if folder.is_dir():
        for p in folder.iterdir():
            n = checkpoint_step(p.name)
            if (
                n is not None
                and p.is_dir()
                and ((p / MANIFEST).is_file() or (p / CHECKPOINT_ADAPTER / MANIFEST).is_file())
            ):
                found.append((n, p, (p / MANIFEST).is_file()))
    return sorted(found)


def prune_local(copy: LocalCopy) -> None:
    """Keep the newest checkpoint, and the newest full one (to resume elsewhere); remove the rest."""
    found = local_checkpoints(copy)
    keep = {found[-1][1]} if found else set()
    full = [p for _, p, is_full in found if is_full]
    if full:
        keep.add(full[-1])
    for _, p, _ in found:
        if p not in keep:
            shutil.rmtree(p, ignore_errors=True)
            shutil.rmtree(_beside(p, ".partial"), ignore_errors=True)


def fetch_checkpoint(
    record: JobRecord,
    *,
    to: Path | None = None,
    full: bool = True,
    step: int | None = None,
    expected_sha256: str | None = None,
    session: Session | None = None,
) -> FetchedCheckpoint:
    """Pull the newest (or a given) checkpoint: whole with `full`, else its adapter alone; verified."""
    copy = local_copy(record, to)
    with _session(record, session) as s:
        transport, paths = s.transport, s.layout.job(record.id)
        for attempt in (1, 2):  # the worker may rotate a checkpoint away while we copy it: take the newer one
            steps = remote_steps(transport, paths) if step is None else []  # a given step needs no listing
            if step is None and not steps:
                raise JobError(
                    f"job {record.id} has no complete checkpoint on {transport.where}",
                    hint=_no_checkpoint_hint(record) if record.state in ("failed", "cancelled", "lost")
                    else "checkpoints are saved every train.save_every_minutes and train.save_steps",
                )
            n = step if step is not None else steps[-1]
            remote = paths.checkpoint(n) if full else paths.checkpoint(n) + "/" + CHECKPOINT_ADAPTER
            local = copy.checkpoint(n)
            dest = local if full else copy.checkpoint_adapter(n)
            try:
                with Lease(transport, paths):
                    t = time.monotonic()
                    digest, size = pull_verified(transport, remote, dest, expected_sha256)
                    seconds = time.monotonic() - t
                break
            except (TransportError, VerifyError):
                if attempt == 2 or step is not None or n in remote_steps(transport, paths):
                    raise
        prune_local(copy)
        return FetchedCheckpoint(n, local, digest, full, size, seconds)


@dataclass
class Fetched:
    """What `autodl-run fetch` got: the final adapter (verified) and/or the newest checkpoint, whole."""

    job_id: str
    adapter: Path | None = None
    manifest_sha256: str | None = None
    checkpoint: FetchedCheckpoint | None = None
    record: Path | None = None  # <job id>/record/ (client.record)
    report: Path | None = None  # its run report

    @property
    def verified(self) -> bool:
        return self.adapter is not None

    def as_dict(self) -> dict:
        return {
            "job_id": self.job_id,
            "adapter": str(self.adapter) if self.adapter else None,
            "manifest_sha256": self.manifest_sha256,
            "verified": self.verified,
            "checkpoint": self.checkpoint.as_dict() if self.checkpoint else None,
            "record": str(self.record) if self.record else None,
            "report": str(self.report) if self.report else None,
        }


def fetch_all(
    record: JobRecord, ledger: Ledger, to: Path | None = None, *, checkpoints: bool = False
) -> Fetched:
    """`autodl-run fetch`: the final adapter; with `checkpoints`, first the newest checkpoint, whole.
    One session for both. With `checkpoints`, a job without a final adapter (failed, stopped, still
    running) is no error. The job's record comes either way (with the final adapter, or alone for a job
    that ended without one)."""
    out = Fetched(record.id)
    copy = local_copy(record, to)
    with open_session(record) as session:
        if record.state != "done":  # the final adapter's fetch brings it otherwise
            state = launcher.job_status(session.transport, session.layout.job(record.id)).state
            ended = state in (JobState.FAILED, JobState.CANCELLED, JobState.LOST)
            if ended and record.state != state.value:
                ledger.update(record.id, state=state.value, finished_at=time.time())
                record.state = state.value
            pull_record(record, session, to, final=state.value if ended else None)
            _note_record(out, copy)
        if checkpoints:
            try:
                out.checkpoint = fetch_checkpoint(record, to=to, full=True, session=session)
            except JobError:
                if record.state != "done":
                    raise
        try:
            out.adapter, out.manifest_sha256 = fetch(record, ledger, to, session=session)
        except JobError as exc:
            if out.report is not None:
                exc.hint = (exc.hint + "; " if exc.hint else "") + f"its record and run report: {out.report}"
            if out.checkpoint is None:
                raise
        _note_record(out, copy)
    return out


def _note_record(out: Fetched, copy: LocalCopy) -> None:
    if copy.record.is_dir():
        out.record = copy.record
        out.report = copy.report if copy.report.is_file() else None
