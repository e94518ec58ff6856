"""Start the guard beside a job, and read what it is doing (remote_worker.guard).

The guard is launched exactly like a job (client.launcher): under tmux on the job's socket (session
`<job id>-guard`), else setsid, with its files in `jobs/<id>/guard/`. It needs nothing from the
laptop afterwards. With `instance.shutdown_after = "never"` (the default for `host = "local"`)
no guard is started.
"""

from __future__ import annotations

import json
import time

from client import launcher
from client.transport.base import Transport
from client.transport.paths import shell_path
from jobs.layout import JobPaths
from jobs.spec import JobSpec


def session(job_id: str) -> str:
    return f"{job_id}-guard"


def start_guard(
    transport: Transport, spec: JobSpec, paths: JobPaths, job_id: str, env: dict[str, str]
) -> dict | None:
    """Launch the job's guard (stopping an earlier one of the same job first). None when the policy is "never"."""
    stop_guard(transport, spec, paths, job_id)  # also for a resumed job whose policy changed to "never"
    if spec.instance.shutdown_policy == "never":
        return None
    argv = [spec.instance.python, "-m", "remote_worker.guard", paths.spec]
    return launcher.launch(
        transport, paths.guard, argv, socket=spec.instance.tmux_socket, session=session(job_id), env=env
    )


def stop_guard(transport: Transport, spec: JobSpec, paths: JobPaths, job_id: str) -> None:
    launcher.cancel(
        transport, paths.guard, socket=spec.instance.tmux_socket, session=session(job_id), grace=2
    )


def guard_status(transport: Transport, paths: JobPaths) -> dict | None:
    """The guard's status.json (phase, policy, reason, message, shutdown_at, copied_to...), or None."""
    res = transport.run(f"cat -- {shell_path(paths.guard_status)} 2>/dev/null", check=False)
    if not res.ok or not res.stdout.strip():
        return None
    try:
        status = json.loads(res.stdout)
    except ValueError:
        return None
    return status if isinstance(status, dict) else None


def describe(status: dict | None, now: float | None = None) -> str:
    """One line for a person: what the guard does or did."""
    if not status:
        return ""
    now = time.time() if now is None else now
    phase, policy = status.get("phase", ""), status.get("policy", "")
    copied = f"; adapter copied to {status['copied_to']}" if status.get("copied_to") else ""
    if phase == "watching":
        return f"watching the job (shutdown_after = {policy})"
    if phase == "waiting":
        at = status.get("shutdown_at")
        when = f" (shuts down in {max(0, at - now) / 60:.0f} min without it)" if at else ""
        return f"{status.get('message', 'waiting')}{when}"
    if phase == "not shut down":
        return f"{status.get('message', '')}{copied}"
    if phase == "shutdown failed":
        return (
            f"the shutdown command failed (exit {status.get('command_rc')}): {status.get('command')}{copied}"
        )
    return f"{phase}: {status.get('message', '')}{copied}"
