"""`python -m remote_worker.export`: the adapter merged into its base, as safetensors, GGUF or for Ollama.

    --merged        a 16-bit safetensors model that transformers loads without peft
    --gguf TYPE     one GGUF file (f32, f16, bf16, q8_0, q5_0, q4_0) through the `gguf` library, with the
                    tokenizer, chat template and stop tokens in its metadata (Llama and Qwen2 architectures)
    --ollama TYPE   that GGUF file plus an Ollama `Modelfile` (FROM, TEMPLATE, PARAMETER stop)

The LoRA is always merged onto the base's original 16-bit weights, also for a QLoRA job, never onto
the dequantized nf4 ones (docs/export.md says why and gives the measured difference). Every merge is
checked: its logits against base + adapter (PEFT, unmerged) on the same tokens, within a stated
tolerance and well under the adapter's own effect on the logits, so a merge that lost the LoRA fails.
A GGUF file is read back (transformers' GGUF loading, dequantized) and its logits compared likewise.
The result folder gets `export.json` (jobs.protocol.ExportRecord) and a sha256 manifest.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import struct
import sys
import time
from functools import partial
from pathlib import Path

from jobs.layout import EXPORT_JSON, MODELFILE, gguf_name
from jobs.manifest import write_manifest
from jobs.protocol import ExportRecord, GgufCheck, MergeCheck, dump_model
from remote_worker import WorkerError, gguf_io
from remote_worker import tuned as tuned_mod

CHECK_TEXTS = (
    "The quick brown fox jumps over the lazy dog.",
    "What is the capital of France?",
    "你好，请介绍一下你自己。",
)
# Merged vs unmerged LoRA differ only by rounding: in fp32 by float error, in 16-bit by one rounding of
# each merged weight. And never more than this share of what the adapter changes: a lost LoRA differs by all of it.
MERGE_ATOL = {"float32": 1e-3, "bfloat16": 0.25, "float16": 0.06}
MERGE_MAX_SHARE = 0.2
# GGUF read back (dequantized) vs the merged model: relative L2 error of the logits.
# Measured on the tiny test model (hidden 64, random weights: the worst case for block quantizers): q8_0 0.012,
# f16 0.0006, q4_0 0.23; on a random Qwen2.5-0.5B-shaped model (24 layers compound it) q8_0 0.033.
# Real models' weights quantize better; a wrong or lost tensor is off by ~1.
GGUF_REL_TOL = {"f32": 1e-5, "f16": 5e-3, "bf16": 2e-2, "q8_0": 6e-2, "q5_0": 0.2, "q4_0": 0.35}
GGUF_TYPES = tuple(GGUF_REL_TOL)
# ... and of each weight tensor. Block quantizers on Gaussian weights: q8_0 about 0.5%, q5_0 4%, q4_0 8%
# (a block's scale is its largest weight over 127, 15, 7); real weights' outliers cost more, hence the margin.
# In 16-bit compute the logits' error is mostly the compute's own: a random 7B in bf16 on an H200 read
# back from f16 (bit-exact weights) gave 0.033. So the weights decide there; a lost tensor is off by ~1.
GGUF_WEIGHT_TOL = {"f32": 1e-6, "f16": 1e-3, "bf16": 5e-3, "q8_0": 0.03, "q5_0": 0.12, "q4_0": 0.25}
ARCHES = {"qwen2": "QWEN2", "llama": "LLAMA"}


class ExportError(WorkerError):
    """The export could not be made, or did not pass its check."""


# --- merging ------------------------------------------------------------------------------------------


def check_inputs(tokenizer, device: str):
    import torch

    enc = tokenizer(list(CHECK_TEXTS), return_tensors="pt", padding=True)
    return {k: v.to(device) for k, v in enc.items() if k in ("input_ids", "attention_mask")}, torch


def logits_of(model, inputs):
    import torch

    with torch.no_grad():
        out = model(**inputs).logits.float()
    mask = inputs["attention_mask"].bool()
    return out[mask]  # the real tokens' logits, (tokens, vocab)


def merge(t: tuned_mod.Tuned, tolerance: float | None = None, lose_lora: bool = False):
    """Base + adapter merged (the PeftModel is consumed), and the check of its logits against PEFT's.

    `lose_lora` (tests only) drops the LoRA instead of merging it: the failure seen in the wild."""
    inputs, _ = check_inputs(t.tokenizer, t.device)
    peft_logits = logits_of(t.model, inputs)
    with t.model.disable_adapter():
        base_logits = logits_of(t.model, inputs)
    merged = t.model.unload() if lose_lora else t.model.merge_and_unload()
    check = compare_merge(logits_of(merged, inputs), peft_logits, base_logits, str(t.dtype).split(".")[-1], tolerance)
    return merged, check


def compare_merge(merged, peft, base, dtype: str, tolerance: float | None = None) -> MergeCheck:
    diff = (merged - peft).abs().max().item()
    effect = (peft - base).abs().max().item()
    tol = MERGE_ATOL.get(dtype, 0.25) if tolerance is None else tolerance
    # Either criterion: rounding the merged weights to bf16 moves a 7B's logits by more than any fixed
    # tolerance (0.45 measured on an H200, adapter effect 5.8), while a lost LoRA moves them by its whole effect.
    passed = diff <= tol or diff <= MERGE_MAX_SHARE * effect
    return MergeCheck(dtype=dtype, max_abs_diff=diff, lora_effect=effect, tolerance=tol, passed=passed)


def require(check: MergeCheck) -> None:
    if not check.passed:
        raise ExportError(
            f"the merged model's logits differ from base + adapter by {check.max_abs_diff:.4g} (tolerance "
            f"{check.tolerance:g}, or {MERGE_MAX_SHARE:g} x the adapter's own effect {check.lora_effect:.4g}): "
            "the merge lost or damaged the LoRA",
            hint="nothing was written; check that peft and transformers are the versions training used",
        )


def quantize_linears(model, device: str) -> None:
    """Replace each base linear weight (not the LoRA's, not lm_head: as bitsandbytes' 4-bit load) by its
    nf4 round trip (double quantization, block 64): the weights QLoRA computes with."""
    import bitsandbytes.functional as bnbf
    import torch

    for name, mod in model.named_modules():
        if isinstance(mod, torch.nn.Linear) and "lora_" not in name and name.split(".")[-1] != "lm_head":
            w = mod.weight.data
            q, st = bnbf.quantize_4bit(w.to(device), quant_type="nf4", blocksize=64, compress_statistics=True)
            mod.weight.data = bnbf.dequantize_4bit(q, st).to(w.dtype)


def nf4_gap(adapter: Path, base: str | None = None, device: str = "cpu") -> dict:
    """What merging onto the dequantized nf4 weights instead would change, measured (docs/export.md).

    Logits on the check texts of: the model as trained (nf4 base + LoRA, unmerged: the dequantized
    weights, as bitsandbytes computes with them), the LoRA merged onto the 16-bit base (what we ship),
    and merged onto the dequantized nf4 base. Returns the max |diff| of each pair and the base's own
    nf4 error."""
    def run(nf4: bool, merge: bool):
        t = tuned_mod.load_tuned(adapter, base, device)
        if nf4:
            quantize_linears(t.model.base_model.model, device)
        inputs, _ = check_inputs(t.tokenizer, t.device)
        model = t.model.merge_and_unload() if merge else t.model
        return logits_of(model, inputs)

    trained, ours, onto_nf4 = run(True, False), run(False, True), run(True, True)
    base16 = tuned_mod.load_base(tuned_mod.base_name(adapter, base), device, trained.dtype)
    tok = tuned_mod.load_tokenizer(adapter)
    inputs, _ = check_inputs(tok, device)
    plain = logits_of(base16, inputs)
    gap = lambda a, b: (a - b).abs().max().item()  # noqa: E731
    return {
        "merged_16bit_vs_merged_nf4": gap(ours, onto_nf4),
        "merged_16bit_vs_trained": gap(ours, trained),
        "merged_nf4_vs_trained": gap(onto_nf4, trained),
        "adapter_effect_16bit": gap(ours, plain),
    }


def save_merged(merged, tokenizer, out: Path, dtype) -> list[str]:
    merged = merged.to(dtype)
    merged.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    return sorted(p.name for p in out.iterdir())


# --- GGUF ------------------------------------------------------------------------------------------------


def _rope_theta(cfg) -> float:
    theta = getattr(cfg, "rope_theta", None)
    params = getattr(cfg, "rope_parameters", None) or {}
    return float(theta or params.get("rope_theta") or 10000.0)


def _permute(w, n_head: int):
    """llama.cpp's Q/K row order for the Llama architecture (convert_hf_to_gguf.py; transformers undoes it)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _vocab(tokenizer, vocab_size: int):
    import gguf

    backend = json.loads(tokenizer.backend_tokenizer.to_str())
    model = backend.get("model", {})
    if model.get("type") != "BPE" or not any(
        (p or {}).get("type") == "ByteLevel" for p in _walk(backend.get("pre_tokenizer"))
    ):
        raise ExportError(
            "GGUF export supports byte-level BPE tokenizers (Qwen2, Llama 3, SmolLM2) only",
            hint="export --merged, then convert it with llama.cpp's convert_hf_to_gguf.py",
        )
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    by_id = {i: t for t, i in tokenizer.get_vocab().items()}
    added = {t.content: t.special for t in tokenizer.added_tokens_decoder.values()}
    tokens, types = [], []
    for i in range(vocab_size):
        tok = by_id.get(i)
        if tok is None:
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
        elif tok in added:
            tokens.append(tok)
            types.append(gguf.TokenType.CONTROL if added[tok] else gguf.TokenType.USER_DEFINED)
        else:
            tokens.append(tok)
            types.append(gguf.TokenType.NORMAL)
    return tokens, types, merges


def _walk(node):
    if isinstance(node, dict):
        yield node
        for p in node.get("pretokenizers", []) or []:
            yield from _walk(p)


def write_gguf(model, tokenizer, path: Path, qtype: str, stop: list[int], phases: dict | None = None) -> None:
    """The merged model as one GGUF file: tensors named and laid out as llama.cpp reads them."""
    import gguf
    import numpy as np

    t0 = time.monotonic()
    cfg = model.config
    arch_name = getattr(cfg, "model_type", "")
    if arch_name not in ARCHES:
        raise ExportError(
            f"GGUF export supports {', '.join(ARCHES)} models; this one is {arch_name!r}",
            hint="export --merged, then convert it with llama.cpp's convert_hf_to_gguf.py",
        )
    arch = getattr(gguf.MODEL_ARCH, ARCHES[arch_name])
    n_head, n_kv = cfg.num_attention_heads, cfg.num_key_value_heads or cfg.num_attention_heads
    qt = {"f32": gguf.GGMLQuantizationType.F32, "f16": gguf.GGMLQuantizationType.F16,
          "bf16": gguf.GGMLQuantizationType.BF16, "q8_0": gguf.GGMLQuantizationType.Q8_0,
          "q5_0": gguf.GGMLQuantizationType.Q5_0, "q4_0": gguf.GGMLQuantizationType.Q4_0}[qtype]  # fmt: skip
    ftype = {"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
             "bf16": gguf.LlamaFileType.MOSTLY_BF16, "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0,
             "q5_0": gguf.LlamaFileType.MOSTLY_Q5_0, "q4_0": gguf.LlamaFileType.MOSTLY_Q4_0}[qtype]  # fmt: skip
    names = gguf.get_tensor_name_map(arch, cfg.num_hidden_layers)

    w = gguf.GGUFWriter(str(path), gguf.MODEL_ARCH_NAMES[arch])
    w.add_name(Path(getattr(cfg, "_name_or_path", "") or "model").name or "model")
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_block_count(cfg.num_hidden_layers)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(n_head)
    w.add_head_count_kv(n_kv)
    w.add_rope_freq_base(_rope_theta(cfg))
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_vocab_size(cfg.vocab_size)
    w.add_file_type(ftype)
    if arch_name == "llama":
        w.add_rope_dimension_count(getattr(cfg, "head_dim", None) or cfg.hidden_size // n_head)

    tokens, types, merges = _vocab(tokenizer, cfg.vocab_size)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("qwen2" if arch_name == "qwen2" else "smaug-bpe" if "<|eot_id|>" in tokens else "default")
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges(merges)
    eos = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else (stop[0] if stop else None)
    if eos is not None:
        w.add_eos_token_id(eos)
    if tokenizer.pad_token_id is not None:
        w.add_pad_token_id(tokenizer.pad_token_id)
    if tokenizer.bos_token_id is not None:
        w.add_bos_token_id(tokenizer.bos_token_id)
    w.add_add_bos_token(bool(getattr(tokenizer, "add_bos_token", False)))
    eot = [i for i in stop if i != eos]
    if eot:
        w.add_eot_token_id(eot[0])
    if getattr(tokenizer, "chat_template", None):
        w.add_chat_template(tokenizer.chat_template)

    tied = getattr(cfg, "tie_word_embeddings", False)
    block = gguf.GGML_QUANT_SIZES[qt][0]
    plan = []  # (gguf name, fetch, type): tensor infos first, then the data streamed in the same order
    for hf_name, tensor in model.state_dict().items():
        if tied and hf_name == "lm_head.weight":
            continue
        name = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if name is None:
            raise ExportError(f"no GGUF name for tensor {hf_name}", hint="export --merged instead")
        n_rot = n_head if hf_name.endswith("q_proj.weight") else n_kv if hf_name.endswith("k_proj.weight") else 0
        if tensor.ndim == 1 or qtype == "f32":
            ttype = gguf.GGMLQuantizationType.F32
        elif qtype == "f16" or tensor.shape[-1] % block:  # a row the block size does not divide stays 16-bit, as llama.cpp does
            ttype = gguf.GGMLQuantizationType.F16
        else:
            ttype = qt
        shape = tuple(tensor.shape)
        w.add_tensor_info(name, shape, np.dtype(np.float32), gguf_io.nbytes(shape, ttype), raw_dtype=ttype)
        plan.append((name, partial(_host, tensor, n_rot if arch_name == "llama" else 0), ttype))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_ti_data_to_file()
    phases = {} if phases is None else phases
    phases["metadata"] = time.monotonic() - t0
    gguf_io.stream_tensors(w, plan, phases)
    w.close()


def _host(tensor, n_rot: int):
    """One tensor as float32 numpy (converted on its device, then copied), Q/K rows permuted for llama.cpp."""
    data = tensor.detach().float().cpu().numpy()
    return _permute(data, n_rot) if n_rot else data


def _unpermute(w, n_head: int):
    return w.reshape(n_head, w.shape[0] // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _read_back(path: Path):
    """gguf_io.read_tensors, one tensor at a time; a short or malformed file is an ExportError."""
    try:
        yield from gguf_io.read_tensors(path)
    except (ValueError, KeyError, struct.error) as exc:  # the disk filled up, or the file was damaged
        raise ExportError(f"{path.name} cannot be read back as GGUF: {str(exc)[:200]}",
                          hint="check the instance's free disk space (df -h), then export again") from None


def load_gguf_into(path: Path, model) -> tuple[str, float]:
    """The GGUF file's tensors, dequantized by the gguf library, copied into `model` in place (every one
    of its tensors must come from the file, by llama.cpp's names; Q/K rows un-permuted for Llama).
    Returns the tensor whose read-back differs most from the model's own, and its relative L2 error."""
    import gguf
    import numpy as np
    import torch

    cfg = model.config
    arch_name = cfg.model_type
    names = gguf.get_tensor_name_map(getattr(gguf.MODEL_ARCH, ARCHES[arch_name]), cfg.num_hidden_layers)
    state = model.state_dict()
    tied = getattr(cfg, "tie_word_embeddings", False)
    wanted = {names.get_name(k, try_suffixes=(".weight", ".bias")): k for k in state if not (tied and k == "lm_head.weight")}
    n_kv = cfg.num_key_value_heads or cfg.num_attention_heads
    worst = ("", 0.0)
    with torch.no_grad():
        for name, data in _read_back(path):
            hf_name = wanted.pop(name, None)
            if hf_name is None or tuple(state[hf_name].shape) != data.shape:
                raise ExportError(f"{path.name}: tensor {name} {data.shape} is not one of the model's",
                                  hint="a bug in the GGUF writer; export --merged instead")  # fmt: skip
            if arch_name == "llama" and hf_name.endswith(("q_proj.weight", "k_proj.weight")):
                data = _unpermute(data, cfg.num_attention_heads if "q_proj" in hf_name else n_kv)
            data = np.ascontiguousarray(data) if data.flags.writeable else np.array(data)  # a read-only memmap view
            own = state[hf_name]
            got = torch.from_numpy(data).to(own.device)
            mine = own.float()  # one float32 copy of the (up to 2 GB) tensor, not one per norm
            rel = ((got - mine).norm() / mine.norm().clamp_min(1e-12)).item()
            del mine
            if not math.isfinite(rel):  # a NaN compares False with everything: it must be the worst
                rel = math.inf
            if rel > worst[1] or not worst[0]:
                worst = (hf_name, rel)
            own.copy_(got)
            del got
    if wanted:
        raise ExportError(f"{path.name} lacks tensors {sorted(wanted.values())[:5]}", hint="export --merged instead")
    return worst


def check_gguf(path: Path, model, tokenizer, reference, qtype: str) -> GgufCheck:
    """Read the file back into the merged `model` (consumed), run the check texts, compare with `reference`."""
    import torch

    tensor, weight_rel = load_gguf_into(path, model)
    inputs, _ = check_inputs(tokenizer, model.device)
    got = logits_of(model, inputs).cpu()
    ref = reference.float().cpu()
    diff = (got - ref).abs().max().item()
    rel = ((got - ref).norm() / ref.norm()).item()
    agree = (got.argmax(-1) == ref.argmax(-1)).float().mean().item()
    tol, wtol = GGUF_REL_TOL[qtype], GGUF_WEIGHT_TOL[qtype]
    float32 = next(model.parameters()).dtype == torch.float32
    passed = weight_rel <= wtol and (rel <= tol or not float32)
    return GgufCheck(qtype=qtype, max_abs_diff=diff, rel_l2=rel, top1_agree=agree, tolerance=tol, passed=passed,
                     weight_rel_l2=weight_rel, weight_tensor=tensor, weight_tolerance=wtol)  # fmt: skip


# --- Ollama ---------------------------------------------------------------------------------------------------

CHATML = (
    "{{ if .System }}<|im_start|>system\n{{ .System }}<|im_end|>\n{{ end }}"
    "{{ if .Prompt }}<|im_start|>user\n{{ .Prompt }}<|im_end|>\n{{ end }}"
    "<|im_start|>assistant\n{{ .Response }}<|im_end|>\n"
)
LLAMA3 = (
    "{{ if .System }}<|start_header_id|>system<|end_header_id|>\n\n{{ .System }}<|eot_id|>{{ end }}"
    "{{ if .Prompt }}<|start_header_id|>user<|end_header_id|>\n\n{{ .Prompt }}<|eot_id|>{{ end }}"
    "<|start_header_id|>assistant<|end_header_id|>\n\n{{ .Response }}<|eot_id|>"
)


def modelfile(tokenizer, gguf_file: str, stop: list[int]) -> str:
    """An Ollama Modelfile: the chat template translated (ChatML or Llama 3), its default system prompt, stops."""
    import re

    src = getattr(tokenizer, "chat_template", None) or ""
    if "<|im_start|>" in src:
        template = CHATML
        m = re.search(r"<\|im_start\|>system(?:\\n|\n)([^{}'\"\\<]+)<\|im_end\|>", src)
    elif "<|start_header_id|>" in src:
        template, m = LLAMA3, None
    else:
        raise ExportError(
            "the adapter's chat template is neither ChatML nor Llama 3: no Ollama TEMPLATE for it",
            hint="use --gguf and write the Modelfile's TEMPLATE yourself",
        )
    words = [tokenizer.convert_ids_to_tokens(i) for i in stop]
    lines = [f"FROM ./{gguf_file}", f'TEMPLATE """{template}"""']
    if m:
        lines.append(f'SYSTEM """{m.group(1)}"""')
    lines += [f'PARAMETER stop "{w}"' for w in dict.fromkeys(words) if w and '"' not in w]
    return "\n".join(lines) + "\n"


# --- the command ---------------------------------------------------------------------------------------------


def export(adapter: Path, out: Path, kind: str, qtype: str = "q8_0", base: str | None = None,
           device: str = "auto", corrupt: bool = False) -> ExportRecord:  # fmt: skip
    """Make the export into `out` (replaced), check it, write export.json and the manifest."""
    t0 = time.monotonic()
    if kind != "merged" and qtype not in GGUF_TYPES:
        raise ExportError(f"unknown GGUF type {qtype!r}", hint=f"one of {', '.join(GGUF_TYPES)}; no K-quants: the gguf library (0.19) only decodes them. "
                        "Export f16, then run llama.cpp's llama-quantize on it (docs/export.md)")
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        record = _export(adapter, tmp, kind, qtype, base, device, corrupt)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)  # never half an export
        raise
    record.seconds = time.monotonic() - t0
    (tmp / EXPORT_JSON).write_text(dump_model(record))
    write_manifest(tmp)
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    return record


def _export(adapter: Path, tmp: Path, kind: str, qtype: str, base: str | None, device: str, corrupt: bool):
    phases: dict[str, float] = {}
    t0 = time.monotonic()
    t = tuned_mod.load_tuned(adapter, base, device)
    tokenizer = t.tokenizer
    t1 = time.monotonic()
    merged, check = merge(t, lose_lora=corrupt)
    require(check)
    phases.update(load=t1 - t0, merge=time.monotonic() - t1)
    record = ExportRecord(kind=kind, base_model=t.base, merged_onto="16-bit base", merge_check=check)
    if kind == "merged":
        t0 = time.monotonic()
        record.files = save_merged(merged, tokenizer, tmp, t.dtype)
        phases["write"] = time.monotonic() - t0
    else:
        t0 = time.monotonic()
        inputs, _ = check_inputs(tokenizer, t.device)
        reference = logits_of(merged, inputs).cpu()
        phases["check"] = time.monotonic() - t0
        name = gguf_name(qtype)
        write_gguf(merged, tokenizer, tmp / name, qtype, t.stop_ids, phases)
        record.qtype = qtype
        t0 = time.monotonic()
        record.gguf_check = check_gguf(tmp / name, merged, tokenizer, reference, qtype)
        phases["check"] += time.monotonic() - t0
        del merged
        if not record.gguf_check.passed:
            g = record.gguf_check
            raise ExportError(
                f"the GGUF file read back differs from the merged model: worst tensor {g.weight_tensor} by "
                f"{g.weight_rel_l2:.3g} (relative L2; tolerance for {qtype}: {g.weight_tolerance:g}), logits by "
                f"{g.rel_l2:.3g} (tolerance {g.tolerance:g}, decisive for a float32 model only)",
                hint="try a wider type (q8_0, f16)",
            )
        if kind == "ollama":
            (tmp / MODELFILE).write_text(modelfile(tokenizer, name, t.stop_ids))
        record.files = sorted(p.name for p in tmp.iterdir())
    record.phases = {k: round(v, 2) for k, v in phases.items()}
    return record


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m remote_worker.export", description=__doc__.split("\n")[0])
    ap.add_argument("--adapter", required=True, type=Path)
    ap.add_argument("--out", required=True, type=Path)
    ap.add_argument("--base", default=None, help="the base model (default: the adapter's, see remote_worker.tuned)")
    ap.add_argument("--device", default="auto", choices=("auto", "cuda", "cpu"))
    what = ap.add_mutually_exclusive_group(required=True)
    what.add_argument("--merged", action="store_true")
    what.add_argument("--gguf", metavar="TYPE", choices=GGUF_TYPES)
    what.add_argument("--ollama", metavar="TYPE", choices=GGUF_TYPES)
    ap.add_argument("--corrupt-for-test", action="store_true", help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    kind = "merged" if a.merged else "gguf" if a.gguf else "ollama"
    try:
        record = export(a.adapter, a.out, kind, a.gguf or a.ollama or "", a.base, a.device, a.corrupt_for_test)
    except WorkerError as exc:
        print(f"failed: {exc}" + (f"\nhint: {exc.hint}" if exc.hint else ""), file=sys.stderr)
        return 1
    print(dump_model(record), end="")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
