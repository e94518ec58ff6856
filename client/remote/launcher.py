"""Start, watch and stop a job on its instance: under tmux when it is there, `setsid nohup` when not.

Either way the same wrapper runs, `run.sh` in the job folder (written from `_WRAPPER` below), so
the same files appear (see jobs.layout):
    pid         the wrapper's pid; it leads the job's process group, and the worker runs in that group
    state       `running`, then `done`/`failed` from the exit code unless the worker already wrote an
                outcome; `cancelled` when cancel() stopped it
    exit_code   the worker's exit status (128+N when signal N ended it), written when it ends:
                a tmux session vanishes with its command, so the code has to go to a file
    worker.log  the worker's stdout and stderr, appended

Every remote command quotes what it is given: paths with shlex (a leading `~` left to the remote
bash), names checked against a strict pattern first, so a job name can never inject shell.
Each public function is one remote round trip.
"""

from __future__ import annotations

import re
import shlex
from dataclasses import dataclass

from client.errors import JobError, RemoteCommandError, RemoteEnvError
from client.transport.base import Result, Transport
from client.transport.paths import shell_path
from jobs.jobstate import parse_exit_code, resolve
from jobs.layout import JOB_FILES, JobPaths
from jobs.protocol import JobState

NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")  # tmux sockets and sessions, job ids
ENV_KEY_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
MARK = "@@autodl-run@@"  # what we print follows it, so a chatty login profile cannot confuse the parser
START_TIMEOUT_S = 10
TERM_WAIT_S = 5.0

_WRAPPER = """#!/bin/sh
# autodl-run job wrapper, written by client/remote/launcher.py: runs the worker and records how it ended.
cd "$(dirname "$0")" || exit 1
# PATH as the launching login shell had it (a long-lived tmux server would hand out its own, older one)
if [ -s {wrapper_path} ]; then PATH=$(cat {wrapper_path}); export PATH; fi
{{exports}}
set -- {{argv}}
echo $$ > {pid}.tmp && mv -f {pid}.tmp {pid}
echo running > {state}.tmp && mv -f {state}.tmp {state}
rm -f {exit_code}
# A trap (not an ignore: ignored signals would be inherited) lets INT/TERM/HUP hit the worker with
# their usual effect while this shell outlives them long enough to write the exit code.
trap : INT TERM HUP
"$@" >> {log} 2>&1 < /dev/null
code=$?
case "$(head -n 1 {state} 2>/dev/null)" in
  done|failed|cancelled) ;;
  *) if [ "$code" -eq 0 ]; then s=done; else s=failed; fi
     echo "$s" > {state}.tmp && mv -f {state}.tmp {state} ;;
esac
echo "$code" > {exit_code}.tmp && mv -f {exit_code}.tmp {exit_code}
""".format(**JOB_FILES)

# Prints the job's files after MARK: exists, state, exit code, pid, alive, launching (launch.json is
# there). alive: the pid answers and, where /proc exists, still runs in this job folder (a pid from
# before a reboot may belong to anything now). jobs.jobstate.resolve turns them into the state.
_STATUS = """
p=$(head -n 1 {pid} 2>/dev/null)
alive() {{{{ [ -n "$p" ] && kill -0 "$p" 2>/dev/null && {{{{ [ ! -e /proc/self/cwd ] || [ /proc/"$p"/cwd -ef . ]; }}}}; }}}}
status() {{{{
  a=0; alive && a=1; l=0; [ -e {launch} ] && l=1
  printf '%s\\n1\\n%s\\n%s\\n%s\\n%s\\n%s\\n' {{mark}} "$(head -n 1 {state} 2>/dev/null)" "$(head -n 1 {exit_code} 2>/dev/null)" "$p" "$a" "$l"
}}}}
""".format(**JOB_FILES)
_MISSING = "{{ printf '%s\\n0\\n' {mark}; exit 0; }}"  # no job folder

_LAUNCH = """unset TMUX TMUX_PANE
mkdir -p -- {{dir}} && cd -- {{dir}} || exit 2
{{status}}
if alive; then echo "a job is already running there (pid $p)" >&2; exit 3; fi
rm -f {pid} {exit_code} {state}
(umask 077; cat > {wrapper} && printf '%s' "$PATH" > {wrapper_path}) || exit 2
if [ {{prefer_tmux}} = 1 ] && command -v tmux >/dev/null 2>&1; then
  # -f /dev/null: a server of our own socket ignores the user's ~/.tmux.conf
  tmux -L {{socket}} -f /dev/null new-session -d -s {{session}} -c "$PWD" 'exec sh ./{wrapper}' || exit 6
elif setsid -f true >/dev/null 2>&1; then
  # -f forks here, so INT is not ignored in the job the way it is for a `&` job of a script
  setsid -f nohup sh ./{wrapper} >/dev/null 2>&1 </dev/null || exit 6
elif command -v setsid >/dev/null 2>&1; then
  setsid nohup sh ./{wrapper} >/dev/null 2>&1 </dev/null &
else
  echo "neither tmux nor setsid is installed" >&2; exit 4
fi
i=0
while [ ! -s {pid} ] && [ $i -lt {{ticks}} ]; do sleep 0.1; i=$((i+1)); done
if [ ! -s {pid} ]; then echo "the job did not start within {{start_s}} s" >&2; tail -n 20 {log} >&2 2>/dev/null; exit 5; fi
p=$(head -n 1 {pid})
status
""".format(**JOB_FILES)

_STATUS_ONLY = """cd -- {dir} 2>/dev/null || {missing}
{status}
status
"""

_CANCEL = """cd -- {{dir}} 2>/dev/null || {{missing}}
{{status}}
wait_gone() {{{{ i=0; while alive && [ $i -lt "$1" ]; do sleep 0.1; i=$((i+1)); done; }}}}
if alive; then
  echo cancelled > {state}.tmp && mv -f {state}.tmp {state}
  kill -s INT -- "-$p" 2>/dev/null || kill -s INT "$p" 2>/dev/null || true
  wait_gone {{int_ticks}}
  if alive; then kill -s TERM -- "-$p" 2>/dev/null || kill -s TERM "$p" 2>/dev/null || true; wait_gone {{term_ticks}}; fi
  if alive; then
    kill -s KILL -- "-$p" 2>/dev/null || kill -s KILL "$p" 2>/dev/null || true
    wait_gone 20
    [ -s {exit_code} ] || echo 137 > {exit_code}
  fi
fi
if command -v tmux >/dev/null 2>&1; then tmux -L {{socket}} kill-session -t ={{session}} >/dev/null 2>&1 || true; fi
status
""".format(**JOB_FILES)


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
    script = _WRAPPER.format(exports=_exports(env), argv=shlex.join(str(a) for a in argv))
    cmd = _LAUNCH.format(
        dir=shell_path(job_paths.dir),
        status=_STATUS.format(mark=MARK),
        prefer_tmux=int(prefer_tmux),
        socket=shlex.quote(_name(socket, "tmux socket")),
        session=shlex.quote(_tmux_session(session)),
        ticks=START_TIMEOUT_S * 10,
        start_s=START_TIMEOUT_S,
    )
    res = transport.run(cmd, check=False, input=script)
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
    cmd = _STATUS_ONLY.format(
        dir=shell_path(job_paths.dir), status=_STATUS.format(mark=MARK), missing=_MISSING.format(mark=MARK)
    )
    return _parse_status(transport.run(cmd), transport)


def cancel(
    transport: Transport, job_paths: JobPaths, *, socket: str, session: str, grace: float = 10.0
) -> LaunchStatus:
    """Stop the job's process group: SIGINT, then SIGTERM after `grace` s, then SIGKILL; state = cancelled.

    A job that already ended keeps its state. Returns the status after, like job_status.
    """
    cmd = _CANCEL.format(
        dir=shell_path(job_paths.dir),
        status=_STATUS.format(mark=MARK),
        missing=_MISSING.format(mark=MARK),
        socket=shlex.quote(_name(socket, "tmux socket")),
        session=shlex.quote(_tmux_session(session)),
        int_ticks=max(1, round(grace * 10)),
        term_ticks=max(1, round(min(grace, TERM_WAIT_S) * 10)),
    )
    return _parse_status(transport.run(cmd, timeout=grace + TERM_WAIT_S + 30), transport)


def status_shell() -> str:
    """Shell that defines `status` (prints the job folder it runs in, for parse_status) and `alive`."""
    return _STATUS.format(mark=MARK)


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
    pid = int(pid_s) if pid_s.isdigit() else None
    resolved = resolve(
        state, code, alive, exists=exists == "1", has_pid=pid is not None, launching=launching == "1"
    )
    return LaunchStatus(resolved, code, alive, pid)


def _exports(env: dict[str, str]) -> str:
    lines = []
    for key, value in env.items():
        if not ENV_KEY_RE.match(key):
            raise JobError(f"not an environment variable name: {key!r}", hint="use letters, digits and '_'")
        lines.append(f"export {key}={shlex.quote(str(value))}")
    return "\n".join(lines)


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
