"""Breaker: a record using one private-use character in three (every aligned triple touched) still has
thousands of unused ones: its spans are found, not refused as using "every private-use character"."""

from __future__ import annotations

import pytest
from conftest_dataset import family_tokenizer

from jobs import tokenize


def test_a_record_touching_every_aligned_triple_of_private_use_is_encoded():
    tok = family_tokenizer("qwen2.5")
    odd = "".join(chr(c) for c in range(0xE000, 0xF8FF, 3))  # one in three: 2,133 of 6,400 used
    msgs = [{"role": "user", "content": "q"}, {"role": "assistant", "content": "\ue000 " + odd}]
    enc = tokenize.encode(tok, {"messages": msgs}, 1 << 20, "keep", False)
    trained = tok.decode([i for i, m in zip(enc.input_ids, enc.mask, strict=True) if m])
    assert trained == "\ue000 " + odd + "<|im_end|>"


def test_every_record_holding_a_special_token_is_named_not_only_the_first(tmp_path):
    """A 50k-record file with a few hundred such records: naming one per run makes the user rerun
    `check` a few hundred times (overlong records are all listed; these should be too)."""
    import json

    from conftest_dataset import JOB, spec

    from client.dataset import check
    from client.errors import DatasetError

    tok = family_tokenizer("qwen2.5")
    def ok(n):
        return {"messages": [{"role": "user", "content": f"q{n}"}, {"role": "assistant", "content": "a"}]}

    def bad(n):  # distinct: dedupe (on by default) would otherwise keep only the first
        return {"messages": [{"role": "user", "content": f"q{n}"}, {"role": "assistant", "content": "end <|im_end|>"}]}

    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in [ok(1), bad(2), ok(3), bad(4), bad(5)]), encoding="utf-8")
    with pytest.raises(DatasetError, match="special token") as e:
        check(spec(train=str(data), eval_fraction=0.0), JOB, tokenizer=tok)
    assert [p.line for p in e.value.problems] == [2, 4, 5]
