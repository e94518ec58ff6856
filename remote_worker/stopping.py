"""When to stop training early, and why: a signal, the instance's deadline, or `instance.max_hours`.

Three reasons, each ends with a checkpoint (so the run can be resumed) and, for the two time
limits, the final adapter and a `done` event (so the client fetches it):

- **signal** - SIGTERM or SIGINT while training: finish the step, save a checkpoint, stop. A second
  signal, or one before training started (nothing to save yet), stops at once (KeyboardInterrupt).
- **deadline** - `deadline_unix` from the client (`instance.expires_at` or `submit --deadline`): stop
  early enough to save *and* fetch (the whole checkpoint, to resume elsewhere, and the adapter).
  The margin is estimated from what was measured: the step time, how long the last checkpoint
  took to write and how big it is, and the download speed the client measured while fetching
  checkpoints (`transfer.json` in the job folder; a cautious default until it has measured one).
- **max_hours** - a hard limit on this run of the worker: stop early enough to save before it.

More than one process (remote_worker.distributed): torchrun passes a signal on to every local
rank, and a deadline is read off each rank's own clock, so ranks could see a reason at different
steps. `agree` makes the decision one: after each step, every rank's reason (and whether its timer
asks for a checkpoint) goes through one all-reduce, the most urgent wins, and all ranks save and
stop at the same step; none is left waiting in a collective for a rank that stopped.

Standard library only (no torch), so it is easy to test.
"""

from __future__ import annotations

import os
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path

from jobs.layout import JobPaths
from jobs.protocol import ProtocolError, TransferSpeed, read_model

# Kept free on top of the estimate; AUTODL_RUN_DEADLINE_SAFETY_S overrides it (tests use a few seconds).
SAFETY_S = 60.0
HARD_SAFETY_S = 10.0
DEFAULT_TRANSFER_BPS = 2 * 2**20  # a cautious laptop download speed until the client measured one
DEFAULT_WRITE_BPS = 100 * 2**20  # disk write speed until a checkpoint was measured
TRANSFER_REREAD_S = 30.0


class Interrupted(KeyboardInterrupt):
    """The job was stopped by a signal after saving a checkpoint (state: cancelled)."""


def safety_s() -> float:
    try:
        return max(0.0, float(os.environ.get("AUTODL_RUN_DEADLINE_SAFETY_S", SAFETY_S)))
    except ValueError:
        return SAFETY_S


# --- signals -----------------------------------------------------------------------------------


@dataclass
class _SignalState:
    armed: bool = False  # training runs: a first signal asks for a checkpoint and a stop
    requested: str | None = None  # the name of the signal that asked


SIGNALS = _SignalState()


def _on_signal(signum, frame):
    name = signal.Signals(signum).name
    if SIGNALS.armed and SIGNALS.requested is None:
        SIGNALS.requested = name
        return
    raise KeyboardInterrupt(f"stopped by signal {name}")


def install_signal_handlers() -> None:
    SIGNALS.armed, SIGNALS.requested = False, None
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, _on_signal)


def arm() -> None:
    """From now on the first signal saves and stops gracefully (training is under way)."""
    SIGNALS.armed, SIGNALS.requested = True, None


def disarm() -> None:
    SIGNALS.armed = False


# --- time limits -------------------------------------------------------------------------------


@dataclass
class Stopper:
    """Decides, after each step, whether the run must stop now to end in time."""

    deadline_unix: float | None = None  # save and fetch before this
    max_hours: float | None = None  # save before this many hours after `started_unix`
    started_unix: float = field(default_factory=time.time)
    job_dir: Path | None = None  # where the client leaves transfer.json
    adapter_bytes: int = 0  # the adapter's size (estimated from the trainable parameters until measured)
    checkpoint_bytes: int = 0
    save_s: float | None = None  # measured: the last checkpoint's write time
    step_s: float = 0.0  # measured: a moving average of the step time
    _bps: float | None = None
    _bps_read_at: float = -1e9

    @property
    def hard_stop_unix(self) -> float | None:
        return None if self.max_hours is None else self.started_unix + self.max_hours * 3600

    def note_step(self, seconds: float) -> None:
        self.step_s = seconds if not self.step_s else 0.8 * self.step_s + 0.2 * seconds

    def note_save(self, checkpoint_bytes: int, adapter_bytes: int, seconds: float) -> None:
        self.checkpoint_bytes, self.adapter_bytes, self.save_s = checkpoint_bytes, adapter_bytes, seconds

    def transfer_bps(self, now: float | None = None) -> float:
        """The client's last measured download speed (bytes/s), re-read every 30 s; a cautious default."""
        now = time.monotonic() if now is None else now
        if self.job_dir is not None and now - self._bps_read_at >= TRANSFER_REREAD_S:
            self._bps_read_at = now
            try:
                path = JobPaths(str(self.job_dir)).transfer
                self._bps = read_model(TransferSpeed, Path(path).read_bytes(), path).bytes_per_s
            except (OSError, ProtocolError):
                pass
        return self._bps or DEFAULT_TRANSFER_BPS

    def save_estimate_s(self) -> float:
        """A checkpoint plus the final adapter, from the last measurement or the sizes."""
        if self.save_s is not None:
            one = self.save_s
        else:
            one = 1.0 + max(self.checkpoint_bytes, 3 * self.adapter_bytes) / DEFAULT_WRITE_BPS
        return 1.5 * one

    def fetch_bytes(self) -> int:
        """What the client pulls after a deadline stop: the whole checkpoint (to resume elsewhere) and the adapter."""
        return max(self.checkpoint_bytes, 3 * self.adapter_bytes) + self.adapter_bytes

    def deadline_margin_s(self) -> float:
        """Time kept before the deadline: finish a step, save, fetch, and a safety margin."""
        fetch_s = 1.5 * self.fetch_bytes() / self.transfer_bps() + 5.0
        return safety_s() + self.step_s + self.save_estimate_s() + fetch_s

    def hard_margin_s(self) -> float:
        return HARD_SAFETY_S + self.step_s + self.save_estimate_s()

    def check(self, now: float | None = None) -> str | None:
        """Why to stop now: "signal", "deadline", "max_hours"; None = keep training."""
        if SIGNALS.requested:
            return "signal"
        now = time.time() if now is None else now
        if self.deadline_unix is not None and now >= self.deadline_unix - self.deadline_margin_s():
            return "deadline"
        hard = self.hard_stop_unix
        if hard is not None and now >= hard - self.hard_margin_s():
            return "max_hours"
        return None

    def describe(self, reason: str, step: int) -> str:
        if reason == "signal":
            return f"stopped by {SIGNALS.requested or 'a signal to another rank'} at step {step}"
        if reason == "deadline":
            left = (self.deadline_unix or 0) - time.time()
            return (
                f"deadline in {left:.0f}s: stopping at step {step} to leave {self.deadline_margin_s():.0f}s "
                "to save and fetch"
            )
        return f"instance.max_hours = {self.max_hours:g} reached: stopping at step {step}"


# --- one decision for all ranks --------------------------------------------------------------------

URGENCY = (None, "max_hours", "deadline", "signal")  # the later, the more urgent


def agree(reason: str | None, timer_save: bool, most) -> tuple[str | None, bool]:
    """(reason, timer_save) as all ranks decide together: `most` is the element-wise maximum over
    the ranks of a list of ints (remote_worker.distributed.most; the identity for one process)."""
    level, timer = most([URGENCY.index(reason), int(timer_save)])
    return URGENCY[level], bool(timer)
