"""Every kind of bad record, located by file:line and field; on_error fail/skip; missing paths."""

from __future__ import annotations

import json

import pytest
from conftest_dataset import JOB, spec

from client.dataset import check, prepare
from client.errors import DatasetError


def problems(**data) -> list[str]:
    with pytest.raises(DatasetError) as e:
        check(spec(**data), JOB)
    assert e.value.exit_code == 3
    assert 'data.on_error = "skip"' in e.value.hint
    return [str(p) for p in e.value.problems]


@pytest.mark.parametrize(
    "name, expected",
    [
        ("bad_json.jsonl", ["bad_json.jsonl:2: invalid JSON: unexpected character"]),
        (
            "bad_missing.jsonl",
            ["bad_missing.jsonl:2: output: missing field", "bad_missing.jsonl:3: instruction: is empty"],
        ),
        ("bad_type.jsonl", ["bad_type.jsonl:2: messages[1].content: content must be a string, got a number"]),
        (
            "bad_role.jsonl",
            [
                "bad_role.jsonl:2: conversations[1].from: unknown role 'robot' "
                "(expected one of: system, user, human, assistant, gpt, model, tool, observation, function_call)"
            ],
        ),
        (
            "bad_end.jsonl",
            ["bad_end.jsonl:2: messages: does not end with an assistant turn (the last turn is user)"],
        ),
        (
            "bad_order.jsonl",
            ["bad_order.jsonl:2: messages[1].role: roles out of order: turn 1 is user, expected assistant"],
        ),
    ],
)
def test_each_kind_of_bad_record(name, expected):
    got = problems(train=name)
    if name == "bad_json.jsonl":  # the parser's wording after the reason differs between orjson and json
        assert len(got) == 1 and got[0].startswith("bad_json.jsonl:2: invalid JSON")
    else:
        assert got == expected


def test_more_order_rules(tmp_path):
    path = tmp_path / "d.jsonl"
    rows = [
        [{"role": "assistant", "content": "a"}],
        [
            {"role": "user", "content": "u"},
            {"role": "system", "content": "s"},
            {"role": "assistant", "content": "a"},
        ],
        [{"role": "system", "content": "s"}],
        [],
        [{"role": "user", "content": "u"}, {"role": "assistant", "content": ""}],
        [{"role": "user", "content": "u"}, {"role": "assistant"}],
        [{"role": "user", "content": [{"type": "text", "text": "u"}]}, {"role": "assistant", "content": "a"}],
    ]
    path.write_text("".join(json.dumps({"messages": r}) + "\n" for r in rows))
    got = problems(train=str(path))
    assert got == [
        f"{path}:1: messages[0].role: roles out of order: turn 0 is assistant, expected user",
        f"{path}:2: messages[1].role: roles out of order: a system turn may only come first (turn 1)",
        f"{path}:3: messages: has no user or assistant turn",
        f"{path}:4: messages: is an empty conversation",
        f"{path}:5: messages[1].content: is empty",
        f"{path}:6: messages[1].content: missing field",
    ]  # row 7 (OpenAI text parts) is fine


def test_skip_drops_and_counts(tmp_path):
    p = prepare(
        spec(train=["bad_missing.jsonl", "bad_order.jsonl"], on_error="skip"), JOB, tmp_path, tokenizer=None
    )
    r = p.report
    assert r["records_in"] == 5
    assert r["invalid_count"] == 3
    assert r["records_out"] == 1  # the good rows of both files are the same conversation
    assert r["duplicates_removed"] == 1
    assert r["invalid"] == [
        {"file": "bad_missing.jsonl", "line": 2, "field": "output", "reason": "missing field"},
        {"file": "bad_missing.jsonl", "line": 3, "field": "instruction", "reason": "is empty"},
        {
            "file": "bad_order.jsonl",
            "line": 2,
            "field": "messages[1].role",
            "reason": "roles out of order: turn 1 is user, expected assistant",
        },
    ]
    assert [(f["file"], f["rows"], f["invalid"], f["records"]) for f in r["files"]] == [
        ("bad_missing.jsonl", 3, 2, 1),
        ("bad_order.jsonl", 2, 1, 0),
    ]


def test_fail_lists_all_but_shows_twenty(tmp_path):
    path = tmp_path / "many.jsonl"
    path.write_text("".join(json.dumps({"instruction": f"q{i}"}) + "\n" for i in range(25)))
    with pytest.raises(DatasetError) as e:
        check(spec(train=str(path)), JOB)
    assert len(e.value.problems) == 25
    text = str(e.value)
    assert text.splitlines()[0] == "25 bad record(s) in the dataset"
    assert f"{path}:20: output: missing field" in text
    assert f"{path}:21:" not in text
    assert "... and 5 more" in text


def test_missing_file_and_empty_glob(tmp_path):
    with pytest.raises(DatasetError) as e:
        check(spec(train=["nope.jsonl", "data/*.jsonl"], eval="gone.csv"), JOB)
    base = JOB.parent
    assert [str(p) for p in e.value.problems] == [
        f"nope.jsonl: data.train: no such file (resolved to {base / 'nope.jsonl'})",
        f"data/*.jsonl: data.train: no file matches the pattern (resolved to {base / 'data/*.jsonl'})",
        f"gone.csv: data.eval: no such file (resolved to {base / 'gone.csv'})",
    ]
    assert "relative to the job file's folder" in e.value.hint


def test_unsupported_type_and_empty_dataset(tmp_path):
    (tmp_path / "a.txt").write_text("hello\n")
    (tmp_path / "e.jsonl").write_text("\n\n")
    with pytest.raises(DatasetError) as e:
        check(spec(train="a.txt"), tmp_path / "job.toml")
    assert "unsupported file type '.txt'" in str(e.value.problems[0])
    with pytest.raises(DatasetError) as e:
        check(spec(train="e.jsonl"), tmp_path / "job.toml")
    assert e.value.message.startswith("the dataset has no usable record")
