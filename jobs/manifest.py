"""sha256 manifests of a folder: the worker writes one next to the adapter, the client verifies it.

`manifest.json` lists every other file of the folder (relative posix path, size, sha256),
sorted by path and written with a fixed layout, so the same folder always gives the same
bytes and the manifest's own sha256 names the folder's content (the `done` event carries it).

On the laptop the manifest comes from the instance: it is parsed as jobs.protocol.FolderManifest
(whose paths are checked by jobs.safepath) and every file is opened through jobs.safepath.inside,
never through a symlink, so no entry can make the laptop read a file outside the folder. A folder
verifies only if it holds regular files and folders alone.

No torch: the laptop imports this too.
"""

from __future__ import annotations

import hashlib
import json
import os
import stat
from pathlib import Path

from jobs.layout import MANIFEST as MANIFEST_NAME  # one name for the file, kept in jobs.layout
from jobs.protocol import FolderManifest, ProtocolError, read_model
from jobs.safepath import UnsafePathError, inside

_CHUNK = 1 << 20


class ManifestError(ValueError):
    """The folder does not match its manifest; the message lists every difference."""


def sha256_file(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def _files(folder: Path) -> list[str]:
    return sorted(
        p.relative_to(folder).as_posix()
        for p in folder.rglob("*")
        if p.is_file() and p.relative_to(folder).as_posix() != MANIFEST_NAME
    )


def shown(rel: str) -> str:
    """A file name from the other side, printable: control characters escaped."""
    return rel.encode("unicode_escape", "backslashreplace").decode("ascii")


def entries(folder: str | Path) -> tuple[list[str], list[tuple[str, str]]]:
    """(regular files, (other entry, what it is)) below `folder`, relative posix paths; never follows a link."""
    folder = Path(folder)
    files: list[str] = []
    other: list[tuple[str, str]] = []
    for dirpath, dirnames, filenames in os.walk(folder):  # os.walk does not descend into symlinked folders
        base = Path(dirpath)
        for name in dirnames + filenames:
            rel = (base / name).relative_to(folder).as_posix()
            mode = os.lstat(base / name).st_mode
            if stat.S_ISREG(mode):
                files.append(rel)
            elif not stat.S_ISDIR(mode):
                other.append((rel, _kind(mode)))
    return sorted(files), sorted(other)


def _kind(mode: int) -> str:
    for test, name in ((stat.S_ISLNK, "a symlink"), (stat.S_ISFIFO, "a FIFO"), (stat.S_ISSOCK, "a socket"),
                       (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device")):  # fmt: skip
        if test(mode):
            return name
    return "not a regular file"


def build_manifest(folder: str | Path) -> dict:
    folder = Path(folder)
    entries = []
    for rel in _files(folder):
        path = folder / rel
        entries.append({"path": rel, "size": path.stat().st_size, "sha256": sha256_file(path)})
    return {"version": 1, "files": entries}


def _dump(manifest: dict) -> bytes:
    return (json.dumps(manifest, indent=1, sort_keys=True, ensure_ascii=False) + "\n").encode()


def write_manifest(folder: str | Path) -> str:
    """Write `folder/manifest.json` covering every other file; return the manifest's sha256."""
    data = _dump(build_manifest(folder))
    (Path(folder) / MANIFEST_NAME).write_bytes(data)
    return hashlib.sha256(data).hexdigest()


def load_manifest(folder: str | Path) -> tuple[FolderManifest, str]:
    """The folder's manifest, parsed and checked (no entry leaves the folder), and its sha256."""
    path = Path(folder) / MANIFEST_NAME
    try:
        if not stat.S_ISREG(os.lstat(path).st_mode):
            raise ManifestError(f"{path} is not a regular file")
        data = path.read_bytes()
    except FileNotFoundError:
        raise ManifestError(f"{path} is missing") from None
    try:
        manifest = read_model(FolderManifest, data, str(path))
    except ProtocolError as exc:
        raise ManifestError(str(exc)) from None
    return manifest, hashlib.sha256(data).hexdigest()


def read_manifest(folder: str | Path) -> dict:
    """The manifest as a dict ({"version", "files": [{"path", "size", "sha256"}]}), checked as load_manifest."""
    return load_manifest(folder)[0].model_dump()


def verify_manifest(folder: str | Path, expected_sha256: str | None = None) -> str:
    """Check every file of `folder` against its manifest; return the manifest's sha256.

    Raises ManifestError naming each missing, changed or unlisted file, anything that is not a
    regular file or a folder (a symlink, a FIFO, a device), and a manifest whose own sha256
    differs from `expected_sha256` (the one the `done` event reported) when given.
    """
    folder = Path(folder)
    manifest, digest = load_manifest(folder)
    problems: list[str] = []
    if expected_sha256 and digest != expected_sha256:
        problems.append(f"manifest.json has sha256 {digest[:12]}…, expected {expected_sha256[:12]}…")
    files, other = entries(folder)
    problems += [f"{shown(rel)}: {kind}, not a regular file" for rel, kind in other]
    regular = set(files)
    listed = set()
    for entry in manifest.files:
        rel = entry.path
        listed.add(rel)
        try:
            path = inside(folder, rel)
        except UnsafePathError as exc:
            problems.append(str(exc))
            continue
        if rel not in regular:
            problems.append(f"{shown(rel)}: missing")
        elif path.stat().st_size != entry.size:
            problems.append(f"{shown(rel)}: size {path.stat().st_size}, expected {entry.size}")
        elif sha256_file(path) != entry.sha256:
            problems.append(f"{shown(rel)}: sha256 differs")
    problems += [f"{shown(rel)}: not in the manifest" for rel in files if rel not in listed | {MANIFEST_NAME}]
    if problems:
        raise ManifestError("; ".join(problems))
    return digest


__all__ = [
    "MANIFEST_NAME",
    "ManifestError",
    "build_manifest",
    "entries",
    "load_manifest",
    "read_manifest",
    "sha256_file",
    "shown",
    "verify_manifest",
    "write_manifest",
]
