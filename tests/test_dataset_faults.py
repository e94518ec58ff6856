"""The six faults of issue #12, each pinned: masks from the template itself on Qwen3- and Mistral-style
templates, base models, datasets with nothing left to train, and tool calls."""

from __future__ import annotations

import io
import json
import subprocess
from pathlib import Path

import pytest
from conftest_dataset import JOB, family_tokenizer, spec, tiny_tokenizer
from jobfiles import cli_here
from rich.console import Console

from client.dataset import check, prepare
from client.errors import DatasetError
from client.views.dataset import render_examples
from jobs import tokenize
from jobs.layout import DATASET_MANIFEST


def marked(tok, messages: list[dict]) -> str:
    pieces, _, _ = tokenize.explain(tok, {"messages": messages})
    return "".join(f"[[{s}]]" if t else s for s, t in pieces)


def U(c: str) -> dict:
    return {"role": "user", "content": c}


def A(c: str) -> dict:
    return {"role": "assistant", "content": c}


def write_rows(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path


def cli(*args: str) -> subprocess.CompletedProcess:
    return cli_here(*args, check=False)


# 1. a template that rewrites earlier turns (Qwen3) --------------------------------------------------


def test_qwen3_trains_each_reply_where_it_is_not_where_its_text_first_appears():
    tok = family_tokenizer("qwen3")
    got = marked(tok, [U("Repeat after me: ok"), A("ok"), U("Once more"), A("ok")])
    assert got == (
        "<|im_start|>user\nRepeat after me: ok<|im_end|>\n<|im_start|>assistant\n[[ok<|im_end|>]]\n"
        "<|im_start|>user\nOnce more<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n[[ok<|im_end|>]]\n"
    )


def test_qwen3_reasoning_in_earlier_turns_is_prepared_and_reported(tmp_path):
    tok = family_tokenizer("qwen3")
    rows = [{"messages": [U(f"{i}+{i}?"), A(f"<think>\nadd\n</think>\n\n{2 * i}"), U("Times 3?"),
                          A(f"<think>\nmultiply\n</think>\n\n{6 * i}")]} for i in range(6)]
    data = write_rows(tmp_path / "r.jsonl", rows)
    p = prepare(spec(train=str(data)), JOB, tmp_path / "out", tokenizer=tok)
    assert p.report["train_records"] == 6
    notes = {n["note"]: n for n in p.report["template"]["notes"]}
    stripped = notes[tokenize.chat.REWRITES_TURN]
    assert stripped["count"] == 6 and stripped["first"].endswith("r.jsonl:1")
    assert any("strips earlier reasoning" in w for w in p.report["warnings"])


# 2. template scaffolding is prompt, not answer ------------------------------------------------------


def test_qwen3_empty_think_block_is_not_trained():
    tok = family_tokenizer("qwen3")
    enc = tokenize.encode(tok, {"messages": [U("Capital of France?"), A("Paris")]}, 4096, "drop")
    trained = [i for i, m in zip(enc.input_ids, enc.mask, strict=True) if m]
    assert tok.decode(trained) == "Paris<|im_end|>"
    assert len(trained) == 2


# 3. a template that joins the system prompt to the last user turn only (Mistral) --------------------


def test_mistral_trains_with_the_system_prompt_inference_sees():
    tok = family_tokenizer("mistral")
    got = marked(tok, [{"role": "system", "content": "Be terse."}, U("Capital of France?"), A("Paris")])
    assert got == "<s>[INST] Be terse.\n\nCapital of France?[/INST][[ Paris</s>]]"


def test_mistral_multi_turn_trains_the_replies_not_the_users_words():
    tok = family_tokenizer("mistral")
    got = marked(tok, [{"role": "system", "content": "Answer yes or no."}, U("Say yes"), A("yes"),
                       U("Is the sky green? yes or no"), A("no")])
    assert got == ("<s>[INST] Say yes[/INST][[ yes</s>]]"
                   "[INST] Answer yes or no.\n\nIs the sky green? yes or no[/INST][[ no</s>]]")


# 4. a base model without a chat template ------------------------------------------------------------


def test_base_model_uses_the_plain_format_and_its_real_eos(tmp_path):
    tok = family_tokenizer("base")
    text = marked(tok, [U("Capital of France?"), A("Paris")])
    assert text == "User: Capital of France?\n\nAssistant:[[ Paris<|endoftext|>]]\n\n"
    assert "<|im_start|>" not in text
    data = write_rows(tmp_path / "b.jsonl", [{"instruction": "Capital of France?", "output": "Paris"}] * 1)
    p = prepare(spec(train=str(data), eval_fraction=0.0), JOB, tmp_path / "out", tokenizer=tok)
    assert p.report["template"]["source"] == "plain"
    manifest = json.loads((p.dir / DATASET_MANIFEST).read_text())
    assert manifest["chat_template"] == tokenize.PLAIN_TEMPLATE


def _job(tmp_path: Path, rows: list[dict], *, template: bool = True, **data) -> Path:
    tok = tiny_tokenizer()
    tok_dir = tmp_path / "tok"
    from tinymodel import load_tokenizer

    copy = load_tokenizer(tok.name_or_path)
    if not template:
        copy.chat_template = None
    copy.save_pretrained(tok_dir)
    write_rows(tmp_path / "d.jsonl", rows)
    extra = "".join(f"{k} = {json.dumps(v)}\n" for k, v in data.items())
    job = tmp_path / "job.toml"
    job.write_text(
        'name = "t"\n[instance]\nhost = "127.0.0.1"\nport = 1\n'
        f'[model]\nname_or_path = "no/such-model"\ntokenizer = "{tok_dir}"\n'
        f'[data]\ntrain = "d.jsonl"\n{extra}'
    )
    return job


def test_check_and_prepare_say_the_tokenizer_has_no_chat_template(tmp_path):
    job = _job(tmp_path, [{"instruction": "Capital of France?", "output": "Paris"}], template=False)
    for verb in ("check", "prepare"):
        res = cli(verb, str(job))
        assert res.returncode == 0, res.stdout + res.stderr
        out = " ".join(res.stdout.split())
        assert "the tokenizer has no chat template" in out, out


# 5. nothing to train is an error before anything is paid for ----------------------------------------


LONG = [{"instruction": f"Tell me about item {i} " + "in great detail " * 20, "output": "It is fine."}
        for i in range(12)]


def test_a_dataset_max_length_empties_is_an_error(tmp_path):
    tok = tiny_tokenizer()
    data = write_rows(tmp_path / "d.jsonl", LONG)
    with pytest.raises(DatasetError, match="nothing to train"):
        prepare(spec(train=str(data), max_length=32), JOB, tmp_path / "out", tokenizer=tok)
    with pytest.raises(DatasetError, match="nothing to train"):
        check(spec(train=str(data), max_length=32), JOB, tokenizer=tok)


def test_check_prepare_and_submit_exit_3_before_connecting(tmp_path):
    job = _job(tmp_path, LONG, max_length=32)
    for verb in ("check", "prepare", "submit"):
        res = cli(verb, str(job))
        assert res.returncode == 3, (verb, res.stdout + res.stderr)
        assert "nothing to train" in " ".join((res.stdout + res.stderr).split())


def test_a_file_of_duplicates_is_warned_about(tmp_path):
    data = write_rows(tmp_path / "d.jsonl", [{"instruction": "same", "output": "same"}] * 10)
    r = prepare(spec(train=str(data)), JOB, tmp_path / "out", tokenizer=tiny_tokenizer()).report
    assert r["records_out"] == 1
    assert any("deduplication removed 9 of 10" in w for w in r["warnings"])
    assert any("deduplication removed 9 of 10" in w for w in check(spec(train=str(data)), JOB)["warnings"])


# 6. tool calls ---------------------------------------------------------------------------------------

OPENAI_TOOLS = {"messages": [
    U("Weather in Paris?"),
    {"role": "assistant", "content": None, "tool_calls": [
        {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": "{\"city\": \"Paris\"}"}}]},
    {"role": "tool", "tool_call_id": "call_1", "content": "18C, sunny"},
    A("It is 18C and sunny."),
]}
SHAREGPT_TOOLS = {"conversations": [
    {"from": "human", "value": "Weather in Paris?"},
    {"from": "function_call", "value": "{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Paris\"}}"},
    {"from": "observation", "value": "18C, sunny"},
    {"from": "gpt", "value": "It is 18C and sunny."},
]}


@pytest.mark.parametrize("row", [OPENAI_TOOLS, SHAREGPT_TOOLS], ids=["openai", "sharegpt"])
def test_tool_calls_train_on_a_template_that_renders_tools(tmp_path, row):
    tok = family_tokenizer("qwen2.5")
    data = write_rows(tmp_path / "t.jsonl", [row])
    p = prepare(spec(train=str(data)), JOB, tmp_path / "out", tokenizer=tok)
    out = io.StringIO()
    render_examples(p, None, 1, Console(file=out, width=300))  # not a terminal: [[...]] marks
    text = out.getvalue()
    assert ('<|im_start|>assistant\n[[<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n'
            "</tool_call><|im_end|>]]\n<|im_start|>user\n<tool_response>\n18C, sunny\n</tool_response><|im_end|>\n"
            "<|im_start|>assistant\n[[It is 18C and sunny.<|im_end|>]]") in text


def test_tool_calls_on_a_template_without_tools_name_the_lack(tmp_path):
    tok = family_tokenizer("llama3")
    data = write_rows(tmp_path / "t.jsonl", [OPENAI_TOOLS])
    with pytest.raises(DatasetError) as e:
        prepare(spec(train=str(data)), JOB, tmp_path / "out", tokenizer=tok)
    reason = e.value.problems[0].message
    assert "does not render tool calls" in reason and "missing content" not in reason
