"""Reach an instance: `connect(instance)` gives the transport for it (see base.Transport).

- `host = "local"`          -> LocalTransport (subprocesses on this machine);
- `profile = "NAME"`        -> SshTransport to the host profile NAME saved by `autodl-run login`
                               (its host, port, user and key; its own pinned host key);
- anything else (host/ssh)  -> SshTransport (paramiko for commands, rsync over ssh for files).

Connections open lazily, on the first command or transfer.
"""

from __future__ import annotations

from pathlib import Path

from client.transport.base import Result, Transport, check_result, to_shell
from client.transport.local import LocalTransport
from client.transport.paths import shell_path
from client.transport.ssh import SshTransport
from jobs.spec import InstanceSpec

__all__ = [
    "LocalTransport",
    "Result",
    "SshTransport",
    "Transport",
    "check_result",
    "connect",
    "shell_path",
    "to_shell",
]


def connect(instance: InstanceSpec, *, known_hosts: Path | None = None) -> Transport:
    """The transport for `instance`; SSH host keys are pinned in `known_hosts` (default $AUTODL_RUN_HOME/known_hosts),
    or, for a profile, in the profile's own file."""
    if instance.is_local:
        return LocalTransport()
    if instance.profile:
        from client.instances import profiles

        return SshTransport.from_profile(
            profiles.get(instance.profile), connect_timeout=instance.connect_timeout
        )
    return SshTransport.from_instance(instance, known_hosts=known_hosts)
