"""The contract between laptop and instance lives in jobs/ alone (issue 11).

- No remote file name is spelled outside jobs/ (jobs.layout is the only place): string constants in
  client/, remote_worker/, scripts/ and bench/ are read with `ast` (docstrings and comments may
  mention names; code may not).
- No shared JSON key of a crossing file is read by hand (`d["manifest_sha256"]`, `d.get("phase")`):
  crossing files are read through their jobs.protocol models.
- jobs.layout really is the only speller: every name below comes out of it.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

from jobs import layout, protocol
from jobs.layout import JobPaths, RemoteLayout

ROOT = Path(__file__).resolve().parent.parent
CHECKED = ["client", "remote_worker", "scripts", "bench"]

# Names distinctive enough to look for anywhere in a string constant.
DISTINCT = [
    "job.json", "launch.json", "events.jsonl", "worker.log", "fetched.json", "transfer.json", "status.json",
    "result.json", "batch_shape.json", "dataset.json", "manifest.json", ".reserve", "run.sh",
    "apt-tmux-failed", "submissions", "eval_results.json",
]  # fmt: skip
# Generic words that are file or folder names of the layout only when used as a path part.
PATH_PARTS = {"state", "pid", "exit_code", "output", "checkpoints", "adapter", "guard", "prefetch", "bundles",
              "jobs", "hf", ".setup", "fetching", "tokens"}  # fmt: skip
# Keys of crossing files distinctive enough that reading them by hand means bypassing the model.
KEYS = {"manifest_sha256", "bytes_per_s", "shutdown_at", "copied_to", "command_rc", "submit_key",
        "micro_batch_tokens", "gradient_checkpointing", "tokenizer_fingerprint"}  # fmt: skip


def _sources() -> list[Path]:
    return sorted(p for d in CHECKED for p in (ROOT / d).rglob("*.py"))


def _docstrings(tree: ast.AST) -> set[int]:
    ids = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef):
            body = node.body
            if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant):
                ids.add(id(body[0].value))
    return ids


def _is_join(call: ast.Call) -> bool:
    f = call.func
    return isinstance(f, ast.Attribute) and f.attr in ("join", "joinpath", "with_name")


def _offences(path: Path) -> list[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    docs = _docstrings(tree)
    found = []
    where = path.relative_to(ROOT)
    for node in ast.walk(tree):
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docs:
            for name in DISTINCT:
                if re.search(rf"(?<![\w.-]){re.escape(name)}(?![\w-])", node.value):
                    found.append(f"{where}:{node.lineno}: spells {name!r}")
        if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Div):
            r = node.right
            if isinstance(r, ast.Constant) and isinstance(r.value, str) and r.value.strip("/") in PATH_PARTS:
                found.append(f"{where}:{node.lineno}: builds a path with {r.value!r}")
        if isinstance(node, ast.Call) and _is_join(node):
            for a in node.args:
                if isinstance(a, ast.Constant) and isinstance(a.value, str) and a.value.strip("/") in PATH_PARTS:
                    found.append(f"{where}:{node.lineno}: joins a path with {a.value!r}")
        key = None
        if isinstance(node, ast.Subscript) and isinstance(node.slice, ast.Constant):
            key = node.slice.value
        elif (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Attribute)
            and node.func.attr == "get"
            and node.args
            and isinstance(node.args[0], ast.Constant)
        ):
            key = node.args[0].value
        if isinstance(key, str) and key in KEYS and where.parts[0] != "bench":  # the bench's own result rows
            found.append(f"{where}:{node.lineno}: reads the key {key!r} by hand (use its jobs.protocol model)")
    return found


def test_no_remote_file_name_or_shared_key_outside_jobs() -> None:
    offences = [o for p in _sources() for o in _offences(p)]
    assert not offences, "spell these through jobs.layout / read them through jobs.protocol:\n" + "\n".join(
        offences
    )


def test_the_checker_finds_what_it_looks_for(tmp_path: Path) -> None:
    bad = tmp_path / "bad.py"
    bad.write_text(
        'from pathlib import Path\nimport posixpath\nd = Path("x")\n'
        'a = d / "state"\nb = posixpath.join("r", "output", "x")\nc = "cat events.jsonl"\n'
        'e = {}["manifest_sha256"]\nf = {}.get("bytes_per_s")\n'
        'def g():\n    """Docstrings may name events.jsonl."""\n'
    )
    offences = _offences_at(bad)
    assert len(offences) == 5, offences


def _offences_at(path: Path) -> list[str]:
    global ROOT
    saved, ROOT = ROOT, path.parent
    try:
        return _offences(path)
    finally:
        ROOT = saved


def test_layout_spells_every_name() -> None:
    p = JobPaths("/r/jobs/j")
    named = {
        p.spec, p.launch, p.transfer, p.fetched, p.events, p.log, p.state, p.exit_code, p.pid, p.wrapper,
        p.reserve, p.guard_status, p.prefetch_result, p.lease("t"), p.checkpoint(3), p.adapter, p.checkpoints,
    }
    assert len(named) == 17
    assert layout.checkpoint_step(Path(p.checkpoint(12)).name) == 12
    assert layout.checkpoint_step("step-x") is None and layout.checkpoint_step("checkpoint-3") is None
    r = RemoteLayout("/r")
    assert r.submission("k").startswith("/r/") and r.setup_file(layout.APT_FAILED).startswith("/r/")


@pytest.mark.parametrize(
    "model, good",
    [
        (protocol.FetchAck, {"manifest_sha256": "a" * 64}),
        (protocol.TransferSpeed, {"bytes_per_s": 1e6}),
        (protocol.GuardStatus, {"phase": "waiting", "policy": "fetched"}),
        (protocol.BatchShape, {"micro_batch_tokens": 4096, "gradient_checkpointing": True}),
        (protocol.ModelDownload, {"ok": True}),
        (protocol.SetupMarker, {"python": "python3"}),
        (protocol.DatasetManifest, {"format_version": 1, "digest": "d"}),
        (protocol.LaunchRecord, {"job_id": "j", "name": "n", "submit_key": "k", "data_digest": "d",
                                 "bundle_digest": "b"}),  # fmt: skip
        (protocol.FolderManifest, {"files": [{"path": "a/b.bin", "size": 1, "sha256": "0" * 64}]}),
        (protocol.TrainerState, {"global_step": 3, "log_history": [{"loss": 1.5, "step": 1}]}),
        (protocol.EvalResults, {"results": [{"step": 3, "metrics": {"eval_loss": 1.2}}]}),
    ],
)
def test_each_crossing_file_round_trips_and_refuses_garbage(model, good) -> None:
    obj = model.model_validate(good)
    again = protocol.read_model(model, protocol.dump_model(obj), "x.json")
    assert again == obj
    for garbage in (b"", b"{", b"[]", b"\xff\xfe", b'{"files": 3}', b"null"):
        with pytest.raises(protocol.ProtocolError) as err:
            protocol.read_model(model, garbage, "the/file.json")
        assert "the/file.json" in str(err.value)


@pytest.mark.parametrize("bad", ["../x", "/etc/passwd", "a/../../b", "a\nb", "a\x1b[2Jb", "", "./a", "a//b", "a\\b"])
def test_a_manifest_cannot_name_a_path_outside_its_folder(bad: str) -> None:
    with pytest.raises(protocol.ProtocolError):
        protocol.read_model(
            protocol.FolderManifest,
            protocol.json.dumps({"files": [{"path": bad, "size": 1, "sha256": "0" * 64}]}),
            "manifest.json",
        )
