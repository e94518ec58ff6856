"""The event protocol: JSON lines the worker appends to `events.jsonl` on the instance.

One line is one event, written whole and flushed, so a reader that stops at the last
newline never sees half an event. Readers resume from a byte offset, which makes
reconnecting lossless: no event is repeated or missed.

On the laptop the file is data from another machine: `parse_or_none` turns a line that is not an
event (bad JSON or UTF-8, an unknown type, wrong fields) into None for the reader to count and skip,
and a line longer than MAX_LINE bytes is skipped whole (client.remote.follow).
"""

from __future__ import annotations

import errno
import os
import time
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, model_validator

MAX_INT = 2**53  # no count or size of a real job comes near it; a larger one is not an event of ours


class _Event(BaseModel):
    model_config = ConfigDict(extra="allow")
    t: float = Field(default_factory=time.time, description="unix time the event was written")

    @model_validator(mode="after")
    def _bounded(self) -> _Event:
        """Every number from the instance within range, so arithmetic on it cannot overflow a view."""
        for name, value in self:
            if isinstance(value, int) and not isinstance(value, bool) and abs(value) > MAX_INT:
                raise ValueError(f"{name} = {value} is out of range")
            if isinstance(value, float) and value == value and abs(value) > 1e300:
                raise ValueError(f"{name} is out of range")
        return self


class Phase(_Event):
    """A stage of the job before or after training: setup, loading the model, saving..."""

    type: Literal["phase"] = "phase"
    phase: str
    message: str = ""
    # a transfer's progress (the model download): the laptop draws a bar from these, the message says it in words
    # (left out of the line when unset: a phase event reads as it always has; exclude_if needs pydantic 2.11)
    bytes_done: int | None = Field(None, ge=0, exclude_if=lambda v: v is None)
    bytes_total: int | None = Field(None, ge=0, exclude_if=lambda v: v is None)
    bytes_per_s: float | None = Field(None, ge=0, exclude_if=lambda v: v is None)


class Started(_Event):
    type: Literal["started"] = "started"
    total_steps: int
    device: str
    dtype: str
    attention: str
    quant: str
    trainable_params: int
    total_params: int
    train_sequences: int
    train_tokens: int
    micro_batch_tokens: int
    grad_accum: int
    gradient_checkpointing: bool
    resumed_from_step: int = 0
    world_size: int = 1  # processes (GPUs) training together
    distributed: str = "none"  # "none", "ddp" or "fsdp"


class Step(_Event):
    type: Literal["step"] = "step"
    step: int
    total_steps: int
    epoch: float
    loss: float
    lr: float
    grad_norm: float | None = None
    tokens: int = Field(0, description="non-pad tokens seen so far")
    tokens_per_s: float = 0.0
    elapsed_s: float = 0.0
    peak_mem_gb: float | None = None  # the largest over the ranks
    rank_peak_mem_gb: list[float] | None = None  # each rank's, with more than one process


class Eval(_Event):
    type: Literal["eval"] = "eval"
    step: int
    eval_loss: float


class Checkpoint(_Event):
    """A complete checkpoint `step-N` (jobs.layout): written, given its manifests, then renamed into place."""

    type: Literal["checkpoint"] = "checkpoint"
    step: int
    path: str
    adapter_sha256: str = Field("", description="sha256 of the checkpoint's manifest.json (every file)")
    adapter_path: str = Field("", description="step-N/adapter: the adapter alone, what auto-fetch pulls")
    adapter_manifest_sha256: str = Field("", description="sha256 of step-N/adapter/manifest.json")
    bytes: int = Field(0, description="the whole checkpoint, optimizer state included")
    adapter_bytes: int = 0
    save_s: float = Field(0.0, description="how long writing it took")
    reason: str = Field("", description='why it was saved: "steps", "timer", "deadline", "max_hours", "signal"')


class Done(_Event):
    type: Literal["done"] = "done"
    adapter_path: str
    manifest_sha256: str
    final_loss: float | None = None
    steps: int = 0
    elapsed_s: float = 0.0
    total_steps: int = 0
    stopped: str = Field("", description='"" = ran to the end; "deadline" or "max_hours" = stopped early, resumable')


class Failed(_Event):
    type: Literal["failed"] = "failed"
    error_class: str
    message: str
    hint: str = ""
    checkpoint: str = Field("", description="the newest complete checkpoint left behind (resume starts there)")


class Warn(_Event):
    """Something went wrong that does not stop the job (a tracker that cannot connect, say)."""

    type: Literal["warning"] = "warning"
    source: str = Field("", description='what warned: "swanlab", "wandb", "tensorboard"')
    message: str


Event = Annotated[Phase | Started | Step | Eval | Checkpoint | Done | Failed | Warn, Field(discriminator="type")]
_ADAPTER: TypeAdapter[Any] = TypeAdapter(Event)


MAX_LINE = 1 << 20  # bytes; a longer line is not an event the worker wrote


def parse(line: str | bytes) -> Phase | Started | Step | Eval | Checkpoint | Done | Failed | Warn:
    return _ADAPTER.validate_json(line)


def parse_or_none(line: str | bytes) -> Phase | Started | Step | Eval | Checkpoint | Done | Failed | Warn | None:
    """The event on this line, or None when it is not one (never raises)."""
    if len(line) > MAX_LINE:
        return None
    try:
        return _ADAPTER.validate_json(line)
    except (ValueError, UnicodeError, RecursionError):  # pydantic's ValidationError is a ValueError
        return None


def dumps(event: _Event) -> str:
    return event.model_dump_json(exclude_none=False)


class EventWriter:
    """Appends events to a file, one fsynced line each, written whole or not at all.

    A line goes out in one write(2) on an O_APPEND descriptor. If it fails half-way (the disk
    is full), the file is cut back to where it was, so readers never see a torn line and the
    next event starts on a line of its own.
    """

    def __init__(self, path: str | os.PathLike[str]):
        self._fd: int | None = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)

    def emit(self, event: _Event) -> None:
        if self._fd is None:
            raise ValueError("the event file is closed")
        data = (dumps(event) + "\n").encode()
        before = os.fstat(self._fd).st_size
        try:
            written = os.write(self._fd, data)
            if written != len(data):
                raise OSError(errno.ENOSPC, f"wrote {written} of {len(data)} bytes of an event")
            os.fsync(self._fd)
        except OSError:
            try:
                os.ftruncate(self._fd, before)
            except OSError:
                pass
            raise

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


def split_complete(buffer: bytes) -> tuple[list[bytes], bytes]:
    """Split bytes into complete lines and the unfinished rest (kept for the next read)."""
    *lines, rest = buffer.split(b"\n")
    return [ln for ln in lines if ln.strip()], rest


__all__ = [
    "Phase", "Started", "Step", "Eval", "Checkpoint", "Done", "Failed", "Warn", "Event",
    "EventWriter", "parse", "parse_or_none", "dumps", "split_complete", "MAX_LINE",
]
