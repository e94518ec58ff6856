"""sha256 manifests of a folder: the worker writes one next to the adapter, the client verifies it.

`manifest.json` lists every other file of the folder (relative posix path, size, sha256),
sorted by path and written with a fixed layout, so the same folder always gives the same
bytes and the manifest's own sha256 names the folder's content (the `done` event carries it).

Standard library only: the laptop imports this without torch.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from jobs.layout import MANIFEST as MANIFEST_NAME  # one name for the file, kept in jobs.layout

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


def read_manifest(folder: str | Path) -> dict:
    path = Path(folder) / MANIFEST_NAME
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ManifestError(f"{path} is missing") from None
    except ValueError as exc:
        raise ManifestError(f"{path} is not valid JSON: {exc}") from None
    if not isinstance(manifest, dict) or not isinstance(manifest.get("files"), list):
        raise ManifestError(f"{path} has no `files` list")
    return manifest


def verify_manifest(folder: str | Path, expected_sha256: str | None = None) -> str:
    """Check every file of `folder` against its manifest; return the manifest's sha256.

    Raises ManifestError naming each missing, changed or unlisted file, and a manifest whose
    own sha256 differs from `expected_sha256` (the one the `done` event reported) when given.
    """
    folder = Path(folder)
    manifest = read_manifest(folder)
    digest = sha256_file(folder / MANIFEST_NAME)
    problems: list[str] = []
    if expected_sha256 and digest != expected_sha256:
        problems.append(f"manifest.json has sha256 {digest[:12]}…, expected {expected_sha256[:12]}…")
    listed = set()
    for entry in manifest["files"]:
        rel = entry.get("path", "")
        listed.add(rel)
        path = folder / rel
        if not path.is_file():
            problems.append(f"{rel}: missing")
        elif path.stat().st_size != entry.get("size"):
            problems.append(f"{rel}: size {path.stat().st_size}, expected {entry.get('size')}")
        elif sha256_file(path) != entry.get("sha256"):
            problems.append(f"{rel}: sha256 differs")
    problems += [f"{rel}: not in the manifest" for rel in _files(folder) if rel not in listed]
    if problems:
        raise ManifestError("; ".join(problems))
    return digest


__all__ = [
    "MANIFEST_NAME",
    "ManifestError",
    "build_manifest",
    "read_manifest",
    "sha256_file",
    "verify_manifest",
    "write_manifest",
]
