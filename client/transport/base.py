"""The one I/O seam between the laptop and an instance: run a command, put files, get files.

Two implementations share this protocol and the `Result` type:
- `LocalTransport` (client.transport.local) for `host = "local"`: subprocesses on this machine;
- `SshTransport` (client.transport.ssh): paramiko for commands, the system rsync for files (SFTP when
  either side lacks rsync); a host profile from `autodl-run login` (client.instances.profiles) picks host, key and pin.

Commands are argv lists; implementations quote them (shlex) and run them through
`bash -lc` so conda's python is on PATH on AutoDL images. A job name can never inject shell.
"""

from __future__ import annotations

import shlex
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from client.errors import RemoteCommandError


@dataclass
class Result:
    """A finished (or, in CommandTimedOut, stopped) command. `stdout` is decoded for reading, invalid
    UTF-8 replaced; `stdout_bytes` is exactly what it printed, for byte counts (client.remote.follow)."""

    command: str
    exited: int
    stdout: str
    stderr: str
    stdout_bytes: bytes = field(default=b"", repr=False)

    @classmethod
    def of(cls, command: str, exited: int, out: bytes, err: bytes) -> Result:
        return cls(command, exited, out.decode(errors="replace"), err.decode(errors="replace"), bytes(out))

    @property
    def ok(self) -> bool:
        return self.exited == 0

    def tail(self, n: int = 10) -> str:
        return "\n".join((self.stderr or self.stdout).strip().splitlines()[-n:])


Command = str | Sequence[str]


def sections(stdout: str) -> dict[str, list[str]]:
    """A probe script's output cut at its `@@NAME [first line]` headers: NAME -> the lines under it."""
    out: dict[str, list[str]] = {}
    current = None
    for line in stdout.splitlines():
        if line.startswith("@@"):
            head, _, rest = line[2:].partition(" ")
            current = out.setdefault(head, [])
            if rest:
                current.append(rest)
        elif current is not None:
            current.append(line)
    return out


def to_shell(cmd: Command) -> str:
    """argv list -> one safely quoted shell string; a str is taken as already-built shell."""
    return cmd if isinstance(cmd, str) else shlex.join(str(c) for c in cmd)


class Transport(Protocol):
    """What every target offers. `where` names it in error messages (e.g. root@host:port)."""

    where: str

    def run(
        self, cmd: Command, *, check: bool = True, timeout: float | None = None, input: str | None = None
    ) -> Result:
        """Run `cmd` on the target through `bash -lc`. With check, a non-zero exit raises RemoteCommandError;
        past `timeout` seconds it is stopped and CommandTimedOut carries its output so far."""
        ...

    def put(self, local: Path, remote: str, *, delete: bool = False) -> None:
        """Copy a local file or folder (its contents) to a remote path, creating parents; resumable (--partial)."""
        ...

    def get(self, remote: str, local: Path) -> None:
        """Copy a remote file or folder (its contents) to a local path, creating parents."""
        ...

    def close(self) -> None: ...


def check_result(result: Result, where: str, hint: str = "") -> Result:
    if not result.ok:
        raise RemoteCommandError(result.command, result.exited, result.stdout, result.stderr, where, hint)
    return result
