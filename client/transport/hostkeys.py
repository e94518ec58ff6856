"""Pinned host keys: read, pin and fetch them (known_hosts files that paramiko and OpenSSH both read).

Two kinds of file use this module:
- `$AUTODL_RUN_HOME/known_hosts`, keys filed under `[host]:port` (instances given by host/port);
- `$AUTODL_RUN_HOME/hostkeys/NAME`, keys filed under a profile's alias (see client.instances.profiles).

A key is pinned the first time it is seen (trust on first use) and then checked at every
connection; only `autodl-run trust` replaces one.
"""

from __future__ import annotations

import os
import socket
from pathlib import Path

import paramiko

from client.transport.errors_map import SshTarget, from_exception


class PinPolicy(paramiko.MissingHostKeyPolicy):
    """Trust on first use: pin the key of a host seen for the first time under `name` in `path`."""

    def __init__(self, path: Path, name: str):
        self.path, self.name = path, name

    def missing_host_key(self, client: paramiko.SSHClient, hostname: str, key: paramiko.PKey) -> None:
        pin(self.path, self.name, key)


def pinned(path: Path, name: str) -> list[paramiko.PKey]:
    """The keys pinned for `name` in `path` (none when the file or the entry is missing)."""
    if not path.is_file():
        return []
    keys = paramiko.HostKeys()
    try:
        keys.load(str(path))
    except (OSError, paramiko.SSHException, ValueError):
        return []
    entry = keys.lookup(name)
    return list(entry.values()) if entry else []


def pin(path: Path, name: str, key: paramiko.PKey) -> None:
    """Make `key` the only key pinned for `name` in `path` (0600, written atomically)."""
    keys = paramiko.HostKeys()
    if path.is_file():
        keys.load(str(path))
    _drop(keys, name)
    keys.add(name, key.get_name(), key)
    _save(keys, path)


def names_for_host(path: Path, host: str) -> list[str]:
    """Every name in `path` that pins a key for `host`, on any port (`host` and `[host]:PORT`)."""
    if not path.is_file():
        return []
    keys = paramiko.HostKeys()
    keys.load(str(path))
    return [n for n in keys.keys() if n == host or n.startswith(f"[{host}]:")]


def fetch(t: SshTarget) -> paramiko.PKey:
    """The host key the server at t.host:t.port presents now (no authentication, nothing run)."""
    try:
        sock = socket.create_connection((t.host, t.port), timeout=t.connect_timeout)
    except OSError as exc:
        raise from_exception(exc, t) from exc
    transport = paramiko.Transport(sock)
    try:
        transport.banner_timeout = t.connect_timeout
        transport.start_client(timeout=t.connect_timeout)
        return transport.get_remote_server_key()
    except Exception as exc:
        raise from_exception(exc, t) from exc
    finally:
        transport.close()


def _drop(keys: paramiko.HostKeys, name: str) -> None:
    while True:
        try:
            del keys[name]  # one entry a call (hashed names match too)
        except KeyError:
            return


def _save(keys: paramiko.HostKeys, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    os.close(fd)
    keys.save(str(tmp))
    os.replace(tmp, path)
