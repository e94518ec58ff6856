"""Start the guard beside a job, and read what it is doing (remote_worker.guard).

The guard is launched exactly like a job (client.remote.launcher): under tmux on the job's socket (session
`<job id>-guard`), else setsid, with its files in `jobs/<id>/guard/`. It needs nothing from the
laptop afterwards. With `instance.shutdown_after = "never"` (the default for `host = "local"`)
no guard is started.
"""

from __future__ import annotations

import time

from client.errors import TransportError
from client.remote import launcher
from client.remote.setup import python_of
from client.transport.base import Transport
from client.transport.paths import shell_path
from jobs.layout import JobPaths
from jobs.protocol import GuardPhase, GuardStatus, ProtocolError, read_model
from jobs.spec import JobSpec


def session(job_id: str) -> str:
    return f"{job_id}-guard"


def start_guard(
    transport: Transport, spec: JobSpec, paths: JobPaths, job_id: str, env: dict[str, str]
) -> launcher.LaunchStatus | None:
    """Launch the job's guard (stopping an earlier one of the same job first): its status once it started,
    None when the policy is "never"."""
    stop_guard(transport, spec, paths, job_id)  # also for a resumed job whose policy changed to "never"
    if spec.instance.shutdown_policy == "never":
        return None
    argv = [python_of(spec.instance), "-m", "remote_worker.guard", paths.spec]
    return launcher.launch(
        transport, paths.guard, argv, socket=spec.instance.tmux_socket, session=session(job_id), env=env
    )


def stop_guard(transport: Transport, spec: JobSpec, paths: JobPaths, job_id: str) -> None:
    launcher.cancel(
        transport, paths.guard, socket=spec.instance.tmux_socket, session=session(job_id), grace=2
    )


GUARD_READ_TIMEOUT_S = 20.0  # reading one small file; a hung instance must not hang `status`


MAX_STATUS_BYTES = 65536  # a status.json is a few hundred bytes

def guard_status(transport: Transport, paths: JobPaths) -> GuardStatus | None:
    """The guard's status.json, or None: none yet, unreadable, malformed, or the instance did not answer."""
    q = shell_path(paths.guard_status)
    cmd = f"[ -f {q} ] && head -c {MAX_STATUS_BYTES} -- {q} 2>/dev/null"  # a regular file, and small
    try:
        res = transport.run(cmd, check=False, timeout=GUARD_READ_TIMEOUT_S)
    except TransportError:
        return None
    if not res.ok or not res.stdout.strip():
        return None
    try:
        return read_model(GuardStatus, res.stdout, paths.guard_status)
    except ProtocolError:
        return None


def describe(status: GuardStatus | None, now: float | None = None) -> str:
    """One line for a person: what the guard does or did."""
    if status is None:
        return ""
    now = time.time() if now is None else now
    copied = f"; adapter copied to {status.copied_to}" if status.copied_to else ""
    if status.phase == GuardPhase.WATCHING:
        return f"watching the job (shutdown_after = {status.policy})"
    if status.phase == GuardPhase.WAITING:
        at = status.shutdown_at
        when = f" (shuts down in {max(0.0, at - now) / 60:.0f} min without it)" if at else ""
        return f"{status.message or 'waiting'}{when}"
    if status.phase == GuardPhase.NOT_SHUT_DOWN:
        return f"{status.message}{copied}"
    if status.phase == GuardPhase.SHUTDOWN_FAILED:
        return f"the shutdown command failed (exit {status.command_rc}): {status.command}{copied}"
    return f"{status.phase}: {status.message}{copied}"
