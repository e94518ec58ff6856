"""Helpers for the dataset tests (imported by tests/test_dataset*.py; not a conftest plugin)."""

from __future__ import annotations

import functools
import tempfile
from pathlib import Path

from jobs.spec import DataSpec, JobSpec, ModelSpec

FIXTURES = Path(__file__).parent / "fixtures" / "data"
JOB = FIXTURES / "job.toml"  # never read: paths in data.* are relative to its folder


@functools.lru_cache(maxsize=1)
def tiny_tokenizer():
    """The tiny ChatML tokenizer of tests/tinymodel.py, made once per test session."""
    from tinymodel import make_tokenizer

    return make_tokenizer(Path(tempfile.mkdtemp(prefix="tiny-tok-")))


def spec(model: str = "no/such-model", **data) -> JobSpec:
    data.setdefault("train", "alpaca.jsonl")
    return JobSpec(name="t", model=ModelSpec(name_or_path=model), data=DataSpec(**data))
