"""`autodl-run chat JOB [--base]`: talk to the tuned model in this terminal, tokens streamed as they come.

`remote_worker.chat` runs where the model is: on the instance through the system `ssh -t` (a pty, so
lines and Ctrl-C reach it as typed; the same pinned host key and options rsync uses), on the local
target as a child process of this one, or on this laptop from the fetched adapter (`here`). It uses
the adapter's tokenizer: the chat template and stop tokens of training.
"""

from __future__ import annotations

import os
import shlex
import subprocess
import sys
from pathlib import Path

from client.ledger import JobRecord
from client.lifecycle.evaluate import local_adapter, require_remote_adapter
from client.remote import posttask
from client.remote.setup import quiet
from client.session import open_session
from client.transport.ssh import SshTransport

MODULE = "remote_worker.chat"


def argv_for(adapter: str, use_base: bool, base: str | None, max_new_tokens: int | None) -> list[str]:
    args = ["--adapter", adapter]
    if use_base:
        args.append("--no-adapter")
    if base:
        args += ["--base", base]
    if max_new_tokens:
        args += ["--max-new-tokens", str(max_new_tokens)]
    return args


def chat(record: JobRecord, *, use_base: bool = False, here: bool = False, to: Path | None = None,
         base: str | None = None, max_new_tokens: int | None = None, log=quiet) -> int:  # fmt: skip
    """Run the chat in the foreground, this terminal as its terminal; returns its exit code."""
    if here:
        adapter = local_adapter(record, to)
        argv = [sys.executable, "-m", MODULE, *argv_for(str(adapter), use_base, base, max_new_tokens)]
        return subprocess.call(argv, env=posttask.here_env())
    with open_session(record) as session:
        transport, job = session.transport, session.layout.job(record.id)
        require_remote_adapter(transport, job, record)
        placed = session.placed(record.spec)
        env = posttask.bundle_env(session, record.spec)
        argv = posttask.worker_argv(placed, MODULE, argv_for(job.adapter, use_base, base, max_new_tokens))
        if not isinstance(transport, SshTransport):  # the local target: a child process of this one
            return subprocess.call(argv, env={**os.environ, **env})
        exports = " ".join(f"{k}={shlex.quote(v)}" for k, v in env.items())
        remote = f"cd {shlex.quote(job.dir)} && env {exports} {shlex.join(argv)}"
        log(f"chatting on {transport.where}")
        ssh = transport.ssh_command()
        return subprocess.call([*ssh[:-1], "-t", ssh[-1], remote])
