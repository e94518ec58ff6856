"""Reading rows out of dataset files, streaming: jsonl, a json array, csv and parquet.

Each reader yields `Row(line, value, error)`: `value` is the parsed object (whatever JSON
type it was) or None with `error` set (invalid JSON). `line` is the 1-based line where the
row starts (for parquet: the 1-based row number). Tolerated: a UTF-8 BOM, CRLF line ends,
blank lines. CSV cells are strings; a conversation in a CSV cell is a JSON list, parsed by
the format that expects a list (see validate.as_list).
"""

from __future__ import annotations

import csv
import glob
import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, NamedTuple

try:
    import orjson

    _loads: Callable[[str | bytes], Any] = orjson.loads
    _JSONError: tuple[type[Exception], ...] = (orjson.JSONDecodeError, ValueError)
except ImportError:  # pragma: no cover - orjson is optional
    orjson = None  # type: ignore[assignment]
    _loads = json.loads
    _JSONError = (ValueError,)

BOM = b"\xef\xbb\xbf"
KINDS = {".jsonl": "jsonl", ".ndjson": "jsonl", ".json": "json", ".csv": "csv", ".tsv": "tsv", ".parquet": "parquet"}


class Row(NamedTuple):
    line: int
    value: Any
    error: str | None = None


class FileError(Exception):
    """A whole file cannot be read (unknown type, unreadable, broken json array)."""


def kind_of(path: Path) -> str:
    kind = KINDS.get(path.suffix.lower())
    if kind is None:
        raise FileError(f"unsupported file type '{path.suffix}' (use .jsonl, .json, .csv, .tsv or .parquet)")
    return kind


def resolve(patterns: list[str], base: Path) -> tuple[list[Path], list[tuple[str, Path]]]:
    """Expand files and globs relative to `base`. Returns (files in order, without repeats;
    [(pattern, resolved path)] for patterns that matched nothing)."""
    files: list[Path] = []
    missing: list[tuple[str, Path]] = []
    for pat in patterns:
        full = Path(pat).expanduser()
        if not full.is_absolute():
            full = base / full
        if glob.has_magic(str(full)):
            hits = sorted(Path(p) for p in glob.glob(str(full), recursive=True) if Path(p).is_file())
        else:
            hits = [full] if full.is_file() else []
        if not hits:
            missing.append((pat, full))
        for h in hits:
            if h not in files:
                files.append(h)
    return files, missing


def read_rows(path: Path) -> Iterator[Row]:
    kind = kind_of(path)
    if kind == "parquet":
        return _parquet(path)
    if kind in ("csv", "tsv"):
        return _csv(path, "\t" if kind == "tsv" else ",")
    with open(path, "rb") as f:
        head = f.read(4096).lstrip(BOM).lstrip()
    if head.startswith(b"["):
        return _json_array(path)
    return _jsonl(path)


def _jsonl(path: Path) -> Iterator[Row]:
    with open(path, "rb") as f:
        for n, raw in enumerate(f, 1):
            if n == 1 and raw.startswith(BOM):
                raw = raw[3:]
            if not raw.strip():
                continue
            try:
                yield Row(n, _loads(raw))
            except _JSONError as exc:
                yield Row(n, None, f"invalid JSON: {_json_reason(exc)}")


def _json_reason(exc: Exception) -> str:
    msg = str(exc)
    return msg.split(": line ")[0] if ": line " in msg else msg


def _json_array(path: Path, chunk: int = 1 << 20) -> Iterator[Row]:
    """Stream the elements of a top-level JSON array, reading `chunk` characters at a time."""
    with open(path, encoding="utf-8-sig", newline="") as f:
        yield from _ArrayReader(f, chunk).rows()


class _ArrayReader:
    def __init__(self, f, chunk: int):
        self.f, self.chunk = f, chunk
        self.buf, self.pos, self.line = "", 0, 1
        self.dec = json.JSONDecoder()

    def _refill(self) -> bool:
        more = self.f.read(self.chunk)
        self.buf, self.pos = self.buf[self.pos :] + more, 0
        return bool(more)

    def _skip_ws(self) -> bool:
        """Skip whitespace; False at the end of the file."""
        while True:
            buf, pos = self.buf, self.pos
            while pos < len(buf) and buf[pos] in " \t\r\n":
                if buf[pos] == "\n":
                    self.line += 1
                pos += 1
            self.pos = pos
            if pos < len(buf):
                return True
            if not self._refill():
                return False

    def rows(self) -> Iterator[Row]:
        if not self._skip_ws() or self.buf[self.pos] != "[":
            yield Row(self.line, None, "invalid JSON: expected '[' at the start of a JSON array file")
            return
        self.pos += 1
        expect_value = True
        while True:
            if not self._skip_ws():
                yield Row(self.line, None, "invalid JSON: the array is not closed with ']'")
                return
            c = self.buf[self.pos]
            if c == "]":
                return
            if c == ",":
                if expect_value:
                    yield Row(self.line, None, "invalid JSON: unexpected ','")
                    return
                self.pos += 1
                expect_value = True
                continue
            if not expect_value:
                yield Row(self.line, None, "invalid JSON: expected ',' or ']' between array elements")
                return
            while True:
                try:
                    value, end = self.dec.raw_decode(self.buf, self.pos)
                    break
                except json.JSONDecodeError as exc:
                    if not self._refill():
                        yield Row(self.line, None, f"invalid JSON: {exc.msg} (the rest of the array cannot be read)")
                        return
            yield Row(self.line, value)
            self.line += self.buf.count("\n", self.pos, end)
            self.pos = end
            expect_value = False
            if self.pos > self.chunk:
                self.buf, self.pos = self.buf[self.pos :], 0


def _csv(path: Path, delimiter: str) -> Iterator[Row]:
    with open(path, encoding="utf-8-sig", newline="") as f:
        reader = csv.reader(f, delimiter=delimiter)
        header = next(reader, None)
        if header is None:
            return
        header = [h.strip() for h in header]
        start = reader.line_num + 1
        for cells in reader:
            if not any(c.strip() for c in cells):
                start = reader.line_num + 1
                continue
            if len(cells) != len(header):
                yield Row(start, None, f"expected {len(header)} columns, got {len(cells)}")
            else:
                yield Row(start, {h: c for h, c in zip(header, cells, strict=True) if h})
            start = reader.line_num + 1


def _parquet(path: Path, batch: int = 8192) -> Iterator[Row]:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise FileError("reading parquet needs pyarrow: pip install 'autodl-run[parquet]'") from None
    try:
        pf = pq.ParquetFile(path)
    except Exception as exc:
        raise FileError(f"cannot read parquet: {exc}") from None
    n = 0
    for rb in pf.iter_batches(batch_size=batch):
        for row in rb.to_pylist():
            n += 1
            yield Row(n, row)
