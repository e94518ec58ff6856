"""The recipe's speed paths, each behind a `train.*` switch of the spec, each with a fallback.

    varlen.py      train.attention: PyTorch's flash varlen kernel over packed rows, self-checked
    liger.py       train.liger: Liger's RMSNorm, RoPE, SwiGLU and fused linear cross-entropy
    fused_lora.py  train.fused_lora: one autograd function for a LoRA layer's base + adapter
    fused_mlp.py   train.fused_lora: one for a SwiGLU MLP of LoRA layers, its product recomputed

They are the candidate "ours" of bench/qlora_bench.py, moved here so the worker runs exactly
what was measured (docs/benchmarks.md, "QLoRA training speed (issue 4)").

The recipe calls, in order:
    paths = fast.choose(model_path, spec, machine)   # before loading: attention check, Liger patches
    load_model(..., paths)                            # attn_implementation = paths.attn_implementation
    get_peft_model(...)
    paths.enable_fused_lora(model, spec)              # after PEFT
    paths.configure(train_set, eval_set)              # what the micro-batches must carry
and reports `paths.started_fields()` in the `started` event.
"""

from __future__ import annotations

import importlib
from dataclasses import asdict, dataclass

from remote_worker.fast import fused_lora, fused_mlp, liger, varlen

# "auto" takes the varlen path only for these families (standard causal GQA attention, checked
# on the same code path); any other model gets it with train.attention = "flash_varlen".
AUTO_VARLEN_MODEL_TYPES = frozenset({"llama", "mistral", "qwen2", "qwen2_moe", "qwen3", "qwen3_moe"})
FLASH_NAMES = ("flash_varlen", "flash_attention_2")


@dataclass
class FastPaths:
    attention: str = "sdpa"  # reported: "flash_varlen", "flash_attention_2" or "sdpa"
    attn_implementation: str = "sdpa"  # the name transformers is given
    attention_note: str = ""  # why this one (the check's errors, or why not the faster one)
    liger: str = "off"  # "on (...)" or "off: why"
    fused_lora: str = "off"  # "on (n of m LoRA layers; k of l MLPs)" or "off: why"
    fused_mlp: bool = False  # SwiGLU MLPs keep no product for the backward (jobs.memory's Setup.fused_mlp)
    varlen_batches: bool = False  # packed rows carry cu_seq_lens_q/k and max_length_q/k
    eval_skip_logits: bool = False  # eval micro-batches ask Liger for the loss only

    def started_fields(self) -> dict:
        return {
            "attention": self.attention,
            "attention_note": self.attention_note,
            "liger": self.liger,
            "fused_lora": self.fused_lora,
        }

    def describe(self) -> str:
        return f"attention {self.attention} ({self.attention_note}); liger {self.liger}"

    def enable_fused_lora(self, model, spec) -> str:
        if spec.train.fused_lora:
            self.fused_lora = fused_lora.enable(model)
            if self.fused_lora.startswith("on ("):
                mlp = fused_mlp.enable(model)
                self.fused_mlp = mlp.startswith("on")
                self.fused_lora = self.fused_lora[:-1] + "; " + (mlp[4:-1] if self.fused_mlp else "MLPs " + mlp) + ")"
        else:
            self.fused_lora = "off: train.fused_lora = false"
        return self.fused_lora

    def configure(self, train_set, eval_set=None) -> None:
        """Tell the micro-batch datasets (remote_worker.data.MicroBatches) what to carry."""
        for dataset in (train_set, eval_set):
            if dataset is not None:
                dataset.varlen = self.varlen_batches
        if eval_set is not None and self.eval_skip_logits:
            eval_set.extra = {"skip_logits": True}

    def as_dict(self) -> dict:
        return asdict(self)


def read_config(model_path: str, spec):
    """The model's config (for its type and head shape), or None when it cannot be read."""
    try:
        from transformers import AutoConfig

        return AutoConfig.from_pretrained(
            model_path, revision=spec.model.revision, trust_remote_code=spec.model.trust_remote_code
        )
    except Exception:  # noqa: BLE001 - loading the model reports the real problem a moment later
        return None


def flash_attn_importable() -> bool:
    try:
        importlib.import_module("flash_attn")
        from transformers.utils import is_flash_attn_2_available
    except Exception:  # noqa: BLE001 - a broken build raises more than ImportError
        return False
    return bool(is_flash_attn_2_available())


def resolve_attention(requested: str, machine, config, packing: bool = True) -> tuple[str, str, str]:
    """(reported name, transformers name, note) for train.attention on this machine and model.

    auto: flash_attention_2 if flash_attn imports, else flash_varlen (CUDA, 16-bit, packed rows,
    a known model family, self-check passed), else sdpa. An explicit choice that cannot run
    falls back down the same chain, and the note says why.
    """
    cuda16 = machine.device == "cuda" and machine.dtype in ("bfloat16", "float16")
    notes: list[str] = []
    if requested == "sdpa":
        return "sdpa", "sdpa", "train.attention = \"sdpa\""
    if requested in ("auto", "flash_attention_2"):
        if cuda16 and flash_attn_importable():
            return "flash_attention_2", "flash_attention_2", "flash_attn imports"
        if requested == "flash_attention_2":
            notes.append("flash_attention_2 requested, but " + (
                "flash_attn does not import" if cuda16 else "it needs CUDA and a 16-bit dtype"))
    why_not = None
    if not cuda16:
        why_not = "flash varlen needs CUDA and a 16-bit dtype"
    elif not packing:
        why_not = "flash varlen is for packed rows (train.packing = false)"
    elif requested != "flash_varlen" and getattr(config, "model_type", None) not in AUTO_VARLEN_MODEL_TYPES:
        why_not = (f"flash varlen is automatic only for {', '.join(sorted(AUTO_VARLEN_MODEL_TYPES))} "
                   f"(set train.attention = \"flash_varlen\" to try it)")
    else:
        why_not = varlen.unsupported_by(config)
    if why_not is None:
        heads, kv_heads, head_dim = varlen.head_shape(config)
        why_not = varlen.self_check(heads, kv_heads, head_dim, machine.torch_dtype, "cuda")
        if why_not is None:
            notes.append("self-check passed: " + varlen.note())
            return "flash_varlen", varlen.register(), "; ".join(notes)
        why_not = "flash varlen self-check failed: " + why_not
    notes.append(why_not)
    return "sdpa", "sdpa", "; ".join(notes)


def choose(model_path: str, spec, machine, config=None) -> FastPaths:
    """Decide attention and Liger before the model is built (Liger patches transformers' classes)."""
    config = config if config is not None else read_config(model_path, spec)
    paths = FastPaths()
    paths.attention, paths.attn_implementation, paths.attention_note = resolve_attention(
        spec.train.attention, machine, config, spec.train.packing
    )
    paths.varlen_batches = spec.train.packing and paths.attention in FLASH_NAMES
    paths.liger, paths.eval_skip_logits = liger.apply(spec.train.liger, machine.device, config)
    return paths


__all__ = ["FastPaths", "choose", "resolve_attention", "read_config", "fused_lora", "liger", "varlen"]
