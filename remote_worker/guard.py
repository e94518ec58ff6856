"""`python -m remote_worker.guard JOB_JSON`: stop paying for the GPU once every adapter on it is safe.

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

Every job on the instance, not just its own. The instance is shut down only when no job runs or is
being launched (its `launch.json` without a pid, for LAUNCH_S after the guard first saw it; or its
model download still running), no client holds a fresh lease on any job, and every finished job's
output (its adapter, or without one its newest checkpoint) is safe: acknowledged by the laptop
(FetchAck naming that manifest's sha256), kept on autodl-fs (a verified copy), or not wanted (that
job's policy is "never", or it has no output). A finished job that is not safe holds the shutdown
while its own grace runs, counted from when this guard saw it end. Once every grace has passed,
the guard copies each such output to autodl-fs, verified, and then shuts down. What could not be
copied (no autodl-fs, or the copy failed) stays on the data disk, which a shutdown keeps (AutoDL
releases a stopped instance only after a while), and the status names it: the guard never keeps
the GPU paid beyond the longest grace. An unreadable file counts as "not safe": a bad `job.json`
gives that job this guard's own grace, a bad `fetched.json` acknowledges nothing. While another
job runs, that job's guard decides: this one copies its own output if it is not safe, and exits.
If this job runs again (`autodl-run resume` on the same instance), the guard goes back to watching.
After-training tasks (`post/<task>/`: eval, export) count as the job: while one runs the job runs,
and the job's adapter counts as acknowledged only once each task's result is acknowledged too.

Durations are measured on the monotonic clock, so a jump of the instance's wall clock neither ends
a grace nor ages a lease: a lease (`fetching.<token>`, touched by the client every 15 s while it
transfers) is fresh while its mtime changed, or it appeared, within LEASE_S monotonic seconds.
`shutdown_at` in the status is wall-clock time, for display only.

The default `shutdown_command` (/usr/bin/shutdown: AutoDL stops billing when it runs inside the
instance) runs only on a host that looks like an AutoDL instance (its environment variables,
/init/others/help or /etc/network_turbo); on any other host it would power off a machine that may
be someone's own, so the guard says so and leaves it running. A command set in the spec always runs.

What it is doing is in `guard/status.json` (jobs.protocol.GuardStatus); `autodl-run status` shows
it. Standard library, pydantic and jobs only: no torch.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from enum import Enum
from pathlib import Path

from jobs import autodl
from jobs.jobstate import parse_exit_code, resolve
from jobs.layout import LEASE_PREFIX, MANIFEST, JobPaths, checkpoint_step
from jobs.manifest import ManifestError, sha256_file, verify_manifest
from jobs.protocol import (
    FetchAck,
    GuardPhase,
    GuardStatus,
    JobState,
    LaunchRecord,
    ProtocolError,
    dump_model,
    read_model,
)
from jobs.spec import InstanceSpec, WorkerJob

USAGE = "usage: python -m remote_worker.guard JOB_JSON"
LEASE_S = 60.0  # a lease whose mtime did not change for this long is stale (touched every 15 s)
LAUNCH_S = 600.0  # a launch.json without a pid counts as a launch in progress this long
FS_ROOTS = autodl.FS_ROOTS  # AutoDL's network disk: survives the instance's release
DEFAULT_COMMAND = InstanceSpec.model_fields["shutdown_command"].default
AUTODL_ENV = autodl.ENV_VARS
AUTODL_FILES = autodl.MARKER_FILES


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


class Reason(str, Enum):
    """Why the guard waits or acts (`reason` in guard/status.json)."""

    NEVER = "never"
    RUNNING = "running"
    FETCH_IN_PROGRESS = "fetch in progress"
    WAITING_FOR_FETCH = "waiting for the fetch"
    IDLE = "idle"  # the job failed or was stopped: waiting for a resume, then the grace ran out
    OTHER_JOB = "another job"  # another job is being launched, or its output waits for its fetch
    FETCHED = "fetched"
    DONE = "done"
    GRACE = "grace"

    def __str__(self) -> str:
        return self.value


@dataclass
class Decision:
    action: str  # "wait", "shutdown", "leave" (another job runs: its guard decides) or "exit"
    reason: Reason
    message: str


@dataclass
class Output:
    """What a finished job must not lose: its adapter, or without one its newest checkpoint."""

    src: Path
    rel: str  # below the job's output/ folder, and below autodl-fs/autodl-run/<job id>/
    sha256: str | None  # of its manifest.json


@dataclass
class JobView:
    """One job folder as the guard sees it this tick."""

    job_id: str
    dir: Path
    state: JobState
    running: bool  # its wrapper or its model download runs
    launching: str | None  # why it counts as being launched (young, no pid yet), or None
    policy: str | None  # None: job.json unreadable
    grace_s: float | None
    output: Output | None
    acked: bool

    @property
    def busy(self) -> bool:
        return self.running or self.launching is not None

    @property
    def what(self) -> str:
        """Its output as a path in the job's output folder (`adapter`, `checkpoints/step-N`)."""
        return self.output.rel if self.output is not None else "output"


def alive(job_dir: Path) -> bool:
    """The job's wrapper (its pid file) still runs, in that folder (a reused pid does not count)."""
    try:
        pid = int(Path(JobPaths(str(job_dir)).pid).read_text().split()[0])
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
        return sha256_file(path)
    except OSError:
        return None


def read_text(path: str | Path) -> str | None:
    try:
        return Path(path).read_text(encoding="utf-8", errors="replace")
    except OSError:
        return None


def read_file(model, path: str | Path):
    """A crossing file through its jobs.protocol model; None when absent or malformed."""
    text = read_text(path)
    if text is None:
        return None
    try:
        return read_model(model, text, str(path))
    except ProtocolError:
        return None


def fs_root() -> Path | None:
    override = os.environ.get("AUTODL_RUN_FS")
    for candidate in ([override] if override else []) + list(FS_ROOTS):
        path = Path(candidate).expanduser()
        if path.is_dir():
            return path
    return None


def post_tasks(paths: JobPaths) -> list[JobPaths]:
    """The job's after-training tasks (eval, export), each in a folder laid out like a job's."""
    try:
        names = sorted(p.name for p in Path(paths.post_dir).iterdir() if p.is_dir())
    except OSError:
        return []
    out = []
    for name in names:
        try:
            out.append(paths.post(name))
        except ValueError:  # not a task folder name: nothing of ours
            continue
    return out


def post_acked(task: JobPaths) -> bool:
    """A task's result is safe: it made none, or a client acknowledged that very result."""
    sha = sha256_of(Path(task.post_result) / MANIFEST)
    if sha is None:
        return True
    ack = read_file(FetchAck, task.fetched)
    return bool(ack and ack.manifest_sha256 == sha)


def newest_checkpoint(root: Path) -> Path | None:
    """The newest complete checkpoint (`step-N` with its manifest) under `root`."""
    try:
        found = [(checkpoint_step(p.name), p) for p in root.iterdir() if (p / MANIFEST).is_file()]
    except OSError:
        return None
    found = [(s, p) for s, p in found if s is not None]
    return max(found)[1] if found else None


class Guard:
    def __init__(
        self,
        job: WorkerJob,
        clock: Callable[[], float] = time.time,
        monotonic: Callable[[], float] = time.monotonic,
    ):
        self.job = job
        self.paths = JobPaths(job.job_dir)
        self.dir = Path(job.job_dir)
        inst = job.spec.instance
        self.policy = inst.shutdown_policy
        self.grace_s = inst.idle_grace_minutes * 60
        self.command = inst.shutdown_command
        self.clock = clock  # wall clock: only for `shutdown_at` and `t`, shown to a person
        self.monotonic = monotonic  # every duration
        self.ended: dict[str, float] = {}  # job id -> when this guard saw it end
        self.pending: dict[str, float] = {}  # job id -> when this guard first saw it without a pid
        self.leases: dict[Path, tuple[int, float]] = {}  # lease -> (mtime, when first seen)
        self.verified: set[tuple[str, str]] = set()  # (copy on autodl-fs, manifest sha256) already checked
        self.views: dict[str, JobView] = {}
        self.remaining: float | None = None  # seconds until the shutdown unless something comes first
        self._status: GuardStatus | None = None

    # -- what the job folders say ------------------------------------------------------------------

    def view(self, job_dir: Path, now: float) -> JobView:
        job_id = job_dir.name
        paths = JobPaths(str(job_dir))
        wrapper = alive(job_dir)
        tasks = post_tasks(paths)
        running = wrapper or alive(Path(paths.prefetch.dir)) or any(alive(Path(t.dir)) for t in tasks)
        has_pid = Path(paths.pid).exists()
        record = read_file(LaunchRecord, paths.launch)
        state = resolve(
            read_text(paths.state), parse_exit_code(read_text(paths.exit_code)), wrapper,
            exists=job_dir.is_dir(), has_pid=has_pid, launching=Path(paths.launch).exists(),
        )  # fmt: skip
        launching = None
        own = job_dir == self.dir  # the guard starts right after its job: that pid may not be written yet
        if not running and (state == JobState.LAUNCHING or (own and state == JobState.STARTING)):
            if now - self.pending.setdefault(job_id, now) < LAUNCH_S:
                launching = f"job {job_id}{f' ({record.name})' if record else ''} is being launched"
        else:
            self.pending.pop(job_id, None)
        if running or launching:
            self.ended.pop(job_id, None)
        else:
            self.ended.setdefault(job_id, now)
        policy: str | None
        grace: float | None
        if own:
            policy, grace = self.policy, self.grace_s
        else:
            spec = read_file(WorkerJob, paths.spec)
            inst = spec.spec.instance if spec else None
            policy = inst.shutdown_policy if inst else None
            grace = inst.idle_grace_minutes * 60 if inst else None
        output = self.output_of(paths)
        ack = read_file(FetchAck, paths.fetched)
        acked = bool(ack and output and output.sha256 and ack.manifest_sha256 == output.sha256)
        acked = acked and all(post_acked(t) for t in tasks)  # eval and export results are fetched too
        return JobView(job_id, job_dir, state, running, launching, policy, grace, output, acked)

    @staticmethod
    def output_of(paths: JobPaths) -> Output | None:
        adapter = Path(paths.adapter)
        src = adapter if (adapter / MANIFEST).is_file() else newest_checkpoint(Path(paths.checkpoints))
        if src is None:
            return None
        return Output(src, src.relative_to(paths.output).as_posix(), sha256_of(src / MANIFEST))

    def survey(self, now: float) -> dict[str, JobView]:
        """Every job folder on the instance, this guard's own first; an unreadable one never stops the guard."""
        views = {self.job.job_id: self.view(self.dir, now)}
        try:
            others = sorted(p for p in self.dir.parent.iterdir() if p.is_dir() and p != self.dir)
        except OSError:
            others = []
        for d in others:
            try:
                views[d.name] = self.view(d, now)
            except Exception as exc:  # noqa: BLE001 - a bad folder is "not safe", never a crash
                self.log(f"cannot read job folder {d}: {exc}")
                views[d.name] = JobView(d.name, d, JobState.LOST, False, None, None, None,
                                        Output(d, "", None), False)  # fmt: skip
                self.ended.setdefault(d.name, now)
        return views

    def fetching(self, now: float, views: dict[str, JobView]) -> str | None:
        """The job a client fetches now: one of its leases (`fetching.<token>`) changed within LEASE_S."""
        seen, fresh = set(), None
        for v in views.values():
            try:
                leases = list(v.dir.glob(LEASE_PREFIX + "*"))
            except OSError:
                continue
            for lease in leases:
                try:
                    mtime = lease.stat().st_mtime_ns
                except OSError:
                    continue
                seen.add(lease)
                known = self.leases.get(lease)
                if known is None or known[0] != mtime:
                    self.leases[lease] = known = (mtime, now)
                if now - known[1] < LEASE_S and fresh is None:
                    fresh = v.job_id
        self.leases = {k: t for k, t in self.leases.items() if k in seen}
        return fresh

    def safe(self, v: JobView) -> bool:
        """Nothing of this finished job would be lost: no output, not wanted, fetched, or on autodl-fs."""
        if v.output is None or v.policy == "never" or v.acked:
            return True
        root = fs_root()
        return root is not None and self.kept_at(self.fs_dest(root, v), v.output.sha256)

    def left(self, v: JobView, now: float) -> float:
        """Seconds of this job's grace left, counted from when this guard saw it end."""
        grace = self.grace_s if v.grace_s is None else v.grace_s
        return self.ended.get(v.job_id, now) + grace - now

    # -- the decision, once a tick -------------------------------------------------------------------

    def decide(self) -> Decision:
        if self.policy == "never":
            return Decision("exit", Reason.NEVER, 'instance.shutdown_after = "never": the guard does nothing')
        now = self.monotonic()
        self.views = views = self.survey(now)
        own = views[self.job.job_id]
        if own.busy:
            self.remaining = None
            return Decision("wait", Reason.RUNNING, "watching the job")
        left = self.left(own, now)
        others = [v for v in views.values() if v is not own]
        unsafe = [(v, self.left(v, now)) for v in others if not v.busy and not self.safe(v)]
        self.remaining = max([left] + [t for _, t in unsafe])
        fetching = self.fetching(now, views)
        if fetching:
            whose = "" if fetching == own.job_id else f" (job {fetching})"
            return Decision(
                "wait", Reason.FETCH_IN_PROGRESS, f"a fetch is in progress{whose}; waiting for it to finish"
            )
        ready = self.own_decision(own, left)
        if ready.action == "wait":
            return ready
        self.remaining = max([0.0] + [t for _, t in unsafe])
        running = [v for v in others if v.running]
        if running:
            return Decision(
                "leave", ready.reason, f"job {running[0].job_id} runs on this instance: its guard decides"
            )
        launching = [v for v in others if v.launching]
        if launching:
            return Decision("wait", Reason.OTHER_JOB, f"{launching[0].launching}; waiting for it")
        waiting = [(v, t) for v, t in unsafe if t > 0]
        if waiting:
            v, t = max(waiting, key=lambda w: w[1])
            return Decision(
                "wait", Reason.OTHER_JOB,
                f"{ready.message}, but job {v.job_id}'s {v.what} is neither fetched nor on autodl-fs: "
                f"waiting {t / 60:.0f} min for its fetch",
            )  # fmt: skip
        return ready

    def own_decision(self, own: JobView, left: float) -> Decision:
        done = (
            own.state == JobState.DONE
            and own.output is not None
            and own.output.src == Path(self.paths.adapter)
        )
        if done and self.policy == "done":
            return Decision("shutdown", Reason.DONE, "the job is done")
        if done and own.acked:
            return Decision("shutdown", Reason.FETCHED, "the client fetched and verified the adapter")
        if left <= 0:
            if done:
                return Decision("shutdown", Reason.GRACE, f"no fetch within {self.grace_s / 60:g} min")
            return Decision(
                "shutdown", Reason.IDLE, f"the job {own.state}; idle for {self.grace_s / 60:g} min"
            )
        if done:
            return Decision("wait", Reason.WAITING_FOR_FETCH, "waiting for the client to fetch the adapter")
        return Decision("wait", Reason.IDLE, f"the job {own.state}; waiting for it to be resumed")

    # -- acting on it ----------------------------------------------------------------------------------

    @staticmethod
    def fs_dest(root: Path, v: JobView) -> Path:
        return root / "autodl-run" / v.job_id / v.what

    def kept_at(self, dest: Path, sha256: str | None) -> bool:
        """`dest` is a verified copy of the output whose manifest has this sha256."""
        if not sha256 or sha256_of(dest / MANIFEST) != sha256:
            return False
        if (str(dest), sha256) not in self.verified:
            try:
                verify_manifest(dest, sha256)
            except (OSError, ManifestError):
                return False
            self.verified.add((str(dest), sha256))
        return True

    def preserve(self, v: JobView) -> str | None:
        """Copy a job's output to autodl-fs, verified; its path there, or None."""
        root = fs_root()
        if root is None or v.output is None or not v.output.sha256:
            return None  # an output whose manifest is unreadable cannot be verified: it stays where it is
        src, dest = v.output.src, self.fs_dest(root, v)
        if self.kept_at(dest, v.output.sha256):
            return str(dest)
        tmp = dest.with_name(f"{dest.name}.partial-{os.getpid()}")  # another job's guard may copy it too
        try:
            shutil.rmtree(tmp, ignore_errors=True)
            shutil.copytree(src, tmp)
            verify_manifest(tmp, v.output.sha256)
            if self.kept_at(dest, v.output.sha256):
                shutil.rmtree(tmp)
            else:
                if dest.exists():
                    shutil.rmtree(dest)
                tmp.rename(dest)
        except (OSError, ManifestError) as exc:
            shutil.rmtree(tmp, ignore_errors=True)
            self.log(f"could not copy {src} to {dest}: {exc}")
            return None
        return str(dest)

    def keep_all(self, decision: Decision) -> tuple[str | None, str]:
        """Copy every output not yet safe to autodl-fs: (this job's copy, what the others' status adds)."""
        own = self.views[self.job.job_id]
        copied = None if decision.reason == Reason.FETCHED else self.preserve(own)
        notes: list[str] = []
        lost = [own] if copied is None and decision.reason != Reason.FETCHED and not self.safe(own) else []
        for v in self.views.values():
            if v is own or v.busy or self.safe(v):
                continue
            path = self.preserve(v)
            if path:
                notes.append(f"job {v.job_id}'s {v.what} copied to {path}")
            else:
                lost.append(v)
        if lost:
            where = "there is no autodl-fs" if fs_root() is None else "copying to autodl-fs failed"
            jobs = ", ".join(f"{v.job_id} ({v.what})" for v in lost)
            notes.append(f"{where}: kept only on this instance's data disk: {jobs}")
        return copied, "".join(f"; {n}" for n in notes)

    def leave(self, decision: Decision) -> int:
        own = self.views[self.job.job_id]
        copied = None if decision.reason == Reason.FETCHED or self.safe(own) else self.preserve(own)
        self.write_status(GuardPhase.EXITED, decision, decision.message, copied_to=copied)
        return 0

    def shutdown(self, decision: Decision) -> int:
        copied, notes = self.keep_all(decision)
        if self.fetching(self.monotonic(), self.views):  # a fetch started while we copied: wait for it
            return -1
        message = decision.message + notes
        if self.command == DEFAULT_COMMAND and not default_command_safe():
            self.write_status(
                GuardPhase.NOT_SHUT_DOWN,
                decision,
                f"{message}; this host does not look like an AutoDL instance, so the default "
                f"shutdown_command ({DEFAULT_COMMAND}) was not run: set instance.shutdown_command to stop it here",
                copied_to=copied,
            )
            return 0
        self.write_status(GuardPhase.SHUTTING_DOWN, decision, message, copied_to=copied, command=self.command)
        self.log(f"{message}: running {self.command}")
        try:
            rc = subprocess.run(["sh", "-c", self.command], stdin=subprocess.DEVNULL).returncode
        except OSError as exc:
            self.log(f"cannot run the shutdown command: {exc}")
            rc = 127
        phase = GuardPhase.SHUT_DOWN if rc == 0 else GuardPhase.SHUTDOWN_FAILED
        self.write_status(phase, decision, message, copied_to=copied, command=self.command, command_rc=rc)
        return 0 if rc == 0 else 1

    def run(self, sleep: Callable[[float], None] = time.sleep) -> int:
        self.log(
            f"guarding {self.job.job_id}: shutdown_after = {self.policy}, grace {self.grace_s / 60:g} min"
        )
        while True:
            decision = self.decide()
            if decision.action == "exit":
                self.write_status(GuardPhase.EXITED, decision, decision.message)
                return 0
            if decision.action == "leave":
                return self.leave(decision)
            if decision.action == "shutdown":
                code = self.shutdown(decision)
                if code >= 0:
                    return code
                continue
            phase = GuardPhase.WATCHING if decision.reason == Reason.RUNNING else GuardPhase.WAITING
            self.write_status(phase, decision, decision.message)
            sleep(poll_s())

    # -- reporting -------------------------------------------------------------------------------------

    def write_status(self, phase: GuardPhase, decision: Decision, message: str, **extra) -> None:
        at = None if self.remaining is None else self.clock() + max(0.0, self.remaining)
        status = GuardStatus(phase=phase, policy=self.policy, reason=decision.reason.value, message=message,
                             shutdown_at=at, t=self.clock(), **extra)  # fmt: skip
        prev, times = self._status, {"t", "shutdown_at"}
        same = prev is not None and status.model_dump(exclude=times) == prev.model_dump(exclude=times)
        if same and prev is not None and prev.shutdown_at is not None and at is not None \
                and abs(at - prev.shutdown_at) < 5:
            return  # unchanged but for the clock: keep the file (and the log) quiet
        if same and prev is not None and prev.shutdown_at is None and at is None:
            return
        self._status = status
        path = Path(self.paths.guard_status)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(f".{path.name}.tmp")
            tmp.write_text(dump_model(status), encoding="utf-8")
            tmp.replace(path)
        except OSError:
            pass
        if not same and phase != GuardPhase.WATCHING:
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
    job = read_file(WorkerJob, argv[0])
    if job is None:
        print(f"cannot read {argv[0]}: not a job file (jobs.spec.WorkerJob)", file=sys.stderr)
        return 2
    return Guard(job).run()


if __name__ == "__main__":
    raise SystemExit(main())
