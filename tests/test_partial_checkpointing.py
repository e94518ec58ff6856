"""Partial gradient checkpointing (remote_worker.calibrate): only the first k decoder layers recompute, the
loss and the gradients are those without checkpointing, and the calibration's candidates are guided by
jobs.memory. A 4-layer tiny Qwen2 with LoRA, fp32 on the CPU."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
peft = pytest.importorskip("peft")

from jobs import memory  # noqa: E402
from jobs.spec import TrainSpec  # noqa: E402
from remote_worker import calibrate  # noqa: E402
from remote_worker.calibrate import Shape, Trial  # noqa: E402

LAYERS = 4
CONFIGS = Path(__file__).parent / "fixtures" / "configs"


def tiny_lora():
    from transformers import AutoModelForCausalLM, Qwen2Config

    torch.manual_seed(0)
    cfg = Qwen2Config(hidden_size=64, intermediate_size=128, num_hidden_layers=LAYERS, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=300, max_position_embeddings=512, use_cache=False)  # fmt: skip
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    for p in model.parameters():
        p.requires_grad_(False)
    model = peft.get_peft_model(model, peft.LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)
    return model.train()


def step(model, counts: list[int]):
    """One forward and backward; returns the loss and the LoRA gradients; `counts` gets each layer's MLP runs."""
    layers = calibrate.decoder_layers(model)
    assert len(layers) == LAYERS

    def counted(i: int, forward):  # module hooks do not run in a recompute; the forward itself does
        def run(*a, **kw):
            counts[i] += 1
            return forward(*a, **kw)

        return run

    for i, layer in enumerate(layers):
        layer.mlp.forward = counted(i, layer.mlp.forward)
    ids = torch.randint(3, 300, (1, 48), generator=torch.Generator().manual_seed(1))
    model.zero_grad(set_to_none=True)
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    for layer in layers:
        del layer.mlp.forward  # back to the class's own
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    return loss.detach(), grads


@pytest.mark.parametrize("k", [1, 3])
def test_k_layers_recompute_and_the_result_is_unchanged(k: int) -> None:
    model = tiny_lora()
    calibrate.set_checkpointing(model, False)
    plain = [0] * LAYERS
    loss0, grads0 = step(model, plain)
    assert plain == [1] * LAYERS

    calibrate.set_checkpointing(model, True, k)
    counts = [0] * LAYERS
    loss, grads = step(model, counts)
    assert counts == [2] * k + [1] * (LAYERS - k)  # the first k run again in the backward
    assert torch.equal(loss, loss0)
    assert grads.keys() == grads0.keys() and grads
    for n in grads:
        torch.testing.assert_close(grads[n], grads0[n], rtol=1e-5, atol=1e-7)

    calibrate.set_checkpointing(model, True)  # all of them again
    every = [0] * LAYERS
    step(model, every)
    assert every == [2] * LAYERS
    calibrate.set_checkpointing(model, False)
    none = [0] * LAYERS
    step(model, none)
    assert none == [1] * LAYERS and not calibrate.is_checkpointing(model)


def test_the_calibration_measures_the_partial_shapes_that_memory_predicts() -> None:
    """A 7B architecture with rows of ~6k tokens on 40 GB (anchors §6): off does not fit; the guide adds a
    partial shape per size, predicted fastest first, which the choice then measures and keeps."""
    arch = memory.Arch.from_config(json.loads((CONFIGS / "qwen2.5-7b.json").read_text()))
    setup = memory.Setup(mean_seq=6000)
    usable = int(40e9 - memory.DEFAULT.context_bytes)
    shapes = calibrate.guide(calibrate.candidates(TrainSpec(), 8192), arch, setup, usable)
    partial = [s for s in shapes if s.layers is not None]
    assert partial and all(0 < s.layers < arch.layers for s in partial)
    assert shapes[0] in partial  # predicted fastest: fewer recomputed layers than "on", and it fits
    assert Shape(16384, False) not in shapes  # predicted far over the card: never run

    def measure(shape: Shape, timed: bool) -> Trial:  # this card's numbers: the model's own prediction
        e = memory.estimate(arch, setup, calibrate.to_memory_shape(shape, arch.layers))
        speed = memory.tokens_per_s(arch, setup, calibrate.to_memory_shape(shape, arch.layers), 312, 1.9e12)
        return Trial(shape, shape.micro_batch_tokens, int(e.allocated), shape.micro_batch_tokens / speed)

    choice = calibrate.choose(shapes, measure, usable)
    assert choice.shape.layers is not None and "checkpointing" in choice.note
    assert not any(t.shape == Shape(8192, True) for t in choice.trials)  # a partial 8k fitted: all-on skipped


def test_without_known_memory_the_candidates_are_unchanged() -> None:
    arch = memory.Arch.from_config(json.loads((CONFIGS / "qwen2.5-0.5b.json").read_text()))
    shapes = calibrate.candidates(TrainSpec(), 2048)
    assert calibrate.guide(shapes, arch, memory.Setup(), None) == shapes


def test_a_resumed_run_keeps_its_checkpointed_layers(tmp_path):
    """The batch shape saved with a checkpoint names its checkpointed layers; the resume sets the model up
    with them (and saves them again), not with all layers or none."""
    from jobfiles import run_in_process
    from test_worker_fast import spec_for
    from tinymodel import make_model

    from jobs.manifest import write_manifest
    from jobs.spec import WorkerJob
    from remote_worker import checkpoints

    model_dir = make_model(tmp_path / "tiny")  # 2 decoder layers
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    records = [{"messages": [{"role": "user", "content": f"q {i}"}, {"role": "assistant", "content": "a " * i}]}
               for i in range(1, 13)]  # fmt: skip
    (data_dir / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))

    def job(max_steps: int) -> WorkerJob:
        spec = spec_for(model_dir, max_steps=max_steps, save_steps=2, micro_batch_tokens=64, save_every_minutes=0)
        return WorkerJob(job_id="p", spec=spec, data_dir=str(data_dir), job_dir=str(tmp_path / "job"))

    first = job(2)
    run_in_process(first)
    step2 = Path(first.job_dir) / "output" / "checkpoints" / "step-2"
    (step2 / checkpoints.BATCH_SHAPE).unlink()
    checkpoints.write_batch_shape(step2, 64, True, layers=1)  # as a GPU run that checkpointed 1 of 2 layers saves it
    assert checkpoints.read_saved_shape(step2).checkpointed_layers == 1
    write_manifest(step2)

    run_in_process(job(4))
    step4 = step2.parent / "step-4"
    saved = checkpoints.read_saved_shape(step4)
    assert (saved.micro_batch_tokens, saved.gradient_checkpointing, saved.checkpointed_layers) == (64, True, 1)


def test_the_batch_shape_file_reads_without_the_layers_field(tmp_path):
    """A checkpoint written before partial checkpointing (no checkpointed_layers) still resumes: all layers."""
    from remote_worker import checkpoints

    (tmp_path / checkpoints.BATCH_SHAPE).write_text('{"micro_batch_tokens": 4096, "gradient_checkpointing": true}')
    saved = checkpoints.read_saved_shape(tmp_path)
    assert (saved.gradient_checkpointing, saved.checkpointed_layers) == (True, None)
    assert checkpoints.read_batch_shape(tmp_path) == (4096, True)
