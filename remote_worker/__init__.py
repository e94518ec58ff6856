"""The GPU side: `python -m remote_worker JOB_JSON` trains one job and reports it as events.

    __main__.py   entry: read job.json, run the recipe, write `state`, turn errors into a `failed` event
    recipe.py     the QLoRA recipe on transformers' Trainer + peft, top to bottom
    data.py       the canonical dataset (or its pre-tokenized ids) packed into micro-batches
    callbacks.py  a TrainerCallback that writes started/step/eval/checkpoint events
    probe.py      device, dtype, attention implementation, versions

Importing this package imports neither torch nor the client.
"""

from __future__ import annotations


class WorkerError(Exception):
    """A failure the worker understands; `hint` tells the user what to change."""

    def __init__(self, message: str, hint: str = ""):
        super().__init__(message)
        self.hint = hint


class ModelNotFound(WorkerError):
    """model.name_or_path is neither a folder on the instance nor a loadable hub id."""


class DataError(WorkerError):
    """The prepared dataset is missing, unreadable or has nothing to train on."""


class DeviceError(WorkerError):
    """The requested device is not there (train.device = "cuda" without a GPU)."""
