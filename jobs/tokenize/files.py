"""The binary token files of a prepared split: three flat .npy files under `tokens/`.

`{split}.ids.npy` (uint32), `{split}.offsets.npy` (int64, n+1), `{split}.mask.npy` (uint8).
"""

from __future__ import annotations

import sys
from array import array
from collections.abc import Iterable
from pathlib import Path

import numpy as np

from jobs.tokenize.encoding import Encoded

TOKENS_DIR = "tokens"
_HEADER = 128  # fixed .npy header size, so the shape can be written after the data


def _npy_header(dtype: np.dtype, n: int) -> bytes:
    d = f"{{'descr': '{np.dtype(dtype).str}', 'fortran_order': False, 'shape': ({n},), }}"
    body = d.ljust(_HEADER - 10 - 1) + "\n"
    return b"\x93NUMPY\x01\x00" + len(body).to_bytes(2, "little") + body.encode("latin1")


class _NpyAppender:
    """A 1-D .npy file written in pieces: buffered in an array.array, the header's shape last."""

    _FLUSH = 1 << 20

    def __init__(self, path: Path, dtype, code: str):
        self.dtype, self.n = np.dtype(dtype), 0
        self.buf = array(code)
        assert self.buf.itemsize == self.dtype.itemsize
        self.f = open(path, "wb")
        self.f.write(_npy_header(self.dtype, 0))

    def append(self, value: int) -> None:
        self.buf.append(value)
        if len(self.buf) >= self._FLUSH:
            self._flush()

    def add(self, values) -> None:
        self.buf.extend(values)
        if len(self.buf) >= self._FLUSH:
            self._flush()

    def _flush(self) -> None:
        if sys.byteorder != "little":  # pragma: no cover
            self.buf.byteswap()
        self.f.write(self.buf.tobytes())
        self.n += len(self.buf)
        self.buf = array(self.buf.typecode)

    def close(self) -> None:
        self._flush()
        self.f.seek(0)
        self.f.write(_npy_header(self.dtype, self.n))
        self.f.close()


class TokenWriter:
    """Appends encoded records to `tokens/{split}.*.npy`, streaming (memory stays bounded)."""

    def __init__(self, dir: str | Path, split: str):
        base = Path(dir) / TOKENS_DIR
        base.mkdir(parents=True, exist_ok=True)
        self.ids = _NpyAppender(base / f"{split}.ids.npy", np.uint32, "I")
        self.offsets = _NpyAppender(base / f"{split}.offsets.npy", np.int64, "q")
        self.mask = _NpyAppender(base / f"{split}.mask.npy", np.uint8, "B")
        self.offsets.add([0])
        self.total = 0
        self.trained = 0
        self.sequences = 0

    def add(self, enc: Encoded) -> None:
        self.ids.add(enc.input_ids)
        self.mask.add(enc.mask)
        self.total += len(enc.input_ids)
        self.trained += sum(enc.mask)
        self.sequences += 1
        self.offsets.append(self.total)

    def close(self) -> dict:
        for a in (self.ids, self.offsets, self.mask):
            a.close()
        return {"sequences": self.sequences, "tokens": self.total, "trained": self.trained}


def write_tokenized(dir: str | Path, split: str, encoded_iter: Iterable[Encoded | None]) -> dict:
    """Write encoded records (None skipped) to `dir/tokens/{split}.*.npy`; returns counts."""
    w = TokenWriter(dir, split)
    try:
        for enc in encoded_iter:
            if enc is not None:
                w.add(enc)
    finally:
        counts = w.close()
    return counts


def load_tokenized(dir: str | Path, split: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(ids uint32 flat, offsets int64 n+1, mask uint8 flat), memory-mapped. Sequence i is
    ids[offsets[i]:offsets[i+1]]."""
    base = Path(dir) / TOKENS_DIR
    ids = np.load(base / f"{split}.ids.npy", mmap_mode="r")
    offsets = np.load(base / f"{split}.offsets.npy", mmap_mode="r")
    mask = np.load(base / f"{split}.mask.npy", mmap_mode="r")
    if ids.dtype != np.uint32 or offsets.dtype != np.int64 or mask.dtype != np.uint8:
        raise ValueError(f"unexpected dtypes in {base}: {ids.dtype}, {offsets.dtype}, {mask.dtype}")
    if len(ids) != len(mask) or (len(offsets) and offsets[-1] != len(ids)):
        raise ValueError(f"inconsistent token files in {base}")
    return ids, offsets, mask
