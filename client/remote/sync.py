"""Sync content-addressed folders to the instance: sent once, complete or absent.

A folder goes to `{dest}.<laptop>.partial` first and is renamed into place only after the copy
finished, so an interrupted upload is resumed (rsync --partial) and never mistaken
for a complete one. The partial folder is this laptop's own (another laptop uploading the same
content at once has its own), and a folder completed meanwhile by another upload is kept.
"""

from __future__ import annotations

import hashlib
import posixpath
import socket
from pathlib import Path

from client.transport.base import Transport


def remote_exists(transport: Transport, path: str) -> bool:
    return transport.run(["test", "-e", path], check=False).ok


def sync_dir(transport: Transport, local: Path, dest: str, *, marker: str) -> bool:
    """Upload `local` to `dest` unless `dest/marker` already exists there. Returns True if sent."""
    if remote_exists(transport, posixpath.join(dest, marker)):
        return False
    partial = f"{dest}.{_laptop()}.partial"
    transport.put(local, partial, delete=True)
    transport.run(["bash", "-c", 'if [ -e "$1/$3" ]; then rm -rf -- "$2"; else rm -rf -- "$1" && mv -- "$2" "$1"; fi',
                   "_", dest, partial, marker])  # fmt: skip
    return True


def _laptop() -> str:
    from client.home import home

    return hashlib.sha256(f"{socket.gethostname()}:{home()}".encode()).hexdigest()[:12]
