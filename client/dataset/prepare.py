"""The prepare pipeline: inputs -> a content-addressed folder the worker can train from.

    resolve files -> find the tokenizer -> input key (reuse?) -> pass 1: read, validate,
    normalize, dedupe into a temporary all.jsonl -> choose the eval split -> pass 2: tokenize,
    apply data.overlong, write train.jsonl / eval.jsonl / tokens/* -> digest -> dataset.json
    -> rename the temporary folder to out_root/{digest}

The folder name is the sha256 of its content (train and eval lines, max_length, overlong and
the tokenizer fingerprint), so the instance never needs the same data twice. A second index,
out_root/.inputs/{input key}, maps the sha256 of the input files plus every data.* field and
the tokenizer fingerprint to that digest, so an unchanged job skips both passes.

Split: the records of data.eval files when given (duplicates of train records removed),
else round(n x eval_fraction) records (at least 1) drawn with random.Random(data.seed);
both splits keep the input order.

Nothing to train is an error here, before anything is paid for: no train record left after
data.max_length (or none with a trained token) raises a DatasetError. Deduplication or
max_length removing more than DROP_WARN_SHARE of the records is a warning in the report, and
so is every record whose content the chat template drops or rewrites (counted per behaviour,
with the first one's file and line).
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import tempfile
import time
from array import array
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from client import activity
from client.dataset import stats
from client.dataset.scan import Scan, Source, sources
from client.dataset.tokens import find_tokenizer
from client.errors import DatasetError, Problem
from jobs import tokenize
from jobs.layout import DATASET_MANIFEST
from jobs.protocol import DatasetManifest, ProtocolError, dump_model, read_model
from jobs.spec import DataSpec, JobSpec
from jobs.tokenize.chat import SPECIAL_IN_CONTENT

try:
    from orjson import loads as _loads
except ImportError:  # pragma: no cover
    from json import loads as _loads  # type: ignore[assignment]

FORMAT_VERSION = 1
# What prepared data depends on besides its input files: every data.* setting.
DATA_FIELDS = tuple(k for k in DataSpec.model_fields if k not in ("train", "eval"))
BATCH = 1024  # rows between two progress calls (a power of two: a mask, not a division, per row)
RowsProgress = Callable[[str, int, "int | None"], None]
GPU_MICRO_BATCH = 16384  # the largest micro-batch the worker tries on a GPU (remote_worker/calibrate.py)
DROP_WARN_SHARE = 0.5  # warn when deduplication or max_length removes more than this share of the records


@dataclass
class Prepared:
    dir: Path
    digest: str
    report: dict
    reused: bool = False
    tokenizer: Any = field(default=None, repr=False, compare=False)


def check(spec: JobSpec, job_file: Path, *, tokenizer: Any = "auto") -> dict:
    """Read and validate the dataset without keeping anything. With the model's tokenizer on the
    laptop, it is tokenized too (in a temporary folder), so what max_length leaves is exact;
    without one, overlong records are estimated from characters."""
    base = Path(job_file).resolve().parent
    srcs = sources(spec.data, base)
    tok, tinfo = _tokenizer(spec, base, tokenizer)
    t0 = time.perf_counter()
    rows = activity.rows("check")
    if tok is not None:
        with tempfile.TemporaryDirectory(prefix="autodl-run-check-") as tmp:
            scan, out = _passes(Path(tmp), spec.data, srcs, tok, 0, rows)
        rows("done", scan.kept, scan.kept)
        report = _report(scan, spec.data)
        report.update(
            records_out=out["counts"]["train"] + out["counts"]["eval"], train_records=out["counts"]["train"],
            eval_records=out["counts"]["eval"], overlong=out["overlong"], tokens=out["tokens"], tokenizer=tinfo,
            tokenizer_reason=None, template=out["template"], output=None, digest=None,
            seconds={"read+tokenize": round(time.perf_counter() - t0, 3)},
        )
        return _warned(report)
    scan = Scan(spec.data, srcs).run(_Counted(_Discard(), rows))
    rows("done", scan.kept, scan.kept)
    scan.raise_if_bad()
    flags = eval_flags(scan, spec.data)
    n_eval = sum(flags)
    report = _report(scan, spec.data)
    report.update(
        records_out=scan.kept, train_records=scan.kept - n_eval, eval_records=n_eval,
        overlong=_estimated_overlong(scan, spec.data), tokens=None, tokenizer=None,
        tokenizer_reason=tinfo.get("reason"), template=None, output=None, digest=None,
        seconds={"read": round(time.perf_counter() - t0, 3)},
    )
    return _warned(report)


def prepare(
    spec: JobSpec, job_file: Path, out_root: Path, *, tokenizer: Any = "auto", workers: int = 0,
    progress: RowsProgress | None = None,
) -> Prepared:  # fmt: skip
    """Prepare (or reuse) the dataset of `spec`; see the module docstring. tokenizer: "auto"
    (find it on the laptop), None (none: estimates from characters) or a tokenizer object.
    progress: called per batch of rows with (phase, rows done, rows in all or None), then ("done", n, n);
    by default client.activity's meters (shown by the CLI)."""
    report_rows = progress or activity.rows("prepare")
    job_file = Path(job_file).resolve()
    base = job_file.parent
    out_root = Path(out_root)
    out_root.mkdir(parents=True, exist_ok=True)
    srcs = sources(spec.data, base)
    tok, tinfo = _tokenizer(spec, base, tokenizer)
    fingerprint = tokenize.tokenizer_fingerprint(tok) if tok is not None else None
    if tok is not None:
        tinfo["fingerprint"] = fingerprint
    key = input_key(srcs, spec.data, fingerprint)
    hit = _reuse(out_root, key, tok, tinfo)
    if hit is not None:
        return hit
    tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=out_root))
    os.chmod(tmp, 0o755)  # mkdtemp makes it 0700; rsync would carry that to the instance
    try:
        t0 = time.perf_counter()
        scan, out = _passes(tmp, spec.data, srcs, tok, workers, report_rows)
        t1 = out.pop("t1")
        digest = _digest(out["hashes"], spec.data, fingerprint)
        final = out_root / digest
        report = _report(scan, spec.data)
        report.update(
            records_out=out["counts"]["train"] + out["counts"]["eval"],
            train_records=out["counts"]["train"], eval_records=out["counts"]["eval"],
            overlong=out["overlong"], tokens=out["tokens"],
            tokenizer=tinfo if tok is not None else None,
            tokenizer_reason=None if tok is not None else tinfo.get("reason"), template=out["template"],
            output=str(final / "train.jsonl"), dir=str(final), digest=digest, reused=False,
            seconds={"read": round(t1 - t0, 3), "write": round(time.perf_counter() - t1, 3)},
        )
        _warned(report)
        plain = out["template"] is not None and out["template"]["source"] == "plain"
        manifest = DatasetManifest(
            format_version=FORMAT_VERSION, digest=digest, created_unix=time.time(),
            counts=out["counts"], max_length=spec.data.max_length, overlong=spec.data.overlong,
            overlong_applied=tok is not None, tokenizer_fingerprint=fingerprint,
            tokenizer=report["tokenizer"], tokens=out["token_files"], report=report,
            chat_template=tokenize.PLAIN_TEMPLATE if plain else None,
        )  # fmt: skip
        (tmp / DATASET_MANIFEST).write_text(dump_model(manifest), encoding="utf-8")
        _publish(tmp, final)
        _remember(out_root, key, digest)
        report_rows("done", scan.kept, scan.kept)
        return Prepared(final, digest, report, False, tok)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


# ----------------------------------------------------------------------------- pieces


def _passes(
    tmp: Path, data: DataSpec, srcs: list[Source], tok: Any, workers: int, progress: RowsProgress
) -> tuple[Scan, dict]:  # fmt: skip
    """Pass one (scan into tmp/all.jsonl), the split, pass two (tmp/{train,eval}.jsonl and tokens)."""
    with open(tmp / "all.jsonl", "wb", buffering=1 << 20) as sink:
        scan = Scan(data, srcs).run(_Counted(sink, progress))
    scan.raise_if_bad()
    t1 = time.perf_counter()
    flags = eval_flags(scan, data)
    out = _write_splits(tmp, scan, flags, data, tok, workers, progress)
    (tmp / "all.jsonl").unlink()
    out["t1"] = t1
    if tok is not None:
        _raise_if_nothing_to_train(scan, out, data)
    return scan, out


def _raise_if_nothing_to_train(scan: Scan, out: dict, data: DataSpec) -> None:
    if out["counts"]["train"] and out["tokens"]["trained_total"]:
        return
    over = out["overlong"]
    why = (f"{scan.records_in:,} read, {scan.invalid_count:,} invalid, {scan.duplicates:,} duplicates, "
           f"{over['dropped']:,} dropped as longer than data.max_length = {data.max_length}")
    if not out["counts"]["train"]:
        what = "no train record is left"
    else:
        what = "no train record has a trained token (only prompt tokens are left)"
    raise DatasetError(
        f"nothing to train: {what} ({why})",
        [Problem(s.shown, None, f"data.{s.split}", "no trainable record") for s in scan.sources if s.split == "train"],
        hint=("raise data.max_length" + ('' if data.overlong == "truncate" else ', or set data.overlong = "truncate"')
              + "; check that records end with an assistant reply"),
    )


def _warned(report: dict) -> dict:
    """Add `warnings`: large shares removed, and what the chat template did to records."""
    warnings: list[str] = []
    n = report["records_in"] or 0
    dup = report.get("duplicates_removed") or 0
    if n and dup / n > DROP_WARN_SHARE:
        warnings.append(f"deduplication removed {dup:,} of {n:,} records ({dup / n:.0%}); set data.dedupe = false "
                        "if the repeats are meant")
    over = report.get("overlong") or {}
    gone = over.get("dropped", 0) or (over.get("count", 0) if over.get("estimated") and over.get("action") == "drop" else 0)
    if n and gone / n > DROP_WARN_SHARE:
        est = " (estimated from characters)" if over.get("estimated") else ""
        warnings.append(f"data.max_length = {over.get('max_length')} drops {gone:,} of {n:,} records "
                        f"({gone / n:.0%}){est}; raise it, or set data.overlong = \"truncate\"")
    for note in (report.get("template") or {}).get("notes", []):
        warnings.append(f"{note['count']:,} record(s): {note['note']} (first: {note['first']})")
    report["warnings"] = warnings
    return report


def _tokenizer(spec: JobSpec, base: Path, tokenizer: Any) -> tuple[Any, dict]:
    if tokenizer is None:
        return None, {"reason": "no tokenizer was asked for"}
    if isinstance(tokenizer, str) and tokenizer == "auto":
        return find_tokenizer(spec.model, base)
    name = getattr(tokenizer, "name_or_path", "") or type(tokenizer).__name__
    return tokenizer, {"name": str(name), "source": "given"}


def input_key(srcs: list[Source], data: DataSpec, fingerprint: str | None) -> str:
    h = hashlib.sha256(f"autodl-run inputs v{FORMAT_VERSION}\n".encode())
    fields = {k: getattr(data, k) for k in DATA_FIELDS}
    h.update(json.dumps([fields, fingerprint], sort_keys=True).encode())
    for src in srcs:
        h.update(f"\n{src.split}\0{src.path.suffix}\0".encode())
        with open(src.path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):  # noqa: B023
                h.update(block)
    return h.hexdigest()


def _reuse(out_root: Path, key: str, tok: Any, tinfo: dict) -> Prepared | None:
    try:
        digest = (out_root / ".inputs" / key).read_text().strip()
        path = out_root / digest / DATASET_MANIFEST
        manifest = read_model(DatasetManifest, path.read_bytes(), str(path))
    except (OSError, ProtocolError):
        return None
    report = manifest.report
    report["reused"] = True
    if tok is not None:
        report["tokenizer"] = tinfo  # the same identity, perhaps found another way this time
    return Prepared(out_root / digest, digest, report, True, tok)


def _remember(out_root: Path, key: str, digest: str) -> None:
    index = out_root / ".inputs"
    index.mkdir(exist_ok=True)
    tmp = index / f".{key}.{os.getpid()}"
    tmp.write_text(digest)
    os.replace(tmp, index / key)


def _publish(tmp: Path, final: Path) -> None:
    if (final / DATASET_MANIFEST).exists():
        return  # the same content is there already (the caller removes tmp)
    if final.exists():
        shutil.rmtree(final)  # a leftover without a manifest is not trusted
    try:
        os.rename(tmp, final)
    except OSError:
        if not (final / DATASET_MANIFEST).exists():
            raise


def _digest(hashes: dict, data: DataSpec, fingerprint: str | None) -> str:
    h = hashlib.sha256(f"autodl-run prepared v{FORMAT_VERSION}\n".encode())
    fields: dict[str, Any] = {"max_length": data.max_length, "overlong": data.overlong,
                              "tokenizer_fingerprint": fingerprint}
    if data.train_template_text:  # other ids from the same lines (absent when false: earlier digests hold)
        fields["train_template_text"] = True
    h.update(json.dumps(fields, sort_keys=True).encode())
    h.update(hashes["train"].digest() + hashes["eval"].digest())
    return h.hexdigest()


def eval_flags(scan: Scan, data: DataSpec) -> bytearray:
    """1 for the records that go to eval."""
    n = scan.kept
    if any(scan.from_eval):
        return bytearray(scan.from_eval)
    flags = bytearray(n)
    if data.eval_fraction > 0 and n >= 2:
        k = min(n - 1, max(1, round(n * data.eval_fraction)))
        for i in random.Random(data.seed).sample(range(n), k):
            flags[i] = 1
    return flags


def _report(scan: Scan, data: DataSpec) -> dict:
    r = scan.summary()
    r["eval_source"] = "data.eval" if any(scan.from_eval) else ("eval_fraction" if data.eval_fraction else None)
    r["chars"] = _chars(scan)
    r["spec"] = {k: getattr(data, k) for k in DATA_FIELDS}
    return r


def _chars(scan: Scan) -> dict:
    c = stats.percentiles(scan.chars)
    c["total"] = int(sum(scan.chars))
    c["est_tokens_total"] = stats.estimate_tokens(int(sum(scan.nbytes)))
    c["est_tokens_p50"] = stats.estimate_tokens(stats.percentiles(scan.nbytes)["p50"])
    return c


def _estimated_overlong(scan: Scan, data: DataSpec) -> dict:
    limit = data.max_length * stats.BYTES_PER_TOKEN
    count = sum(1 for b in scan.nbytes if b > limit)
    return {"count": count, "action": data.overlong, "max_length": data.max_length, "estimated": True,
            "dropped": 0, "truncated": 0}


class _Counted:
    """The scan's sink, counting the rows written through it (one progress call per batch)."""

    def __init__(self, sink: Any, progress: RowsProgress) -> None:
        self.sink, self.progress, self.n = sink, progress, 0

    def write(self, line: bytes) -> int:
        self.n += 1
        if not self.n & (BATCH - 1):
            self.progress("reading", self.n, None)
        return self.sink.write(line)


class _Discard:
    """A sink that keeps nothing (`check` without a tokenizer counts the rows, it writes none)."""

    def write(self, line: bytes) -> int:
        return len(line)


def _write_splits(
    tmp: Path, scan: Scan, flags: bytearray, data: DataSpec, tok: Any, workers: int, progress: RowsProgress
) -> dict:
    names = ("train", "eval")
    outs = {s: open(tmp / f"{s}.jsonl", "wb", buffering=1 << 20) for s in names}
    hashes = {s: hashlib.sha256() for s in names}
    counts = {s: 0 for s in names}
    try:
        with open(tmp / "all.jsonl", "rb") as lines:
            if tok is None:
                for i, line in enumerate(lines):
                    if not i & (BATCH - 1):
                        progress("writing", i, scan.kept)
                    split = names[flags[i]]
                    outs[split].write(line)
                    hashes[split].update(line)
                    counts[split] += 1
                return {"hashes": hashes, "counts": counts, "overlong": _estimated_overlong(scan, data),
                        "tokens": None, "token_files": None, "template": None}
            return _tokenized(tmp, scan, flags, data, tok, workers, lines, outs, hashes, counts, progress)
    finally:
        for f in outs.values():
            f.close()


def _tokenized(tmp, scan, flags, data, tok, workers, lines, outs, hashes, counts, progress) -> dict:
    names = ("train", "eval")
    writers = {s: tokenize.TokenWriter(tmp, s) for s in names}
    lengths = array("I")  # every record, before data.overlong
    train_lengths = array("I")  # train records as written
    over = {"count": 0, "action": data.overlong, "max_length": data.max_length, "estimated": False,
            "dropped": 0, "truncated": 0}
    problems: list[Problem] = []
    refused: list[tuple[Problem, str]] = []  # records the chat template cannot train, and what to do
    first_trained = 0  # train records whose first token is masked in: it is never predicted, so not trained
    notes: dict[str, list] = {}  # what the chat template did: note -> [count, index of the first record]
    try:
        with open(tmp / "all.jsonl", "rb") as again:
            records = (_loads(line) for line in again)
            encoded = tokenize.encode_many(tok, records, data.max_length, "keep", workers, data.train_template_text,
                                           refusals=True)
            for i, (line, enc) in enumerate(zip(lines, encoded, strict=True)):
                if not i & (BATCH - 1):
                    progress("tokenizing", i, scan.kept)
                if isinstance(enc, tokenize.Refused):
                    if data.on_error == "skip":
                        scan.skip_record(i, enc.field, enc.reason)
                    else:
                        refused.append((_where(scan, i, enc.reason, enc.field), enc.hint))
                    continue
                assert enc is not None  # "keep" never drops a record
                lengths.append(enc.full_length)
                for note in enc.notes:
                    notes.setdefault(note, [0, i])[0] += 1
                if enc.overlong:
                    over["count"] += 1
                    if data.overlong == "fail":
                        problems.append(_where(scan, i, f"{enc.full_length} tokens, over data.max_length = "
                                                        f"{data.max_length}"))
                        continue
                    limited = tokenize.apply_overlong(enc, data.max_length, data.overlong)
                    if limited is None:
                        over["dropped"] += 1
                        continue
                    enc = limited
                    over["truncated"] += 1
                split = names[flags[i]]
                outs[split].write(line)
                hashes[split].update(line)
                counts[split] += 1
                writers[split].add(enc)
                if split == "train":
                    first_trained += enc.mask[0] if len(enc.mask) else 0
                    train_lengths.append(len(enc.input_ids))
    except tokenize.TemplateError as exc:  # about the whole template (refusals=True): one error says it
        where = _where(scan, exc.index or 0, exc.reason, exc.field)
        raise DatasetError("the model's chat template cannot render the dataset's records", [where],
                           hint=exc.hint or "use a model (or model.tokenizer) whose chat template supports them, "
                           "or leave such records out") from None
    finally:
        files = {s: w.close() for s, w in writers.items()}
    if refused:
        _raise_refused(refused)
    if problems:
        raise DatasetError(
            f"{len(problems)} record(s) longer than data.max_length = {data.max_length} tokens",
            problems, hint='raise data.max_length, or set data.overlong = "drop" (the default) or "truncate"',
        )
    tokens = stats.percentiles(lengths)
    total = files["train"]["tokens"]  # the writer counted them, and every masked-in token
    trained = files["train"]["trained"] - first_trained
    tokens.update(
        total=total, trained_total=trained, prompt_total=total - trained,
        packing_efficiency=stats.packing_efficiency(train_lengths, data.max_length, data.seed),
        packing_efficiency_gpu=stats.packing_efficiency(
            train_lengths, max(data.max_length, GPU_MICRO_BATCH), data.seed),
        eval_total=files["eval"]["tokens"],
    )
    source, _ = tokenize.template_used(tok)
    template = {
        "source": source,
        "format": "the model's chat template" if source == "tokenizer" else
        "plain (the tokenizer has no chat template): 'User: …\\n\\nAssistant: …<EOS>', saved into the adapter's tokenizer",
        "notes": [{"note": k, "count": c, "first": _shown(scan, i)} for k, (c, i) in notes.items()],
    }
    return {"hashes": hashes, "counts": counts, "overlong": over, "tokens": tokens, "token_files": files,
            "template": template}


def _shown(scan: Scan, i: int) -> str:
    return f"{scan.sources[scan.origin_file[i]].shown}:{scan.origin_line[i]}"


def _where(scan: Scan, i: int, reason: str, fld: str = "") -> Problem:
    src = scan.sources[scan.origin_file[i]]
    return Problem(src.shown, scan.origin_line[i], fld, reason)


def _raise_refused(refused: list[tuple[Problem, str]]) -> None:
    """Every record the chat template cannot train, in one error (DatasetError shows the first 20)."""
    problems = [p for p, _ in refused]
    special = sum(SPECIAL_IN_CONTENT in p.message for p in problems)
    if special == len(problems):
        summary = f"{special} record(s) hold a special token of the tokenizer in their text"
    else:
        summary = f"the model's chat template cannot train {len(problems)} record(s)" + (
            f" ({special} hold a special token of the tokenizer)" if special else "")
    hints = dict.fromkeys(h or "fix the record, or check that the tokenizer matches the model" for _, h in refused)
    raise DatasetError(summary, problems, hint="; ".join(hints) + '; or set data.on_error = "skip" to drop '
                       "such records (they are counted)")
