"""Module fixtures shared by the tests that train the tiny model in worker processes (test_multigpu*.py,
test_resume.py): import them by name into the test module (`from tinyjob import model_dir, data_dir`).
A module sets DATA_REPEATS to change how many times the training pairs repeat (default 3)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from jobfiles import PAIRS, chat
from tinymodel import make_model


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One torch thread: on a busy 2-core machine two spin against each other (5-10x slower)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    return make_model(tmp_path_factory.mktemp("tiny"))


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory, request) -> Path:
    d = tmp_path_factory.mktemp("data")
    repeats = getattr(request.module, "DATA_REPEATS", 3)
    rows = [chat(f"{q} ({i})", a) for i in range(repeats) for q, a in PAIRS]
    (d / "train.jsonl").write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    return d
