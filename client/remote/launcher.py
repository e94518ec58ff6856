"""Start, watch and stop a job on its instance: under tmux when it is there, `setsid nohup` when not.

Either way the same wrapper runs, `run.sh` in the job folder (jobs/scripts/job_wrapper.sh behind
its quoted parameters), so the same files appear (see jobs.layout):
    pid         the wrapper's pid; it leads the job's process group, and the worker runs in that group
    state       `running`, then `done`/`failed` from the exit code unless the worker already wrote an
                outcome; `cancelled` when cancel() stopped it
    exit_code   the worker's exit status (128+N when signal N ended it), written when it ends:
                a tmux session vanishes with its command, so the code has to go to a file
    worker.log  the worker's stdout and stderr, appended

The programs are package data, jobs/scripts/job_control.sh and job_wrapper.sh: every value goes to
them as an argument (a leading `~` of a path expanded there), never into their text; names are checked
against a strict pattern first. The wrapper's parameters are the one exception: they are written
into run.sh, each value quoted (shlex). Each public function is one remote round trip.

The worker's command line is `worker_argv`: `python -m remote_worker JOB_JSON`, or with train.gpus
above 1 or several nodes the same under torchrun (torch.distributed.run, through remote_worker.torchrun,
which also says which rank a signal killed), one process per GPU. The
wrapper's pid is then torchrun's; torchrun starts each rank in a session of its own and passes a
SIGINT/SIGTERM it gets on to every rank, which then checkpoint and stop in step; a rank outlives
neither its torchrun nor the wrapper (remote_worker.distributed). The exit code is torchrun's: 0
when every rank succeeded.
"""

from __future__ import annotations

import re
import shlex
from dataclasses import dataclass

from client.errors import JobError, RemoteCommandError, RemoteEnvError
from client.remote.bundle import script as package_script
from client.transport.base import Result, Transport
from jobs.jobstate import parse_exit_code, resolve
from jobs.layout import JOB_FILES, JobPaths
from jobs.protocol import JobState
from jobs.spec import TrainSpec

NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")  # tmux sockets and sessions, job ids
ENV_KEY_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
MARK = "@@autodl-run@@"  # what we print follows it, so a chatty login profile cannot confuse the parser
START_TIMEOUT_S = 30  # for the wrapper to write its pid: a wait until, only a wrapper that never starts waits it out
TERM_WAIT_S = 5.0
STATUS_TIMEOUT_S = 60.0  # a look at a job folder; what is there cannot make it wait longer
# How long torchrun waits for its ranks to save and stop after a signal, before it kills them
# (its default, 30 s, can be shorter than a checkpoint of a large run).
RANKS_SHUTDOWN_S = 120

# The wrapper's parameters (jobs/scripts/job_wrapper.sh): its variable -> the JOB_FILES name it holds
_WRAPPER_FILES = {"pid_file": "pid", "state_file": "state", "exit_code_file": "exit_code", "log_file": "log",
                  "path_file": "wrapper_path"}  # fmt: skip
# job_control.sh's arguments after MODE DIR MARK, in its order
_CONTROL_FILES = ("pid", "state", "exit_code", "log", "launch", "wrapper", "wrapper_path")


@dataclass(frozen=True)
class LaunchStatus:
    """A job folder's state (jobs.jobstate.resolve) and the wrapper's process."""

    state: JobState
    exit_code: int | None
    alive: bool
    pid: int | None

    @property
    def active(self) -> bool:
        """Launched (or being launched) and not ended: a second launch would run it twice."""
        return self.state in (JobState.LAUNCHING, JobState.STARTING, JobState.RUNNING)

    def as_dict(self) -> dict:
        return {"state": self.state.value, "exit_code": self.exit_code, "alive": self.alive, "pid": self.pid}


def launch(
    transport: Transport,
    job_paths: JobPaths,
    argv: list[str],
    *,
    socket: str,
    session: str,
    env: dict[str, str],
    prefer_tmux: bool = True,
) -> LaunchStatus:
    """Start `argv` in the job folder, detached (tmux session SESSION on socket SOCKET, else setsid).

    Returns once the wrapper wrote its pid, with the job's status (see job_status).
    """
    if not argv:
        raise JobError("nothing to launch: argv is empty")
    wrapper = _wrapper(env, argv)
    cmd = _control(
        "launch", job_paths.dir, _name(socket, "tmux socket"), _tmux_session(session),
        int(prefer_tmux), START_TIMEOUT_S * 10, START_TIMEOUT_S,
    )  # fmt: skip
    res = transport.run(cmd, check=False, input=wrapper)
    if res.exited == 3:
        raise JobError(
            f"{res.tail(1)}: {job_paths.dir} on {transport.where}",
            hint="cancel it first, or launch a new job id",
        )
    if res.exited == 4:
        raise RemoteEnvError(
            f"cannot start a detached job on {transport.where}: neither tmux nor setsid is installed",
            hint="install tmux there: apt-get install -y tmux",
        )
    if not res.ok:
        raise RemoteCommandError(
            f"launch {shlex.join(argv)} in {job_paths.dir}", res.exited, res.stdout, res.stderr, transport.where,
            hint="see the last lines above; a duplicate session means this job id is already running",
        )  # fmt: skip
    return _parse_status(res, transport)


@dataclass(frozen=True)
class Node:
    """This machine's place among several: node `rank` of `count`, rank 0's address and port."""

    rank: int = 0
    count: int = 1
    master: str = ""
    port: int = 29400


def worker_argv(python: str, job_json: str, train: TrainSpec, node: Node = Node()) -> list[str]:
    """The worker's command line: alone, or under torchrun with train.gpus processes per node.

    One node: `--standalone` (a rendezvous on a free local port, so two jobs on one instance do not
    collide). Several: a static rendezvous at node 0's address, each node with its `--node-rank`,
    so global rank 0, the one that writes events and checkpoints, is on node 0 that the client
    follows (c10d's dynamic rendezvous numbers the nodes by host name instead).
    """
    worker = ["-m", "remote_worker", job_json]
    if not train.multi_process and node.count == 1:
        return [python, *worker]
    gpus = train.gpus
    per_node = str(gpus) if isinstance(gpus, int) else ("auto" if train.device == "cpu" else "gpu")
    if node.count == 1:
        rdzv = ["--standalone", "--nnodes", "1"]
    else:
        rdzv = ["--nnodes", str(node.count), "--node-rank", str(node.rank), "--rdzv-backend", "static",
                "--master-addr", node.master, "--master-port", str(node.port)]  # fmt: skip
    return ["env", f"TORCH_ELASTIC_SHUTDOWN_TIMEOUT={RANKS_SHUTDOWN_S}", python, "-m", "remote_worker.torchrun",
            *rdzv, "--nproc-per-node", per_node, "--max-restarts", "0", *worker]  # fmt: skip


def job_status(
    transport: Transport, job_paths: JobPaths, socket: str | None = None, session: str | None = None
) -> LaunchStatus:
    """The job's LaunchStatus in one round trip; its state by jobs.jobstate.resolve (launching,
    starting, running, done, failed, cancelled, lost, missing).
    socket and session are accepted for symmetry with launch/cancel; the pid decides.
    """
    if socket is not None:
        _name(socket, "tmux socket")
    if session is not None:
        _tmux_session(session)
    return _parse_status(transport.run(_control("status", job_paths.dir), timeout=STATUS_TIMEOUT_S), transport)


def cancel(
    transport: Transport, job_paths: JobPaths, *, socket: str, session: str, grace: float = 10.0
) -> LaunchStatus:
    """Stop the job's process group: SIGINT, then SIGTERM after `grace` s, then SIGKILL; state = cancelled.

    A job that already ended keeps its state. Returns the status after, like job_status.
    """
    cmd = _control(
        "cancel", job_paths.dir, _name(socket, "tmux socket"), _tmux_session(session),
        max(1, round(grace * 10)), max(1, round(min(grace, TERM_WAIT_S) * 10)),
    )  # fmt: skip
    return _parse_status(transport.run(cmd, timeout=grace + TERM_WAIT_S + 30), transport)


def status_shell() -> str:
    """Shell that defines `status`: prints the status of the job folder it runs in, for parse_status."""
    return f"status() {{ {shlex.join(_control('status', '.'))}; }}"


def parse_status(res: Result, transport: Transport) -> LaunchStatus:
    """The LaunchStatus a `status` of status_shell() printed (the last one, when several were)."""
    return _parse_status(res, transport)


def _parse_status(res: Result, transport: Transport) -> LaunchStatus:
    out = res.stdout
    if MARK not in out:
        raise RemoteCommandError(res.command, res.exited, res.stdout, res.stderr or "no status printed",
                                 transport.where)  # fmt: skip
    lines = (out.rsplit(MARK, 1)[1].lstrip("\n").split("\n") + [""] * 6)[:6]
    exists, state, code_s, pid_s, alive_s, launching = (x.strip() for x in lines)
    code = parse_exit_code(code_s)
    alive = alive_s == "1"
    pid = int(pid_s) if re.fullmatch(r"[0-9]{1,10}", pid_s) else None
    resolved = resolve(
        state, code, alive, exists=exists == "1", has_pid=pid is not None, launching=launching == "1"
    )
    return LaunchStatus(resolved, code, alive, pid)


def _control(mode: str, job_dir: str, *args: object) -> list[str]:
    """argv of one job_control.sh run (see its header): everything it is given is an argument."""
    files = [JOB_FILES[key] for key in _CONTROL_FILES]
    return ["bash", "-c", package_script("job_control.sh"), "job-control", mode, job_dir, MARK, *files,
            *(str(a) for a in args)]  # fmt: skip


def _wrapper(env: dict[str, str], argv: list[str]) -> str:
    """run.sh: `#!/bin/sh`, the parameters of jobs/scripts/job_wrapper.sh (each value quoted), then it."""
    params = [f"{var}={shlex.quote(JOB_FILES[key])}" for var, key in _WRAPPER_FILES.items()]
    return "\n".join([
        "#!/bin/sh",
        "# autodl-run job wrapper, written by client/remote/launcher.py: its parameters, then the program",
        *params,
        "job_env() {",
        *(f"  {line}" for line in _exports(env)),
        "  :",
        "}",
        "set -- " + shlex.join(str(a) for a in argv),
        package_script("job_wrapper.sh"),
    ])  # fmt: skip


def _exports(env: dict[str, str]) -> list[str]:
    lines = []
    for key, value in env.items():
        if not ENV_KEY_RE.match(key):
            raise JobError(f"not an environment variable name: {key!r}", hint="use letters, digits and '_'")
        lines.append(f"export {key}={shlex.quote(str(value))}")
    return lines


def _name(value: str, what: str) -> str:
    if not NAME_RE.match(value):
        raise JobError(
            f"bad {what} {value!r}",
            hint="use 1-128 letters, digits, '.', '_' or '-', starting with a letter or digit",
        )
    return value


def _tmux_session(session: str) -> str:
    # tmux reads '.' and ':' in a target as window/pane separators: keep them out of session names
    return _name(session, "tmux session").replace(".", "_")
