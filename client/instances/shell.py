"""`autodl-run ssh JOB [COMMAND...]`: a shell (or one command) on the job's instance, in the job's folder.

It runs the system `ssh` with the job's host, port, user and key, and the host keys this project
pinned (a profile's own file, or $AUTODL_RUN_HOME/known_hosts), never trusting a new or changed key.
On the local target it is a login shell in the job's folder. A COMMAND's words are joined with spaces
and run by the shell there, as `ssh HOST COMMAND` does. The caller execs the argv it returns.
"""

from __future__ import annotations

import os
import shlex
import shutil
from dataclasses import dataclass

from client.errors import JobError, RemoteEnvError
from client.ledger import JobRecord
from client.transport import connect
from client.transport.ssh import SshTransport


@dataclass(frozen=True)
class ShellCommand:
    argv: list[str]
    cwd: str | None  # where to run it (the local target); None for ssh, which `cd`s there itself
    folder: str  # the job's folder


def shell_command(record: JobRecord, command: list[str]) -> ShellCommand:
    folder = record.layout.job(record.id).dir
    transport = connect(record.spec.instance)
    if not isinstance(transport, SshTransport):  # the local target: this machine
        if not os.path.isdir(folder):
            raise JobError(f"the folder of {record.id} is gone: {folder}", hint="`autodl-run ls` lists the jobs")
        shell = os.environ.get("SHELL") or "bash"
        argv = [shell, "-lc", " ".join(command)] if command else [shell, "-l"]
        return ShellCommand(argv, folder, folder)
    if shutil.which("ssh") is None:
        raise RemoteEnvError("autodl-run ssh needs the ssh command on this machine", hint="install OpenSSH's client")
    argv = [a.replace("StrictHostKeyChecking=accept-new", "StrictHostKeyChecking=yes")
            for a in transport.ssh_command()]  # fmt: skip  # only the key pinned when the job was submitted
    target = argv.pop()
    go = f"cd -- {shlex.quote(folder)} || exit 1; "
    remote = go + (" ".join(command) if command else 'exec "${SHELL:-bash}" -l')
    return ShellCommand([*argv, "-t" if not command else "-T", target, remote], None, folder)
