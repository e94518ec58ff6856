"""A tiny Qwen2-style model and tokenizer, made on the fly, for tests (no hub, no download).

The tokenizer is a byte-level BPE trained in memory on a small corpus, with ChatML special
tokens and a Qwen-like chat template. Reload it with `PreTrainedTokenizerFast` (AutoTokenizer
would swap in Qwen2's own pre-tokenizer and change the ids; see shared/anchors.md).
"""

from __future__ import annotations

from pathlib import Path

CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n' }}"
    "{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]

_CORPUS = [
    "You are a helpful assistant.",
    "What is the capital of France? The capital of France is Paris.",
    "Translate to Chinese: hello. 你好。",
    "Write a haiku about GPUs renting by the hour.",
    "system user assistant instruction input output question answer",
    "The quick brown fox jumps over the lazy dog 0123456789.",
] * 20


def make_tokenizer(out_dir: str | Path, vocab_size: int = 512):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=SPECIALS, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(_CORPUS, trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>", bos_token=None
    )
    fast.chat_template = CHATML_TEMPLATE
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    fast.save_pretrained(out)
    return load_tokenizer(out)


def load_tokenizer(path: str | Path):
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast.from_pretrained(str(path))


def tiny_causal_lm(config_class, tok, seed: int = 0, **config):
    """A random float32 causal LM of `config_class` (Qwen2Config, LlamaConfig, ...), hidden 64 and 2 layers,
    over `tok`'s vocabulary, in eval mode, not saved; `config` overrides any config field."""
    import torch
    from transformers import AutoModelForCausalLM

    shape = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=len(tok), max_position_embeddings=256,
                 eos_token_id=tok.eos_token_id, tie_word_embeddings=False)  # fmt: skip
    cfg = config_class(**{**shape, **config})
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).eval()


def make_model(out_dir: str | Path, vocab_size: int = 512, seed: int = 0) -> Path:
    """Save a tiny random Qwen2 (hidden 64, 2 layers) plus its tokenizer into out_dir."""
    from transformers import Qwen2Config

    out = Path(out_dir)
    tok = make_tokenizer(out, vocab_size)
    model = tiny_causal_lm(Qwen2Config, tok, seed, max_position_embeddings=4096, pad_token_id=tok.pad_token_id,
                           bos_token_id=None)  # fmt: skip
    model.save_pretrained(out)
    return out
