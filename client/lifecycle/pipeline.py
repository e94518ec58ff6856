"""The lifecycle as one pipeline of timed steps: check, prepare, connect, sync, setup, model, launch.

`submit` and `resume` are compositions of the same steps (client.lifecycle.steps): each runs through
a `Pipeline`, which times it and hands a `StepResult` (data: name, seconds, a one-line detail) to the
caller's `report`; the CLI's view renders them. Progress lines within a step (set-up, the model
download) go to `log` as they happen.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

T = TypeVar("T")
Log = Callable[[str], None]


@dataclass(frozen=True)
class StepResult:
    name: str
    seconds: float
    detail: str = ""  # what the step found or did, one line of plain text ("" for nothing to say)


Report = Callable[[StepResult], None]


@dataclass(frozen=True)
class Step(Generic[T]):
    name: str
    fn: Callable[..., T]
    describe: Callable[[T], str] | None = None  # the detail line of its result


def step_text(result: StepResult) -> str:
    """The plain-text form of a step's line (what a caller without a view of its own prints)."""
    return f"✓ {result.name:<8} {result.seconds:6.2f}s"


class Pipeline:
    """Runs steps one after another, timing each; `results` holds what each finished step reported."""

    def __init__(self, report: Report | None = None, log: Log = print):
        self.report = report or (lambda r: _plain(r, log))
        self.log = log
        self.results: list[StepResult] = []

    def run(self, step: Step[T], *args: Any, **kwargs: Any) -> T:
        t = time.monotonic()
        value = step.fn(*args, **kwargs)
        detail = step.describe(value) if step.describe else ""
        result = StepResult(step.name, time.monotonic() - t, detail)
        self.results.append(result)
        self.report(result)
        return value

    @property
    def timings(self) -> dict[str, float]:
        return {r.name: r.seconds for r in self.results}


def _plain(result: StepResult, log: Log) -> None:
    log(step_text(result))
    if result.detail:
        log(f"  {result.detail}")
