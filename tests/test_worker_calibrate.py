"""remote_worker.calibrate: which micro-batch shape a run trains with, and that measuring learns nothing.

The choice is tested on tables of measurements (what a card would report); the passes themselves
run for real on the tiny model on the CPU, where memory is not known and speed alone decides.
docs/benchmarks.md has what the worker chose on a GPU.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("peft")

from jobfiles import run_in_process  # noqa: E402
from test_worker_fast import lora_model, sequences, spec_for  # noqa: E402
from tinymodel import make_model  # noqa: E402

from jobs import events as ev  # noqa: E402
from jobs.spec import TrainSpec, WorkerJob  # noqa: E402
from remote_worker import calibrate, checkpoints, data, recipe  # noqa: E402
from remote_worker.calibrate import DoesNotFit, Shape, Trial  # noqa: E402

GB = 10**9


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    return make_model(tmp_path_factory.mktemp("tiny"))


def table(rows: dict[Shape, tuple[float | None, float]]):
    """measure() over a card's numbers: shape -> (peak GB or None for out of memory, tokens/s)."""
    asked: list[tuple[Shape, bool]] = []

    def measure(shape: Shape, timed: bool) -> Trial:
        asked.append((shape, timed))
        peak, speed = rows[shape]
        if peak is None:
            return Trial(shape, tokens=shape.micro_batch_tokens, oom=True)
        seconds = shape.micro_batch_tokens / speed if timed else None
        return Trial(shape, tokens=shape.micro_batch_tokens, peak_bytes=int(peak * GB), seconds=seconds)

    return measure, asked


OFF16, OFF8, OFF4 = Shape(16384, False), Shape(8192, False), Shape(4096, False)
ON16, ON8, ON4 = Shape(16384, True), Shape(8192, True), Shape(4096, True)
# An H100's numbers for a 7B, nf4, all-linear r=16 (docs/benchmarks.md); 16k without checkpointing: over 80 GB.
H100 = {
    OFF16: (None, 0),
    OFF8: (42.7, 15824),
    OFF4: (24.0, 13000),
    ON16: (12.1, 11658),
    ON8: (8.9, 10979),
    ON4: (7.0, 8000),
}


def test_candidates_follow_the_spec():
    assert calibrate.candidates(TrainSpec(), 2048) == [OFF16, OFF8, OFF4, ON16, ON8, ON4]
    assert calibrate.candidates(TrainSpec(), 8192) == [OFF16, OFF8, ON16, ON8]  # a whole sequence must fit
    assert calibrate.candidates(TrainSpec(), 32768) == [Shape(32768, False), Shape(32768, True)]
    assert calibrate.candidates(TrainSpec(gradient_checkpointing="on"), 2048) == [ON16, ON8, ON4]
    assert calibrate.candidates(TrainSpec(micro_batch_tokens=6000), 2048) == [
        Shape(6000, False),
        Shape(6000, True),
    ]
    fixed = TrainSpec(micro_batch_tokens=6000, gradient_checkpointing="off")
    assert calibrate.candidates(fixed, 2048) == [Shape(6000, False)]


def test_an_80gb_card_trains_without_checkpointing_where_it_fits():
    measure, asked = table(H100)
    choice = calibrate.choose(calibrate.candidates(TrainSpec(), 2048), measure, usable_bytes=80 * GB)
    assert choice.shape == OFF8
    # With checkpointing off fitting at 8,192 tokens, checkpointing on at 8,192 or less is never run.
    assert [s for s, _ in asked] == [OFF16, OFF8, OFF4, ON16]
    assert "16,384 tokens, checkpointing off: out of memory" in choice.note
    assert "8,192 tokens, checkpointing off: 42.7 GB, 15,824 tokens/s" in choice.note


def test_a_24gb_card_keeps_checkpointing_and_the_fastest_size_that_fits():
    measure, _ = table(H100)
    choice = calibrate.choose(calibrate.candidates(TrainSpec(), 2048), measure, usable_bytes=24 * GB)
    # 4,096 off needs 24.0 GB: over 24 GB less the headroom, though it ran.
    assert choice.shape == ON16


def test_the_optimizer_state_counts_against_the_memory():
    measure, _ = table(H100)
    shapes = calibrate.candidates(TrainSpec(), 2048)
    assert calibrate.choose(shapes, measure, usable_bytes=50 * GB).shape == OFF8
    assert calibrate.choose(shapes, measure, usable_bytes=50 * GB, state_bytes=5 * GB).shape == OFF4


def test_a_fixed_shape_is_only_checked_for_memory_without_headroom():
    measure, asked = table(H100)
    fixed = TrainSpec(micro_batch_tokens=8192, gradient_checkpointing="off")
    choice = calibrate.choose(calibrate.candidates(fixed, 2048), measure, usable_bytes=43 * GB)
    assert choice.shape == OFF8 and asked == [(OFF8, False)]  # not timed: there is nothing to compare


def test_a_fixed_shape_that_does_not_fit_fails_before_training_with_what_to_change():
    measure, _ = table(H100)
    fixed = TrainSpec(micro_batch_tokens=16384, gradient_checkpointing="off")
    with pytest.raises(DoesNotFit) as err:
        calibrate.choose(calibrate.candidates(fixed, 2048), measure, usable_bytes=80 * GB)
    assert str(err.value).startswith(
        "16,384 tokens, checkpointing off does not fit in the GPU's memory (80.0 GB"
    )
    assert "out of memory" in str(err.value)
    assert "train.micro_batch_tokens = 0" in err.value.hint and "gradient_checkpointing" in err.value.hint


def test_when_nothing_fits_the_error_says_so_and_what_to_try():
    measure, _ = table({s: (None, 0) for s in H100})
    with pytest.raises(DoesNotFit) as err:
        calibrate.choose(calibrate.candidates(TrainSpec(), 2048), measure, usable_bytes=8 * GB)
    assert "none of the 6 micro-batch shapes fits" in str(err.value)
    assert "data.max_length" in err.value.hint


def test_measuring_stops_after_the_time_budget_once_a_shape_fits():
    measure, asked = table(H100)
    ticks = iter(range(0, 1000, 100))  # each look at the clock: 100 s later
    choice = calibrate.choose(
        calibrate.candidates(TrainSpec(), 2048),
        measure,
        usable_bytes=80 * GB,
        budget_s=60,
        clock=lambda: next(ticks),
    )
    assert [s for s, _ in asked] == [OFF16, OFF8]  # 100 s had passed before the third
    assert choice.shape == OFF8


# --- the passes, for real, on the CPU ----------------------------------------------------------


def test_measuring_learns_nothing_and_leaves_the_chosen_checkpointing(model_dir):
    model = lora_model(model_dir)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    seqs = sequences(lengths=(40, 31, 17, 9, 64, 50))

    def build_row(chosen, tokens):
        return data.packed_row(chosen, pad_to=tokens, pad_id=0)

    train = TrainSpec(micro_batch_tokens=128, gradient_checkpointing="auto")
    choice = calibrate.calibrate(model, calibrate.candidates(train, 64), seqs, build_row, torch.float32)
    # Checkpointing off fits (memory is not known here), so on, slower at the same size, is not run.
    (trial,) = choice.trials
    assert trial.shape == choice.shape == Shape(128, False)
    assert trial.seconds > 0 and trial.tokens == 64 + 50 + 9 and not trial.oom
    assert calibrate.is_checkpointing(model) == choice.shape.checkpointing
    assert all(p.grad is None for p in model.parameters())
    after = dict(model.named_parameters())
    assert all(torch.equal(before[n], after[n]) for n in before)


def test_checkpointing_can_be_turned_off_and_on_again(model_dir):
    model = lora_model(model_dir)
    base = model.get_base_model()
    calibrate.set_checkpointing(model, True)
    assert calibrate.is_checkpointing(base) and base._require_grads_hook is not None
    calibrate.set_checkpointing(model, False)
    assert not calibrate.is_checkpointing(base) and getattr(base, "_require_grads_hook", None) is None
    # On again twice, then off: no input-grad hook is left behind on the embeddings.
    calibrate.set_checkpointing(model, True)
    calibrate.set_checkpointing(model, True)
    assert len(base.get_input_embeddings()._forward_hooks) == 1
    calibrate.set_checkpointing(model, False)
    assert not base.get_input_embeddings()._forward_hooks
    assert not base.get_input_embeddings()(torch.tensor([[1, 2]])).requires_grad
    batch = data.packed_row(sequences(), pad_id=0)
    for on in (True, False):
        calibrate.set_checkpointing(model, on)
        model.zero_grad(set_to_none=True)
        model(**batch).loss.backward()
        assert any(p.grad is not None for p in model.parameters() if p.requires_grad)


def test_the_worst_row_takes_the_longest_sequences_that_fit():
    def lengths(chosen):
        return [len(s.ids) for s in chosen]

    seqs = sequences(lengths=(10, 50, 30, 20, 70))
    assert calibrate.worst_row(seqs, 100, lengths) == ([70, 30], 100)
    assert calibrate.worst_row(sequences(lengths=(10, 50, 30, 20, 45)), 60, lengths) == ([50, 10], 60)
    # A sequence longer than a fixed micro-batch gets a row of its own: that row is the costliest.
    assert calibrate.worst_row(seqs, 40, lengths) == ([70], 70)


# --- the shape travels with the checkpoints ----------------------------------------------------


def _job(tmp_path, model_dir, name, **train) -> WorkerJob:
    data_dir = tmp_path / "data"
    if not data_dir.exists():
        data_dir.mkdir()
        records = [
            {
                "messages": [
                    {"role": "user", "content": f"question {i}"},
                    {"role": "assistant", "content": "answer " * i},
                ]
            }
            for i in range(1, 13)
        ]
        (data_dir / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    spec = spec_for(model_dir, save_every_minutes=0, learning_rate=1e-2, **train)
    return WorkerJob(job_id=name, spec=spec, data_dir=str(data_dir), job_dir=str(tmp_path / name))


def test_checkpoints_keep_the_batch_shape_and_a_resume_trains_with_it(tmp_path, model_dir):
    job = _job(tmp_path, model_dir, "a", max_steps=4, save_steps=2, micro_batch_tokens=64)
    run_in_process(job)
    step = Path(job.job_dir) / "output" / "checkpoints" / "step-4"
    assert checkpoints.read_batch_shape(step) == (64, False)
    assert not (step / "adapter" / checkpoints.BATCH_SHAPE).exists()  # training state, not adapter

    # The same job resumed with another micro_batch_tokens in its spec keeps the checkpoint's shape
    # (its data order depends on it) and says so.
    (step / checkpoints.BATCH_SHAPE).unlink()
    checkpoints.write_batch_shape(step, 64, True)
    from jobs.manifest import write_manifest

    write_manifest(step)
    resumed = _job(tmp_path, model_dir, "a", max_steps=6, save_steps=2, micro_batch_tokens=128)
    run_in_process(resumed)
    events = [ev.parse(x) for x in (Path(job.job_dir) / "events.jsonl").read_text().splitlines()]
    started = [e for e in events if e.type == "started"][-1]
    assert started.resumed_from_step == 4
    assert (started.micro_batch_tokens, started.gradient_checkpointing) == (64, True)
    assert started.model_extra["calibration"] == "kept from step-4"


def test_on_the_cpu_the_shape_is_the_specs_and_not_measured(tmp_path, model_dir):
    job = _job(tmp_path, model_dir, "cpu", max_steps=1)
    run_in_process(job)
    events = [ev.parse(x) for x in (Path(job.job_dir) / "events.jsonl").read_text().splitlines()]
    started = next(e for e in events if e.type == "started")
    assert (
        started.micro_batch_tokens == 256 and started.model_extra["calibration"] == "not measured on the CPU"
    )
    assert not any(e.type == "phase" and e.phase == "calibrating" for e in events)
    assert recipe.use_gradient_checkpointing("auto", "cpu", 10**10) is False
