"""The event protocol: JSON lines the worker appends to `events.jsonl` on the instance.

One line is one event, written whole and flushed, so a reader that stops at the last
newline never sees half an event. Readers resume from a byte offset, which makes
reconnecting lossless: no event is repeated or missed.
"""

from __future__ import annotations

import json
import os
import time
from typing import IO, Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter


class _Event(BaseModel):
    model_config = ConfigDict(extra="allow")
    t: float = Field(default_factory=time.time, description="unix time the event was written")


class Phase(_Event):
    """A stage of the job before or after training: setup, loading the model, saving..."""

    type: Literal["phase"] = "phase"
    phase: str
    message: str = ""


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
    peak_mem_gb: float | None = None


class Eval(_Event):
    type: Literal["eval"] = "eval"
    step: int
    eval_loss: float


class Checkpoint(_Event):
    type: Literal["checkpoint"] = "checkpoint"
    step: int
    path: str
    adapter_sha256: str = ""


class Done(_Event):
    type: Literal["done"] = "done"
    adapter_path: str
    manifest_sha256: str
    final_loss: float | None = None
    steps: int = 0
    elapsed_s: float = 0.0


class Failed(_Event):
    type: Literal["failed"] = "failed"
    error_class: str
    message: str
    hint: str = ""


Event = Annotated[Phase | Started | Step | Eval | Checkpoint | Done | Failed, Field(discriminator="type")]
_ADAPTER: TypeAdapter[Any] = TypeAdapter(Event)
TERMINAL = ("done", "failed")


def parse(line: str | bytes) -> Phase | Started | Step | Eval | Checkpoint | Done | Failed:
    return _ADAPTER.validate_json(line)


def dumps(event: _Event) -> str:
    return event.model_dump_json(exclude_none=False)


class EventWriter:
    """Appends events to a file, one flushed and fsynced line each."""

    def __init__(self, path: str | os.PathLike[str]):
        self._f: IO[str] = open(path, "a", encoding="utf-8")

    def emit(self, event: _Event) -> None:
        self._f.write(dumps(event) + "\n")
        self._f.flush()
        os.fsync(self._f.fileno())

    def close(self) -> None:
        self._f.close()


def split_complete(buffer: bytes) -> tuple[list[bytes], bytes]:
    """Split bytes into complete lines and the unfinished rest (kept for the next read)."""
    *lines, rest = buffer.split(b"\n")
    return [ln for ln in lines if ln.strip()], rest


def loads_many(lines: list[bytes]) -> list[Any]:
    return [parse(ln) for ln in lines]


__all__ = [
    "Phase", "Started", "Step", "Eval", "Checkpoint", "Done", "Failed", "Event",
    "EventWriter", "parse", "dumps", "split_complete", "loads_many", "TERMINAL", "json",
]
