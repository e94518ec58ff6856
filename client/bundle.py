"""The worker bundle: the `remote_worker` and `jobs` packages, staged and content-addressed.

The instance runs the worker from `{remote_root}/bundles/{sha256}/`, so an unchanged
bundle is never sent twice and a running job never sees its code change under it.
"""

from __future__ import annotations

import hashlib
import shutil
from dataclasses import dataclass
from pathlib import Path

import jobs

PACKAGES = ("remote_worker", "jobs")


@dataclass(frozen=True)
class Bundle:
    dir: Path
    digest: str


def _package_dirs() -> list[Path]:
    return [Path(jobs.__file__).parent.parent / name for name in PACKAGES]


def stage_bundle(cache: Path) -> Bundle:
    files: list[tuple[str, Path]] = []
    for pkg in _package_dirs():
        for f in sorted(pkg.rglob("*.py")):
            files.append((f.relative_to(pkg.parent).as_posix(), f))
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
