"""Trained-token masks and notes on records the span finder could confuse: content holding the
private-use characters it marks turns with, and template text trained on request (Qwen3)."""

from __future__ import annotations

import pytest
from conftest_dataset import FAMILIES, family_tokenizer

from jobs import tokenize
from jobs.tokenize.chat import REWRITES_TURN

# the end-of-turn each family trains after a reply (GLM-4 writes the next turn's header, then EOS last)
EOT = {"qwen2.5": "<|im_end|>", "qwen3": "<|im_end|>", "llama3": "<|eot_id|>", "mistral": "</s>",
       "glm4": "<|user|>", "gemma": "<end_of_turn>", "base": "<|endoftext|>"}
LAST_EOT = {**EOT, "glm4": "<|endoftext|>"}
ODD = ["\ue000Paris", "Paris\ue002", "\ue000\ue001\ue002", "\ue000", "\uf8ff", "a\ue001b", "\uf8ffx\ue000",
           "\ue002\ue001\ue000 reversed", "".join(chr(c) for c in range(0xE000, 0xE040)),
           "A", "line 1\r\nline 2\r", "\ufeffled by a BOM", "\tindented"]


def _trained_runs(tok, record: dict, template_text: bool = False) -> list[str]:
    enc = tokenize.encode(tok, record, 1 << 20, "keep", template_text)
    runs: list[list[int]] = []
    prev = 0
    for i, m in zip(enc.input_ids, enc.mask, strict=True):
        if m and not prev:
            runs.append([])
        if m:
            runs[-1].append(i)
        prev = m
    return [tok.decode(r) for r in runs]


@pytest.mark.parametrize("family", list(FAMILIES))
@pytest.mark.parametrize("content", ODD, ids=lambda c: c.encode("unicode_escape").decode()[:24])
def test_odd_replies_are_trained_exactly(family, content):
    tok = family_tokenizer(family)
    msgs = [{"role": "user", "content": "\ue000q" + content}, {"role": "assistant", "content": content},
            {"role": "user", "content": content}, {"role": "assistant", "content": content}]
    runs = _trained_runs(tok, {"messages": msgs})
    assert len(runs) == 2, runs
    if family in ("llama3", "mistral", "gemma"):  # their templates trim content (as inference sees it)
        content = content.strip()
    # Mistral and the plain format write a space before a reply: trained only when a token joins it to the reply
    lead = " " if family in ("mistral", "base") and runs[0].startswith(" ") else ""
    assert runs == [lead + content + EOT[family], lead + content + LAST_EOT[family]]


@pytest.mark.parametrize("content", ["\ue000Paris", "Paris\ue002"])
def test_template_text_with_private_use_replies(content):
    tok = family_tokenizer("qwen3")
    msgs = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": content}]
    runs = _trained_runs(tok, {"messages": msgs}, template_text=True)
    assert runs == ["<think>\n\n</think>\n\n" + content + "<|im_end|>"]


def test_template_text_notes_only_records_the_template_rewrites():
    tok = family_tokenizer("qwen3")
    plain = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "Paris"},
                          {"role": "user", "content": "and?"}, {"role": "assistant", "content": "Rome"}]}
    stripped = {"messages": [{"role": "user", "content": "2+2?"},
                             {"role": "assistant", "content": "<think>\nsum\n</think>\n\n4"},
                             {"role": "user", "content": "x3?"}, {"role": "assistant", "content": "12"}]}
    for template_text in (False, True):
        assert REWRITES_TURN not in tokenize.encode(tok, plain, 4096, "keep", template_text).notes
        assert REWRITES_TURN in tokenize.encode(tok, stripped, 4096, "keep", template_text).notes


def test_check_notes_no_rewrite_for_template_text_on_qwen3(tmp_path):
    """`check` with train_template_text on Qwen3 noted "rewrites" for every record (a breaker's find)."""
    import json

    from conftest_dataset import JOB, spec

    from client.dataset import check

    rows = [{"messages": [{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": f"a{i}"}]}
            for i in range(3)]
    rows.append({"messages": [{"role": "user", "content": "2+2?"},
                              {"role": "assistant", "content": "<think>\nsum\n</think>\n\n4"},
                              {"role": "user", "content": "x3?"}, {"role": "assistant", "content": "12"}]})
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    report = check(spec(train=str(data), eval_fraction=0.0, train_template_text=True), JOB,
                   tokenizer=family_tokenizer("qwen3"))
    notes = {n["note"]: n["count"] for n in report["template"]["notes"]}
    assert notes == {REWRITES_TURN: 1}, notes


def test_a_history_reply_of_reasoning_only_is_not_trained_as_an_empty_reply():
    """Qwen3 strips an earlier reply's reasoning; a reply of reasoning only became "" + <|im_end|>, and
    training it taught the model to answer with an immediate end-of-turn."""
    from jobs.tokenize.chat import EMPTIED_TURN

    tok = family_tokenizer("qwen3")
    think = "<think>\nx\n</think>\n\n"
    msgs = [{"role": "user", "content": "q"}, {"role": "assistant", "content": think},
            {"role": "user", "content": "u"}, {"role": "assistant", "content": think + "done"}]
    for template_text in (False, True):
        assert _trained_runs(tok, {"messages": msgs}, template_text) == [think + "done<|im_end|>"]
        assert EMPTIED_TURN in tokenize.encode(tok, {"messages": msgs}, 4096, "keep", template_text).notes


@pytest.mark.parametrize("family", ["qwen2.5", "qwen3", "llama3", "mistral", "glm4", "base"])
@pytest.mark.parametrize("content", ["\ue000Paris", "Paris\ue002", "\ue000\ue001\ue002"])
def test_private_use_replies_after_a_system_prompt(family, content):
    """With a system prompt Mistral trains the last reply after the prompt inference sees (another path)."""
    tok = family_tokenizer(family)
    msgs = [{"role": "system", "content": "\ue000sys"}, {"role": "user", "content": "q"},
            {"role": "assistant", "content": content}, {"role": "user", "content": "u"},
            {"role": "assistant", "content": content}]
    runs = [r.lstrip(" ") if family in ("mistral", "base") else r for r in _trained_runs(tok, {"messages": msgs})]
    assert runs == [content + EOT[family], content + LAST_EOT[family]]
