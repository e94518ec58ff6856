"""Follow a job on its instance: read new bytes of a file from an offset, plus the job's state.

Each poll is one remote round trip that prints the state, the exit code, whether the worker is
alive, and then the file's bytes from `offset`. Only complete lines are consumed, and the
offset only moves past them, so a dropped connection loses or repeats nothing: the follower
reconnects with backoff and asks again from the same byte.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

from client.errors import JobError, RemoteCommandError, TransportError
from client.transport.base import Transport
from jobs.events import split_complete
from jobs.layout import JobPaths

CHUNK = 1 << 20  # at most this many bytes a poll, so a long backlog streams in pieces
TERMINAL_STATES = ("done", "failed", "cancelled")

_POLL = r"""
cd "$1" 2>/dev/null || { printf 'missing\n\n0\n'; exit 0; }
s=$(cat state 2>/dev/null); e=$(cat exit_code 2>/dev/null); a=1
# alive unless a recorded pid is gone (no pid file yet: still starting)
p=$(cat pid 2>/dev/null) && [ -n "$p" ] && ! kill -0 "$p" 2>/dev/null && a=0
printf '%s\n%s\n%s\n' "$s" "$e" "$a"
tail -c +"$2" "$3" 2>/dev/null | head -c "$4"
"""


@dataclass
class JobState:
    state: str  # running | done | failed | cancelled | lost | missing
    exit_code: int | None
    alive: bool

    @property
    def finished(self) -> bool:
        return self.state in TERMINAL_STATES or self.state in ("lost", "missing")


def _resolve_state(state: str, exit_code: int | None, alive: bool, started: bool) -> str:
    if state in TERMINAL_STATES or state == "missing":
        return state
    if exit_code is not None:
        # The process ended without the worker recording an outcome: a crash (OOM killer, SIGKILL).
        return "done" if exit_code == 0 and state == "done" else "failed"
    if not alive and started and state == "running":
        return "lost"
    return state or "starting"


@dataclass
class Poll:
    state: JobState
    lines: list[bytes] = field(default_factory=list)
    more: bool = False  # the file had more bytes than one chunk


def poll_once(transport: Transport, paths: JobPaths, filename: str, offset: int) -> tuple[Poll, int]:
    """One round trip: the job's state and the complete lines of `filename` after `offset`."""
    res = transport.run(
        ["bash", "-c", _POLL, "_", paths.dir, str(offset + 1), filename, str(CHUNK)], check=False
    )
    if not res.ok:
        raise RemoteCommandError(res.command, res.exited, res.stdout, res.stderr, transport.where)
    head, _, body = _split_header(res.stdout)
    state, code, alive = head
    exit_code = int(code) if code.strip().lstrip("-").isdigit() else None
    raw = body.encode("utf-8", errors="surrogateescape")
    lines, rest = split_complete(raw)
    consumed = len(raw) - len(rest)
    js = JobState(_resolve_state(state, exit_code, alive == "1", offset + consumed > 0), exit_code, alive == "1")
    return Poll(js, lines, more=len(raw) >= CHUNK), offset + consumed


def _split_header(out: str) -> tuple[tuple[str, str, str], str, str]:
    parts = out.split("\n", 3)
    while len(parts) < 4:
        parts.append("")
    return (parts[0], parts[1], parts[2]), "", parts[3]


@dataclass
class Reconnecting:
    attempt: int
    error: str
    wait_s: float


class Follower:
    """Yields lists of new lines, `Reconnecting` notices, and finally the terminal `JobState`."""

    def __init__(
        self,
        connect: Callable[[], Transport],
        paths: JobPaths,
        filename: str,
        *,
        offset: int = 0,
        poll_s: float = 1.0,
        reconnect_timeout_s: float = 900.0,
        sleep: Callable[[float], None] = time.sleep,
    ):
        self._connect = connect
        self.paths = paths
        self.filename = filename
        self.offset = offset
        self.poll_s = poll_s
        self.reconnect_timeout_s = reconnect_timeout_s
        self._sleep = sleep
        self._transport: Transport | None = None

    def _poll(self) -> Poll:
        if self._transport is None:
            self._transport = self._connect()
        poll, self.offset = poll_once(self._transport, self.paths, self.filename, self.offset)
        return poll

    def __iter__(self) -> Iterator[list[bytes] | Reconnecting | JobState]:
        down_since: float | None = None
        attempt = 0
        suspect_lost = False
        while True:
            try:
                poll = self._poll()
            except TransportError as exc:
                if isinstance(exc, RemoteCommandError) and exc.exited != -1:
                    raise
                self._drop()
                now = time.monotonic()
                down_since = down_since or now
                if now - down_since > self.reconnect_timeout_s:
                    raise JobError(
                        f"lost the connection to the instance for over {self.reconnect_timeout_s:.0f}s: {exc.message}",
                        hint="the job keeps running on the instance; `autodl-run tail` reattaches when it is reachable",
                    ) from None
                attempt += 1
                wait = min(30.0, 0.5 * 2 ** min(attempt, 6))
                yield Reconnecting(attempt, exc.message.splitlines()[0], wait)
                self._sleep(wait)
                continue
            if down_since is not None:
                down_since, attempt = None, 0
            if poll.lines:
                yield poll.lines
            if poll.more:
                continue
            if poll.state.finished:
                # The pid can vanish a moment before the launcher writes the exit code: confirm `lost`.
                if poll.state.state != "lost" or suspect_lost:
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
