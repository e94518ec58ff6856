"""Breaker: a record using one private-use character in three (every aligned triple touched) still has
thousands of unused ones: its spans are found, not refused as using "every private-use character"."""

from __future__ import annotations

from conftest_dataset import family_tokenizer

from jobs import tokenize


def test_a_record_touching_every_aligned_triple_of_private_use_is_encoded():
    tok = family_tokenizer("qwen2.5")
    odd = "".join(chr(c) for c in range(0xE000, 0xF8FF, 3))  # one in three: 2,133 of 6,400 used
    msgs = [{"role": "user", "content": "q"}, {"role": "assistant", "content": "\ue000 " + odd}]
    enc = tokenize.encode(tok, {"messages": msgs}, 1 << 20, "keep", False)
    trained = tok.decode([i for i, m in zip(enc.input_ids, enc.mask, strict=True) if m])
    assert trained == "\ue000 " + odd + "<|im_end|>"
