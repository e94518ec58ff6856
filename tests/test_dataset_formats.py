"""Every input format and file type -> the exact canonical records."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from conftest_dataset import FIXTURES, JOB, spec

from client.dataset import check, prepare
from client.errors import DatasetError


def records(out_root: Path, **data) -> tuple[list[dict], dict]:
    p = prepare(spec(**data), JOB, out_root, tokenizer=None)
    lines = (p.dir / "train.jsonl").read_text(encoding="utf-8").splitlines()
    return [json.loads(x) for x in lines], p.report


def conv(*turns: str) -> dict:
    roles = ["user", "assistant"]
    msgs = []
    for t in turns:
        if t.startswith("system:"):
            msgs.append({"role": "system", "content": t[7:]})
        else:
            msgs.append({"role": roles[len([m for m in msgs if m["role"] != "system"]) % 2], "content": t})
    return {"messages": msgs}


def test_alpaca_with_input_system_and_history(tmp_path):
    recs, report = records(tmp_path, train="alpaca.jsonl")
    assert recs == [
        conv("What is the capital of France?", "Paris."),
        conv("Translate to Chinese\nhello", "你好。"),
        conv(
            "system:Answer briefly.",
            "What is the capital of France?",
            "Paris.",
            "And the capital of Italy?",
            "Rome.",
        ),
    ]
    assert report["files"] == [
        {
            "file": "alpaca.jsonl",
            "split": "train",
            "type": "jsonl",
            "format": "alpaca",
            "rows": 3,
            "invalid": 0,
            "duplicates": 0,
            "records": 3,
        }
    ]


def test_sharegpt_both_role_vocabularies(tmp_path):
    recs, report = records(tmp_path, train="sharegpt.jsonl")
    assert recs == [conv("system:Be terse.", "hi", "hello"), conv("What is 2+2?", "4", "And 3+3?", "6")]
    assert report["files"][0]["format"] == "sharegpt"


def test_openai_messages(tmp_path):
    recs, report = records(tmp_path, train="messages.jsonl")
    assert recs == [
        conv("Write a haiku about GPUs.", "Rented by the hour"),
        conv("system:You are a helpful assistant.", "question", "answer"),
    ]
    assert report["files"][0]["format"] == "messages"


def test_prompt_completion(tmp_path):
    recs, _ = records(tmp_path, train="prompt_completion.jsonl")
    assert recs == [conv("The quick brown fox", "jumps over the lazy dog."), conv("0123", "456789")]


def test_text(tmp_path):
    recs, report = records(tmp_path, train="text.jsonl")
    assert recs == [
        {"text": "The quick brown fox jumps over the lazy dog."},
        {"text": "GPUs renting by the hour."},
    ]
    assert report["files"][0]["format"] == "text"


def test_json_array_with_line_numbers(tmp_path):
    recs, report = records(tmp_path, train="alpaca_array.json")
    assert recs == [
        conv("What is the capital of France?", "Paris."),
        conv("Write a haiku about GPUs.", "Rented by the hour"),
    ]
    assert report["files"][0]["type"] == "json"
    bad = tmp_path / "bad.json"
    bad.write_text('[\n  {"instruction": "a", "output": "b"},\n  {"instruction": "c"},\n  7\n]\n')
    with pytest.raises(DatasetError) as e:
        check(spec(train=str(bad)), JOB)
    assert [str(p) for p in e.value.problems] == [
        f"{bad}:3: output: missing field",
        f"{bad}:4: expected an object, got a number",
    ]


def test_csv_quoted_multiline(tmp_path):
    recs, report = records(tmp_path, train="alpaca.csv")
    assert recs == [
        conv("What is the capital of France?", "Paris."),
        conv("Write a haiku\nabout GPUs.", "Rented, by the hour"),
    ]
    assert report["files"][0]["type"] == "csv"


def test_parquet(tmp_path):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    table = pa.Table.from_pylist(
        [
            {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]},
            {"messages": [{"role": "user", "content": "bye"}, {"role": "assistant", "content": "ciao"}]},
        ]
    )
    path = tmp_path / "chat.parquet"
    pq.write_table(table, path)
    recs, report = records(tmp_path / "out", train=str(path))
    assert recs == [conv("hi", "hello"), conv("bye", "ciao")]
    assert report["files"][0]["type"] == "parquet"
    assert report["files"][0]["format"] == "messages"


def test_bom_crlf_blank_lines_trailing_whitespace(tmp_path):
    recs, report = records(tmp_path, train="bom_crlf.jsonl")
    assert recs == [
        conv("What is the capital of France?", "Paris."),
        conv("Translate to Chinese\nhello", "你好。"),
    ]
    assert report["records_in"] == 2
    assert report["invalid_count"] == 0


def test_columns_mapping(tmp_path):
    recs, report = records(
        tmp_path, train="columns.jsonl", columns={"instruction": "question", "output": "answer"}
    )
    assert recs == [
        conv("What is the capital of France?", "Paris."),
        conv("Translate to Chinese: hello", "你好。"),
    ]
    assert report["files"][0]["format"] == "alpaca"


def test_columns_inside_turns(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text(
        json.dumps({"dialog": [{"speaker": "user", "text": "hi"}, {"speaker": "assistant", "text": "yo"}]})
        + "\n"
    )
    recs, _ = records(
        tmp_path / "o",
        train=str(path),
        format="messages",
        columns={"messages": "dialog", "role": "speaker", "content": "text"},
    )
    assert recs == [conv("hi", "yo")]


def test_format_override_and_undetectable(tmp_path):
    with pytest.raises(DatasetError) as e:
        check(spec(train="columns.jsonl"), JOB)
    assert [str(p) for p in e.value.problems] == [
        "columns.jsonl:1: cannot detect the format: its first record has the fields [answer, id, question], "
        "expected messages, conversations, instruction+output, prompt+completion or text"
    ]
    assert "data.format" in e.value.hint
    with pytest.raises(DatasetError) as e:
        check(spec(train="alpaca.jsonl", format="text"), JOB)
    assert str(e.value.problems[0]) == "alpaca.jsonl:1: text: missing field"


def test_system_prompt_added_where_missing(tmp_path):
    recs, _ = records(tmp_path, train="messages.jsonl", system_prompt="Be nice.")
    assert recs[0] == conv("system:Be nice.", "Write a haiku about GPUs.", "Rented by the hour")
    assert recs[1]["messages"][0] == {"role": "system", "content": "You are a helpful assistant."}


def test_several_files_and_globs(tmp_path):
    for name in ("alpaca.jsonl", "messages.jsonl", "text.jsonl"):
        shutil.copy(FIXTURES / name, tmp_path / name)
    job = tmp_path / "job.toml"
    report = check(spec(train=["alpaca.jsonl", "*.jsonl"]), job)
    assert [(f["file"], f["format"]) for f in report["files"]] == [
        ("alpaca.jsonl", "alpaca"),
        ("messages.jsonl", "messages"),
        ("text.jsonl", "text"),
    ]
    assert report["records_out"] == 7


def test_csv_conversation_cells_and_bracketed_text(tmp_path):
    path = tmp_path / "c.csv"
    conv_cell = json.dumps([{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]).replace('"', '""')
    path.write_text(f'messages\n"{conv_cell}"\n', encoding="utf-8")
    recs, _ = records(tmp_path / "o1", train=str(path))
    assert recs == [conv("hi", "yo")]
    path2 = tmp_path / "a.csv"
    path2.write_text("instruction,output\n\"[1, 2, 3]\",sum is 6\n", encoding="utf-8")
    recs, _ = records(tmp_path / "o2", train=str(path2))
    assert recs == [conv("[1, 2, 3]", "sum is 6")]  # a bracketed string stays a string


def test_json_array_streams_across_chunk_edges(tmp_path):
    from client.dataset.readers import _json_array

    rows = [{"instruction": f"问题 {i} " + "x" * (i * 7), "output": f"answer {i}"} for i in range(30)]
    path = tmp_path / "a.json"
    path.write_text("\ufeff[\r\n" + ",\r\n".join(json.dumps(r, ensure_ascii=False, indent=1) for r in rows) + "\r\n]\r\n",
                    encoding="utf-8")
    whole = list(_json_array(path))
    assert [r.value for r in whole] == rows
    assert [r.line for r in whole][:3] == [2, 6, 10]
    for chunk in (7, 16, 100):
        assert list(_json_array(path, chunk=chunk)) == whole
