"""The worker bundle: the `remote_worker` and `jobs` packages, staged and content-addressed.

The instance runs the worker from `{remote_root}/bundles/{sha256}/`, so an unchanged
bundle is never sent twice and a running job never sees its code change under it. Doctor,
set-up and the model download run their programs from it too (`python -m remote_worker.X`).

The shell scripts the client runs on the instance are package data of `jobs` (`jobs/scripts/*.sh`):
`script(name)` reads one, to send as `bash -c SCRIPT NAME ARGS...`.
"""

from __future__ import annotations

import hashlib
import shutil
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import jobs
from client.home import bundle_cache
from client.remote.sync import sync_dir
from client.transport.base import Transport
from jobs.layout import RemoteLayout

PACKAGES = ("remote_worker", "jobs")
PATTERNS = ("*.py", "scripts/*.sh")  # code and the scripts beside it
MARKER = "remote_worker/__init__.py"  # a bundle on the instance is complete when it has this


@dataclass(frozen=True)
class Bundle:
    dir: Path
    digest: str


def _package_dirs() -> list[Path]:
    return [Path(jobs.__file__).parent.parent / name for name in PACKAGES]


def _files() -> list[tuple[str, Path]]:
    found: dict[str, Path] = {}
    for pkg in _package_dirs():
        for pattern in PATTERNS:
            for f in pkg.rglob(pattern):
                found[f.relative_to(pkg.parent).as_posix()] = f
    return sorted(found.items())


def stage_bundle(cache: Path) -> Bundle:
    files = _files()
    h = hashlib.sha256()
    for rel, f in files:
        h.update(rel.encode() + b"\0" + f.read_bytes() + b"\0")
    digest = h.hexdigest()[:16]
    out = cache / digest
    if not out.is_dir():
        tmp = cache / f".{digest}.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        for rel, f in files:
            (tmp / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(f, tmp / rel)
        tmp.rename(out)
    return Bundle(out, digest)


def sync_bundle(transport: Transport, layout: RemoteLayout) -> tuple[str, bool]:
    """Stage the worker bundle here and send it unless the instance has it: (its digest, sent)."""
    bundle = stage_bundle(bundle_cache())
    sent = sync_dir(transport, bundle.dir, layout.bundle_dir(bundle.digest), marker=MARKER)
    return bundle.digest, sent


def script(name: str) -> str:
    """The text of `jobs/scripts/NAME`."""
    return (resources.files("jobs") / "scripts" / name).read_text()
