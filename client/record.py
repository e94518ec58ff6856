"""The job's record on the laptop: what is left of a run once its instance is gone.

Into `<fetch.to>/<job id>/record/` (jobs.layout.LocalCopy): `events.jsonl` and the worker's log,
`trainer_state.json`, `eval_results.json`, the TensorBoard event files (`tensorboard/`), and the run
report that client.report writes from them. Auto-fetch brings it at each checkpoint and the final
fetch at the end; the append-only files (events, log, TensorBoard) are read on from the bytes the
laptop holds, so each pull sends only what is new.

What the instance sends is untrusted, and a record has no manifest to check it against (it grows
while the job runs), so it is read with bounded reads instead of rsync, which cannot cap a file that
grows during the transfer: each read asks for at most CHUNK bytes through the session's command
channel (whose output is capped besides, client.transport.ssh.MAX_STDOUT) and keeps no more than it
asked for, each file stops at its cap (CAPS; the TensorBoard folder at TB_CAP in at most TB_FILES
files), only regular files are read (`test -f` and not a link), every read has a timeout, and the
laptop names every file itself: the fixed names of jobs.layout, and TensorBoard names that match
jobs.layout.TB_FILE_RE. Whole files are parsed with their jobs.protocol model before they are kept;
events are parsed line by line later (jobs.events.parse_or_none, lines over MAX_LINE skipped).
A file cut at its cap is said so in `notes` and in the report.
"""

from __future__ import annotations

import os
import re
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from client.ledger import JobRecord
from client.session import Session
from jobs.layout import RECORD_APPEND, RECORD_WHOLE, TB_FILE_RE, JobPaths, LocalCopy, tensorboard_dir
from jobs.protocol import EvalResults, ProtocolError, TrainerState, read_model
from jobs.safepath import UnsafePathError, inside

MiB = 1 << 20
CAPS = {"events": 64 * MiB, "log": 64 * MiB, "trainer_state": 16 * MiB, "eval_results": 4 * MiB}
TB_CAP = 256 * MiB
TB_FILES = 64
SWAN_CAP = 64 * MiB  # SwanLab's folder (`swanlog/`, with [track] report_to swanlab), all its files together
SWAN_FILES = 256
SWAN_DEPTH = 6
CHUNK = 16 * MiB  # one read; well under the transport's cap on a command's output
READ_TIMEOUT_S = 120.0
FINAL = ".final"  # in record/: the state the job ended in, written once the record was pulled after that
MODELS: dict[str, type[TrainerState | EvalResults]] = {"trainer_state": TrainerState, "eval_results": EvalResults}

# $1 file, $2 offset, $3 bytes: its size on a line, then at most $3 bytes from the offset; 3 = not a regular file
_READ = 'if [ -f "$1" ] && [ ! -L "$1" ]; then stat -c %s -- "$1" && tail -c +$(( $2 + 1 )) -- "$1" | head -c "$3"; else exit 3; fi'
# $1.. folders: the first that is a real folder, its TensorBoard files as "SIZE NAME" lines
_LIST = (
    'for d in "$@"; do if [ -d "$d" ] && [ ! -L "$d" ]; then echo "$d"; '
    "find \"$d\" -maxdepth 1 -type f -name 'events.out.tfevents.*' -printf '%s %f\\n' | head -n 1000; exit 0; fi; done"
)
# $1 a folder: when it is a real one, its regular files (not links) as "SIZE RELPATH" NUL-terminated entries
_TREE = (
    'if [ -d "$1" ] && [ ! -L "$1" ]; then cd -- "$1" && '
    "find . -maxdepth $2 -type f -printf '%s %P\\0' | head -z -n $3; fi"
)
_SIZE_RE = re.compile(rb"^[0-9]{1,15}$")


@dataclass
class RecordResult:
    folder: Path
    files: dict[str, int] = field(default_factory=dict)  # name in record/ -> bytes held
    notes: list[str] = field(default_factory=list)  # what was cut at its cap, refused or unreadable
    report: Path | None = None
    final: str | None = None  # the state the job ended in, when pulled after that

    def as_dict(self) -> dict:
        return {"record": str(self.folder), "report": str(self.report) if self.report else None,
                "files": self.files, "notes": self.notes}  # fmt: skip


def is_final(copy: LocalCopy, state: str) -> bool:
    """The laptop holds the record as it was when the job ended in `state` (the ledger's)."""
    try:
        return (copy.record / FINAL).read_text().split("\n", 1)[0] == state
    except OSError:
        return False


def invalidate(copy: LocalCopy) -> None:
    """The job runs again (resumed) or ended otherwise than the record says: ask the instance from now on."""
    (copy.record / FINAL).unlink(missing_ok=True)


def pull(
    record: JobRecord, session: Session, copy: LocalCopy, *, final: str | None = None, report: bool | None = None
) -> RecordResult:
    """Bring the record up to date from the instance; with `final` (the state the job ended in) mark it
    complete and, unless `report` is False, write the run report. Transport errors propagate; what the
    instance sends that does not fit is a note."""
    transport, paths = session.transport, session.layout.job(record.id)
    copy.record.mkdir(parents=True, exist_ok=True)
    out = RecordResult(copy.record, final=final)
    for key in RECORD_APPEND:
        local = copy.record_file(key)
        _append(transport, paths.record_file(key), local, CAPS[key], lines=key == "events", out=out)
    for key in RECORD_WHOLE:
        _whole(transport, paths.record_file(key), copy.record_file(key), key, out)
    _tensorboard(transport, paths, record.id, copy, out)
    if "swanlab" in record.spec.track.report_to:
        _swanlog(transport, paths.swanlog, copy.swanlog, out)
    for p in sorted(copy.record.rglob("*")):
        if p.is_file() and p.name != FINAL:
            out.files[p.relative_to(copy.record).as_posix()] = p.stat().st_size
    if not final:
        invalidate(copy)  # the job runs (again, after a resume): what the laptop holds is not its end
    else:
        (copy.record / FINAL).write_text("\n".join([final, *out.notes]) + "\n")
        if report is not False:
            from client.report import write_report  # matplotlib: only when a report is written

            out.report = write_report(record, copy, notes=out.notes)
    return out


def _read(transport, remote: str, offset: int, n: int) -> tuple[int, bytes] | None:
    """(the remote file's size, at most n bytes from offset), or None when it is not a regular file."""
    res = transport.run(["bash", "-c", _READ, "read", remote, str(offset), str(n)], check=False,
                        timeout=READ_TIMEOUT_S)  # fmt: skip
    if not res.ok:
        return None
    head, _, data = res.stdout_bytes.partition(b"\n")
    if not _SIZE_RE.match(head):
        return None
    return int(head), data[:n]


def _append(transport, remote: str, local: Path, cap: int, *, lines: bool, out: RecordResult) -> None:
    """Read `remote` on from the bytes `local` holds (from 0 if the remote one got shorter), up to `cap`."""
    held = local.stat().st_size if local.is_file() else 0
    first = True
    while True:
        room = cap - held
        if room <= 0:
            out.notes.append(f"{local.name}: kept its first {held:,} bytes only (the cap is {cap // MiB} MiB)")
            return
        got = _read(transport, remote, held, min(CHUNK, room))
        if got is None:
            return
        size, data = got
        if first and size < held:  # rewritten on the instance: start over
            local.unlink()
            held, first = 0, False
            continue
        first = False
        keep = data
        if lines and data:
            keep = data[: data.rfind(b"\n") + 1]  # whole lines only; the rest comes next time
            if not keep and len(data) == min(CHUNK, room):
                if room <= CHUNK:  # the next whole line would pass the cap
                    out.notes.append(f"{local.name}: kept its first {held:,} bytes only (the cap is {cap // MiB} MiB)")
                else:
                    out.notes.append(f"{local.name}: a line over {CHUNK // MiB} MiB; kept what came before it")
                return
        if keep:
            with open(local, "ab") as f:
                f.write(keep)
            held += len(keep)
        if len(data) < min(CHUNK, room) or not keep:
            return


def _whole(transport, remote: str, local: Path, key: str, out: RecordResult) -> None:
    cap = CAPS[key]
    got = _read(transport, remote, 0, cap + 1)
    if got is None:
        return
    _, data = got
    if len(data) > cap:
        out.notes.append(f"{local.name}: over {cap // MiB} MiB on the instance; not kept")
        return
    try:
        read_model(MODELS[key], data, local.name)
    except ProtocolError as exc:
        out.notes.append(f"{local.name}: not kept, it does not parse ({exc})")
        return
    tmp = local.with_name(local.name + ".tmp")
    tmp.write_bytes(data)
    os.replace(tmp, local)


def _tensorboard(transport, paths: JobPaths, job_id: str, copy: LocalCopy, out: RecordResult) -> None:
    """The TensorBoard files from the job folder's `tensorboard/` or AutoDL's panel folder."""
    candidates = [tensorboard_dir(paths.dir, job_id, on_autodl=False), tensorboard_dir(paths.dir, job_id, True)]
    res = transport.run(["bash", "-c", _LIST, "list", *candidates], check=False, timeout=READ_TIMEOUT_S)
    lines = res.stdout.splitlines() if res.ok else []
    if not lines or lines[0] not in candidates:
        return
    folder, names = lines[0], []
    for ln in lines[1:]:
        _, _, name = ln.partition(" ")
        if TB_FILE_RE.match(name):
            names.append(name)
        elif name:
            out.notes.append(f"tensorboard: skipped a file named {name[:80]!r}")
    if len(names) > TB_FILES:
        out.notes.append(f"tensorboard: {len(names)} files; kept the first {TB_FILES}")
    copy.tensorboard.mkdir(parents=True, exist_ok=True)
    used = sum(p.stat().st_size for p in copy.tensorboard.iterdir() if p.is_file())
    for name in sorted(names)[:TB_FILES]:
        local = copy.tensorboard / name
        before = local.stat().st_size if local.is_file() else 0
        room = max(0, TB_CAP - used) + before
        _append(transport, f"{folder}/{name}", local, room, lines=False, out=out)
        used += (local.stat().st_size if local.is_file() else 0) - before


def _swanlog(transport, remote: str, local_root: Path, out: RecordResult) -> None:
    """SwanLab's folder, file by file: names checked (jobs.safepath), links and other kinds skipped, a file
    read again whole when its size changed (SwanLab rewrites some), all of them together up to SWAN_CAP."""
    res = transport.run(["bash", "-c", _TREE, "tree", remote, str(SWAN_DEPTH), str(SWAN_FILES + 1)], check=False,
                        timeout=READ_TIMEOUT_S)  # fmt: skip
    entries = [e for e in res.stdout_bytes.split(b"\0") if e] if res.ok else []
    if not entries:
        return
    if len(entries) > SWAN_FILES:
        out.notes.append(f"swanlog: over {SWAN_FILES} files; kept the first {SWAN_FILES}")
    local_root.mkdir(parents=True, exist_ok=True)
    used = sum(p.stat().st_size for p in local_root.rglob("*") if p.is_file() and not p.is_symlink())
    for entry in sorted(entries[:SWAN_FILES]):
        head, _, raw = entry.partition(b" ")
        try:
            rel = raw.decode("utf-8")
            local = inside(local_root, rel)
        except (UnicodeDecodeError, UnsafePathError) as exc:
            out.notes.append(f"swanlog: skipped a file named {raw[:80]!r} ({str(exc)[:120]})")
            continue
        if not _SIZE_RE.match(head):
            continue
        size, held = int(head), local.stat().st_size if local.is_file() else 0
        if local.is_file() and size == held:
            continue
        if used - held + size > SWAN_CAP:
            out.notes.append(f"swanlog/{rel}: not kept, the folder would pass its cap ({SWAN_CAP // MiB} MiB)")
            continue
        data = _whole_bounded(transport, f"{remote}/{rel}", size)
        if data is None:
            continue
        tmp = ""
        try:
            local.parent.mkdir(parents=True, exist_ok=True)
            # written beside the folder, not in it: any name in it may be one of the instance's files
            fd, tmp = tempfile.mkstemp(prefix=".swanlog-", suffix=".part", dir=local_root.parent)
            with os.fdopen(fd, "wb") as f:
                f.write(data)
            os.replace(tmp, local)
        except OSError as exc:  # a file where the instance now has a folder, or the other way round
            out.notes.append(f"swanlog/{rel}: not kept ({exc.strerror or exc})")
            if tmp:
                Path(tmp).unlink(missing_ok=True)
            continue
        used += len(data) - held


def _whole_bounded(transport, remote: str, size: int) -> bytes | None:
    """The file's first `size` bytes (what the listing said it held), read CHUNK by CHUNK; None if it is gone."""
    data = b""
    while len(data) < size:
        got = _read(transport, remote, len(data), min(CHUNK, size - len(data)))
        if got is None:
            return None
        if not got[1]:
            break
        data += got[1]
    return data
