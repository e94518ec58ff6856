"""Progress of the laptop's long steps (prepare, uploads and fetches, pip on the instance), as plain events.

Library code reports through a `Meter` (`meter(what, unit, total)`): it emits `Activity` events
(start, update, end) to the sink the caller installed with `reporting(sink)` for the current
context, and does nothing when none is installed. Callers update per batch (prepare: 1,024 rows;
rsync: per progress line; pip: per poll), so each update is sent as it comes (`every` can thin
them). Nothing here renders or prints: the
CLI installs client.views.progress, which draws a bar in a terminal and one line per activity
when piped.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Literal

Kind = Literal["start", "update", "end"]


@dataclass(frozen=True)
class Activity:
    """One step of progress: `done` of `total` (None: unknown) `unit`s ("rows", "bytes", "" for none)."""

    id: int
    what: str
    kind: Kind
    done: float = 0
    total: float | None = None
    unit: str = ""
    rate: float | None = None  # units a second, when the source measures it itself (rsync)
    note: str = ""  # the latest line of text (pip's), shown beside the count
    seconds: float = 0.0  # since the start
    ok: bool = True  # on "end": whether it finished or was cut short by an error


Sink = Callable[[Activity], None]
_sink: ContextVar[Sink | None] = ContextVar("autodl_run_activity_sink", default=None)
_ids = itertools.count(1)


@contextmanager
def reporting(sink: Sink | None) -> Iterator[None]:
    """Send the activities of this context (this thread) to `sink`; None silences them."""
    token = _sink.set(sink)
    try:
        yield
    finally:
        _sink.reset(token)


_name: ContextVar[str] = ContextVar("autodl_run_activity_name", default="")


@contextmanager
def naming(what: str) -> Iterator[None]:
    """Name the activities started in this context that have no name of their own (an upload's "what")."""
    token = _name.set(what)
    try:
        yield
    finally:
        _name.reset(token)


def name_or(default: str) -> str:
    return _name.get() or default


def watched() -> bool:
    """Whether anyone receives the activities (a caller can skip measuring what nobody sees)."""
    return _sink.get() is not None


class Meter:
    """One activity: `update` as it goes (throttled), `end` once; a context manager ends it (ok or not)."""

    def __init__(self, what: str, unit: str = "", total: float | None = None, every: float = 0.0) -> None:
        self.what, self.unit, self.total, self.every = what, unit, total, every
        self.sink = _sink.get()
        self.id = next(_ids)
        self.done: float = 0
        self.rate: float | None = None
        self.note = ""
        self.t0 = time.monotonic()
        self._last = 0.0
        self._ended = False
        self._emit("start")

    def _emit(self, kind: Kind, ok: bool = True) -> None:
        if self.sink is not None:
            self.sink(Activity(self.id, self.what, kind, self.done, self.total, self.unit, self.rate, self.note,
                               time.monotonic() - self.t0, ok))  # fmt: skip

    def update(
        self,
        done: float | None = None,
        *,
        total: float | None = None,
        rate: float | None = None,
        note: str | None = None,
    ) -> None:
        if self.sink is None:
            return
        if done is not None:
            self.done = done
        if total is not None:
            self.total = total
        if rate is not None:
            self.rate = rate
        if note is not None:
            self.note = note
        now = time.monotonic()
        if now - self._last >= self.every:
            self._last = now
            self._emit("update")

    def end(self, ok: bool = True) -> None:
        if not self._ended:
            self._ended = True
            self._emit("end", ok)

    def __enter__(self) -> Meter:
        return self

    def __exit__(self, exc_type: object, *_: object) -> None:
        self.end(ok=exc_type is None)


def meter(what: str, unit: str = "", total: float | None = None) -> Meter:
    return Meter(what, unit, total)


def rows(what: str) -> Callable[[str, int, int | None], None]:
    """A callback of (phase, rows done, rows in all or None), as client.dataset.prepare calls it, turned into
    one Meter per phase named "`what`: phase"; the phase "done" ends the last one."""
    current: list[Meter] = []

    def report(phase: str, done: int, total: int | None) -> None:
        if current and (phase == "done" or current[0].what != f"{what}: {phase}"):
            last = current.pop()
            last.update(done if phase == "done" else (total or last.done))
            last.end()
        if phase == "done" or _sink.get() is None:
            return
        if not current:
            current.append(Meter(f"{what}: {phase}", "rows", total))
        current[0].update(done, total=total)

    return report
