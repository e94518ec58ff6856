"""Follow a job on its instance: read new bytes of a file from an offset, plus the job's state.

Each poll is one remote round trip that prints the job folder's facts (for jobs.jobstate.resolve)
and then the file's bytes from `offset`. Only complete lines are consumed, and the offset moves by
exactly their bytes, so a dropped connection loses or repeats nothing: the follower reconnects with
backoff and asks again from the same byte.

What the instance wrote is data, not trusted: a line longer than jobs.events.MAX_LINE is skipped
whole (across as many polls as it takes) and counted, a file that is not a regular file (a FIFO
would block the read forever) is not read, and every read has a timeout, which counts as a dropped
connection.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

from client.errors import JobError, RemoteCommandError, TransportError
from client.remote.bundle import script
from client.retry import Backoff
from client.transport.base import Transport
from jobs.events import MAX_LINE, split_complete
from jobs.jobstate import parse_exit_code, resolve
from jobs.layout import JOB_FILES, JobPaths
from jobs.protocol import JobState

CHUNK = MAX_LINE + 1  # at most this many bytes a poll (the longest line and its newline)
POLL_TIMEOUT_S = 60.0  # one poll reads at most CHUNK bytes; a slower read counts as a dropped link
RECONNECT = Backoff(initial=1.0, factor=2.0, cap=30.0)  # 1, 2, 4 ... 30 s apart, until reconnect_timeout_s
NOT_REGULAR = "not a regular file"

_HEADER_LINES = 7  # jobs/scripts/poll.sh prints them before the bytes


@dataclass
class JobStatus:
    state: JobState  # jobs.jobstate.resolve
    exit_code: int | None
    alive: bool

    @property
    def finished(self) -> bool:
        return self.state.finished


@dataclass
class Poll:
    state: JobStatus
    lines: list[bytes] = field(default_factory=list)
    more: bool = False  # the file had more bytes than one chunk
    skipping: bool = False  # inside a line over MAX_LINE bytes: the next poll goes on skipping it
    skipped: int = 0  # lines over MAX_LINE bytes this poll started to skip
    problem: str = ""  # why the file was not read (it is not a regular file)


def poll_once(
    transport: Transport,
    paths: JobPaths,
    filename: str,
    offset: int,
    *,
    skipping: bool = False,
    timeout: float = POLL_TIMEOUT_S,
) -> tuple[Poll, int]:
    """One round trip: the job's state and the complete lines of `filename` after `offset`.

    `skipping`: the bytes at `offset` continue a too-long line (the last Poll's `skipping`)."""
    res = transport.run(
        ["bash", "-c", script("poll.sh"), "poll", paths.dir, str(offset + 1), filename, str(CHUNK),
         JOB_FILES["state"], JOB_FILES["exit_code"], JOB_FILES["pid"], JOB_FILES["launch"]],
        check=False,
        timeout=timeout,
    )
    if not res.ok:
        raise RemoteCommandError(res.command, res.exited, res.stdout, res.stderr, transport.where)
    parts = res.stdout_bytes.split(b"\n", _HEADER_LINES)
    parts += [b""] * (_HEADER_LINES + 1 - len(parts))
    exists, state, code, has_pid, alive, launching, kind = (p.decode(errors="replace") for p in parts[:-1])
    body = parts[-1]
    exit_code = parse_exit_code(code)
    status = JobStatus(
        resolve(
            state, exit_code, alive == "1", exists=exists == "1", has_pid=has_pid == "1", launching=launching == "1"
        ),
        exit_code,
        alive == "1",
    )
    poll = Poll(status, more=len(body) >= CHUNK)
    if kind == "other":
        poll.problem = f"{filename} in {paths.dir} on {transport.where} is {NOT_REGULAR}: not read"
        return poll, offset
    consumed = 0
    if skipping:
        end = body.find(b"\n")
        if end < 0:  # the long line goes on past this chunk
            poll.skipping = True
            return poll, offset + len(body)
        consumed = end + 1
    lines, rest = split_complete(body[consumed:])
    consumed = len(body) - len(rest)
    if len(rest) > MAX_LINE:  # a whole chunk without a newline: too long to be a line, skip it
        poll.skipping, poll.skipped = True, 1
        consumed = len(body)
    poll.lines = lines
    return poll, offset + consumed


@dataclass
class Reconnecting:
    attempt: int
    error: str
    wait_s: float


@dataclass
class Skipped:
    """Lines the follower dropped unread: longer than jobs.events.MAX_LINE bytes, or the file not readable."""

    lines: int = 0
    problem: str = ""


class Follower:
    """Yields lists of new lines, `Reconnecting` and `Skipped` notices, and finally the terminal `JobStatus`."""

    def __init__(
        self,
        connect: Callable[[], Transport],
        paths: JobPaths,
        filename: str,
        *,
        offset: int = 0,
        poll_s: float = 1.0,
        reconnect_timeout_s: float = 900.0,
        poll_timeout_s: float = POLL_TIMEOUT_S,
        sleep: Callable[[float], None] = time.sleep,
    ):
        self._connect = connect
        self.paths = paths
        self.filename = filename
        self.offset = offset
        self.skipping = False
        self.poll_s = poll_s
        self.reconnect_timeout_s = reconnect_timeout_s
        self.poll_timeout_s = poll_timeout_s
        self._sleep = sleep
        self._transport: Transport | None = None

    def _poll(self) -> Poll:
        if self._transport is None:
            self._transport = self._connect()
        poll, self.offset = poll_once(
            self._transport, self.paths, self.filename, self.offset,
            skipping=self.skipping, timeout=self.poll_timeout_s,
        )  # fmt: skip
        self.skipping = poll.skipping
        return poll

    def __iter__(self) -> Iterator[list[bytes] | Reconnecting | Skipped | JobStatus]:
        down_since: float | None = None
        attempt = 0
        suspect_lost = False
        problem = ""
        while True:
            try:
                poll = self._poll()
            except TransportError as exc:
                if isinstance(exc, RemoteCommandError) and exc.exited != -1:
                    raise
                self._drop()  # a timed-out read (CommandTimedOut) too: the link may be wedged
                now = time.monotonic()
                down_since = down_since or now
                if now - down_since > self.reconnect_timeout_s:
                    raise JobError(
                        f"lost the connection to the instance for over {self.reconnect_timeout_s:.0f}s: {exc.message}",
                        hint="the job keeps running on the instance; `autodl-run tail` reattaches when it is reachable",
                    ) from None
                attempt += 1
                wait = RECONNECT.wait(attempt)
                yield Reconnecting(attempt, exc.message.splitlines()[0], wait)
                self._sleep(wait)
                continue
            if down_since is not None:
                down_since, attempt = None, 0
            if poll.skipped or (poll.problem and poll.problem != problem):
                problem = poll.problem
                yield Skipped(poll.skipped, poll.problem)
            if poll.lines:
                yield poll.lines
            if poll.more:
                continue
            if poll.state.finished:
                # The pid can vanish a moment before the launcher writes the exit code: confirm `lost`.
                if poll.state.state is not JobState.LOST or suspect_lost:
                    yield poll.state
                    return
                suspect_lost = True
            else:
                suspect_lost = False
            self._sleep(self.poll_s)

    def _drop(self) -> None:
        if self._transport is not None:
            try:
                self._transport.close()
            except Exception:
                pass
            self._transport = None

    def close(self) -> None:
        self._drop()
