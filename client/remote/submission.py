"""One job, exactly once: the instance's own record of what was launched.

Before a job is launched its identity goes to the instance (`jobs/<id>/launch.json`, a
jobs.protocol.LaunchRecord) and the submission file `submissions/<key>` names the job the
submission became; `<key>` is the sha256 of the resolved spec and the data digest. Both are written
under a lock on the instance (`mkdir submissions/<key>.lock`, which holds its owner's token), after
checking that the job the file names is not launching or running there. So a second `submit` of the
same job, from this laptop or another, at once or after a cut link, finds the first job and
reattaches to it; a finished job does not block a new one. `recover` rebuilds ledger rows from the
`launch.json` files.

Each public function is one remote round trip, except claim (two: look under the lock, then write).
"""

from __future__ import annotations

import hashlib
import posixpath
import secrets
import shlex
from dataclasses import dataclass, field

from client.errors import JobError, RemoteCommandError
from client.remote import launcher
from client.remote.launcher import NAME_RE, LaunchStatus
from client.transport.base import Result, Transport
from client.transport.paths import shell_path
from jobs.layout import JOB_FILES, RemoteLayout
from jobs.protocol import JobState, LaunchRecord, ProtocolError, dump_model, read_model
from jobs.spec import JobSpec

LOCK_STALE_MIN = 2  # a lock older than this was left by a client that died holding it
LOCK_WAIT_S = 60
LAUNCH_STALE_S = 300  # a job still `launching` after this was abandoned before its launch: claim anew
_HEAD = "@@autodl-run-claim@@"


def submission_key(spec: JobSpec, data_digest: str) -> str:
    """The identity of "the same job": the resolved spec (remote_root included) and the data."""
    return hashlib.sha256((spec.model_dump_json() + "\n" + data_digest).encode()).hexdigest()


@dataclass
class Claim:
    job_id: str  # the job the submission is: ours (mine) or the one found launching or running there
    mine: bool
    status: LaunchStatus | None = None  # the job found (when not mine)
    record: LaunchRecord | None = None  # its launch.json, when readable
    superseded: str | None = None  # an earlier job of this key that never launched (ours replaces it)


def current(transport: Transport, layout: RemoteLayout, key: str) -> Claim | None:
    """The job this submission became, if it is launching or running there now (no lock: a quick look)."""
    found = _look(transport, layout, key, lock=None)
    return found if found is not None and found.mine is False else None


def claim(transport: Transport, layout: RemoteLayout, record: LaunchRecord) -> Claim:
    """Under the instance's lock: the job already there (launching or running), or record's job, written."""
    token = secrets.token_hex(8)
    found = _look(transport, layout, record.submit_key, lock=token)
    try:
        if found is not None and not found.mine:
            return found
        _commit(transport, layout, record, token)
    finally:
        _release(transport, layout, record.submit_key, token)
    return Claim(record.job_id, True, superseded=found.superseded if found else None)


def unclaim(transport: Transport, layout: RemoteLayout, key: str, job_id: str) -> None:
    """After a launch that certainly failed: the submission and its launch.json are dropped."""
    sub, launch = layout.submission(key), layout.job(job_id).launch
    transport.run(
        f'[ "$(head -n 1 {shell_path(sub)} 2>/dev/null)" = {shlex.quote(job_id)} ] && rm -f -- {shell_path(sub)}; '
        f"rm -f -- {shell_path(launch)}",
        check=False,
    )


def write_launch_record(transport: Transport, layout: RemoteLayout, record: LaunchRecord) -> None:
    """launch.json alone (a job moved to another instance by `resume`)."""
    launch = layout.job(record.job_id).launch
    transport.run(
        f"mkdir -p -- {shell_path(posixpath.dirname(launch))} && cat > {shell_path(launch)}.tmp "
        f"&& mv -f -- {shell_path(launch)}.tmp {shell_path(launch)}",
        input=dump_model(record),
    )


def _look(transport: Transport, layout: RemoteLayout, key: str, lock: str | None) -> Claim | None:
    sub = layout.submission(key)
    acquire = ""
    if lock is not None:
        acquire = f"""lock={shell_path(layout.submission_lock(key))}
mkdir -p -- {shell_path(posixpath.dirname(sub))} || exit 2
i=0
until mkdir -- "$lock" 2>/dev/null; do
  if [ -n "$(find "$lock" -maxdepth 0 -mmin +{LOCK_STALE_MIN} 2>/dev/null)" ]; then
    mv -f -- "$lock" "$lock.stale.$$" 2>/dev/null && rm -rf -- "$lock.stale.$$"; continue
  fi
  i=$((i+1)); if [ $i -ge {LOCK_WAIT_S * 10} ]; then echo "the submission lock $lock stays held" >&2; exit 7; fi
  sleep 0.1
done
echo {lock} > "$lock/owner"
"""
    tail = secrets.token_hex(8)
    launch = shlex.quote(JOB_FILES["launch"])
    # fresh: launch.json was written less than LAUNCH_STALE_S ago (the instance's clock, by find -mmin)
    script = f"""{acquire}old=$(head -n 1 {shell_path(sub)} 2>/dev/null)
case "$old" in ''|*/*|.*) old='';; esac
printf '%s\\n%s\\n' {_HEAD} "$old"
if [ -n "$old" ] && cd -- {shell_path(layout.jobs_dir)}/"$old" 2>/dev/null; then
{launcher.status_shell()}
  if [ -n "$(find {launch} -mmin -{LAUNCH_STALE_S // 60} 2>/dev/null)" ]; then echo 1; else echo 0; fi
  status
  echo {tail}; head -c 1000000 {launch} 2>/dev/null
else
  echo 0; printf '%s\\n0\\n' {launcher.MARK}; echo {tail}
fi
"""
    res = transport.run(script, check=False)
    if res.exited == 7:
        raise JobError(
            f"{res.tail(1)} on {transport.where}: another submit of this job is under way",
            hint="wait for it and submit again (it reattaches), or remove the lock folder if no submit runs",
        )
    if not res.ok or _HEAD not in res.stdout:
        raise RemoteCommandError("claim the submission", res.exited, res.stdout, res.stderr, transport.where)
    body, _, launch_text = res.stdout.rsplit(_HEAD, 1)[1].partition("\n" + tail + "\n")
    lines = body.split("\n")[1:]  # [0]: the rest of the head's line
    old, fresh = (x.strip() for x in (lines + ["", ""])[:2])
    if not old or not NAME_RE.match(old):
        return None
    status = launcher.parse_status(Result(res.command, 0, "\n".join(lines[2:]), ""), transport)
    record = _parse_record(launch_text, old, f"{transport.where}:{layout.job(old).launch}")
    if status.alive:
        return Claim(old, False, status, record)
    if status.state is JobState.LAUNCHING and fresh == "1":
        return Claim(old, False, status, record)
    if status.state is JobState.STARTING or status.state is JobState.LAUNCHING:
        return Claim(old, True, status, record, superseded=old)  # never launched: ours replaces it
    return None  # it ended (or is gone): a new job may run


def _commit(transport: Transport, layout: RemoteLayout, record: LaunchRecord, token: str) -> None:
    key = record.submit_key
    lock, sub, launch = layout.submission_lock(key), layout.submission(key), layout.job(record.job_id).launch
    _name(record.job_id)
    res = transport.run(
        f"""[ "$(cat {shell_path(lock)}/owner 2>/dev/null)" = {token} ] || {{ echo "lost the submission lock" >&2; exit 7; }}
mkdir -p -- {shell_path(posixpath.dirname(launch))} \\
  && cat > {shell_path(launch)}.tmp && mv -f -- {shell_path(launch)}.tmp {shell_path(launch)} \\
  && printf '%s\\n' {record.job_id} > {shell_path(sub)}.tmp && mv -f -- {shell_path(sub)}.tmp {shell_path(sub)}
""",
        check=False,
        input=dump_model(record),
    )
    if not res.ok:
        raise RemoteCommandError(f"write {launch}", res.exited, res.stdout, res.stderr, transport.where)


def _release(transport: Transport, layout: RemoteLayout, key: str, token: str) -> None:
    lock = shell_path(layout.submission_lock(key))
    transport.run(f'[ "$(cat {lock}/owner 2>/dev/null)" = {token} ] && rm -rf -- {lock}', check=False)


# --- recover: the instance's launch records -----------------------------------------------------------


@dataclass
class Found:
    records: list[LaunchRecord] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)  # why each unreadable launch.json was left out


def launch_records(transport: Transport, layout: RemoteLayout) -> Found:
    """Every job's launch.json under the instance's jobs/ folder; a bad one is skipped and said why."""
    mark = "@@autodl-run-launch-" + secrets.token_hex(8) + "@@"
    name = shlex.quote(JOB_FILES["launch"])
    res = transport.run(
        f"cd -- {shell_path(layout.jobs_dir)} 2>/dev/null || exit 0\n"
        f'for d in */; do d=${{d%/}}; [ -f "$d"/{name} ] || continue; '
        f'printf "\\n%s %s\\n" {mark} "$d"; head -c 1000000 "$d"/{name}; done',
        check=False,
    )
    if not res.ok:
        raise RemoteCommandError(f"list {layout.jobs_dir}", res.exited, res.stdout, res.stderr, transport.where)
    found = Found()
    for chunk in res.stdout.split("\n" + mark + " ")[1:]:
        folder, _, text = chunk.partition("\n")
        where = f"{transport.where}:{layout.job(folder).launch}"
        if not NAME_RE.match(folder):
            found.skipped.append(f"{layout.jobs_dir}/{folder!r}: not a job id")
            continue
        try:
            record = read_model(LaunchRecord, text, where)
            if record.job_id != folder:
                raise ProtocolError(f"{where}: job_id {record.job_id!r} is not its folder's name")
            JobSpec.model_validate_json(record.spec_json)
        except ProtocolError as exc:
            found.skipped.append(str(exc))
            continue
        except ValueError as exc:
            found.skipped.append(f"{where}: spec_json: {str(exc).splitlines()[0]}")
            continue
        found.records.append(record)
    return found


def _parse_record(text: str, job_id: str, where: str) -> LaunchRecord | None:
    try:
        record = read_model(LaunchRecord, text, where)
    except ProtocolError:
        return None
    return record if record.job_id == job_id else None


def _name(job_id: str) -> str:
    if not NAME_RE.match(job_id):
        raise JobError(f"bad job id {job_id!r}", hint="job ids are letters, digits, '.', '_' and '-'")
    return job_id
