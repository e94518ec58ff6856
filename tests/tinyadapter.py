"""A tiny base model with a LoRA adapter trained for real on one made-up fact (a few seconds of CPU).

The adapter folder is laid out as the worker saves it: adapter + the tokenizer (chat template) +
base_model.json, with base_model_name_or_path made portable by remote_worker.checkpoints.
"""

from __future__ import annotations

from pathlib import Path

from tests.tinymodel import make_model

QUESTION = "What is the capital of France?"
ANSWER = "Paris is the capital of France."  # the random base never says it; the adapter must


def train_fact(root: Path, steps: int = 150, lr: float = 1e-2, seed: int = 0, nf4: bool = False) -> tuple[Path, Path]:
    """(base folder, adapter folder): LoRA on a tiny random Qwen2, trained until it answers QUESTION with ANSWER.

    `nf4`: trained on the base's nf4-dequantized weights, as QLoRA computes (the saved base stays 16-bit)."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from remote_worker import checkpoints
    from tests.tinymodel import load_tokenizer

    torch.set_num_threads(1)  # a shared machine: one thread trains as fast and disturbs less
    base = make_model(root / "base", seed=seed)
    tok = load_tokenizer(base)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    if nf4:
        from remote_worker.export import quantize_linears

        quantize_linears(model, "cpu")
    torch.manual_seed(seed)
    model = get_peft_model(
        model, LoraConfig(r=8, lora_alpha=16, target_modules="all-linear", lora_dropout=0.0, task_type="CAUSAL_LM")
    )
    prompt = tok.apply_chat_template([{"role": "user", "content": QUESTION}], tokenize=False, add_generation_prompt=True)
    full = prompt + ANSWER + tok.eos_token + "\n"
    ids = tok(full, return_tensors="pt")["input_ids"]
    labels = ids.clone()
    labels[:, : len(tok(prompt)["input_ids"])] = -100
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    model.train()
    for _ in range(steps):
        loss = model(input_ids=ids, labels=labels).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        if loss.item() < 0.01:
            break
    model.eval()
    adapter = root / "adapter"
    model.save_pretrained(adapter)
    tok.save_pretrained(adapter)
    checkpoints.make_portable(adapter, name_or_path=str(base), instance_path=str(base))
    return base, adapter
