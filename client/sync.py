"""Sync content-addressed folders to the instance: sent once, complete or absent.

A folder goes to `{dest}.partial` first and is renamed into place only after the copy
finished, so an interrupted upload is resumed (rsync --partial) and never mistaken
for a complete one.
"""

from __future__ import annotations

import posixpath
from pathlib import Path

from client.transport.base import Transport


def remote_exists(transport: Transport, path: str) -> bool:
    return transport.run(["test", "-e", path], check=False).ok


def sync_dir(transport: Transport, local: Path, dest: str, *, marker: str) -> bool:
    """Upload `local` to `dest` unless `dest/marker` already exists there. Returns True if sent."""
    if remote_exists(transport, posixpath.join(dest, marker)):
        return False
    partial = dest + ".partial"
    transport.put(local, partial, delete=True)
    transport.run(["bash", "-c", 'rm -rf -- "$1" && mv -- "$2" "$1"', "_", dest, partial])
    return True
