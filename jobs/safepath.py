"""Relative paths that come from the other side (a manifest, a file listing) are data, not instructions.

`check_relpath` accepts only a plain relative posix path: no empty parts, no `.` or `..`, not
absolute, no backslash, no control character (newlines included). `inside` then joins it onto a
local folder and checks, after resolving symlinks, that the result still lies inside it. Both are
used before anything is opened or written, so an instance cannot make the laptop touch a file
outside the folder it asked for (`./../../.bashrc`, `/etc/passwd`, `a\\n../b`).

Standard library only.
"""

from __future__ import annotations

import unicodedata
from pathlib import Path


class UnsafePathError(ValueError):
    """A path from the other side that would leave its folder, or that holds control characters."""


def _control(ch: str) -> bool:
    return unicodedata.category(ch) in ("Cc", "Cf", "Zl", "Zp") or ch == "\x7f"


def check_relpath(rel: str, *, allow_backslash: bool = False) -> str:
    """`rel` unchanged if it is a safe relative path; UnsafePathError (with the path escaped) if not.

    allow_backslash: where the path is used on a POSIX system only (a backslash is no separator there)."""
    shown = rel.encode("unicode_escape", "backslashreplace").decode("ascii")[:200]
    if not isinstance(rel, str) or not rel:
        raise UnsafePathError("an empty path")
    if any(_control(ch) for ch in rel):
        raise UnsafePathError(f"{shown!r}: control characters in a file name")
    if "\\" in rel and not allow_backslash:
        raise UnsafePathError(f"{shown!r}: a backslash in a file name")
    if rel.startswith("/"):
        raise UnsafePathError(f"{shown!r}: an absolute path")
    parts = rel.split("/")
    if any(p in ("", ".", "..") for p in parts):
        raise UnsafePathError(f"{shown!r}: empty, '.' or '..' parts leave or blur the folder")
    return rel


def inside(root: Path, rel: str, *, allow_backslash: bool = False) -> Path:
    """`root / rel`, refused unless `rel` is safe and the resolved result stays within `root`."""
    check_relpath(rel, allow_backslash=allow_backslash)
    base = Path(root).resolve()
    target = (base / rel).resolve()
    if target != base and base not in target.parents:
        raise UnsafePathError(f"{rel!r} resolves outside {base} (through a symlink)")
    return base / rel


__all__ = ["UnsafePathError", "check_relpath", "inside"]
