"""The one rule for a job's state, used by the launcher, the follower (client) and the guard (instance).

Inputs are what the job folder holds (jobs.layout): the first line of `state` (written by the
worker and its wrapper), `exit_code` (written by the wrapper when the process ends), whether the
wrapper's `pid` still runs in that folder, and whether `launch.json` exists.

    no job folder                                  -> missing
    the process runs                               -> running (starting before `state` is written;
                                                      running too while it saves after `cancel`)
    state says done/failed/cancelled               -> that
    an exit code, no outcome                       -> done if 0 else failed
    no pid yet                                     -> launching (launch.json exists) or starting
    a pid that no longer runs, no outcome          -> lost (instance restarted, OOM killer, SIGKILL)

Standard library and jobs.protocol only.
"""

from __future__ import annotations

import re

from jobs.protocol import OUTCOMES, JobState

_CODE_RE = re.compile(r"-?[0-9]{1,10}")


def parse_exit_code(text: str | None) -> int | None:
    """An exit code as the wrapper writes it (ASCII digits); None for anything else (`²`, 60 digits)."""
    m = _CODE_RE.fullmatch((text or "").strip())
    return int(m.group(0)) if m else None


def resolve(
    state: str | None,
    exit_code: int | None,
    alive: bool,
    *,
    exists: bool = True,
    has_pid: bool = True,
    launching: bool = False,
) -> JobState:
    """The job's state from its folder; see the module docstring for the rule."""
    if not exists:
        return JobState.MISSING
    lines = (state or "").strip().splitlines()
    written = lines[0].strip() if lines else ""
    if alive:  # still running, also while it finishes a checkpoint after `cancel`
        return JobState.RUNNING if written else JobState.STARTING
    if written in OUTCOMES:
        return JobState(written)
    if exit_code is not None:  # the process ended without recording an outcome
        return JobState.DONE if exit_code == 0 else JobState.FAILED
    if not has_pid:  # the wrapper has not started (yet)
        return JobState.LAUNCHING if launching else JobState.STARTING
    return JobState.LOST


__all__ = ["parse_exit_code", "resolve"]
