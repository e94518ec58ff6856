"""`encode` over many records, in order, lazily: a tokenizer thread beside Python, or processes."""

from __future__ import annotations

import multiprocessing
import os
import sys
from collections import deque
from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np

from jobs.tokenize.chat import TemplateError
from jobs.tokenize.encoding import (
    OVERLONG,
    Encoded,
    Refused,
    _encode_chunk,
    _finish,
    _stage,
    _tokenize_staged,
)

_CHUNK = 256


def encode_many(
    tokenizer: Any, records: Iterable[dict], max_length: int, overlong: str, workers: int = 0,
    template_text: bool = False, refusals: bool = False,
) -> Iterator[Encoded | Refused | None]:
    """`encode` over many records, in order, lazily (memory stays bounded).

    workers=0 (the default, fastest on 2 cores): in this process; chunks of records are
    rendered and turned into masks in Python while the fast tokenizer's multi-threaded batch
    API, in a background thread without the GIL, tokenizes the chunk before.
    workers>=2: that many processes (fork where safe, else spawn), each single-threaded.
    A TemplateError carries the index of the record that failed. refusals=True: a record the chat
    template cannot train (a special token in its text, a role the template refuses) is a `Refused`
    in its place and the rest go on; an error about the whole template (no template and no EOS, no
    tool support) still raises.
    """
    if overlong not in OVERLONG:
        raise ValueError(f"overlong must be one of {OVERLONG}, not {overlong!r}")
    chunks = _chunks(records, _CHUNK)
    if workers >= 2:
        yield from _encode_pool(tokenizer, chunks, max_length, overlong, workers, template_text, refusals)
        return
    pending: deque = deque()
    base = 0
    with ThreadPoolExecutor(1, thread_name_prefix="tokenize") as pool:
        for chunk in chunks:
            try:
                staged = _stage(tokenizer, chunk, template_text, refusals)
            except TemplateError as exc:
                exc.index = base + (exc.index or 0)
                raise
            base += len(chunk)
            pending.append((staged, pool.submit(_tokenize_staged, tokenizer, staged)))
            if len(pending) >= 2:
                staged, fut = pending.popleft()
                yield from _finish(tokenizer, staged, fut.result(), max_length, overlong)
        while pending:
            staged, fut = pending.popleft()
            yield from _finish(tokenizer, staged, fut.result(), max_length, overlong)


def _chunks(records: Iterable[dict], size: int) -> Iterator[list[dict]]:
    chunk: list[dict] = []
    for r in records:
        chunk.append(r)
        if len(chunk) >= size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


# ------------------------------------------------------------ process pool

_POOL_TOKENIZER: Any = None


def _pool_init(tokenizer: Any) -> None:
    global _POOL_TOKENIZER
    if tokenizer is not None:
        _POOL_TOKENIZER = tokenizer


def _pool_work(args: tuple[list[dict], int, str, bool, bool]):
    records, max_length, overlong, template_text, refusals = args
    try:
        encs = _encode_chunk(_POOL_TOKENIZER, records, max_length, overlong, template_text, refusals)
    except TemplateError as exc:
        return ("error", exc)
    return ("ok", _pack(encs))


def _pack(encs: list[Encoded | Refused | None]):
    refused = {i: e for i, e in enumerate(encs) if isinstance(e, Refused)}
    plain: list[Encoded | None] = [None if isinstance(e, Refused) else e for e in encs]
    lens = np.array([-1 if e is None else len(e.input_ids) for e in plain], dtype=np.int64)
    full = np.array([0 if e is None else e.full_length for e in plain], dtype=np.int64)
    over = np.array([False if e is None else e.overlong for e in plain], dtype=bool)
    kept = [e for e in plain if e is not None]
    ids = np.fromiter((t for e in kept for t in e.input_ids), dtype=np.uint32)
    mask = np.fromiter((t for e in kept for t in e.mask), dtype=np.uint8)
    notes = {i: e.notes for i, e in enumerate(plain) if e is not None and e.notes}
    return lens, full, over, ids, mask, notes, refused


def _unpack(packed) -> list[Encoded | Refused | None]:
    lens, full, over, ids, mask, notes, refused = packed
    ids, mask = ids.tolist(), mask.tolist()
    out: list[Encoded | Refused | None] = []
    pos = 0
    for k, (n, f, o) in enumerate(zip(lens.tolist(), full.tolist(), over.tolist(), strict=True)):
        if n < 0:
            out.append(refused.get(k))
            continue
        out.append(Encoded(ids[pos : pos + n], mask[pos : pos + n], o, f, notes.get(k, ())))
        pos += n
    return out


def _encode_pool(tokenizer, chunks: Iterator[list[dict]], max_length: int, overlong: str, workers: int,
                 template_text: bool = False, refusals: bool = False):
    global _POOL_TOKENIZER
    fork = "fork" in multiprocessing.get_all_start_methods() and sys.platform != "darwin"
    ctx = multiprocessing.get_context("fork" if fork else "spawn")
    saved = os.environ.get("TOKENIZERS_PARALLELISM")
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # each process single-threaded; no fork warning
    try:
        _POOL_TOKENIZER = tokenizer if fork else None
        pool = ctx.Pool(workers, initializer=_pool_init, initargs=(None if fork else tokenizer,))
    finally:
        if saved is None:
            os.environ.pop("TOKENIZERS_PARALLELISM", None)
        else:
            os.environ["TOKENIZERS_PARALLELISM"] = saved
    try:
        pending: deque = deque()
        base = 0
        exhausted = False
        while True:
            while not exhausted and len(pending) < 2 * workers + 2:  # bounded: back-pressure
                chunk = next(chunks, None)
                if chunk is None:
                    exhausted = True
                    break
                pending.append((base, pool.apply_async(_pool_work, ((chunk, max_length, overlong, template_text, refusals),))))
                base += len(chunk)
            if not pending:
                break
            start, res = pending.popleft()
            kind, payload = res.get()
            if kind == "error":
                payload.index = start + (payload.index or 0)
                raise payload
            yield from _unpack(payload)
    finally:
        pool.terminate()
        _POOL_TOKENIZER = None
