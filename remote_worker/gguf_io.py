"""GGUF tensor data, fast: quantized in parallel threads and streamed to the file, then read back.

The `gguf` library's quantizers are vectorized numpy; numpy releases the GIL inside each operation,
so row chunks of one tensor quantize in parallel threads. One tensor at a time is converted and
quantized while the previous one is written, so host memory holds about two tensors, never the
whole quantized model (GGUFWriter.add_tensor would keep every tensor until the end).

The read-back parses the file's header itself (gguf.GGUFReader builds a Python object per vocabulary
entry: ~27 s for a 152k vocabulary), dequantizes each tensor with the library's dequantizer, again
in parallel row chunks, and copies it into the merged model in place: no second model in memory.
"""

from __future__ import annotations

import functools
import mmap
import os
import struct
import time
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

ROWS_PER_TASK = 256  # rows per thread task: big enough that numpy, not Python, dominates


def workers() -> int:
    return max(1, min(32, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1))


def over_rows(fn: Callable[[np.ndarray], np.ndarray], rows: np.ndarray, pool: ThreadPoolExecutor) -> np.ndarray:
    """fn applied to row chunks of a 2-D array in the pool, concatenated (block formats are row-local)."""
    n = rows.shape[0]
    if n <= ROWS_PER_TASK:
        return fn(rows)
    parts = pool.map(lambda s: fn(rows[s : s + ROWS_PER_TASK]), range(0, n, ROWS_PER_TASK))
    return np.concatenate(list(parts), axis=0)


def encoder(qt) -> Callable[[np.ndarray], np.ndarray]:
    import gguf

    if qt == gguf.GGMLQuantizationType.F32:
        return lambda a: a.astype(np.float32, copy=False)
    if qt == gguf.GGMLQuantizationType.F16:
        return lambda a: a.astype(np.float16)
    return lambda a: gguf.quants.quantize(a, qt)


def nbytes(shape: tuple[int, ...], qt) -> int:
    import gguf

    block, size = gguf.GGML_QUANT_SIZES[qt]
    return int(np.prod(shape[:-1], dtype=np.int64)) * (shape[-1] // block) * size


def stream_tensors(writer, items: Iterable[tuple[str, Callable[[], np.ndarray], object]], phases: dict) -> None:
    """Write each (name, fetch, qtype) in order to a GGUFWriter whose tensor infos are already added.

    `fetch` gives the float32 numpy data; `phases` accumulates convert / quantize / write seconds
    (write: the time the main thread waited on the disk)."""
    for k in ("convert", "quantize", "write"):
        phases.setdefault(k, 0.0)
    with ThreadPoolExecutor(workers()) as pool, ThreadPoolExecutor(1) as disk:
        pending = None
        for _name, fetch, qt in items:
            t0 = time.monotonic()
            data = fetch()
            t1 = time.monotonic()
            rows = data.reshape(-1, data.shape[-1]) if data.ndim > 1 else data.reshape(1, -1)
            out = over_rows(encoder(qt), rows, pool)
            t2 = time.monotonic()
            if pending is not None:
                pending.result()
            t3 = time.monotonic()
            pending = disk.submit(writer.write_tensor_data, out)
            del data, rows, out
            phases["convert"] += t1 - t0
            phases["quantize"] += t2 - t1
            phases["write"] += t3 - t2
        t3 = time.monotonic()
        if pending is not None:
            pending.result()
        phases["write"] += time.monotonic() - t3


# --- reading back ------------------------------------------------------------------------------------------

_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
STRING, ARRAY = 8, 9


class Layout:
    """A GGUF file's key-values (arrays skipped) and tensor infos: (name, numpy shape, type, offset)."""

    def __init__(self, path: Path):
        with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as m:
            self._m, self._pos = m, 0
            if m[:4] != b"GGUF":
                raise ValueError(f"{path} is not a GGUF file")
            self._pos = 4
            self.version, n_tensors, n_kv = self._take("<I"), self._take("<Q"), self._take("<Q")
            self.kv = {}
            for _ in range(n_kv):
                key = self._string()
                self.kv[key] = self._value(self._take("<I"))
            self.tensors = []
            for _ in range(n_tensors):
                name = self._string()
                dims = [self._take("<Q") for _ in range(self._take("<I"))]
                qt, offset = self._take("<I"), self._take("<Q")
                self.tensors.append((name, tuple(reversed(dims)), qt, offset))
            align = int(self.kv.get("general.alignment") or 32)
            self.data_start = self._pos + (-self._pos) % align
            del self._m

    def _take(self, fmt: str):
        (v,) = struct.unpack_from(fmt, self._m, self._pos)
        self._pos += struct.calcsize(fmt)
        return v

    def _string(self) -> str:
        n = self._take("<Q")
        s = self._m[self._pos : self._pos + n]
        self._pos += n
        return s.decode("utf-8", errors="replace")

    def _value(self, vtype: int):
        if vtype == STRING:
            return self._string()
        if vtype == ARRAY:
            itype, n = self._take("<I"), self._take("<Q")
            if itype == STRING:
                for _ in range(n):
                    length = self._take("<Q")  # not `_pos += _take()`: that reads _pos before _take moves it
                    self._pos += length
            elif itype == ARRAY:
                for _ in range(n):
                    self._value(ARRAY)
            else:
                self._pos += n * struct.calcsize(_SCALARS[itype])
            return n  # the length only: the check needs no vocabulary
        return self._take(_SCALARS[vtype])


def read_tensors(path: Path, layout: Layout | None = None):
    """(name, float32 numpy array) for each tensor of the file, dequantized with the gguf library."""
    import gguf

    layout = layout or Layout(path)
    mm = np.memmap(path, dtype=np.uint8, mode="r")
    with ThreadPoolExecutor(workers()) as pool:
        for name, shape, qt_id, offset in layout.tensors:
            qt = gguf.GGMLQuantizationType(qt_id)
            start = layout.data_start + offset
            raw = mm[start : start + nbytes(shape, qt)]
            rows = raw.reshape(-1, nbytes((shape[-1],), qt))
            data: np.ndarray
            if qt == gguf.GGMLQuantizationType.F32:
                data = rows.view(np.float32)
            elif qt == gguf.GGMLQuantizationType.F16:
                data = over_rows(lambda r: r.view(np.float16).astype(np.float32), rows, pool)
            else:
                data = over_rows(functools.partial(gguf.quants.dequantize, qtype=qt), rows, pool)
            yield name, data.reshape(shape)
