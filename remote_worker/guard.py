"""`python -m remote_worker.guard JOB_JSON`: stop paying for the GPU once the job's adapter is safe.

The client starts it beside the job, under tmux like the job itself (files in `jobs/<id>/guard/`,
jobs.layout), so it needs no laptop. It watches the job and, once the job's process has ended,
acts on `instance.shutdown_after`:

    "fetched" (default)  wait for the client's acknowledgement (`fetched.json`, naming the sha256 of
                         the adapter's manifest, written after the laptop verified every file), then
                         run `instance.shutdown_command`. No acknowledgement within
                         `instance.idle_grace_minutes`: copy the adapter to autodl-fs when it exists,
                         and shut down anyway (the data disk keeps the job's folder too).
    "done"               copy the adapter to autodl-fs when it exists, then shut down.
    "never"              nothing.

A job that failed or was stopped has no final adapter: after the idle grace its newest checkpoint
is copied to autodl-fs (whole, so it can be resumed elsewhere) and the instance is shut down.

Never while a fetch is in progress: the client touches `fetching` while it transfers, and the guard
waits while that lease is fresh (LEASE_S). Never while another job runs on the instance: that job's
guard decides. If this job runs again (`autodl-run resume` on the same instance), the guard goes
back to watching.

The default `shutdown_command` (/usr/bin/shutdown: AutoDL stops billing when it runs inside the
instance) runs only on a host that looks like an AutoDL instance (its environment variables,
/init/others/help or /etc/network_turbo); on any other host it would power off a machine that may
be someone's own, so the guard says so and leaves it running. A command set in the spec always runs.

What it is doing is in `guard/status.json`; `autodl-run status` shows it. Standard library and
jobs only: no torch.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from jobs.layout import MANIFEST, JobPaths
from jobs.manifest import ManifestError, verify_manifest
from jobs.spec import InstanceSpec, WorkerJob
from remote_worker import checkpoints

USAGE = "usage: python -m remote_worker.guard JOB_JSON"
LEASE_S = 60.0  # a `fetching` lease older than this is stale (the client refreshes it every 15 s)
FS_ROOTS = ("~/autodl-fs", "/root/autodl-fs")  # AutoDL's network disk: survives the instance's release
DEFAULT_COMMAND = InstanceSpec.model_fields["shutdown_command"].default
AUTODL_ENV = ("AutoDLContainerUUID", "AutoDLRegion", "AutoDLDataCenter")
AUTODL_FILES = ("/init/others/help", "/etc/network_turbo")


def on_autodl() -> bool:
    """Whether this host looks like an AutoDL instance (where /usr/bin/shutdown stops the billing)."""
    return any(os.environ.get(v) for v in AUTODL_ENV) or any(os.path.exists(f) for f in AUTODL_FILES)


def default_command_safe() -> bool:
    """The default command may run: on AutoDL, and not systemd's shutdown (AutoDL's containers run no
    systemd, so theirs is AutoDL's own; systemd's would power off a real machine)."""
    return on_autodl() and os.path.basename(os.path.realpath(DEFAULT_COMMAND)) != "systemctl"


def poll_s() -> float:
    try:
        return max(0.05, float(os.environ.get("AUTODL_RUN_GUARD_POLL_S", "1")))
    except ValueError:
        return 1.0


@dataclass
class Decision:
    action: str  # "wait", "shutdown" or "exit"
    reason: str  # wait: running, fetch in progress, waiting for the fetch, idle; shutdown: fetched, done, grace, idle
    message: str


def alive(job_dir: Path) -> bool:
    """The job's wrapper (its pid file) still runs, in that folder (a reused pid does not count)."""
    try:
        pid = int((job_dir / "pid").read_text().split()[0])
        os.kill(pid, 0)
    except (OSError, ValueError, IndexError):
        return False
    cwd = Path(f"/proc/{pid}/cwd")
    if Path("/proc/self/cwd").exists():
        try:
            return os.path.samefile(cwd, job_dir)
        except OSError:
            return False
    return True


def sha256_of(path: Path) -> str | None:
    try:
        return hashlib.sha256(path.read_bytes()).hexdigest()
    except OSError:
        return None


def fs_root() -> Path | None:
    override = os.environ.get("AUTODL_RUN_FS")
    for candidate in ([override] if override else []) + list(FS_ROOTS):
        path = Path(candidate).expanduser()
        if path.is_dir():
            return path
    return None


class Guard:
    def __init__(self, job: WorkerJob, clock: Callable[[], float] = time.time):
        self.job = job
        self.paths = JobPaths(job.job_dir)
        self.dir = Path(job.job_dir)
        inst = job.spec.instance
        self.policy = inst.shutdown_policy
        self.grace_s = inst.idle_grace_minutes * 60
        self.command = inst.shutdown_command
        self.clock = clock
        self.ended_at: float | None = None
        self._status: dict = {}

    # -- what the job folder says ------------------------------------------------------------

    def running(self) -> bool:
        return alive(self.dir)

    def outcome(self) -> str:
        state_file = Path(self.paths.state)
        state = state_file.read_text().strip() if state_file.is_file() else ""
        if state == "done" and (Path(self.paths.adapter) / MANIFEST).is_file():
            return "done"
        return state if state in ("failed", "cancelled") else "lost"

    def acknowledged(self) -> dict | None:
        """The client's acknowledgement, if it names this very adapter (sha256 of its manifest)."""
        try:
            ack = json.loads(Path(self.paths.fetched).read_text())
        except (OSError, ValueError):
            return None
        want = sha256_of(Path(self.paths.adapter) / MANIFEST)
        if isinstance(ack, dict) and want and ack.get("manifest_sha256") == want:
            return ack
        return None

    def fetch_in_progress(self, now: float) -> bool:
        """A client's lease (`fetching.<token>`, touched while it transfers) is fresh."""
        for lease in self.dir.glob("fetching*"):
            try:
                if now - lease.stat().st_mtime < LEASE_S:
                    return True
            except OSError:
                pass
        return False

    def others_running(self) -> list[str]:
        jobs = self.dir.parent
        return sorted(p.name for p in jobs.iterdir() if p.is_dir() and p != self.dir and alive(p))

    # -- the decision, once a tick ---------------------------------------------------------------

    def decide(self, now: float) -> Decision:
        if self.policy == "never":
            return Decision("exit", "never", 'instance.shutdown_after = "never": the guard does nothing')
        if self.running():
            self.ended_at = None
            return Decision("wait", "running", "watching the job")
        if self.ended_at is None:
            self.ended_at = now
        outcome = self.outcome()
        left = self.ended_at + self.grace_s - now
        if self.fetch_in_progress(now):
            return Decision("wait", "fetch in progress", "a fetch is in progress; waiting for it to finish")
        if outcome == "done" and self.policy == "done":
            return Decision("shutdown", "done", "the job is done")
        if outcome == "done" and self.acknowledged():
            return Decision("shutdown", "fetched", "the client fetched and verified the adapter")
        if left <= 0:
            if outcome == "done":
                return Decision("shutdown", "grace", f"no fetch within {self.grace_s / 60:g} min")
            return Decision("shutdown", "idle", f"the job {outcome}; idle for {self.grace_s / 60:g} min")
        if outcome == "done":
            return Decision("wait", "waiting for the fetch", "waiting for the client to fetch the adapter")
        return Decision("wait", "idle", f"the job {outcome}; waiting for it to be resumed")

    # -- acting on it ------------------------------------------------------------------------------

    def preserve(self) -> str | None:
        """Copy the adapter (or, without one, the newest checkpoint) to autodl-fs; its path there, or None."""
        root = fs_root()
        if root is None:
            return None
        adapter = Path(self.paths.adapter)
        if (adapter / MANIFEST).is_file():
            src, dest = adapter, root / "autodl-run" / self.job.job_id / "adapter"
        else:
            steps = checkpoints.complete(Path(self.paths.checkpoints))
            if not steps:
                return None
            src, dest = steps[-1], root / "autodl-run" / self.job.job_id / "checkpoints" / steps[-1].name
        tmp = dest.with_name(dest.name + ".partial")
        try:
            shutil.rmtree(tmp, ignore_errors=True)
            shutil.copytree(src, tmp)
            verify_manifest(tmp)
            if dest.exists():
                shutil.rmtree(dest)
            tmp.rename(dest)
        except (OSError, ManifestError) as exc:
            shutil.rmtree(tmp, ignore_errors=True)
            self.log(f"could not copy {src} to {dest}: {exc}")
            return None
        return str(dest)

    def shutdown(self, decision: Decision) -> int:
        others = self.others_running()
        if others:
            self.write_status("exited", decision, f"job {others[0]} runs on this instance: its guard decides")
            return 0
        copied = None if decision.reason == "fetched" else self.preserve()
        if self.fetch_in_progress(self.clock()):  # a fetch started while we copied: wait for it
            return -1
        if self.command == DEFAULT_COMMAND and not default_command_safe():
            self.write_status(
                "not shut down",
                decision,
                f"{decision.message}; this host does not look like an AutoDL instance, so the default "
                f"shutdown_command ({DEFAULT_COMMAND}) was not run: set instance.shutdown_command to stop it here",
                copied_to=copied,
            )
            return 0
        self.write_status("shutting down", decision, decision.message, copied_to=copied, command=self.command)
        self.log(f"{decision.message}: running {self.command}")
        try:
            rc = subprocess.run(["sh", "-c", self.command], stdin=subprocess.DEVNULL).returncode
        except OSError as exc:
            self.log(f"cannot run the shutdown command: {exc}")
            rc = 127
        self.write_status("shut down" if rc == 0 else "shutdown failed", decision, decision.message,
                          copied_to=copied, command=self.command, command_rc=rc)  # fmt: skip
        return 0 if rc == 0 else 1

    def run(self, sleep: Callable[[float], None] = time.sleep) -> int:
        self.log(
            f"guarding {self.job.job_id}: shutdown_after = {self.policy}, grace {self.grace_s / 60:g} min"
        )
        while True:
            now = self.clock()
            decision = self.decide(now)
            if decision.action == "exit":
                self.write_status("exited", decision, decision.message)
                return 0
            if decision.action == "shutdown":
                code = self.shutdown(decision)
                if code >= 0:
                    return code
                continue
            self.write_status(
                "watching" if decision.reason == "running" else "waiting", decision, decision.message
            )
            sleep(poll_s())

    # -- reporting ---------------------------------------------------------------------------------

    def write_status(self, phase: str, decision: Decision, message: str, **extra) -> None:
        status = {
            "phase": phase,
            "policy": self.policy,
            "reason": decision.reason,
            "message": message,
            "shutdown_at": None if self.ended_at is None else self.ended_at + self.grace_s,
            **extra,
        }
        if status == {k: v for k, v in self._status.items() if k != "t"}:
            return
        self._status = {**status, "t": self.clock()}
        path = Path(self.paths.guard_status)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(".status.json.tmp")
            tmp.write_text(json.dumps(self._status, indent=1) + "\n")
            tmp.replace(path)
        except OSError:
            pass
        if phase != "watching":
            self.log(f"{phase}: {message}")

    @staticmethod
    def log(message: str) -> None:
        try:
            print(time.strftime("%Y-%m-%d %H:%M:%S"), message, flush=True)
        except OSError:
            pass


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1 or argv[0].startswith("-"):
        print(USAGE, file=sys.stderr)
        return 2
    try:
        job = WorkerJob.model_validate_json(Path(argv[0]).read_text(encoding="utf-8"))
    except Exception as exc:
        print(f"cannot read {argv[0]}: {exc}", file=sys.stderr)
        return 2
    return Guard(job).run()


if __name__ == "__main__":
    raise SystemExit(main())
