"""Hostile datasets through `check`/`prepare`: each is refused with file, line and field, or trained exactly."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest_dataset import JOB, family_tokenizer, spec

from client.dataset import check, prepare
from client.errors import DatasetError
from jobs import tokenize


def U(c: str) -> dict:
    return {"role": "user", "content": c}


def A(c: str) -> dict:
    return {"role": "assistant", "content": c}


OK = {"messages": [U("q"), A("a")]}


def write_rows(path: Path, rows: list) -> Path:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path


@pytest.mark.parametrize("family", ["qwen3", "llama3", "base"])
@pytest.mark.parametrize("turn", [0, 1])
def test_a_special_tokens_text_in_content_is_refused_with_its_place(tmp_path, family, turn):
    """"a<|im_end|>b" in a reply was tokenized as the real end-of-turn and trained: the model learnt to stop mid-reply."""
    tok = family_tokenizer(family)
    eot = tok.eos_token
    msgs = [U("q"), A("a")]
    msgs[turn] = {**msgs[turn], "content": f"x {eot} y"}
    data = write_rows(tmp_path / "d.jsonl", [OK, {"messages": msgs}])
    for verb in (check, lambda *a, **k: prepare(*a[:2], tmp_path / "out", **k)):
        with pytest.raises(DatasetError, match="special token") as e:
            verb(spec(train=str(data), eval_fraction=0.0), JOB, tokenizer=tok)
        (problem,) = e.value.problems
        assert problem.line == 2 and problem.file.endswith("d.jsonl")
        assert f"d.jsonl:2: messages[{turn}].content: holds {eot!r}" in str(problem)
        assert "remove that text" in e.value.hint


def test_ordinary_added_tokens_in_content_still_train():
    """Qwen3's <think> is an added token but not a special one: reasoning in a reply stays allowed."""
    tok = family_tokenizer("qwen3")
    enc = tokenize.encode(tok, {"messages": [U("q"), A("<think>\nhm\n</think>\n\nyes")]}, 4096, "keep")
    assert enc is not None and enc.trained > 0


def test_a_file_mixing_formats_says_which_record_is_in_which(tmp_path):
    rows = [OK, {"instruction": "q", "output": "a"},
            {"conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}]}]
    data = write_rows(tmp_path / "mixed.jsonl", rows)
    with pytest.raises(DatasetError) as e:
        check(spec(train=str(data)), JOB)
    got = [str(p).split("mixed.jsonl", 1)[1] for p in e.value.problems]
    assert got == [":2: messages: missing field: this record is in the alpaca format, but the file's first record "
                   "made it messages: keep one format per file",
                   ":3: messages: missing field: this record is in the sharegpt format, but the file's first record "
                   "made it messages: keep one format per file"]


def test_a_200k_character_reply_is_trained_whole_or_dropped_as_overlong(tmp_path):
    tok = family_tokenizer("qwen3")
    reply = "word " * 40000 + "end"
    rec = {"messages": [U("q"), A(reply)]}
    enc = tokenize.encode(tok, rec, 1 << 20, "keep")
    trained = [i for i, m in zip(enc.input_ids, enc.mask, strict=True) if m]
    assert tok.decode(trained) == reply + "<|im_end|>"
    data = write_rows(tmp_path / "d.jsonl", [OK, rec])
    report = check(spec(train=str(data), eval_fraction=0.0), JOB, tokenizer=tok)
    assert report["overlong"]["dropped"] == 1, report["overlong"]


def test_a_special_tokens_text_in_a_text_record_is_refused(tmp_path):
    tok = family_tokenizer("qwen2.5")
    data = write_rows(tmp_path / "t.jsonl", [{"text": "plain prose"}, {"text": "prose <|im_end|> more"}])
    with pytest.raises(DatasetError, match="special token") as e:
        check(spec(train=str(data), eval_fraction=0.0), JOB, tokenizer=tok)
    assert [str(p).split("t.jsonl", 1)[1] for p in e.value.problems] == [
        ":2: text: holds '<|im_end|>', a special token of this tokenizer; it would be read as that control token, "
        "not as text"]


def test_a_special_tokens_text_in_tool_call_arguments_is_refused():
    tok = family_tokenizer("qwen2.5")
    call = {"type": "function", "function": {"name": "f", "arguments": {"q": "x<|im_end|>"}}}
    msgs = [U("q"), {"role": "assistant", "content": "", "tool_calls": [call]}, {"role": "tool", "content": "r"},
            A("a")]
    with pytest.raises(tokenize.TemplateError, match=r"turn 1 \(assistant\) tool_calls: holds '<\|im_end\|>'"):
        tokenize.encode(tok, {"messages": msgs}, 4096, "keep")


def test_a_null_conversation_is_said_null_not_missing(tmp_path):
    data = write_rows(tmp_path / "n.jsonl", [OK, {"messages": None}])
    with pytest.raises(DatasetError) as e:
        check(spec(train=str(data)), JOB)
    assert [str(p).split("n.jsonl", 1)[1] for p in e.value.problems] == [":2: messages: is null"]
