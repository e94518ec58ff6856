"""Pass one over the inputs: read, validate, normalize and dedupe, streaming.

Canonical records go, one JSON line each, to a sink (a temporary file), in input order:
all `data.train` files first, then all `data.eval` files. Kept in memory: a 16-byte hash
per distinct record (dedupe), and per kept record its origin (file, line), its split of
origin, its content length in characters and its canonical size in bytes.
"""

from __future__ import annotations

import glob
import hashlib
from array import array
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from client.dataset import formats
from client.dataset.readers import FileError, read_rows, resolve
from client.dataset.validate import RecordError
from client.errors import DatasetError, Problem
from jobs.spec import DataSpec

try:
    import orjson

    def dumps(rec: dict) -> bytes:
        return orjson.dumps(rec)

except ImportError:  # pragma: no cover - orjson is optional
    import json

    def dumps(rec: dict) -> bytes:
        return json.dumps(rec, ensure_ascii=False, separators=(",", ":")).encode()


class Sink(Protocol):
    """Where the canonical lines go: a binary file, or a wrapper that counts them."""

    def write(self, data: bytes, /) -> int: ...


INVALID_KEPT = 100  # bad records listed in the report under on_error = "skip"


@dataclass
class Source:
    path: Path
    shown: str  # as the user knows it: relative to the job file when under it
    split: str  # "train" | "eval"


def sources(data: DataSpec, base: Path) -> list[Source]:
    """The input files, in order; a missing file or a glob matching nothing is a DatasetError."""
    out: list[Source] = []
    problems: list[Problem] = []
    for split, patterns in (("train", data.train_list()), ("eval", data.eval_list())):
        files, missing = resolve(patterns, base)
        for pat, full in missing:
            what = "no file matches the pattern" if glob.has_magic(pat) else "no such file"
            problems.append(Problem(pat, None, f"data.{split}", f"{what} (resolved to {full})"))
        out += [Source(f, _shown(f, base), split) for f in files]
    if problems:
        raise DatasetError(
            f"{len(problems)} dataset path(s) not found",
            problems,
            hint=f"paths are relative to the job file's folder ({base}); fix data.train / data.eval",
        )
    return out


def _shown(path: Path, base: Path) -> str:
    try:
        return str(path.relative_to(base))
    except ValueError:
        return str(path)


@dataclass
class Scan:
    data: DataSpec
    sources: list[Source]
    records_in: int = 0
    duplicates: int = 0
    invalid_count: int = 0
    problems: list[Problem] = field(default_factory=list)  # bad records (all, or the first 100 when skipping)
    fatal: list[Problem] = field(default_factory=list)  # whole files that cannot be used
    files: list[dict] = field(default_factory=list)
    origin_file: array = field(default_factory=lambda: array("I"))
    origin_line: array = field(default_factory=lambda: array("I"))
    from_eval: array = field(default_factory=lambda: array("B"))
    chars: array = field(default_factory=lambda: array("Q"))
    nbytes: array = field(default_factory=lambda: array("Q"))

    @property
    def kept(self) -> int:
        return len(self.origin_line)

    def run(self, sink: Sink | None) -> Scan:
        seen: set[bytes] = set()
        for index, src in enumerate(self.sources):
            self.files.append(self._file(index, src, sink, seen))
        return self

    def _bad(self, src: Source, line: int | None, fld: str, reason: str, info: dict) -> None:
        self.invalid_count += 1
        info["invalid"] += 1
        if self.data.on_error == "fail" or len(self.problems) < INVALID_KEPT:
            self.problems.append(Problem(src.shown, line, fld, reason))

    def skip_record(self, i: int, fld: str, reason: str) -> None:
        """Kept record i turned out bad later (the chat template refused it): counted and named as invalid."""
        k = self.origin_file[i]
        self._bad(self.sources[k], self.origin_line[i], fld, reason, self.files[k])

    def _file(self, index: int, src: Source, sink: Sink | None, seen: set[bytes]) -> dict:
        data = self.data
        info: dict[str, Any] = {"file": src.shown, "split": src.split, "type": None, "format": None,
                "rows": 0, "invalid": 0, "duplicates": 0, "records": 0}
        try:
            info["type"] = src.path.suffix.lower().lstrip(".")
            rows = read_rows(src.path)
            fmt, rows = self._format(src, rows, info)
        except (FileError, OSError, UnicodeDecodeError) as exc:
            self.fatal.append(Problem(src.shown, None, "", f"cannot read the file: {exc}"))
            return info
        if fmt is None:
            return info
        info["format"] = info["format"] or fmt
        norm = formats.Normalizer(fmt, data.columns, data.system_prompt, detected=data.format == "auto")
        dedupe = data.dedupe
        split_flag = 1 if src.split == "eval" else 0
        blake = hashlib.blake2b
        try:
            for line, value, error in rows:
                info["rows"] += 1
                if error is not None:
                    self._bad(src, line, "", error, info)
                    continue
                try:
                    rec = norm(value)
                except RecordError as exc:
                    self._bad(src, line, exc.field, exc.reason, info)
                    continue
                b = dumps(rec)
                if dedupe:
                    h = blake(b, digest_size=16).digest()
                    if h in seen:
                        info["duplicates"] += 1
                        continue
                    seen.add(h)
                if sink is not None:
                    sink.write(b + b"\n")
                self.origin_file.append(index)
                self.origin_line.append(line)
                self.from_eval.append(split_flag)
                msgs = rec.get("messages")
                self.chars.append(sum(len(m["content"]) for m in msgs) if msgs else len(rec["text"]))
                self.nbytes.append(len(b))
                info["records"] += 1
        except (FileError, OSError, UnicodeDecodeError) as exc:
            self.fatal.append(Problem(src.shown, None, "", f"cannot read the file: {exc}"))
        self.records_in += info["rows"]
        self.duplicates += info["duplicates"]
        return info

    def _format(self, src: Source, rows, info: dict):
        """(format, rows again from the start); format None (and a fatal problem) if undetectable."""
        if self.data.format != "auto":
            return self.data.format, rows
        head = []
        for row in rows:
            head.append(row)
            if row.error is None:
                fmt = formats.detect(row.value, self.data.columns)
                if fmt is None:
                    self.fatal.append(Problem(
                        src.shown, row.line, "",
                        f"cannot detect the format: {formats.undetected_reason(row.value)}",
                    ))
                    return None, rows
                return fmt, _chain(head, rows)
        if not head:
            return None, rows  # an empty file
        info["format"] = "unknown"
        return "text", iter(head)  # no parsable row: nothing to detect; its errors are reported

    def raise_if_bad(self) -> None:
        if self.fatal:
            raise DatasetError(
                f"{len(self.fatal)} dataset file(s) cannot be used",
                self.fatal,
                hint='set data.format = "alpaca" | "sharegpt" | "messages" | "prompt_completion" | "text", '
                'and map other field names with data.columns, e.g. {instruction = "question"}',
            )
        if self.invalid_count and self.data.on_error == "fail":
            raise DatasetError(
                f"{self.invalid_count} bad record(s) in the dataset",
                self.problems,
                hint='fix these records, or set data.on_error = "skip" to drop them (they are counted)',
            )
        if self.kept == 0:
            raise DatasetError(
                "the dataset has no usable record",
                [Problem(s.shown, None, f"data.{s.split}", "no usable record") for s in self.sources],
                hint="check that data.train points at the right files",
            )

    def summary(self) -> dict:
        return {
            "records_in": self.records_in,
            "invalid_count": self.invalid_count,
            "invalid": [p.as_dict() for p in self.problems[:INVALID_KEPT]],
            "duplicates_removed": self.duplicates,
            "files": self.files,
        }


def _chain(head, rows):
    yield from head
    yield from rows
