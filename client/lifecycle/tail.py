"""`tail` and `status`: follow a job's events (or its raw log) and show its progress.

While `tail` follows, each new checkpoint's adapter is fetched in the background (client.lifecycle.autofetch);
when the job is done, the final adapter is fetched, verified and acknowledged on the instance, so
its guard can shut it down (client.lifecycle.fetch). Either way the last lines say where the adapter is and
what the guard does. `fetch=False` (`tail --no-fetch`) leaves all fetching to `autodl-run fetch`.

Lines of the event file that are not events are skipped and counted (said once, and in `status`);
every string from the instance is shown with its control characters escaped (client.views.text).

A job that ended (the ledger says done, failed or cancelled) whose record the laptop holds whole
(client.record.is_final) is answered from that record at once, by `tail` (`--raw` too) and `status`:
the instance is not asked, so one that is shut down costs no wait.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from rich.console import Console
from rich.live import Live
from rich.text import Text

from client import record as job_record
from client.errors import AutodlRunError, JobError, TransportError
from client.ledger import JobRecord, Ledger
from client.lifecycle import steps
from client.lifecycle.autofetch import AutoFetcher
from client.lifecycle.fetch import fetch as fetch_adapter
from client.lifecycle.fetch import fetch_checkpoint, local_copy, pull_record
from client.remote import guard as guard_launch
from client.remote import launcher
from client.remote.follow import Follower, JobStatus, Reconnecting, Skipped, poll_once
from client.session import Session, open_session
from client.views.render import Progress, event_line, panel
from client.views.text import json_line, log_line, shown
from jobs import events as ev
from jobs.layout import JOB_FILES
from jobs.protocol import GuardStatus, JobState


def _follower(session: Session, job_id: str, filename: str, poll_s: float, reconnect_timeout_s: float) -> Follower:
    """The follower reads through the session's transport: after a drop it closes it, and the transport
    connects again on its next command (the same session, so everything after the follow reuses it)."""
    return Follower(
        lambda: session.transport,
        session.layout.job(job_id),
        filename,
        poll_s=poll_s,
        reconnect_timeout_s=reconnect_timeout_s,
    )


def _finish(
    record: JobRecord, ledger: Ledger, state: JobStatus, progress: Progress | None, update: bool = True
) -> None:
    final = state.state
    if update:
        ledger.update(record.id, state=final.value, finished_at=time.time())
    if final is JobState.DONE:
        return
    why = ""
    log_hint = f"see the log with `autodl-run tail {record.id} --raw`"
    if progress and progress.failed:
        f = progress.failed
        why = f": {shown(f.error_class)}: {shown(f.message)}"
        hint = shown(f.hint) if f.hint else log_hint
    elif final is JobState.LOST:
        why = ": the worker stopped without an outcome (instance restarted, or the process was killed)"
        hint = log_hint
    else:
        if state.exit_code not in (None, 0):
            why = f" (exit code {state.exit_code})"
        hint = log_hint
    if progress and progress.checkpoint and "autodl-run resume" not in hint:
        hint += (
            f"; continue from checkpoint step-{progress.checkpoint.step} with `autodl-run resume {record.id}`"
        )
    raise JobError(f"job {record.id} {final}{why}", hint=hint)


def tail(
    record: JobRecord,
    ledger: Ledger,
    console: Console,
    *,
    raw: bool = False,
    as_json: bool = False,
    poll_s: float = 1.0,
    reconnect_timeout_s: float = 900.0,
    fetch: bool = True,
    log: Callable[[str], None] | None = None,
) -> Progress:
    """Follow until the job ends, fetching checkpoints and the final adapter (unless `fetch` is off).

    Raises JobError when the job did not end as `done`.
    """
    if on_laptop(record, need_adapter=fetch and not raw):
        return _tail_from_laptop(record, ledger, console, raw=raw, as_json=as_json, log=log)
    progress = Progress(record.id, record.spec.instance.price_per_hour, record.spec.instance.currency)
    session = open_session(record)  # one connection for all of it; the auto-fetch has the only other
    follower = _follower(session, record.id, JOB_FILES["log" if raw else "events"], poll_s, reconnect_timeout_s)
    live = console.is_terminal and not raw and not as_json
    note = ""
    view = (
        Live(panel(progress, "running"), console=console, refresh_per_second=4, transient=False)
        if live
        else None
    )
    say = _sayer(view, log)
    fetcher = AutoFetcher(record, say) if fetch and not raw else None
    final: JobStatus | None = None
    try:
        if view:
            view.start()
        _ensure_guard(record, session, say)
        for item in follower:
            if isinstance(item, Reconnecting):
                note = (
                    f"connection lost ({item.error}); reconnecting in {item.wait_s:.0f}s (try {item.attempt})"
                )
                if not view:
                    print(shown(note), file=sys.stderr, flush=True)
            elif isinstance(item, Skipped):
                progress.skipped += item.lines
                if item.problem:
                    progress.problem = item.problem
                    if not view:
                        print(shown(item.problem), file=sys.stderr, flush=True)
            elif isinstance(item, JobStatus):
                final = item
            else:
                note = ""
                for line in item:
                    if raw:
                        sys.stdout.write(log_line(line.decode("utf-8", "replace")) + "\n")
                        continue
                    e = progress.feed(line)
                    if e is None:
                        continue
                    if fetcher and isinstance(e, ev.Checkpoint):
                        fetcher.offer(e)
                    if as_json:  # the validated event, re-serialized: never the instance's raw bytes
                        sys.stdout.write(json_line(e.model_dump(mode="json")) + "\n")
                    elif not view and (text := event_line(e, progress)):
                        console.print(Text(text), highlight=False)
                if raw or as_json:
                    sys.stdout.flush()
            if fetcher and fetcher.latest:
                held = fetcher.latest
                progress.laptop = f"checkpoint step-{held.step} adapter at {held.adapter}"
            if view:
                view.update(panel(progress, final.state if final else "running", note))
        assert final is not None
        if progress.skipped and not view:
            what = "log lines over 1 MiB" if raw else "unreadable event lines"
            print(f"skipped {progress.skipped} {what}", file=sys.stderr, flush=True)
        if fetcher:
            newest = fetcher.close(wait=True)
            if newest:
                progress.laptop = f"checkpoint step-{newest.step} adapter at {newest.adapter}"
        if raw and final.state is not JobState.DONE:
            progress, _ = status_progress(record, session)
        if fetch and final.state is JobState.DONE:
            _fetch_final(record, ledger, progress, say, session)
        elif fetch and final.state.finished:  # no final adapter: the record is what is left to keep
            ended = final.state.terminal or final.state is JobState.LOST
            got = pull_record(record, session, final=final.state.value if ended else None, log=say)
            if got and got.report:
                say(f"record and run report -> {got.report}")
        _report_guard(record, progress, final, say, session)
        if view:
            view.update(panel(progress, final.state, ""))
    finally:
        if fetcher:
            fetcher.close(wait=False)
        if view:
            view.stop()
        follower.close()
        session.close()
    _finish(record, ledger, final, progress)
    return progress


def _sayer(view: Live | None, log: Callable[[str], None] | None) -> Callable[[str], None]:
    """Where notes go: the live panel's last rows, or `log` (default stderr: stdout may carry --json)."""

    def say(msg: str) -> None:
        if view is not None:
            return  # the panel shows progress.laptop and progress.guard
        if log is not None:
            log(msg)
        else:
            print(msg, file=sys.stderr, flush=True)

    return say


def _ensure_guard(record: JobRecord, session: Session, say: Callable[[str], None]) -> None:
    """The job runs, so its guard must too (unless the policy is "never")."""
    if record.spec.instance.shutdown_policy == "never" or not record.bundle_digest:
        return
    try:
        if launcher.job_status(session.transport, session.layout.job(record.id)).alive and steps.ensure_guard(
            session, record.spec, record.id, record.bundle_digest
        ):
            say(f"started the guard of {record.id} (it was not running)")
    except TransportError:
        pass  # the follower reconnects and says so


def _fetch_final(
    record: JobRecord, ledger: Ledger, progress: Progress, say: Callable[[str], None], session: Session
) -> None:
    """The final adapter, verified and acknowledged. Stopped by its deadline (the instance is going away),
    first the whole checkpoint too, so the job can be resumed elsewhere; before the acknowledgement, so
    the guard does not shut down in between."""
    expected = progress.done.manifest_sha256 if progress.done else None
    if progress.done and progress.done.stopped == "deadline":
        try:
            got = fetch_checkpoint(record, full=True, session=session)
            say(f"checkpoint step-{got.step} fetched whole (to resume elsewhere) -> {got.path}")
        except AutodlRunError as exc:
            say(f"could not fetch the whole checkpoint: {exc.message.splitlines()[0]}")
    try:
        dest, digest = fetch_adapter(record, ledger, expected_sha256=expected, session=session)
    except AutodlRunError as exc:
        exc.hint = (
            exc.hint + "; " if exc.hint else ""
        ) + f"the job is done: fetch again with `autodl-run fetch {record.id}`"
        raise
    record.fetched_to = str(dest)
    progress.laptop = f"adapter at {dest} (verified, manifest sha256 {digest[:12]}…)"
    say(f"adapter fetched and verified -> {dest}")
    report = local_copy(record).report
    if report.is_file():
        say(f"record and run report -> {report}")


def _report_guard(
    record: JobRecord, progress: Progress, final: JobStatus, say: Callable[[str], None], session: Session
) -> None:
    """Say what happens to the instance now: what the guard did, or, until it acts, what it will do."""
    inst = record.spec.instance
    policy = inst.shutdown_policy
    acts_now = final.state is JobState.DONE and (policy == "done" or (policy == "fetched" and record.fetched_to))
    status = None
    if policy != "never":
        status = _guard_status(record, session, wait_s=GUARD_WAIT_S if acts_now else 0.0)
    if status and status.phase.acted:
        text = shown(guard_launch.describe(status))
    elif policy == "never":
        text = "the instance keeps running (shutdown_after = never): stop it when you are done"
    elif acts_now and policy == "fetched":
        text = "the guard shuts the instance down now: it saw the verified fetch"
    elif acts_now:
        text = "the guard copies the adapter to autodl-fs (when there is one) and shuts the instance down"
    elif final.state is JobState.DONE:
        text = (
            f"the guard waits {inst.idle_grace_minutes:g} min for `autodl-run fetch {record.id}`, then copies "
            "the adapter to autodl-fs (when there is one) and shuts the instance down"
        )
    else:
        text = (
            f"the guard shuts the instance down after {inst.idle_grace_minutes:g} idle min, keeping the newest "
            f"checkpoint (copied to autodl-fs when there is one), unless `autodl-run resume {record.id}` runs first"
        )
    if inst.is_local and policy == "never":
        return  # the laptop itself: nothing to shut down
    progress.guard = text
    say(f"guard: {text}")


GUARD_WAIT_S = 5.0  # the guard looks once a second


def _guard_status(record: JobRecord, session: Session, wait_s: float) -> GuardStatus | None:
    """The guard's status; with `wait_s`, waits that long for it to act (it polls once a second)."""
    paths = session.layout.job(record.id)
    deadline = time.monotonic() + wait_s
    try:
        while True:
            status = guard_launch.guard_status(session.transport, paths)
            if (status and status.phase.acted) or time.monotonic() >= deadline:
                return status
            time.sleep(0.5)
    except TransportError:
        return None


def status_progress(record: JobRecord, session: Session | None = None) -> tuple[Progress, JobStatus]:
    """Replay the job's whole event file once (no following), and read what its guard is doing.

    Uses `session` when given (left open), else one of its own."""
    progress = Progress(record.id, record.spec.instance.price_per_hour, record.spec.instance.currency)
    own = session is None
    session = session or open_session(record)
    transport, paths = session.transport, session.layout.job(record.id)
    try:
        offset, skipping = 0, False
        while True:
            poll, offset = poll_once(transport, paths, JOB_FILES["events"], offset, skipping=skipping)
            skipping = poll.skipping
            progress.skipped += poll.skipped
            progress.problem = poll.problem
            for line in poll.lines:
                progress.feed(line)
            if not poll.more:
                break
        if record.spec.instance.shutdown_policy != "never":
            progress.guard = shown(guard_launch.describe(guard_launch.guard_status(transport, paths)))
    finally:
        if own:
            session.close()
    if record.fetched_to:
        progress.laptop = f"adapter at {record.fetched_to}"
    return progress, poll.state


@dataclass
class StatusReport:
    """`autodl-run status`: the ledger's row, the instance's state, and the replayed progress."""

    record: JobRecord
    state: JobStatus
    progress: Progress
    report: str | None = None  # answered from the laptop's record (client.record): its run report

    def as_dict(self) -> dict:
        return {**self.record.as_dict(), "state": self.state.state.value, "exit_code": self.state.exit_code,
                **self.progress.as_dict(), "from_laptop": self.report is not None,
                "report": self.report}  # fmt: skip


# --- a job that ended, answered from the laptop's record ---------------------------------------------

ENDED = ("done", "failed", "cancelled", "lost")


def on_laptop(record: JobRecord, need_adapter: bool = False) -> bool:
    """The job ended and the laptop holds its whole record (and, with `need_adapter`, a done job's
    adapter): no need to ask the instance."""
    if record.state not in ENDED or not job_record.is_final(local_copy(record), record.state):
        return False
    return not (need_adapter and record.state == "done" and not record.fetched_to)


def _local_lines(path) -> Iterator[bytes]:
    if path.is_file():
        with open(path, "rb") as f:
            for line in f:
                if line.strip():
                    yield line.rstrip(b"\n")


def laptop_progress(record: JobRecord) -> Progress:
    copy = local_copy(record)
    progress = Progress(record.id, record.spec.instance.price_per_hour, record.spec.instance.currency)
    for line in _local_lines(copy.record_file("events")):
        progress.feed(line)
    progress.laptop = f"adapter at {record.fetched_to}" if record.fetched_to else f"record at {copy.record}"
    progress.guard = "not asked: the job ended and its record is on the laptop"
    return progress


def _tail_from_laptop(
    record: JobRecord, ledger: Ledger, console: Console, *, raw: bool, as_json: bool, log: Callable[[str], None] | None
) -> Progress:
    copy = local_copy(record)
    progress = Progress(record.id, record.spec.instance.price_per_hour, record.spec.instance.currency)
    if raw:
        for line in _local_lines(copy.record_file("log")):
            sys.stdout.write(log_line(line.decode("utf-8", "replace")) + "\n")
    for line in _local_lines(copy.record_file("events")):
        e = progress.feed(line)
        if e is None or raw:
            continue
        if as_json:
            sys.stdout.write(json_line(e.model_dump(mode="json")) + "\n")
        elif not console.is_terminal and (text := event_line(e)):
            console.print(Text(text), highlight=False)
    sys.stdout.flush()
    progress.laptop = f"adapter at {record.fetched_to}" if record.fetched_to else f"record at {copy.record}"
    if console.is_terminal and not raw and not as_json:
        console.print(panel(progress, record.state, ""))
    say = _sayer(None, log)
    say(f"{record.id} ended ({record.state}): shown from the laptop's record, {copy.report}")
    state = JobStatus(JobState(record.state), None, False)
    if state.state is not JobState.DONE:
        _finish(record, ledger, state, progress, update=False)
    return progress


def status(record: JobRecord, ledger: Ledger) -> StatusReport:
    if on_laptop(record):
        progress = laptop_progress(record)
        state = JobStatus(JobState(record.state), None, False)
        return StatusReport(record, state, progress, str(local_copy(record).report))
    try:
        progress, state = status_progress(record)
    except TransportError as exc:
        if record.spec.instance.hosts:  # node 0 silent: what the other nodes say (nodewatch's NodeLost)
            from client.lifecycle.nodes import describe_others

            exc.message += "".join(f"\n  {line}" for line in describe_others(record))
        raise
    if state.finished and record.state == "running":
        ledger.update(record.id, state=state.state.value, finished_at=time.time())
        job_record.invalidate(local_copy(record))  # pulled before this run ended: ask the instance until fetched
    return StatusReport(record, state, progress)
