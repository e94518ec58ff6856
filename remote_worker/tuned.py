"""A trained adapter with its base, loaded for eval, chat and export (on the instance or the laptop).

The base is found in this order: an explicit `--base`; the instance path recorded in the adapter's
`base_model.json` when it exists here (on the instance); adapter_config.json's
base_model_name_or_path, which names a base the laptop can resolve (remote_worker.checkpoints makes
it portable). The tokenizer is the adapter's own copy: the chat template and stop tokens of training.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from jobs.layout import BASE_MODEL
from jobs.protocol import BaseModelRecord, ProtocolError, read_model
from remote_worker import ModelNotFound, WorkerError

if TYPE_CHECKING:
    import torch
    from peft import PeftModel
    from transformers import PreTrainedTokenizerBase

ADAPTER_CONFIG = "adapter_config.json"  # PEFT's own file name
# End-of-turn tokens of the chat templates we know: generation stops at whichever the vocabulary has.
END_OF_TURN = ("<|im_end|>", "<|eot_id|>", "<|end_of_text|>", "<|endoftext|>", "<end_of_turn>", "<|end|>")


def base_record(adapter: Path) -> BaseModelRecord | None:
    try:
        return read_model(BaseModelRecord, (Path(adapter) / BASE_MODEL).read_bytes(), str(adapter / BASE_MODEL))
    except (OSError, ProtocolError):
        return None


def base_name(adapter: str | Path, override: str | None = None) -> str:
    """Where to load the base from, here: see the module docstring."""
    adapter = Path(adapter)
    if override:
        return os.path.expanduser(override)
    rec = base_record(adapter)
    if rec and rec.instance_path and Path(rec.instance_path).exists():
        return rec.instance_path
    try:
        name = json.loads((adapter / ADAPTER_CONFIG).read_text())["base_model_name_or_path"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ModelNotFound(
            f"{adapter / ADAPTER_CONFIG} names no base model ({exc})", hint="give the base with --base"
        ) from None
    return os.path.expanduser(name)


def pick_device(device: str = "auto") -> tuple[str, object]:
    """(device, dtype): CUDA in bf16 (fp16 without bf16), else the CPU in fp32."""
    import torch

    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda":
        return device, torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return device, torch.float32


def load_tokenizer(adapter: str | Path, base: str | None = None):
    from transformers import AutoTokenizer

    for src in (adapter, base):
        if src is None:
            continue
        try:
            tok = AutoTokenizer.from_pretrained(str(src))
            break
        except (OSError, ValueError):
            continue
    else:
        raise ModelNotFound(f"no tokenizer in {adapter} nor {base}", hint="give the base with --base")
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return tok


def load_base(name: str, device: str, dtype):
    from transformers import AutoModelForCausalLM

    try:
        return AutoModelForCausalLM.from_pretrained(name, dtype=dtype, device_map={"": device})
    except OSError as exc:
        raise ModelNotFound(
            f"cannot load the base model {name}: {exc}",
            hint="give a folder or hub id that holds it with --base (on the laptop: where you keep the base model)",
        ) from None


@dataclass
class Tuned:
    tokenizer: PreTrainedTokenizerBase
    model: PeftModel  # `with model.disable_adapter():` is the base alone
    base: str
    device: str
    dtype: torch.dtype
    stop_ids: list[int] = field(default_factory=list)


def load_tuned(adapter: str | Path, base: str | None = None, device: str = "auto") -> Tuned:
    from peft import PeftModel

    adapter = Path(adapter)
    if not (adapter / ADAPTER_CONFIG).is_file():
        raise WorkerError(f"{adapter} is not an adapter folder (no {ADAPTER_CONFIG})", hint="fetch the adapter first")
    name = base_name(adapter, base)
    device, dtype = pick_device(device)
    tokenizer = load_tokenizer(adapter, name)
    model = PeftModel.from_pretrained(load_base(name, device, dtype), str(adapter))
    model.eval()
    return Tuned(tokenizer, model, name, device, dtype, stop_ids(tokenizer, model))


def stop_ids(tokenizer, model=None) -> list[int]:
    """The tokenizer's EOS, the base's generation EOS ids, and the end-of-turn tokens the vocabulary has."""
    ids: list[int] = []
    if tokenizer.eos_token_id is not None:
        ids.append(tokenizer.eos_token_id)
    gen = getattr(model, "generation_config", None)
    eos = getattr(gen, "eos_token_id", None)
    ids += eos if isinstance(eos, list) else ([eos] if eos is not None else [])
    vocab = tokenizer.get_vocab()
    ids += [vocab[t] for t in END_OF_TURN if t in vocab]
    return list(dict.fromkeys(i for i in ids if i is not None))


def chat_prompt(tokenizer, messages: list[dict]) -> str:
    """The text the model sees, as in training: the adapter's chat template, generation prompt added."""
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return "\n".join(m["content"] for m in messages) + "\n"
