"""jobs.tokenize: the loss mask covers exactly the assistant turns (content + end-of-turn token)."""

from __future__ import annotations

import numpy as np
import pytest
from conftest_dataset import tiny_tokenizer
from tinymodel import load_tokenizer

from jobs import tokenize
from jobs.tokenize import (
    Encoded,
    encode,
    encode_many,
    encoding,
    load_tokenized,
    tokenizer_fingerprint,
    write_tokenized,
)

S, U1, A1, U2, A2 = "Be terse.", "What is the capital of France?", "Paris.", "And of Italy?", "Rome, 你好。"
CHAT = {
    "messages": [
        {"role": "system", "content": S},
        {"role": "user", "content": U1},
        {"role": "assistant", "content": A1},
        {"role": "user", "content": U2},
        {"role": "assistant", "content": A2},
    ]
}


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


def fresh(tok, template):
    t = load_tokenizer(tok.name_or_path)
    t.chat_template = template
    return t


def groups(tok, enc: Encoded) -> tuple[list[str], list[str]]:
    """Decoded runs of (trained, prompt) tokens."""
    trained, prompt, run, cur = [], [], [], None
    for i, m in zip(enc.input_ids + [None], enc.mask + [None], strict=True):
        if m != cur and run:
            (trained if cur else prompt).append(tok.decode(run))
            run = []
        cur = m
        if i is not None:
            run.append(i)
    return trained, prompt


def test_mask_is_exactly_the_assistant_turns(tok):
    enc = encode(tok, CHAT, 2048, "drop")
    assert enc.input_ids == tok.apply_chat_template(CHAT["messages"], tokenize=True)["input_ids"]
    trained, prompt = groups(tok, enc)
    assert trained == [f"{A1}<|im_end|>", f"{A2}<|im_end|>"]
    assert prompt == [
        f"<|im_start|>system\n{S}<|im_end|>\n<|im_start|>user\n{U1}<|im_end|>\n<|im_start|>assistant\n",
        f"\n<|im_start|>user\n{U2}<|im_end|>\n<|im_start|>assistant\n",
        "\n",
    ]
    assert enc.overlong is False and enc.full_length == len(enc.input_ids)


def test_template_whose_reply_is_not_its_prompts_continuation_is_refused(tok):
    # every turn header carries the conversation length, so no rendering of a prefix is a prefix of the whole:
    # there is no text that is both what inference sees and the reply; no span is guessed by searching
    t = fresh(
        tok,
        "{% for m in messages %}{{ '<|im_start|>' + m['role'] + ' ' + (messages|length)|string + '\n' "
        "+ m['content'] + '<|im_end|>\n' }}{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}",
    )
    with pytest.raises(tokenize.TemplateError, match="does not start with its generation prompt"):
        encode(t, CHAT, 2048, "drop")


def test_llama3_style_template(tok):
    t = fresh(
        tok,
        "{{ bos_token }}{% for m in messages %}{{ '<|start_header_id|>' + m['role'] + "
        "'<|end_header_id|>\n\n' + m['content'] + '<|eot_id|>' }}{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}",
    )
    t.add_special_tokens({"additional_special_tokens": ["<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]})
    trained, prompt = groups(t, encode(t, CHAT, 2048, "drop"))
    assert trained == [f"{A1}<|eot_id|>", f"{A2}<|eot_id|>"]
    assert prompt[-1].endswith("<|start_header_id|>assistant<|end_header_id|>\n\n")


def test_no_chat_template_uses_the_plain_format_ending_with_eos(tok):
    t = fresh(tok, None)
    rec = {"messages": CHAT["messages"][1:3]}
    trained, prompt = groups(t, encode(t, rec, 2048, "drop"))
    assert trained == [f" {A1}{t.eos_token}"]
    assert prompt == [f"User: {U1}\n\nAssistant:", "\n\n"]
    assert tokenize.template_used(t) == ("plain", tokenize.PLAIN_TEMPLATE)


def test_text_record_trains_every_token_and_ends_with_eos(tok):
    enc = encode(tok, {"text": "The quick brown fox"}, 2048, "drop")
    assert enc.input_ids[-1] == tok.eos_token_id
    assert set(enc.mask) == {1}
    assert tok.decode(enc.input_ids) == "The quick brown fox<|im_end|>"


def test_overlong_actions(tok):
    n = len(encode(tok, CHAT, 2048, "drop").input_ids)
    assert encode(tok, CHAT, n - 1, "drop") is None
    assert encode(tok, CHAT, n - 1, "fail") is None
    keep = encode(tok, CHAT, n - 1, "keep")
    assert (len(keep.input_ids), keep.overlong, keep.full_length) == (n, True, n)
    cut = encode(tok, CHAT, n - 1, "truncate")
    assert (len(cut.input_ids), len(cut.mask), cut.overlong, cut.full_length) == (n - 1, n - 1, True, n)
    assert cut.input_ids == keep.input_ids[: n - 1]
    assert encode(tok, CHAT, 16, "truncate") is None  # only prompt tokens would be left: nothing to train
    assert encode(tok, CHAT, n, "fail").overlong is False


@pytest.mark.parametrize("workers", [0, 2])
def test_encode_many_matches_encode(tok, workers):
    recs = [CHAT, {"text": "hello"}, {"messages": CHAT["messages"][1:3]}] * 300
    many = list(encode_many(tok, iter(recs), 40, "truncate", workers=workers))
    assert many == [encode(tok, r, 40, "truncate") for r in recs]


def test_template_error_carries_the_index(tok):
    t = fresh(
        tok,
        "{% for m in messages %}{% if m['role'] == 'system' %}{{ raise_exception('no system') }}"
        "{% endif %}{{ m['content'] }}{% endfor %}",
    )
    recs = [{"messages": CHAT["messages"][1:3]}] * 300 + [CHAT]
    with pytest.raises(tokenize.TemplateError) as e:
        list(encode_many(t, recs, 2048, "drop"))
    assert e.value.index == 300
    assert "no system" in str(e.value)


def test_fingerprint_is_identity_not_path(tok, tmp_path):
    fp = tokenizer_fingerprint(tok)
    tok.save_pretrained(tmp_path / "elsewhere")
    assert tokenizer_fingerprint(load_tokenizer(tmp_path / "elsewhere")) == fp
    tok("a long text", truncation=True, max_length=2)  # runtime truncation state is not identity
    assert tokenizer_fingerprint(tok) == fp
    assert tokenizer_fingerprint(fresh(tok, "{{ messages[0]['content'] }}")) != fp


def test_write_and_load_tokenized(tmp_path):
    encs = [Encoded([1, 2, 3], [0, 1, 1]), None, Encoded([4, 5], [1, 1]), Encoded([70000], [0])]
    counts = write_tokenized(tmp_path, "train", encs)
    assert counts == {"sequences": 3, "tokens": 6, "trained": 4}
    ids, offsets, mask = load_tokenized(tmp_path, "train")
    assert (ids.dtype, offsets.dtype, mask.dtype) == (np.uint32, np.int64, np.uint8)
    assert ids.tolist() == [1, 2, 3, 4, 5, 70000]
    assert offsets.tolist() == [0, 3, 5, 6]
    assert mask.tolist() == [0, 1, 1, 1, 1, 0]
    write_tokenized(tmp_path, "eval", [])
    ids, offsets, mask = load_tokenized(tmp_path, "eval")
    assert (len(ids), offsets.tolist(), len(mask)) == (0, [0], 0)


@pytest.mark.parametrize(
    "template",
    [
        None,
        "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>' }}{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}",  # the last span ends the text
        "{% for m in messages %}{{ m['role'] + ': ' + m['content'] + '  ' }}{% endfor %}"
        "{% if add_generation_prompt %}{{ 'assistant: ' }}{% endif %}",  # no special tokens, spaces at the edges
    ],
)
def test_edge_lookup_matches_every_offset(tok, template):
    t = fresh(tok, template)
    for rec in (CHAT, {"messages": CHAT["messages"][1:3]}):
        text, spans = tokenize.render_chat(t, rec["messages"])
        enc = t.backend_tokenizer.encode(text, add_special_tokens=False)
        n = len(enc.ids)
        assert encoding._mask(enc, n, len(text), spans) == encoding._mask_by_offsets(enc, n, spans)
        assert sum(encoding._mask(enc, n, len(text), spans)) > 0
