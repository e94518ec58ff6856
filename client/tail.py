"""`tail` and `status`: follow a job's events (or its raw log) and show its progress."""

from __future__ import annotations

import json
import sys
import time

from rich.console import Console
from rich.live import Live
from rich.markup import escape

from client.errors import JobError
from client.follow import Follower, JobState, Reconnecting, poll_once
from client.ledger import JobRecord, Ledger
from client.render import Progress, event_line, panel
from client.submit import layout_for
from client.transport import connect
from jobs import events as ev


def _follower(record: JobRecord, filename: str, poll_s: float, reconnect_timeout_s: float) -> Follower:
    paths = layout_for(record.spec).job(record.id)
    return Follower(
        lambda: connect(record.spec.instance), paths, filename, poll_s=poll_s,
        reconnect_timeout_s=reconnect_timeout_s,
    )


def _finish(record: JobRecord, ledger: Ledger, state: JobState, progress: Progress | None) -> None:
    final = state.state
    ledger.update(record.id, state=final, finished_at=time.time())
    if final == "done":
        return
    why = ""
    if progress and progress.failed:
        f = progress.failed
        why = f": {f.error_class}: {f.message}"
        hint = f.hint or f"see the log with `autodl-run tail {record.id} --raw`"
    elif final == "lost":
        why = ": the worker stopped without an outcome (instance restarted, or the process was killed)"
        hint = f"see the log with `autodl-run tail {record.id} --raw`"
    else:
        if state.exit_code not in (None, 0):
            why = f" (exit code {state.exit_code})"
        hint = f"see the log with `autodl-run tail {record.id} --raw`"
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
) -> Progress:
    """Follow until the job ends. Raises JobError when it did not end as `done`."""
    progress = Progress(record.id, record.spec.instance.price_per_hour, record.spec.instance.currency)
    follower = _follower(record, "worker.log" if raw else "events.jsonl", poll_s, reconnect_timeout_s)
    live = console.is_terminal and not raw and not as_json
    note = ""
    view = Live(panel(progress, "running"), console=console, refresh_per_second=4, transient=False) if live else None
    final: JobState | None = None
    try:
        if view:
            view.start()
        for item in follower:
            if isinstance(item, Reconnecting):
                note = f"connection lost ({item.error}); reconnecting in {item.wait_s:.0f}s (try {item.attempt})"
                if not view:
                    print(note, file=sys.stderr, flush=True)
            elif isinstance(item, JobState):
                final = item
            else:
                note = ""
                for line in item:
                    if raw:
                        sys.stdout.write(line.decode("utf-8", "replace") + "\n")
                        continue
                    e = ev.parse(line)
                    progress.apply(e)
                    if as_json:
                        sys.stdout.write(line.decode() + "\n")
                    elif not view and (text := event_line(e)):
                        console.print(escape(text), highlight=False)
                if raw or as_json:
                    sys.stdout.flush()
            if view:
                view.update(panel(progress, final.state if final else "running", note))
    finally:
        if view:
            view.stop()
        follower.close()
    assert final is not None
    if raw and final.state != "done":
        progress = status_progress(record)
    _finish(record, ledger, final, progress)
    return progress


def status_progress(record: JobRecord) -> Progress:
    """Replay the job's whole event file once (no following)."""
    progress = Progress(record.id, record.spec.instance.price_per_hour, record.spec.instance.currency)
    paths = layout_for(record.spec).job(record.id)
    transport = connect(record.spec.instance)
    try:
        offset = 0
        while True:
            poll, offset = poll_once(transport, paths, "events.jsonl", offset)
            for line in poll.lines:
                progress.apply(ev.parse(line))
            if not poll.more:
                break
    finally:
        transport.close()
    progress.state = poll.state  # type: ignore[attr-defined]
    return progress


def status(record: JobRecord, ledger: Ledger) -> dict:
    progress = status_progress(record)
    state: JobState = progress.state  # type: ignore[attr-defined]
    if state.finished and record.state == "running":
        ledger.update(record.id, state=state.state, finished_at=time.time())
    return {**record.as_dict(), "state": state.state, "exit_code": state.exit_code, **progress.as_dict()}


def dumps(obj: object) -> str:
    return json.dumps(obj, indent=2, default=str)
