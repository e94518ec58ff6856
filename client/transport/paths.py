"""Remote paths that may start with `~`, the same way on every transport.

A leading `~` means the home folder of the user on the target. Two uses:
- `expand_home(path, home)`: resolve it on the laptop, once the target's `$HOME` is known
  (rsync arguments, `test -d`);
- `shell_path(path)`: quote a path for a shell command and let the target's bash expand `~`
  (`~/a b` becomes `"$HOME"/'a b'`). Everything else is quoted, so nothing in a path is ever run.
"""

from __future__ import annotations

import shlex


def split_home(path: str) -> tuple[bool, str]:
    """(starts at home, the rest after `~/`). Only `~` and `~/...` count; `~user` is not expanded."""
    if path == "~":
        return True, ""
    if path.startswith("~/"):
        return True, path[2:].lstrip("/")
    return False, path


def expand_home(path: str, home: str) -> str:
    at_home, rest = split_home(path)
    if not at_home:
        return path
    home = home.rstrip("/") or "/"
    return home if not rest else f"{home.rstrip('/')}/{rest}"


def shell_path(path: str) -> str:
    at_home, rest = split_home(path)
    if not at_home:
        return shlex.quote(path)
    return '"$HOME"' + (f"/{shlex.quote(rest)}" if rest else "")
