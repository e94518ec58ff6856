"""Breaker: SwanLab's folder pulled with names the laptop's own temporary name collides with."""

from __future__ import annotations

from pathlib import Path

import pytest
from test_record import _tree, job  # noqa: F401

from client import record as job_record

pytestmark = pytest.mark.ssh


def test_a_file_and_its_dot_part_sibling_both_come_back(job) -> None:  # noqa: F811
    """The pull writes `x` through `x.part`, then renames it: an instance file named `x.part`, pulled
    before `x`, was overwritten and renamed away, so the record lacked it."""
    record, session, copy, paths = job
    record = record.__class__(**{**record.__dict__, "spec": record.spec.model_copy(update={
        "track": record.spec.track.model_copy(update={"report_to": ["swanlab"]})})})
    swan = Path(paths.swanlog)
    swan.mkdir(parents=True)
    (swan / "x.part").write_text("the instance's own x.part\n")  # its listing entry sorts first
    (swan / "x").write_text("x itself\n")
    job_record.pull(record, session, copy)
    assert _tree(copy.swanlog) == _tree(swan)
