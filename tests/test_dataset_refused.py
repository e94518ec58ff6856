"""Records the chat template cannot train (a special token in their text, a role it refuses): every one is
named with file, line and field, or skipped and counted under data.on_error = "skip"; an error about the
whole template (no tool support) stays one error."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest
from conftest_dataset import JOB, family_tokenizer, spec
from rich.console import Console

from client.dataset import check, prepare
from client.errors import DatasetError
from client.lifecycle.submit import _describe_prepared
from client.views.dataset import render_report
from jobs import tokenize


def U(c: str) -> dict:
    return {"role": "user", "content": c}


def A(c: str) -> dict:
    return {"role": "assistant", "content": c}


def S(c: str) -> dict:
    return {"role": "system", "content": c}


def write_rows(path: Path, rows: list) -> Path:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path


def mixed(tmp_path: Path) -> Path:
    """Lines 2 and 5 hold Qwen's end-of-turn in a reply, line 4 in a user turn; 1 and 3 are good."""
    return write_rows(tmp_path / "d.jsonl", [
        {"messages": [U("q1"), A("a1")]},
        {"messages": [U("q2"), A("stop <|im_end|> here")]},
        {"messages": [U("q3"), A("a3")]},
        {"messages": [U("q4 <|im_end|>"), A("a4")]},
        {"messages": [U("q5"), A("again <|im_end|>")]},
    ])


def test_skip_drops_and_counts_every_refused_record_and_names_them(tmp_path):
    tok = family_tokenizer("qwen2.5")
    data = mixed(tmp_path)
    report = check(spec(train=str(data), eval_fraction=0.0, on_error="skip"), JOB, tokenizer=tok)
    assert report["invalid_count"] == 3 and report["records_out"] == 2 and report["train_records"] == 2
    assert [(p["line"], p["field"]) for p in report["invalid"]] == [
        (2, "messages[1].content"), (4, "messages[0].content"), (5, "messages[1].content")]
    assert all("special token" in p["reason"] for p in report["invalid"])
    assert report["files"][0]["invalid"] == 3
    out = io.StringIO()
    render_report(report, Console(file=out, width=200))
    shown = out.getvalue()
    assert "3 skipped" in shown and "d.jsonl:4: messages[0].content: holds '<|im_end|>'" in shown

    prepared = prepare(spec(train=str(data), eval_fraction=0.0, on_error="skip"), JOB, tmp_path / "out",
                       tokenizer=tok)
    assert prepared.report["invalid_count"] == 3 and prepared.report["train_records"] == 2
    lines = (prepared.dir / "train.jsonl").read_text(encoding="utf-8").splitlines()
    assert [json.loads(x)["messages"][0]["content"] for x in lines] == ["q1", "q3"]
    assert "3 invalid rows skipped" in _describe_prepared(prepared)


def test_a_gemma_system_turn_names_the_field_and_what_to_do_for_every_record(tmp_path):
    tok = family_tokenizer("gemma")
    data = write_rows(tmp_path / "g.jsonl", [
        {"messages": [S("Be terse."), U("q1"), A("a1")]},
        {"messages": [U("q2"), A("a2")]},
        {"messages": [S("Be kind."), U("q3"), A("a3")]},
    ])
    with pytest.raises(DatasetError) as e:
        check(spec(train=str(data), eval_fraction=0.0), JOB, tokenizer=tok)
    assert [str(p).split("g.jsonl", 1)[1] for p in e.value.problems] == [
        ":1: messages[0].role: the chat template refuses a system turn: System role not supported",
        ":3: messages[0].role: the chat template refuses a system turn: System role not supported"]
    assert "fold the system prompt into the first user turn" in e.value.hint
    assert "chat template accepts a system turn" in e.value.hint

    report = check(spec(train=str(data), eval_fraction=0.0, on_error="skip"), JOB, tokenizer=tok)
    assert report["invalid_count"] == 2 and report["records_out"] == 1


def test_the_pool_of_processes_yields_refused_records_in_their_place():
    tok = family_tokenizer("qwen2.5")
    good = [{"messages": [U(f"q{n}"), A("a")]} for n in range(600)]
    good[3] = {"messages": [U("q"), A("x <|im_end|>")]}
    good[400] = {"text": "t <|endoftext|>"}
    for workers in (0, 2):
        out = list(tokenize.encode_many(tok, good, 4096, "keep", workers, refusals=True))
        refused = {i: e for i, e in enumerate(out) if isinstance(e, tokenize.Refused)}
        assert list(refused) == [3, 400]
        assert (refused[3].field, refused[400].field) == ("messages[1].content", "text")
        assert all(isinstance(e, tokenize.Encoded) for i, e in enumerate(out) if i not in refused)
    with pytest.raises(tokenize.TemplateError) as e:  # the default: the first one raises, as the worker wants
        list(tokenize.encode_many(tok, good, 4096, "keep"))
    assert e.value.index == 3


def test_a_template_without_tool_support_is_one_error_even_under_skip(tmp_path):
    tok = family_tokenizer("gemma")
    call = {"type": "function", "function": {"name": "f", "arguments": {}}}
    rows = [{"messages": [U(f"q{n}"), {"role": "assistant", "content": "", "tool_calls": [call]},
                          {"role": "tool", "content": "r"}, A("a")]} for n in range(3)]
    data = write_rows(tmp_path / "t.jsonl", rows)
    for on_error in ("fail", "skip"):
        with pytest.raises(DatasetError, match="chat template") as e:
            check(spec(train=str(data), eval_fraction=0.0, on_error=on_error), JOB, tokenizer=tok)
        (problem,) = e.value.problems
        assert problem.line == 1 and "does not render tool" in problem.message
