"""After-training tasks on the instance (eval, export): launched like a job, waited for, fetched verified.

Each task runs a worker module (`remote_worker.evaluate`, `remote_worker.export`) under the job's
python, detached under tmux in `jobs/<id>/post/<task>/` (jobs.layout: laid out like a job, so a
dropped link does not stop it and the guard sees it run). Its result folder carries a sha256
manifest; the laptop pulls it through client.lifecycle.fetch.pull_verified and then writes the
task's acknowledgement (`post/<task>/fetched.json`): the guard does not shut the instance down
while a task runs or while its result waits for that acknowledgement.
"""

from __future__ import annotations

import shlex
import time
from collections.abc import Callable
from pathlib import Path

from client.errors import JobError, RemoteEnvError
from client.remote import launcher
from client.remote.bundle import sync_bundle
from client.remote.setup import pip_command, python_of
from client.session import Session
from client.transport.base import Transport
from client.transport.paths import shell_path
from client.views.text import shown
from jobs.layout import MANIFEST, JobPaths
from jobs.requirements import POST_REQUIREMENTS
from jobs.spec import JobSpec

POLL_S = 2.0
Log = Callable[[str], None]


def worker_argv(spec: JobSpec, module: str, args: list[str]) -> list[str]:
    return [python_of(spec.instance), "-m", module, *args]


def ensure_deps(transport: Transport, spec: JobSpec, log: Log) -> None:
    """gguf and rouge-score where the job's python lacks them (the training set-up does not install them)."""
    names = list(POST_REQUIREMENTS)
    check = f"{shell_path(python_of(spec.instance))} -c {shlex.quote('import ' + ', '.join(names))}"
    if transport.run(check, check=False, timeout=120).ok:
        return
    log(f"installing {', '.join(POST_REQUIREMENTS.values())} on {transport.where}")
    res = transport.run(pip_command(spec, None, list(POST_REQUIREMENTS.values())), check=False, timeout=900)
    if not res.ok:
        raise RemoteEnvError(
            f"cannot install {', '.join(POST_REQUIREMENTS.values())} on {transport.where}: {shown(res.tail(3))}",
            hint="install them into the job's python there by hand, or run the command on the laptop with --here",
        )


def run_task(session: Session, spec: JobSpec, job_id: str, task: str, module: str, args: list[str],
             *, env: dict[str, str], log: Log, timeout_s: float = 6 * 3600) -> JobPaths:  # fmt: skip
    """Launch `python -m module args` in post/<task>/ and wait until it ends; its folder, once it succeeded."""
    transport = session.transport
    paths = session.layout.job(job_id).post(task)
    status = launcher.job_status(transport, paths)
    if status.active:
        log(f"{task} already runs on {transport.where}: waiting for it")
    else:
        transport.run(["rm", "-rf", "--", paths.post_result], check=False)
        launcher.launch(transport, paths, worker_argv(spec, module, args), socket=spec.instance.tmux_socket,
                        session=f"{job_id}-{task}", env=env)  # fmt: skip
        log(f"{task} started on {transport.where} (its log: {paths.log})")
    deadline = time.monotonic() + timeout_s
    while True:
        status = launcher.job_status(transport, paths)
        if not status.active:
            break
        if time.monotonic() > deadline:
            raise JobError(f"{task} of job {job_id} still runs on {transport.where} after {timeout_s / 3600:g} h",
                           hint="it keeps running there: run the same command again later to fetch it")  # fmt: skip
        time.sleep(POLL_S)
    if status.state.value != "done" or not has_result(transport, paths):
        tail = transport.run(["tail", "-n", "15", "--", paths.log], check=False).stdout
        raise JobError(
            f"{task} of job {job_id} ended as {status.state.value} on {transport.where}; the end of its log:\n{shown(tail)}",
            hint=f"see its whole log: {paths.log} on the instance",
        )
    return paths


def has_result(transport: Transport, paths: JobPaths) -> bool:
    return transport.run(["test", "-f", paths.post_result + "/" + MANIFEST], check=False).ok


def bundle_env(session: Session, spec: JobSpec) -> dict[str, str]:
    """The environment of a worker module: this client's bundle (sent unless the instance has it)."""
    from client.lifecycle.steps import worker_env

    digest, _ = sync_bundle(session.transport, session.layout)
    return worker_env(session.placed(spec), session.layout, session.layout.bundle_dir(digest))


def here_env() -> dict[str, str]:
    """The environment of a worker module run on this laptop (--here): this installation's code."""
    import os

    import remote_worker

    root = str(Path(remote_worker.__file__).resolve().parent.parent)
    path = os.environ.get("PYTHONPATH", "")
    return {**os.environ, "PYTHONPATH": root + (os.pathsep + path if path else ""), "TOKENIZERS_PARALLELISM": "false"}
