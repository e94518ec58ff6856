"""remote_worker.fast on the CPU: fused LoRA against PEFT, varlen attention plumbing, fallbacks.

The flash varlen kernel and Liger's Triton kernels need CUDA; here the attention function runs
its per-sequence SDPA reference (same packing, kwargs and reshapes) and Liger must stay off.
bench/qlora_bench.py `smoke` runs the whole candidate on the tiny model; `--phase W` on a GPU.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("peft")

from jobfiles import run_in_process  # noqa: E402
from peft import LoraConfig, get_peft_model  # noqa: E402
from tinymodel import make_model  # noqa: E402

from jobs import events as ev  # noqa: E402
from jobs.spec import JobSpec, WorkerJob  # noqa: E402
from remote_worker import WorkerError, data, fast, recipe  # noqa: E402
from remote_worker.fast import fused_lora, fused_mlp, liger, varlen  # noqa: E402
from remote_worker.probe import Probe  # noqa: E402

CPU = Probe("cpu", "cpu", False, "float32", "sdpa", {})
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    return make_model(tmp_path_factory.mktemp("tiny"))


def spec_for(model_dir, bits=16, **train) -> JobSpec:
    return JobSpec.model_validate(
        {
            "name": "t",
            "model": {"name_or_path": str(model_dir)},
            "data": {"train": "x", "max_length": 256},
            "quant": {"bits": bits},
            "train": {"device": "cpu", **train},
        }
    )


def sequences(lengths=(9, 31, 2, 17, 40), vocab=200, seed=0) -> list[data.Seq]:
    rng = np.random.default_rng(seed)
    return [data.Seq(rng.integers(3, vocab, n).astype(np.int64), np.ones(n, np.uint8)) for n in lengths]


def lora_model(model_dir, bits=16, seed=0, **lora):
    """The tiny model as the recipe loads it, with LoRA; B made non-zero so LoRA changes the output."""
    spec = spec_for(model_dir, bits)
    model = recipe.load_model(str(model_dir), spec, CPU)
    model = recipe.prepare_for_training(model, spec, CPU, checkpointing=False)
    torch.manual_seed(seed)
    config = dict(r=8, lora_alpha=16, lora_dropout=0.0, target_modules=TARGETS, task_type="CAUSAL_LM")
    config.update(lora)
    model = get_peft_model(model, LoraConfig(**config))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)
    return model.train()


def loss_and_grads(model, batch) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
    model.zero_grad(set_to_none=True)
    out = model(**batch)
    out.loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    return out.loss.detach(), out.logits.detach(), grads


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-12)).item()


def fused_layers(model) -> int:
    return sum(bool(getattr(m, fused_lora.FLAG, False)) for m in model.modules())


# --- fused LoRA ---------------------------------------------------------------------------------


@pytest.mark.parametrize("bits", [16, 4])
def test_fused_lora_matches_peft_outputs_and_gradients(model_dir, bits):
    if bits == 4:
        pytest.importorskip("bitsandbytes")
    model = lora_model(model_dir, bits)
    batch = data.packed_row(sequences())
    ref_loss, ref_logits, ref_grads = loss_and_grads(model, batch)  # PEFT's own forward

    note = fast.FastPaths().enable_fused_lora(model, spec_for(model_dir, bits))
    assert note == "on (14 of 14 LoRA layers; 2 of 2 MLPs)", note
    loss, logits, grads = loss_and_grads(model, batch)

    assert abs(loss.item() - ref_loss.item()) < 1e-5
    assert rel(logits, ref_logits) < 1e-5
    assert grads.keys() == ref_grads.keys() and len(grads) == 28  # A and B of 14 layers
    for name, g in grads.items():
        assert rel(g, ref_grads[name]) < 1e-4, (name, rel(g, ref_grads[name]))
        assert g.abs().sum() > 0, name

    fused_lora.set_enabled(model, False)  # and back: PEFT's path again, the same numbers
    loss_back, _, _ = loss_and_grads(model, batch)
    assert abs(loss_back.item() - ref_loss.item()) < 1e-6


def test_the_fused_path_is_really_taken(model_dir, monkeypatch):
    model = lora_model(model_dir)
    fused_lora.enable(model)
    calls = []
    real = fused_lora.fused_apply
    monkeypatch.setattr(fused_lora, "fused_apply", lambda *a: calls.append(1) or real(*a))
    model(**data.packed_row(sequences()))
    assert len(calls) == 14  # every targeted linear of both layers, once


def test_fused_training_reaches_the_same_adapter_as_peft(model_dir, tmp_path):
    batches = [data.packed_row(sequences(seed=s)) for s in range(3)]
    trained = {}
    for fused in (False, True):
        model = lora_model(model_dir, seed=1)
        if fused:
            assert fused_lora.enable(model).startswith("on")
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
        for b in batches * 2:
            model(**b).loss.backward()
            opt.step()
            opt.zero_grad()
        model.save_pretrained(tmp_path / f"fused-{fused}")  # PEFT's own save, fused or not
        trained[fused] = {k: v.detach().clone() for k, v in model.state_dict().items() if "lora_" in k}
    assert trained[True].keys() == trained[False].keys()
    for k, v in trained[True].items():
        assert rel(v, trained[False][k]) < 1e-4, k
    files = sorted(p.name for p in (tmp_path / "fused-True").iterdir())
    assert files == sorted(p.name for p in (tmp_path / "fused-False").iterdir())
    assert "adapter_model.safetensors" in files


@pytest.mark.parametrize(
    ("lora", "reason"),
    [
        ({"lora_dropout": 0.05}, "lora dropout > 0"),
        ({"use_dora": True}, "DoRA or another LoRA variant"),
    ],
)
def test_fused_lora_falls_back_to_peft(model_dir, lora, reason):
    model = lora_model(model_dir, **lora)
    note = fused_lora.enable(model)
    assert note == f"off: {reason}" and fused_layers(model) == 0
    model.eval()  # no dropout: PEFT's path, deterministic
    model(**data.packed_row(sequences()))


def test_a_trainable_base_bias_keeps_peft_path(model_dir):
    """LoraConfig(bias="all") trains the base layers' biases (Qwen2's q/k/v have one): the fused function
    returns no gradient for a bias, so those layers must stay on PEFT's path, and every bias must learn."""
    model = lora_model(model_dir, bias="all")
    batch = data.packed_row(sequences())
    _, _, ref = loss_and_grads(model, batch)
    note = fast.FastPaths().enable_fused_lora(model, spec_for(model_dir))
    assert note == "on (8 of 14 LoRA layers; 2 of 2 MLPs)", note  # q/k/v of both layers keep PEFT's forward
    _, _, grads = loss_and_grads(model, batch)
    assert grads.keys() == ref.keys() and sum(".bias" in n for n in grads) == 6
    for name, g in grads.items():
        assert rel(g, ref[name]) < 1e-4, name


def test_several_adapters_fall_back(model_dir):
    model = lora_model(model_dir)
    model.add_adapter("second", LoraConfig(r=4, target_modules=["q_proj"], task_type="CAUSAL_LM"))
    note = fused_lora.enable(model)
    assert note.startswith("on (12 of 14")  # q_proj now holds two adapters: PEFT's path there
    q_proj = model.base_model.model.model.layers[0].self_attn.q_proj
    assert fused_lora.ineligible(q_proj) == "several adapters"


def test_fused_lora_off_by_spec(model_dir):
    model = lora_model(model_dir)
    paths = fast.FastPaths()
    assert paths.enable_fused_lora(model, spec_for(model_dir, fused_lora=False)) == "off: train.fused_lora = false"
    assert fused_layers(model) == 0


def test_a_failing_check_turns_the_fused_path_off(model_dir, monkeypatch):
    model = lora_model(model_dir)
    monkeypatch.setattr(fused_lora, "check", lambda layer: "mismatch against PEFT's formula (forced)")
    assert fused_lora.enable(model) == "off: mismatch against PEFT's formula (forced)"
    assert fused_layers(model) == 0


# --- fused MLP ------------------------------------------------------------------------------------


def saved_sizes(model, batch) -> list[int]:
    """Byte sizes of the distinct storages autograd keeps for the backward of one forward."""
    seen: dict[int, int] = {}

    def pack(t):
        storage = t.untyped_storage()
        seen[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(**batch).loss.backward()
    return list(seen.values())


def test_the_fused_mlp_keeps_no_swiglu_product(model_dir):
    """What it exists for: a layer keeps gate and up (tokens x intermediate each) and nothing else that
    wide; unfused, the product silu(gate) * up is kept too (for down_proj's LoRA gradient)."""
    model = lora_model(model_dir)
    batch = data.packed_row(sequences())
    wide = batch["input_ids"].numel() * 128 * 4  # tokens x intermediate (128) x float32
    fused_lora.enable(model)
    unfused = saved_sizes(model, batch)
    assert fused_mlp.enable(model) == "on (2 of 2 MLPs)"
    fused = saved_sizes(model, batch)
    assert fused.count(wide) == 2 * 2  # gate and up, two layers
    assert unfused.count(wide) >= 2 * 3  # and the product (torch's silu keeps one more)
    assert sum(unfused) - sum(fused) >= 2 * wide


@pytest.mark.parametrize("checkpointing", [False, True])
def test_the_fused_mlp_matches_peft_outputs_and_gradients(model_dir, checkpointing):
    from remote_worker import calibrate

    model = lora_model(model_dir)
    calibrate.set_checkpointing(model, checkpointing, 1 if checkpointing else None)
    batch = data.packed_row(sequences())
    ref_loss, ref_logits, ref_grads = loss_and_grads(model, batch)
    fused_lora.enable(model)
    assert fused_mlp.enable(model) == "on (2 of 2 MLPs)"
    calls = []
    real = fused_mlp.fused_mlp_apply
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(fused_mlp, "fused_mlp_apply", lambda *a: calls.append(1) or real(*a))
        loss, logits, grads = loss_and_grads(model, batch)
    assert len(calls) == 2 + checkpointing  # one a layer, and the checkpointed layer's recompute
    assert abs(loss.item() - ref_loss.item()) < 1e-5 and rel(logits, ref_logits) < 1e-5
    for name, g in grads.items():
        assert rel(g, ref_grads[name]) < 1e-4, (name, rel(g, ref_grads[name]))
        assert g.abs().sum() > 0, name


def test_the_swiglu_backward_matches_autograd():
    forward, backward = fused_mlp._swiglu_kernels("cpu")
    g = torch.randn(6, 10, dtype=torch.float64, requires_grad=True)
    u = torch.randn(6, 10, dtype=torch.float64, requires_grad=True)
    dh = torch.randn(6, 10, dtype=torch.float64)
    want = torch.autograd.grad(torch.nn.functional.silu(g) * u, (g, u), dh)
    got = backward(g.detach().clone(), u.detach().clone(), dh)
    assert torch.allclose(forward(g, u), torch.nn.functional.silu(g) * u)
    assert all(torch.allclose(a, b) for a, b in zip(got, want, strict=True))


@pytest.mark.parametrize(
    ("targets", "reason"),
    [
        (["q_proj", "gate_proj", "up_proj"], "gate_proj, up_proj and down_proj are not all fused LoRA layers"),
    ],
)
def test_an_mlp_without_three_fused_layers_keeps_its_own_forward(model_dir, targets, reason):
    model = lora_model(model_dir, target_modules=targets)
    paths = fast.FastPaths()
    note = paths.enable_fused_lora(model, spec_for(model_dir))
    assert note == f"on (6 of 6 LoRA layers; MLPs off: {reason})" and not paths.fused_mlp
    model(**data.packed_row(sequences())).loss.backward()


def test_a_non_silu_mlp_is_not_fused(model_dir):
    model = lora_model(model_dir)
    for m in fused_mlp.mlps(model):
        m.act_fn = torch.nn.GELU()
    fused_lora.enable(model)
    assert fused_mlp.enable(model) == "off: its activation is not SiLU"


def test_a_failing_mlp_check_unfuses_them_all(model_dir, monkeypatch):
    model = lora_model(model_dir)
    fused_lora.enable(model)
    monkeypatch.setattr(fused_mlp, "check", lambda mlp: "mismatch (forced)")
    assert fused_mlp.enable(model) == "off: mismatch (forced)"
    assert not any(getattr(m, fused_mlp.FLAG, False) for m in model.modules())


def peft_init(model):
    """B back to zero, as get_peft_model leaves it (and the worker checks it)."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.zero_()
    return model


@pytest.mark.parametrize("broken", ["lora forward", "lora input gradient"])
def test_the_mlp_check_sees_lora_right_after_peft_init(model_dir, monkeypatch, broken):
    """The worker checks right after get_peft_model, every B zero: LoRA's share of y, dx and dA is zero in
    both runs then, so a check on the layers' own B could not see it wrong. It must, and leave B as it was."""
    model = peft_init(lora_model(model_dir))
    fused_lora.enable(model)
    if broken == "lora forward":
        real = fused_mlp._linear
        monkeypatch.setattr(fused_mlp, "_linear", lambda x2, w, q, b, a, bb, s: real(x2, w, q, b, a, bb, 2 * s))
    else:
        real = fused_mlp._input_grad
        monkeypatch.setattr(fused_mlp, "_input_grad", lambda dx, g, w, q, gb, a, s: real(dx, g, w, q, gb, a, -s))
    assert fused_mlp.enable(model).startswith("off: mismatch against the MLP's own forward")
    assert all(p.abs().sum() == 0 for n, p in model.named_parameters() if "lora_B" in n)
    monkeypatch.undo()
    assert fused_mlp.enable(model) == "on (2 of 2 MLPs)"
    assert all(p.abs().sum() == 0 for n, p in model.named_parameters() if "lora_B" in n)


# --- varlen attention -------------------------------------------------------------------------


def test_varlen_attention_keeps_packed_sequences_apart(model_dir):
    """The registered attention function gives the same loss and gradients as SDPA's packed mask,
    with the boundaries from the row (cu_seq_lens) or derived from position_ids."""
    seqs = sequences()
    ref_model = lora_model(model_dir)
    ref_loss, ref_logits, ref_grads = loss_and_grads(ref_model, data.packed_row(seqs))
    assert ref_model.config._attn_implementation == "sdpa"

    name = varlen.register()
    model = lora_model(model_dir)
    model.base_model.model.set_attn_implementation(name)
    assert model.config._attn_implementation == name
    for batch in (data.packed_row(seqs, varlen=True), data.packed_row(seqs, pad_to=150, varlen=True),
                  data.packed_row(seqs)):
        loss, logits, grads = loss_and_grads(model, batch)
        n = ref_logits.shape[1]
        assert abs(loss.item() - ref_loss.item()) < 1e-5
        assert rel(logits[:, :n], ref_logits) < 1e-5
        for k, g in grads.items():
            assert rel(g, ref_grads[k]) < 1e-4, k


def test_packed_rows_carry_the_boundaries():
    seqs = sequences((3, 5, 2))
    row = data.packed_row(seqs, pad_to=16, pad_id=0, varlen=True)
    assert row["cu_seq_lens_q"].dtype == torch.int32
    assert row["cu_seq_lens_q"].tolist() == [0, 3, 8, 10, 16]  # the filler is a sequence of its own
    assert row["cu_seq_lens_k"] is row["cu_seq_lens_q"]
    assert row["max_length_q"] == row["max_length_k"] == 6 and isinstance(row["max_length_q"], int)
    assert "cu_seq_lens_q" not in data.packed_row(seqs)
    positions = row["position_ids"]
    cu, longest = varlen.cu_seq_lens_from_positions(positions)
    assert cu.tolist() == [0, 3, 8, 10, 16] and longest == 6


def test_micro_batches_take_the_fast_paths_settings():
    seqs = sequences()
    train = data.MicroBatches(seqs, 64, packing=True, pad_id=0, pad_to=64)
    evals = data.MicroBatches(seqs, 64, packing=True, pad_id=0, pad_to=64)
    fast.FastPaths(varlen_batches=True, eval_skip_logits=True).configure(train, evals)
    assert "cu_seq_lens_q" in train[0] and "skip_logits" not in train[0]
    assert evals[0]["skip_logits"] is True and "cu_seq_lens_q" in evals[0]
    fast.FastPaths().configure(train, None)
    assert set(train[0]) == {"input_ids", "labels", "position_ids"}


def test_the_self_check_takes_the_first_variant_that_matches():
    def per_sequence(q, k, v, cu, max_len, scale=None):
        return varlen.sdpa_per_sequence(q, k, v, cu, scale)

    def across_sequences(q, k, v, cu, max_len, scale=None):  # ignores the boundaries: wrong
        return varlen.sdpa_per_sequence(q, k, v, cu[[0, -1]], scale)

    shape = (4, 2, 16, torch.float32, "cpu")
    assert varlen.pick([("right", per_sequence)], *shape) is None
    assert varlen.note().startswith("right, relative error")
    problem = varlen.pick([("wrong", across_sequences)], *shape)
    assert problem.startswith("wrong: mismatch against per-sequence SDPA")
    assert varlen._STATE["impl"] is None
    assert varlen.pick([("wrong", across_sequences), ("right", per_sequence)], *shape) is None
    assert varlen.note().startswith("right")


def test_attention_resolution_falls_back_to_sdpa(model_dir):
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(model_dir)
    assert fast.resolve_attention("auto", CPU, config)[:2] == ("sdpa", "sdpa")
    name, impl, note = fast.resolve_attention("flash_varlen", CPU, config)
    assert (name, impl) == ("sdpa", "sdpa") and "needs CUDA" in note
    name, _, note = fast.resolve_attention("flash_attention_2", CPU, config)
    assert name == "sdpa" and "flash_attention_2 requested" in note
    # A CUDA machine whose kernel cannot run (no GPU here): the self-check fails, SDPA is used.
    gpu = Probe("cuda", "test", True, "bfloat16", "sdpa", {})
    name, impl, note = fast.resolve_attention("auto", gpu, config)
    assert (name, impl) == ("sdpa", "sdpa") and "self-check failed" in note
    assert "packed rows" in fast.resolve_attention("auto", gpu, config, packing=False)[2]
    config.model_type = "gpt2"
    assert "automatic only for" in fast.resolve_attention("auto", gpu, config)[2]
    config.use_sliding_window, config.sliding_window = True, 64
    assert "sliding-window" in fast.resolve_attention("flash_varlen", gpu, config)[2]


# --- Liger, model preparation, the worker's started event ---------------------------------------


def test_liger_stays_off_where_it_cannot_run():
    class Config:
        model_type = "no_such_model"

    assert liger.apply("auto", "cpu", Config()) == ("off: Liger's Triton kernels need CUDA", False)
    assert liger.apply("on", "cpu", Config())[0].startswith("off")
    assert liger.apply("off", "cuda", Config()) == ('off: train.liger = "off"', False)
    status, fused_ce = liger.apply("auto", "cuda", Config())  # unknown type, or liger-kernel absent
    assert status.startswith("off: ") and not fused_ce
    with pytest.raises(WorkerError, match='train.liger = "on"'):
        liger.apply("on", "cuda", Config())


def test_cuda_preparation_freezes_without_upcasting(model_dir):
    """The CUDA path: bf16 stays bf16 (peft's prepare_model_for_kbit_training would upcast)."""
    from peft import prepare_model_for_kbit_training
    from transformers import AutoModelForCausalLM

    gpu = Probe("cuda", "test", True, "bfloat16", "sdpa", {})
    spec = spec_for(model_dir, bits=4)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16)
    model = recipe.prepare_for_training(model, spec, gpu, checkpointing=True)
    assert all(not p.requires_grad for p in model.parameters())
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    assert model.is_gradient_checkpointing and model.training
    embeddings = model.get_input_embeddings()(torch.tensor([[1, 2]]))
    assert embeddings.requires_grad  # input grads, for checkpointing

    upcast = prepare_model_for_kbit_training(AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16))
    assert torch.float32 in {p.dtype for p in upcast.parameters()}  # what the CUDA path avoids

    model = get_peft_model(model, recipe.lora_config(spec))
    fused_lora.enable(model)
    loss = model(**data.packed_row(sequences())).loss
    loss.backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)


def test_the_started_event_names_the_paths(tmp_path, model_dir):
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    record = {"messages": [{"role": "user", "content": "question"}, {"role": "assistant", "content": "answer"}]}
    (data_dir / "train.jsonl").write_text((json.dumps(record) + "\n") * 4)
    spec = spec_for(model_dir, max_steps=2, micro_batch_tokens=64, save_every_minutes=0)
    job = WorkerJob(job_id="t", spec=spec, data_dir=str(data_dir), job_dir=str(tmp_path / "job"))
    run_in_process(job)
    events = [ev.parse(x) for x in (Path(job.job_dir) / "events.jsonl").read_text().splitlines()]
    started = next(e for e in events if e.type == "started")
    extra = started.model_extra
    assert started.attention == "sdpa" and "needs CUDA" in extra["attention_note"]
    assert extra["liger"] == "off: Liger's Triton kernels need CUDA"
    assert extra["fused_lora"] == "on (14 of 14 LoRA layers; 2 of 2 MLPs)"
    assert any(e.type == "phase" and e.message.startswith("attention sdpa") for e in events)


def test_default_micro_batch_is_16k_tokens_on_cuda():
    from jobs.spec import TrainSpec

    assert data.batch_shape(TrainSpec(), 2048, "cuda") == (16384, 1)
    assert data.batch_shape(TrainSpec(), 32768, "cuda") == (32768, 1)  # a whole sequence always fits
    assert data.batch_shape(TrainSpec(), 2048, "cpu") == (2048, 1)
    assert data.batch_shape(TrainSpec(micro_batch_tokens=4096), 2048, "cuda") == (4096, 1)


def test_liger_is_an_optional_extra_only():
    from jobs import requirements

    assert requirements.OPTIONAL_CUDA_REQUIREMENTS == {"liger_kernel": "liger-kernel>=0.8.5"}
    for bits in (4, 16):
        assert "liger_kernel" not in requirements.requirements_for(bits)
    assert requirements.optional_requirements_for("auto") == requirements.OPTIONAL_CUDA_REQUIREMENTS
    assert requirements.optional_requirements_for("off") == {}


def _run_worker(tmp_path, model_dir, name) -> list:
    data_dir = tmp_path / f"data-{name}"
    data_dir.mkdir()
    records = [
        {"messages": [{"role": "user", "content": f"question {i}"}, {"role": "assistant", "content": "answer " * i}]}
        for i in range(1, 9)
    ]
    (data_dir / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    (data_dir / "eval.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records[:3]))
    spec = spec_for(model_dir, max_steps=4, micro_batch_tokens=96, save_every_minutes=0, learning_rate=1e-2)
    job = WorkerJob(job_id=name, spec=spec, data_dir=str(data_dir), job_dir=str(tmp_path / f"job-{name}"))
    run_in_process(job)
    return [ev.parse(x) for x in (Path(job.job_dir) / "events.jsonl").read_text().splitlines()]


def test_the_worker_trains_through_the_varlen_path(tmp_path, model_dir, monkeypatch):
    """The flash_varlen route end to end through the Trainer, PEFT and transformers, with the kernel
    replaced by its per-sequence reference (no GPU here): the same losses as SDPA's packed mask."""
    reference = _run_worker(tmp_path, model_dir, "sdpa")

    seen = []

    def kernel(q, k, v, cu, max_len, scale=None):
        assert cu.dtype == torch.int32 and isinstance(max_len, int)
        seen.append(int(cu[-1]))
        return varlen.sdpa_per_sequence(q, k, v, cu, scale)

    def no_derivation(position_ids):
        raise AssertionError("the micro-batch should carry cu_seq_lens")

    monkeypatch.setattr(fast, "resolve_attention", lambda *a, **k: ("flash_varlen", varlen.register(), "forced"))
    monkeypatch.setattr(varlen, "cu_seq_lens_from_positions", no_derivation)
    monkeypatch.setitem(varlen._STATE, "impl", kernel)
    events = _run_worker(tmp_path, model_dir, "varlen")

    started = next(e for e in events if e.type == "started")
    assert started.attention == "flash_varlen" and started.model_extra["fused_lora"].startswith("on")
    assert len(seen) >= 2 * 4  # both layers' attention, every training step (and the evaluations)
    losses = [e.loss for e in events if e.type == "step"]
    ref_losses = [e.loss for e in reference if e.type == "step"]
    assert len(losses) == 4 and losses == pytest.approx(ref_losses, rel=1e-4, abs=1e-4)
    evals = [e.eval_loss for e in events if e.type == "eval"]
    assert evals and evals == pytest.approx([e.eval_loss for e in reference if e.type == "eval"], rel=1e-4)
